"""Interop on the 2015 wire format: with socat's TUN mode without iff-no-pi, which
speaks it, and between daemons with and without offloads."""

import shutil

import pytest

from conftest import cannot_run
from lab import meanwhile, transfer, wait_until

MEGABYTES = 64 << 20
MODES = {"offload": (), "no-offload": ("--no-offload",)}


@pytest.fixture(params=sorted(MODES))
def socat_peer(lab, request):
    """Host a runs our daemon; host b runs socat, a peer that knows nothing of ours."""
    if shutil.which("socat") is None:
        cannot_run("needs socat (make test installs it)")
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon(*MODES[request.param])
    a.add_tunnel("udp2", "10.0.1.1", b, "-m", "1400")
    lab.spawn(b.ns, ["socat", "-b", "65536",
                     "UDP:%s:5000,sourceport=5000" % a.address,
                     "TUN:10.0.1.2/30,tun-name=udp1,tun-type=tun,iff-up"], "b-socat.log")
    wait_until(lambda: b.link_exists("udp1"), "socat's TUN device is up")
    b.run("ip", "link", "set", "udp1", "mtu", "1400")
    return a, b


def test_ping_and_full_size_packets_with_socat(socat_peer):
    a, b = socat_peer
    assert a.ping("10.0.1.2")
    assert b.ping("10.0.1.1", size=1400 - 28)
    assert a.ping("10.0.1.2", size=1400 - 28)


def test_tcp_both_ways_with_socat(socat_peer):
    a, b = socat_peer
    sent, received = transfer(a, b, "10.0.1.2", MEGABYTES)
    assert received == sent
    sent, received = transfer(b, a, "10.0.1.1", MEGABYTES)
    assert received == sent
    # socat's datagrams never say it takes partial checksums: it gets full ones throughout.
    tunnel = a.tunnels()["udp2"]
    assert (tunnel["peerOffload"], tunnel["checksums"]) == (False, "full")


# 1401: an odd MTU makes an odd MSS, whose segments the offload daemon must sum right
# itself (a peer without offloads writes them as they came, and the kernel checks them).
@pytest.mark.parametrize("mtu", [1400, 1401, 1500])
def test_offload_and_no_offload_daemons_carry_tcp_both_ways(lab, mtu):
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon()
    b.start_daemon("--no-offload")
    a.add_tunnel("udp2", "10.0.1.1", b, "-m", str(mtu))
    b.add_tunnel("udp1", "10.0.1.2", a, "-m", str(mtu))
    assert a.ping("10.0.1.2", size=mtu - 28) and b.ping("10.0.1.1", size=mtu - 28)
    for sender, receiver, address in ((a, b, "10.0.1.2"), (b, a, "10.0.1.1")):
        sent, received = transfer(sender, receiver, address, MEGABYTES)
        assert received == sent
    assert not a.tunnels()["udp2"]["drops"] and not b.tunnels()["udp1"]["drops"]
    # The new daemon with offloads is told by every datagram of the other to send full sums.
    assert [a.tunnels()["udp2"][field] for field in ("peerOffload", "checksums")] == [False, "full"]
    assert [b.tunnels()["udp1"][field] for field in ("peerOffload", "checksums")] == [True, "full"]


def test_control_is_answered_while_the_data_path_is_saturated(pair):
    a, b = pair
    with meanwhile(lambda: transfer(a, b, "10.0.1.2", 8 * MEGABYTES)) as results:
        wait_until(lambda: a.tunnels()["udp2"]["tx_bytes"] > MEGABYTES, "the transfer is under way")
        for _ in range(5):
            assert a.control("127.0.0.1", "-o", "list", "--timeout", "10").returncode == 0
            assert b.control("127.0.0.1", "-o", "list", "--timeout", "10").returncode == 0
    (sent, received), = results
    assert received == sent
