"""Routes the daemon owns, and IPv6 under and inside the tunnels."""

import time

from lab import ipv6_host, transfer


def test_routes_come_with_the_tunnel_and_go_with_del_and_shutdown(pair):
    a, b = pair
    a.control("127.0.0.1", "-o", "del", "-n", "udp2")
    a.add_tunnel("udp2", "10.0.1.1", b, "--route", "192.168.2.0/24", "--route", "fd00:2::/64")
    assert "192.168.2.0/24 dev udp2" in a.routes()
    assert "fd00:2::/64 dev udp2" in a.routes("-6")
    assert a.tunnels()["udp2"]["routes"] == ["192.168.2.0/24", "fd00:2::/64"]
    assert "192.168.2.0/24,fd00:2::/64" in a.control("127.0.0.1", "-o", "list").stdout
    a.control("127.0.0.1", "-o", "del", "-n", "udp2")
    assert "192.168.2.0/24" not in a.routes() and "fd00:2::" not in a.routes("-6")
    a.add_tunnel("udp2", "10.0.1.1", b, "--route", "192.168.2.0/24")
    assert a.stop_daemon() == 0
    assert "192.168.2.0/24" not in a.routes()


def test_a_route_that_cannot_be_made_leaves_no_half_made_tunnel(pair):
    a, b = pair
    # The underlay's own network is routed already: the kernel refuses it twice.
    result = a.control("127.0.0.1", "-o", "add", "-n", "udp9", "-t", "10.0.9.1", "-r",
                       "198.18.0.9", "--route", "192.168.9.0/24", "--route", "198.18.0.0/24",
                       check=False)
    assert result.returncode == 1
    assert "cannot route 198.18.0.0/24 through udp9: (17, 'File exists')" in result.stdout
    assert not a.link_exists("udp9") and "udp9" not in a.tunnels()
    assert "192.168.9.0/24" not in a.routes()


def test_an_ipv6_underlay_carries_ipv4_and_ipv6_traffic(lab):
    a, b = ipv6_host(lab, "a", 1), ipv6_host(lab, "b", 2)
    a.start_daemon()
    b.start_daemon()
    # Added over IPv6, to the other host's daemon.
    a.control("-s", b.address6, "-o", "add", "-n", "udp1", "-t", "fd00:1::2/64", "-r",
              a.address6, "--route", "192.168.1.0/24", "-m", "1400")
    b.control("-s", a.address6, "-o", "add", "-n", "udp2", "-t", "fd00:1::1/64", "-r",
              b.address6, "--route", "192.168.2.0/24", "-m", "1400")
    assert a.tunnels()["udp2"]["remoteServer"] == "2001:2::2"
    assert a.ping("fd00:1::2") and b.ping("fd00:1::1")
    assert a.ping(b.lan, source=a.lan, size=1400 - 28)
    for address in ("fd00:1::2", b.lan):
        sent, received = transfer(a, b, address, 8 << 20)
        assert received == sent
    sent, received = transfer(b, a, "fd00:1::1", 8 << 20)
    assert received == sent


def test_an_ipv6_tunnel_needs_an_mtu_ipv6_can_use(pair):
    a, _ = pair
    result = a.control("127.0.0.1", "-o", "add", "-n", "udp6", "-t", "fd00:6::1/64", "-r",
                       "198.18.0.6", "-m", "1200", check=False)
    assert "mtu 1200 is too small for IPv6 (at least 1280)" in result.stdout


def test_an_ipv4_tunnel_sends_nothing_of_its_own_and_carries_routed_ipv6(pair):
    """No IPv6 link-local address on an IPv4 tunnel's device: its kernel sends no router
    solicitations (each one a handshake for an encrypted tunnel), yet IPv6 routed through
    it crosses."""
    a, b = pair
    time.sleep(6)  # the kernel solicits a router at about 0.5 and 4.4 s after the device is up
    for host, tunnel in ((a, "udp2"), (b, "udp1")):
        assert "inet6" not in host.run("ip", "-6", "addr", "show", "dev", tunnel).stdout
        listed = host.tunnels()[tunnel]
        assert listed["tx_packets"] == listed["rx_packets"] == 0
    a.ip("addr", "add", "fd00:1::1/64", "dev", "lan0", "nodad")
    b.ip("addr", "add", "fd00:2::1/64", "dev", "lan0", "nodad")
    for host, tunnel, peer in ((a, "udp2", b), (b, "udp1", a)):
        host.control("127.0.0.1", "-o", "del", "-n", tunnel)
        host.add_tunnel(tunnel, "10.0.1.%d" % (1 if host is a else 2), peer, "--route",
                        "fd00:%d::/64" % (2 if host is a else 1))
    assert a.ping("fd00:2::1", source="fd00:1::1")
