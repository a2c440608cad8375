"""The tunnels compared: each builds the same point-to-point link on a Pair.

A starter gets a Pair, makes 10.0.1.1/30 on a reach 10.0.1.2/30 on b through
its tunnel at MTU 1400, and returns the processes that carry the packets, whose
CPU time the bench counts (none for the kernel's VXLAN).
"""

import os
import re
import subprocess

from pair import lablib

TUNNEL_MTU = 1400
# The daemon's data port, which socat reuses so both speak on the same port.
DATA_PORT = 5000
FASTD_PORT = 10000
VXLAN_ID = 42
# IANA's VXLAN port.
VXLAN_PORT = 4789
# Where the command stands in a Lab process's argv, after "ip netns exec NS".
COMMAND = 4
FASTD_KEY = re.compile(r"^(Secret|Public): ([0-9a-f]{64})$", re.M)


class Skipped(Exception):
    """This tunnel cannot be measured here; the text says why."""


def start_daemon(pair, *flags):
    """Our daemon on both hosts, each tunnel added with the control script, as a user would."""
    for host in pair.hosts():
        try:
            host.start_daemon(*flags)
        except AssertionError as e:
            if flags:
                raise Skipped("the daemon refused %s: %s" % (" ".join(flags), last_line(e))) from None
            raise
    for host in pair.hosts():
        host.add_tunnel("udp0", host.tunnel_address, pair.peer(host), "-m", str(TUNNEL_MTU))
    return [host.daemon for host in pair.hosts()]


def start_udpproxy(pair):
    return start_daemon(pair)


def start_udpproxy_no_offload(pair):
    return start_daemon(pair, "--no-offload")


def start_fastd(pair):
    """fastd with its null method: no cipher, so only the forwarding is compared."""
    keys = {host.name: generate_fastd_key() for host in pair.hosts()}
    processes = []
    for host in pair.hosts():
        peer = pair.peer(host)
        config = os.path.join(pair.lab.workdir, "fastd-%s.conf" % host.name)
        with open(config, "w") as f:
            f.write(fastd_config(host, peer, keys[host.name][0], keys[peer.name][1]))
        processes.append(pair.lab.spawn(host.ns, ["fastd", "--config", config],
                                        "%s-fastd.log" % host.name))
    for host in pair.hosts():
        wait_for_device(host, "fastd0", processes)
    pair.address_tunnel("fastd0")
    return processes


def generate_fastd_key():
    """(secret, public) from fastd --generate-key."""
    out = subprocess.run(["fastd", "--generate-key"], capture_output=True, text=True,
                         check=True, timeout=lablib.PATIENCE).stdout
    found = dict(FASTD_KEY.findall(out))
    return found["Secret"], found["Public"]


def fastd_config(host, peer, secret, peer_public):
    # No "user" line: fastd stays root, as every other tunnel of the bench does.
    return "\n".join((
        'log level warn;',
        'mode tun;',
        'interface "fastd0";',
        'mtu %d;' % TUNNEL_MTU,
        'method "null";',
        'secret "%s";' % secret,
        'bind %s:%d;' % (host.address, FASTD_PORT),
        'peer "%s" {' % peer.name,
        '  key "%s";' % peer_public,
        '  remote %s port %d;' % (peer.address, FASTD_PORT),
        '}',
        '',
    ))


def start_socat(pair):
    """socat's TUN mode: one read, one write per packet, the simplest userspace tunnel."""
    processes = []
    for host in pair.hosts():
        argv = ["socat", "-b", "65536",
                "UDP:%s:%d,sourceport=%d" % (pair.peer(host).address, DATA_PORT, DATA_PORT),
                "TUN:%s/30,tun-name=tun0,tun-type=tun,iff-up" % host.tunnel_address]
        processes.append(pair.lab.spawn(host.ns, argv, "%s-socat.log" % host.name))
    for host in pair.hosts():
        wait_for_device(host, "tun0", processes)
        host.ip("link", "set", "tun0", "mtu", str(TUNNEL_MTU))
    return processes


def start_vxlan(pair):
    """The kernel's VXLAN: no process at all, the bound on what a tunnel can do here."""
    for host in pair.hosts():
        host.ip("link", "add", "vx0", "mtu", str(TUNNEL_MTU), "type", "vxlan", "id", str(VXLAN_ID),
                "local", host.address, "remote", pair.peer(host).address,
                "dstport", str(VXLAN_PORT), "dev", "eth0")
    pair.address_tunnel("vx0")
    return []


def wait_for_device(host, device, processes):
    def ready():
        for proc in processes:
            if proc.poll() is not None:
                with open(proc.log_path, errors="replace") as log:
                    raise AssertionError("%s exited %d: %s"
                                         % (proc.args[COMMAND], proc.returncode, log.read()[-2000:]))
        return host.link_exists(device)
    lablib.wait_until(ready, "%s on %s" % (device, host.name))


def last_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else str(error)


OURS = "udpProxyServer"
# Row label and starter, in the order of the table.
KINDS = (
    (OURS, start_udpproxy),
    ("udpProxyServer --no-offload", start_udpproxy_no_offload),
    ("fastd (null)", start_fastd),
    ("socat TUN", start_socat),
    ("VXLAN (kernel)", start_vxlan),
)
