"""Super-packets in chunks between two new daemons, on real devices: 64 MiB of TCP intact
with and without loss on the underlay, and the older kinds of peer (a 2015 daemon, a
daemon without offloads) still get per-segment datagrams only."""


import pytest

from lab import key_file, lose, meanwhile, transfer, tunnel_pair, wait_until

MEGABYTES = 64 << 20


@pytest.mark.parametrize("loss", [0, 0.1, 1])
def test_tcp_crosses_in_chunks_intact_with_and_without_loss(lab, loss):
    a, b = tunnel_pair(lab, 1400)
    assert a.ping("10.0.1.2") and b.ping("10.0.1.1")
    assert a.tunnels()["udp2"]["superPackets"] == "chunks"
    for host in (a, b):
        lose(host, loss)
    for sender, receiver, address in ((a, b, "10.0.1.2"), (b, a, "10.0.1.1")):
        sent, received = transfer(sender, receiver, address, MEGABYTES)
        assert received == sent
    for host, name in ((a, "udp2"), (b, "udp1")):
        tunnel = host.tunnels()[name]
        assert tunnel["superPackets"] == "chunks", tunnel
        assert not {"bad_chunk", "unwanted_chunk", "internal_error"} & set(tunnel["drops"])


def test_a_2015_daemon_gets_segments_and_tcp_crosses_intact(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon()
    b.start_2015_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b, "-m", "1400")
    b.control_2015("127.0.0.1", "add", "udp1", "10.0.1.2", a.address)
    b.run("ip", "link", "set", "udp1", "mtu", "1400")
    assert a.ping("10.0.1.2")
    sent, received = transfer(a, b, "10.0.1.2", MEGABYTES)
    assert received == sent
    tunnel = a.tunnels()["udp2"]
    assert (tunnel["superPackets"], tunnel["checksums"]) == ("segments", "full")


def test_mtu_changed_both_ends_mid_transfer_loses_nothing(lab):
    """The MTU set in place on both ends (-o set) while 512 MiB cross in chunks, down and
    back up: chunks of the old size and the new meet on the way."""
    a, b = tunnel_pair(lab, 1400)
    assert a.ping("10.0.1.2")
    with meanwhile(lambda: transfer(a, b, "10.0.1.2", 8 * MEGABYTES)) as results:
        for mtu, part in (("1200", 1), ("1400", 3)):
            wait_until(lambda: a.tunnels()["udp2"]["tx_bytes"] > part * MEGABYTES,
                       "the transfer under way")
            for host, name in ((a, "udp2"), (b, "udp1")):
                host.control("127.0.0.1", "-o", "set", "-n", name, "--mtu", mtu)
            assert not results  # changed while it ran
    assert results and results[0][1] == results[0][0]
    assert a.tunnels()["udp2"]["mtu"] == 1400
    assert not {"bad_chunk", "internal_error"} & set(b.tunnels()["udp1"]["drops"])


@pytest.mark.parametrize("loss", [0, 1])
def test_encrypted_tcp_crosses_in_sealed_chunks_intact_with_and_without_loss(lab, loss):
    a, b = lab.host("a", 1), lab.host("b", 2)
    keys = {}
    for host in (a, b):
        path, keys[host.name] = key_file(lab, host)
        host.start_daemon("--key-file", path)
    a.add_tunnel("wg2", "10.0.1.1", b, "--peer-key", keys["b"], "-m", "1420")
    b.add_tunnel("wg1", "10.0.1.2", a, "--peer-key", keys["a"], "-m", "1420")
    assert a.ping("10.0.1.2") and b.ping("10.0.1.1")
    wait_until(lambda: a.tunnels()["wg2"]["superPackets"] == "chunks"
               and b.tunnels()["wg1"]["superPackets"] == "chunks", "each end told")
    for host in (a, b):
        lose(host, loss)
    for sender, receiver, address in ((a, b, "10.0.1.2"), (b, a, "10.0.1.1")):
        sent, received = transfer(sender, receiver, address, MEGABYTES)
        assert received == sent
    for host, name in ((a, "wg2"), (b, "wg1")):
        drops = set(host.tunnels()[name]["drops"])
        assert not {"bad_chunk", "unwanted_chunk", "internal_error", "not_allowed_source",
                    "malformed"} & drops, drops


def test_a_peer_replaced_by_a_2015_daemon_mid_transfer_loses_nothing(lab):
    """b's daemon (no state file: its device goes with it) is stopped while chunks cross,
    and the 2015 daemon takes its place: a learns from b's first datagram to send segments
    again, and the transfer ends intact."""
    a, b = tunnel_pair(lab, 1400)
    assert a.ping("10.0.1.2")
    with meanwhile(lambda: transfer(a, b, "10.0.1.2", 8 * MEGABYTES)) as results:
        wait_until(lambda: a.tunnels()["udp2"]["tx_bytes"] > MEGABYTES, "the transfer under way")
        assert a.tunnels()["udp2"]["superPackets"] == "chunks"
        b.stop_daemon()
        b.start_2015_daemon()
        b.control_2015("127.0.0.1", "add", "udp1", "10.0.1.2", a.address)
        wait_until(lambda: b.link_exists("udp1"), "the 2015 daemon's device")
        b.run("ip", "link", "set", "udp1", "mtu", "1400")
        assert not results  # replaced while it ran
    assert results and results[0][1] == results[0][0]
    assert a.tunnels()["udp2"]["superPackets"] == "segments"
