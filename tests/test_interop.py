"""Interop with the 2015 wire format: socat's TUN mode without iff-no-pi speaks it."""

import shutil

import pytest

from lab import transfer, wait_until

MEGABYTES = 4 << 20


@pytest.fixture
def socat_peer(lab):
    """Host a runs our daemon; host b runs socat, a peer that knows nothing of ours."""
    if shutil.which("socat") is None:
        pytest.skip("needs socat (make test installs it)")
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b)
    lab.spawn(b.ns, ["socat", "-b", "65536",
                     "UDP:%s:5000,sourceport=5000" % a.address,
                     "TUN:10.0.1.2/30,tun-name=udp1,tun-type=tun,iff-up"], "b-socat.log")
    wait_until(lambda: b.link_exists("udp1"), "socat's TUN device is up")
    return a, b


def test_ping_and_full_size_packets_with_socat(socat_peer):
    a, b = socat_peer
    assert a.ping("10.0.1.2")
    assert b.ping("10.0.1.1", size=1500 - 28)
    assert a.ping("10.0.1.2", size=1500 - 28)


def test_tcp_both_ways_with_socat(socat_peer):
    a, b = socat_peer
    sent, received = transfer(a, b, "10.0.1.2", MEGABYTES)
    assert received == sent
    sent, received = transfer(b, a, "10.0.1.1", MEGABYTES)
    assert received == sent
