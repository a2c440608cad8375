"""The 2015 README's three-host mesh, built for real in network namespaces.

Starts the real daemon, locked with a shared secret and with a WireGuard key of
its own (made by --generate-key), on three test hosts; one command of the real
control script on a management host builds the whole encrypted mesh from a mesh
file (six tunnels, and the routes, which the daemons install); then it pings
every LAN from every other, prints what it did and a result table, applies the
file again to show nothing changes, shows every tunnel's state with --status,
and tears it all down. Run as root: make demo.
"""

import json
import os
import re
import signal
import sys

import lab as lablib

RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def say(line=""):
    print(line, flush=True)


def ping_rtt(host, other):
    """The average RTT in ms from host's LAN to other's LAN, or None when unanswered."""
    result = host.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "3",
                      "-I", host.lan, other.lan, check=False)
    match = RTT.search(result.stdout)
    return float(match.group(1)) if result.returncode == 0 and match else None


def make_key(lab, host):
    """Host's WireGuard key file, made by the daemon, which prints the public key."""
    path = os.path.join(lab.workdir, host.name + ".key")
    argv = ("udpProxyServer.py", "--public-key", "--key-file", path, "--generate-key")
    public = host.run(sys.executable, lab.script(argv[0]), *argv[1:]).stdout.strip()
    say("  %s# %s\n  %s" % (host.name, " ".join(argv), public))
    return path


def main():
    if not lablib.is_root():
        say("demo: must run as root (it creates network namespaces): sudo make demo")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # tear down on kill as on ^C
    lab = lablib.Lab(log=lambda line: say("  " + line), show_logs=False)
    try:
        say("udpProxyServer demo: three hosts in network namespaces %s-*" % lab.prefix)
        say("Hosts on an underlay switch (198.18.0.0/24), each with a LAN on a local bridge,")
        say("each making its WireGuard key and running the daemon with it and a shared secret:")
        secret = lablib.write_secret(lab)
        hosts = [lab.host(name, index) for name, index in lablib.MESH_HOSTS]
        for host in hosts:
            host.start_daemon("--secret-file", secret, "--key-file", make_key(lab, host))
        mesh = os.path.join(lab.workdir, "mesh.json")
        entries = ",\n".join("    " + json.dumps({"name": h.name, "address": h.address,
                                                    "lan": [h.lan.rsplit(".", 1)[0] + ".0/24"]})
                               for h in hosts)
        with open(mesh, "w") as f:
            f.write('{\n  "controlPort": 5001, "encrypt": true, "tunnelNet": "10.0.0.0/24",\n'
                    '  "hosts": [\n%s\n  ]\n}\n' % entries)
        say()
        say("The mesh file, %s:" % mesh)
        with open(mesh) as f:
            say("  " + f.read().replace("\n", "\n  "))
        say()
        say("One command on minion-1 builds the whole mesh, encrypted (each daemon gives its")
        say("public key), routes included:")
        say(hosts[0].control("--mesh", mesh, "--secret-file", secret).stdout.rstrip())
        say()
        say("Ping from every LAN to every other (average RTT of 3 pings):")
        labels = ["%s (%s)" % (h.name, h.lan) for h in hosts]
        first = max(len(label) for label in labels) + 2
        say("  " + "from \\ to".ljust(first) + "".join(h.name.ljust(14) for h in hosts))
        failures = 0
        for host, label in zip(hosts, labels):
            cells = []
            for other in hosts:
                if other is host:
                    cells.append("-")
                    continue
                rtt = ping_rtt(host, other)
                failures += rtt is None
                cells.append("FAILED" if rtt is None else "ok %.2f ms" % rtt)
            say("  " + label.ljust(first) + "".join(cell.ljust(14) for cell in cells))
        say()
        say("The same command again changes nothing:")
        say(hosts[0].control("--mesh", mesh, "--secret-file", secret).stdout.rstrip())
        say()
        say("Tunnels of minion-1, as udpProxyServerControl.py -o list shows them:")
        say(hosts[0].control("-s", hosts[0].address, "--secret-file", secret,
                             "-o", "list").stdout.rstrip())
        say()
        say("Requests without the secret are refused with the reason, on the host itself")
        say("and from another host (in a reply no larger than the request):")
        for host, server in ((hosts[0], "127.0.0.1"), (hosts[2], hosts[0].address)):
            result = host.control("-s", server, "-o", "del", "-n", "m-minion-2", check=False)
            say((result.stdout + result.stderr).rstrip() + "  (exit %d)" % result.returncode)
        say()
        say("The state of every tunnel end, as the daemons list it (--status changes nothing):")
        status = hosts[0].control("--mesh", mesh, "--secret-file", secret, "--status", check=False)
        say((status.stdout + status.stderr).rstrip())
        say()
        pairs = len(hosts) * (len(hosts) - 1)
        if failures or status.returncode:
            lab.show_logs = True
        if failures:
            say("%d of %d LAN pairs unreachable." % (failures, pairs))
        else:
            say("All %d LAN pairs reachable." % pairs)
        return 1 if failures or status.returncode else 0
    finally:
        say("Tearing down: daemons stopped, namespaces %s-* deleted." % lab.prefix)
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
