"""Restarts, crashes and upgrades as an operator lives them, real daemons in namespaces: with
a state file (the service), a tunnel's device and routes outlive its daemon, so what is
routed into it meanwhile is dropped, never sent elsewhere in clear; and what the daemon
keeps is its own."""

import json
import os
import signal
import sys

from prometheus_client.parser import text_string_to_metric_families

from lab import HELPERS, Pinger, Systemd, key_file, wait_until, write_secret


def watch(lab, host, marker, seconds=60):
    """Count, on host's underlay device, the packets that carry marker."""
    proc = lab.spawn(host.ns, [sys.executable, os.path.join(HELPERS, "devwatch.py"), "eth0",
                               str(seconds), marker], "%s-watch-%s.log" % (host.name, marker))
    wait_until(lambda: "watching" in open(proc.log_path).read(), "the capture on %s" % host.name)

    def stop():
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        return json.loads(open(proc.log_path).read().split("\n")[1])[marker]
    return stop


def test_restarts_and_crashes_send_nothing_in_clear_and_traffic_comes_back(lab):
    """Host a reaches b's LAN through a plain tunnel and c's through an encrypted one; g is
    a's default gateway and counts what reaches it for either LAN while a's daemon is
    restarted (SIGTERM, then start) and crashes (SIGKILL, then start)."""
    a, b, c, g = (lab.host(name, index) for name, index in (("a", 1), ("b", 2), ("c", 3),
                                                             ("g", 4)))
    a.ip("route", "add", "default", "via", g.address)
    secret = write_secret(lab)
    keys = {host.name: key_file(lab, host) for host in (a, c)}
    state = os.path.join(lab.workdir, "a-tunnels.json")
    service = ("--secret-file", secret, "--state-file", state, "--key-file", keys["a"][0])
    systemd = Systemd(lab)
    a.start_daemon(*service, env=systemd.env())
    b.start_daemon("--secret-file", secret)
    c.start_daemon("--secret-file", secret, "--key-file", keys["c"][0])
    locked = ("--secret-file", secret)
    # Each end added from the management host, g, as the README does.
    g.control("-s", a.address, *locked, "-n", "udp2", "-t", "10.0.1.1", "-r", b.address,
              "--route", "192.168.2.0/24")
    g.control("-s", b.address, *locked, "-n", "udp1", "-t", "10.0.1.2", "-r", a.address,
              "--route", "192.168.1.0/24")
    g.control("-s", a.address, *locked, "-n", "wg3", "-t", "10.0.3.1", "-r", c.address,
              "--peer-key", keys["c"][1], "--route", "192.168.3.0/24")
    g.control("-s", c.address, *locked, "-n", "wg1", "-t", "10.0.3.2", "-r", a.address,
              "--peer-key", keys["a"][1], "--route", "192.168.1.0/24")
    leaks = {lan: watch(lab, g, marker) for lan, marker in (("b", "PLAINLAN"), ("c", "CRYPTLAN"))}
    pings = {"b": Pinger(lab, a, b.lan, "PLAINLAN", source=a.lan),
             "c": Pinger(lab, a, c.lan, "CRYPTLAN", source=a.lan)}
    wait_until(lambda: a.tunnels(secret=secret)["wg3"]["rx_packets"] > 10, "pings through")

    readies = []
    for signum in (signal.SIGTERM, signal.SIGKILL):
        a.stop_daemon(signum)
        assert a.link_exists("udp2") and a.link_exists("wg3")  # kept, and dropping
        assert "192.168.2.0/24 dev udp2" in a.routes()
        a.start_daemon(*service, env=systemd.env(), wait=False)
        readies.append(systemd.wait_for("READY=1"))
        # Ready: it answers, with every tunnel, on the devices it had.
        a.wait_for_daemon(a.daemon)
        assert set(a.tunnels(secret=secret)) == {"udp2", "wg3"}
        wait_until(lambda: a.tunnels(secret=secret)["wg3"]["rx_packets"] > 10,
                   "pings through the encrypted tunnel again")

    replies = {lan: ping.stop() for lan, ping in pings.items()}
    assert {lan: stop() for lan, stop in leaks.items()} == {"b": 0, "c": 0}
    for lan, times in replies.items():
        for ready in readies:
            back = [t for t in times if t >= ready]
            assert back, "no reply from %s's LAN after the daemon was ready again" % lan
            print("%s's LAN: traffic back %.3f s after the daemon was ready" % (lan, back[0] - ready))
    # Each route stayed, as the daemon added it, once.
    assert a.routes().count("192.168.2.0/24 dev udp2 proto 87") == 1


