"""The mesh as users build it: real daemons in namespaces, real packets."""

import pytest

from lab import build_mesh, transfer, tunnel_pair, wait_until

MEGABYTES = 8 << 20


def test_three_host_mesh_every_lan_reaches_every_other(lab):
    hosts = build_mesh(lab)
    for host in hosts:
        for other in hosts:
            if other is not host:
                assert host.ping(other.lan, source=host.lan), \
                    "%s LAN cannot reach %s LAN" % (host.name, other.name)


def test_tcp_between_lans_arrives_intact(lab):
    one, two, _ = build_mesh(lab)
    sent, received = transfer(one, two, two.lan, MEGABYTES)
    assert received == sent


@pytest.mark.parametrize("mtu", [1500, 1400, 9000])
def test_full_size_packets_cross_both_ways(lab, mtu):
    a, b = tunnel_pair(lab, mtu)
    # An IP packet of exactly the tunnel MTU: 28 bytes of IPv4 and ICMP headers plus the payload.
    assert a.ping("10.0.1.2", size=mtu - 28)
    assert b.ping("10.0.1.1", size=mtu - 28)
    sent, received = transfer(a, b, "10.0.1.2", MEGABYTES)
    assert received == sent
    sent, received = transfer(b, a, "10.0.1.1", MEGABYTES)
    assert received == sent
    assert not a.tunnels()["udp2"]["drops"]
    assert not b.tunnels()["udp1"]["drops"]


def test_list_counts_what_crossed(pair):
    a, b = pair
    assert a.ping("10.0.1.2", count=3)
    wait_until(lambda: b.tunnels()["udp1"]["tx_packets"] >= 3, "b counts the replies it sent")
    udp2 = a.tunnels()["udp2"]
    assert udp2["tx_packets"] >= 3 and udp2["rx_packets"] >= 3
    # Each datagram is the 4-byte packet information header and an 84-byte ping.
    assert udp2["tx_bytes"] >= 3 * 88
    assert udp2["last_rx"] is not None
    # As it was added: the peer's data port is this daemon's (5000), so none is named.
    assert udp2["remoteServer"] == b.address and "remotePort" not in udp2
    table = a.control("127.0.0.1", "-o", "list").stdout
    assert "udp2" in table and "10.0.1.1/30" in table and b.address + ":5000" in table
