"""TCP through a tunnel between two daemons at every MTU a user may give it."""

import pytest

from lab import transfer, tunnel_pair

MEGABYTES = 8 << 20
# 68 is the smallest MTU IPv4 allows. TCP sends no segment under 88 bytes (20 of IPv4, 32
# of TCP with timestamps, 36 of data: tcp_min_snd_mss is 48 at the least), so under MTU 88
# the kernel carries TCP in IP fragments and hands the daemon no super-packets. At 88 it
# hands over 64 KB cut into 36-byte segments, the most segments of any MTU, and up to
# MTU 501 more than the daemon's shared buffer holds at once. 9000: jumbo frames.
MTUS = [68, 88, 300, 576, 1280, 1400, 1500, 9000]


@pytest.mark.parametrize("mtu", MTUS)
def test_tcp_crosses_intact_at_any_mtu(lab, mtu):
    a, b = tunnel_pair(lab, mtu)
    # An IP packet of exactly the tunnel MTU: 28 bytes of IPv4 and ICMP headers plus the payload.
    assert a.ping("10.0.1.2", size=mtu - 28) and b.ping("10.0.1.1", size=mtu - 28)
    sent, received = transfer(a, b, "10.0.1.2", MEGABYTES)
    assert received == sent
    assert not a.tunnels()["udp2"]["drops"] and not b.tunnels()["udp1"]["drops"]
    # TCP sends again what a daemon lost, so the bytes arrive even then: what the daemons
    # logged shows whether they lost any.
    for host in (a, b):
        with open(host.daemon.log_path) as log:
            errors = [line for line in log if " ERROR " in line]
        assert not errors, "%s's daemon: %s" % (host.name, "".join(errors[:3]))