def test_kept_devices_are_the_state_file_s_and_only_those(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    state = os.path.join(lab.workdir, "tunnels.json")
    metrics = os.path.join(lab.workdir, "udpproxy.prom")
    a.start_daemon("--state-file", state, "--metrics-file", metrics, "--metrics-interval", "0.2")
    b.start_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b, "--route", "192.168.2.0/24")
    a.add_tunnel("udp3", "10.0.1.5", "198.18.0.3")
    b.add_tunnel("udp1", "10.0.1.2", a)
    assert a.ping("10.0.1.2")

    # A TUN device of the same name made by someone else is not taken over, and stays
    # as it was.
    a.run("ip", "tuntap", "add", "dev", "udp4", "mode", "tun")
    out = a.control("127.0.0.1", "-n", "udp4", "-t", "10.0.1.9", "-r", "198.18.0.5",
                    check=False).stdout
    assert "a device named 'udp4' already exists" in out
    # One daemon a state file: a second one is refused at start-up.
    first = a.daemon
    second = a.start_daemon("--state-file", state, "-dp", "6000", "-cp", "6001", wait=False)
    a.daemon = first
    assert second.wait(20) == 1
    assert "is in use by another udpProxyServer (pid %d)" % first.pid in open(
        second.log_path).read()
    # --remove-all too, while the daemon runs.
    remove_all = (sys.executable, lab.script("udpProxyServer.py"), "--remove-all",
                  "--state-file", state)
    assert a.run(*remove_all, check=False).returncode == 1

    # The metrics file, as node_exporter's textfile collector reads it.
    def received():
        with open(metrics) as f:
            families = {family.name: family for family in text_string_to_metric_families(f.read())}
        return {sample.labels["tunnel"]: sample.value
                for sample in families["udpproxy_tunnel_receive_bytes"].samples}
    wait_until(lambda: "udp3" in received(), "the metrics file written again")
    assert received()["udp2"] > 0 and received()["udp3"] == 0

    assert a.stop_daemon() == 0
    # Its tunnel taken out of the state file while the daemon is down: the device goes at
    # the next start; the others are taken up again, their routes once each.
    with open(state) as f:
        saved = json.load(f)
    saved["tunnels"] = [entry for entry in saved["tunnels"] if entry["name"] != "udp3"]
    with open(state, "w") as f:
        json.dump(saved, f)
    a.start_daemon("--state-file", state)
    assert not a.link_exists("udp3") and a.link_exists("udp4")
    assert set(a.tunnels()) == {"udp2"} and a.ping("10.0.1.2")
    assert a.routes().count("192.168.2.0/24 dev udp2 proto 87") == 1
    assert "alias udpProxyServer %s" % state in a.run("ip", "-d", "link", "show", "udp2").stdout

    # Removed for good: the devices kept for the state file, once no daemon runs with it.
    assert a.stop_daemon() == 0
    result = a.run(*remove_all)
    assert "1 kept devices deleted, 1 tunnels taken out of %s" % state in result.stdout
    assert not a.link_exists("udp2") and a.link_exists("udp4")
    assert "192.168.2.0/24" not in a.routes()
    with open(state) as f:
        assert json.load(f)["tunnels"] == []

    # Without a state file the devices go with the daemon, however it ends, as in 2015.
    a.start_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b)
    a.stop_daemon(signal.SIGKILL)
    wait_until(lambda: not a.link_exists("udp2"), "the device gone with its daemon")
