"""Faults and floods, bounded, against real daemons: they stay up and the tunnels keep working."""

import os
import subprocess
import sys

from lab import HELPERS, meanwhile, transfer, wait_until

BARRAGE = os.path.join(HELPERS, "barrage.py")
DATAGRAMS = 100000
MEGABYTES = 32 << 20


def barrage(host, mode, target, port, seed):
    """Send DATAGRAMS random and malformed datagrams from host; return (sent, seconds)."""
    out = host.run(sys.executable, BARRAGE, mode, target, str(port), str(DATAGRAMS), str(seed),
                   timeout=300).stdout.split()
    return int(out[0]), float(out[1])


def shape(host):
    return {n: (t["tunnelIP"], t["remoteServer"], t["mtu"]) for n, t in host.tunnels().items()}


def test_a_control_barrage_during_a_transfer_harms_nothing(lab, pair, figures):
    a, b = pair
    c = lab.host("c", 3)
    before = shape(a)
    with meanwhile(lambda: transfer(a, b, "10.0.1.2", MEGABYTES)) as results:
        sent, seconds = barrage(c, "control", a.address, 5001, seed=1)
        # From loopback, trusted: every reply but the rate limit's.
        local_sent, _ = barrage(a, "control", "127.0.0.1", 5001, seed=2)
    (sent_bytes, sent_sum), (got_bytes, got_sum) = results[0]
    assert (got_bytes, got_sum) == (sent_bytes, sent_sum) == (MEGABYTES, sent_sum)
    assert a.daemon.poll() is None
    assert shape(a) == before
    assert a.ping("10.0.1.2")
    counts = a.request({"op": "list"})["control"]
    figures("%d datagrams from another host in %.1f s and %d from loopback, during a %d MB"
            " transfer (checksum intact); the daemon read and parsed %d, refused %d, withheld %d"
            " replies larger than their request, held back %d over the rate limit; tunnels"
            " unchanged"
            % (sent, seconds, local_sent, MEGABYTES >> 20, counts.get("requests", 0),
               counts.get("refused", 0), counts.get("withheld", 0),
               counts.get("rate_limited", 0)))


def kernel_drops(host, port):
    """Datagrams the kernel dropped for the socket on port (its receive buffer was full)."""
    for table in ("/proc/net/udp6", "/proc/net/udp"):
        for line in host.run("cat", table).stdout.splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[-1])
    raise AssertionError("no UDP socket on port %d" % port)


def test_floods_at_the_data_port_are_counted_and_the_tunnel_works(lab, pair, figures):
    a, b = pair
    c = lab.host("c", 3)

    def counted():
        listed = a.request({"op": "list"})
        udp2 = listed["tunnels"][0]
        return (listed["drops"].get("unknown_source", 0), kernel_drops(a, 5000),
                udp2["rx_packets"] + sum(udp2["drops"].values()), udp2)

    unknown, _ = barrage(c, "data", a.address, 5000, seed=3)
    # Every datagram is counted once: by the daemon as from an unknown source, or by the
    # kernel as dropped before the daemon could read it.
    wait_until(lambda: sum(counted()[:2]) == unknown, "every datagram of the unknown host counted")
    from_unknown, dropped_before, taken_before, _ = counted()
    garbage, _ = barrage(b, "data", a.address, 5000, seed=4)
    # From the peer: written to the device, or dropped by the tunnel under one reason, or by
    # the kernel; and none of it counted as from an unknown source.
    wait_until(lambda: counted()[1] - dropped_before + counted()[2] - taken_before == garbage,
               "every datagram of the peer counted once")
    assert counted()[0] == from_unknown
    _, dropped, _, udp2 = counted()
    assert "internal_error" not in udp2["drops"]  # super-packet chunks among them
    assert a.daemon.poll() is None
    assert a.ping("10.0.1.2")
    figures("%d datagrams from an unknown host: %d counted as unknown_source, %d dropped by the"
            " kernel; %d of garbage from the peer: %d written to the device, drops %s, %d by the"
            " kernel; the tunnel still pings"
            % (unknown, from_unknown, dropped_before, garbage, udp2["rx_packets"], udp2["drops"],
               dropped - dropped_before))


def test_a_tunnel_deleted_under_traffic_goes_cleanly(pair):
    a, b = pair
    flood = subprocess.Popen(["ip", "netns", "exec", a.ns, "ping", "-f", "-q", "-c", "100000",
                              "-w", "3", "10.0.1.2"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: a.tunnels()["udp2"]["tx_packets"] > 1000, "the flood is flowing")
        assert "udp2: del done" in a.control("127.0.0.1", "-o", "del", "-n", "udp2").stdout
    finally:
        flood.wait(30)
    assert a.daemon.poll() is None and b.daemon.poll() is None
    assert not a.link_exists("udp2")
    a.add_tunnel("udp2", "10.0.1.1", b)
    assert a.ping("10.0.1.2")
