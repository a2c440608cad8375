"""Remote checksum offload between two new daemons, on real devices: partial checksums
on the wire, finished by the receiving host's kernel, also for a flow it routes on; and
back to full checksums the moment the peer stops taking partial ones."""

import os
import shutil
import subprocess
import sys

from conftest import cannot_run
from lab import HELPERS, Host, meanwhile, sh, transfer, wait_until

MEGABYTES = 64 << 20
# Host c sits behind host b on a LAN of its own, reached from a through the tunnel.
LAN_C = ("192.168.50.1", "192.168.50.2")
TRANSFER_PORT = 7000


def host_behind(lab, b):
    """Host c, on a veth from b whose transmit checksum offload is off: b's kernel must
    finish in software every sum it forwards to c."""
    if shutil.which("ethtool") is None:
        cannot_run("needs ethtool (make test installs it)")
    c = Host(lab, "c", lab.namespace("c"), LAN_C[1])
    sh("ip", "-n", b.ns, "link", "add", "lanc", "type", "veth", "peer", "name", "eth0",
       "netns", c.ns)
    b.run("ethtool", "-K", "lanc", "tx", "off")
    b.ip("addr", "add", LAN_C[0] + "/24", "dev", "lanc")
    b.ip("link", "set", "lanc", "up")
    c.ip("addr", "add", LAN_C[1] + "/24", "dev", "eth0")
    c.ip("link", "set", "eth0", "up")
    c.ip("route", "add", "default", "via", LAN_C[0])
    b.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    return c


def test_new_daemons_send_partial_checksums_and_a_routed_flow_leaves_with_valid_ones(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon()
    b.start_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b, "-m", "1400", "--route", "192.168.50.0/24")
    b.add_tunnel("udp1", "10.0.1.2", a, "-m", "1400")
    c = host_behind(lab, b)
    assert a.ping(LAN_C[1])
    capture = subprocess.Popen(
        ["ip", "netns", "exec", c.ns, sys.executable, os.path.join(HELPERS, "checksums.py"),
         "eth0", LAN_C[1], str(TRANSFER_PORT), "120"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout.readline().strip() == "capturing"
        sent, received = transfer(a, c, LAN_C[1], MEGABYTES, TRANSFER_PORT)
        out, _ = capture.communicate("done\n", timeout=30)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    assert received == sent
    good, bad = map(int, out.split())
    # Thousands of data segments checked on arrival (the capture may miss some in a burst).
    assert bad == 0 and good > 1000
    for host, name in ((a, "udp2"), (b, "udp1")):
        tunnel = host.tunnels()[name]
        assert (tunnel["peerOffload"], tunnel["checksums"]) == (True, "partial"), tunnel
        assert not tunnel["drops"], tunnel


def test_a_peer_restarted_without_offloads_mid_transfer_gets_full_checksums(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    state = os.path.join(lab.workdir, "b-tunnels.json")
    a.start_daemon()
    b.start_daemon("--state-file", state)
    a.add_tunnel("udp2", "10.0.1.1", b, "-m", "1400")
    b.add_tunnel("udp1", "10.0.1.2", a, "-m", "1400")
    assert a.ping("10.0.1.2")
    with meanwhile(lambda: transfer(a, b, "10.0.1.2", MEGABYTES)) as results:
        wait_until(lambda: a.tunnels()["udp2"]["superPackets"] == "chunks",
                   "partial checksums and super-packets in chunks while b is new")
        wait_until(lambda: a.tunnels()["udp2"]["tx_bytes"] > MEGABYTES // 4, "a quarter sent")
        b.stop_daemon()
        b.start_daemon("--no-offload", "--state-file", state)
    assert results and results[0][1] == results[0][0]
    assert a.ping("10.0.1.2")  # a hears from b as it is now, should the transfer have ended first
    tunnel = a.tunnels()["udp2"]
    assert (tunnel["peerOffload"], tunnel["checksums"], tunnel["superPackets"]) == (
        False, "full", "segments"), tunnel
    assert b.tunnels()["udp1"]["checksums"] == "full"
    assert "bad_partial" not in b.tunnels()["udp1"]["drops"]
