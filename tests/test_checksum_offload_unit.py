"""Remote checksum offload without root: partial checksums cut and flagged, the flags
negotiated per tunnel from what the peer's datagrams say, and partial packets written
for the kernel to finish."""

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

import packets
import udpProxyServer as ups
from fakes import (add_loopback_tunnel, deliver, fake_offload_server, fake_server,
                   refuse_joined_writes, udp, vnet)

ACCEPTS, PARTIAL = ups.PI_ACCEPTS_PARTIAL, ups.PI_PARTIAL
# What a daemon with offloads says on every datagram: it takes partial checksums, and
# super-packets in chunks. The peers here say only the first, as a daemon of 2.1 did.
SAYS = ups.PI_ACCEPTS_PARTIAL | ups.PI_TAKES_CHUNKS


def finish(packet, l4):
    """What the kernel does with a partial checksum: sum from the L4 header on, the field's
    pseudo-header sum included, and put the complement in the field."""
    packet = bytearray(packet)
    offset = ups.CHECKSUM_OFFSET[packet[9] if packet[0] >> 4 == 4 else packet[6]]
    value = packets.rfc1071(packet[l4:])
    if offset == 6 and value == 0:
        value = 0xFFFF
    struct.pack_into("!H", packet, l4 + offset, value)
    return packet


def cut(packet, proto, l4, mss, pi_flags=ACCEPTS, partial=True):
    """2015-format datagrams of a super-packet, as a daemon with offloads cuts them: partial
    sums (flagged so) where asked for and the L4 header is where the peer looks for it."""
    out = bytearray(ups.BUFFER_SIZE + ups.BUFFER_SIZE // 8)
    partial = partial and ups.transport_start(packet) == (l4, proto)
    prefix = bytes([0, pi_flags | PARTIAL if partial else pi_flags]) + \
        ups.PI_BY_VERSION[packet[0] >> 4][2:]
    stride, total, done = ups.split_gso(packet, proto, l4, mss, out, 0, prefix, partial)
    assert done is None
    return [bytes(out[at:min(at + stride, total)]) for at in range(0, total, stride)]


@pytest.mark.parametrize("version, proto", [(4, ups.TCP), (6, ups.TCP), (4, ups.UDP),
                                            (6, ups.UDP)])
def test_partial_segments_are_flagged_and_the_kernel_sum_makes_them_valid(version, proto):
    payload = os.urandom(5001)
    packet, l4 = packets.super_packet(version, proto, payload)
    full = cut(packet, proto, l4, 1000, partial=False)
    partial = cut(packet, proto, l4, 1000)
    assert len(partial) == 6
    for datagram, reference in zip(partial, full):
        assert datagram[:4] == bytes([0, ACCEPTS | PARTIAL]) + ups.PI_BY_VERSION[version][2:]
        assert reference[1] == ACCEPTS
        assert not packets.valid(datagram[4:])  # the payload was not summed
        assert finish(datagram[4:], l4) == reference[4:]
        assert packets.valid(reference[4:])


def test_a_packet_whose_l4_header_is_not_where_the_peer_looks_gets_full_sums():
    """IPv6 with a hop-by-hop header: the receiver would look for TCP at byte 40."""
    packet, l4 = packets.super_packet(6, ups.TCP, os.urandom(3000))
    ip, rest = bytearray(packet[:40]), bytes(packet[40:])
    ip[6] = 0  # next header: hop-by-hop options, eight bytes, then TCP
    packet = memoryview(ip + bytes([ups.TCP, 0, 1, 4, 0, 0, 0, 0]) + rest)
    for datagram in cut(packet, ups.TCP, l4 + 8, 1000):
        assert datagram[1] == ACCEPTS
        assert packets.rfc1071(packets.pseudo(datagram[4:], 48)[:36] + b"\0\0\0\x06"
                               + datagram[4 + 48:]) == 0


def send_super_packet(devices, server, tunnel, peer, payload):
    packet, l4 = packets.super_packet(4, ups.TCP, payload)
    devices.outer[tunnel.name].send(vnet(ups.GSO_TCPV4, 1000, l4, 16, ups.VNET_F_NEEDS_CSUM)
                                    + bytes(packet))
    server.loop.dispatch(tunnel.fd)
    return [peer.recv(65535) for _ in range(-(-len(payload) // 1000))], l4


def hear_from_peer(server, peer, flags):
    """One datagram from the peer carrying flags in its PI header."""
    packet, _ = packets.super_packet(4, ups.UDP, b"hello")
    peer.sendto(bytes([0, flags, 8, 0]) + bytes(packet), ("127.0.0.1", server.data_port))
    server.loop.dispatch(server.data_sock.fileno())


def test_partial_checksums_go_only_while_the_peer_says_it_takes_them(offload_server):
    server, devices = offload_server
    payload = os.urandom(3000)
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        before, _ = send_super_packet(devices, server, tunnel, peer, payload)
        assert [d[1] for d in before] == [SAYS] * 3 and all(packets.valid(d[4:]) for d in before)
        assert tunnel.describe()["checksums"] == "full"
        assert tunnel.describe()["peerOffload"] is None
        hear_from_peer(server, peer, ACCEPTS)
        during, l4 = send_super_packet(devices, server, tunnel, peer, payload)
        assert [d[1] for d in during] == [SAYS | PARTIAL] * 3
        assert [finish(d[4:], l4) for d in during] == [bytearray(d[4:]) for d in before]
        assert (tunnel.describe()["checksums"], tunnel.describe()["peerOffload"]) == ("partial", True)
        tunnel.codec.peer_heard_at -= ups.PARTIAL_FRESH  # nothing since: it may be another peer now
        assert send_super_packet(devices, server, tunnel, peer, payload)[0] == before
        hear_from_peer(server, peer, ACCEPTS)
        assert [d[1] for d in send_super_packet(devices, server, tunnel, peer, payload)[0]] == \
            [SAYS | PARTIAL] * 3
        hear_from_peer(server, peer, 0)  # the peer is now a 2015 daemon, or --no-offload
        after, _ = send_super_packet(devices, server, tunnel, peer, payload)
        assert after == before
        assert (tunnel.describe()["checksums"], tunnel.describe()["peerOffload"]) == ("full", False)


def test_a_single_packet_the_kernel_left_partial_stays_partial_for_a_new_peer(offload_server):
    server, devices = offload_server
    packet, l4 = packets.super_packet(4, ups.UDP, os.urandom(300))
    segment = bytearray(cut(packet, ups.UDP, l4, 65535, partial=False)[0][4:])
    struct.pack_into("!H", segment, l4 + 6, ~packets.rfc1071(packets.pseudo(segment, l4)) & 0xFFFF)
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        for flags, expected in ((0, SAYS), (ACCEPTS, SAYS | PARTIAL)):
            hear_from_peer(server, peer, flags)
            devices.outer["udp2"].send(vnet(start=l4, offset=6, flags=ups.VNET_F_NEEDS_CSUM)
                                       + bytes(segment))
            server.loop.dispatch(tunnel.fd)
            datagram = peer.recv(65535)
            assert datagram[1] == expected
            if expected & PARTIAL:
                assert not packets.valid(datagram[4:]) and packets.valid(finish(datagram[4:], l4))
            else:
                assert packets.valid(datagram[4:])


def test_a_daemon_without_offloads_never_sets_the_bit_and_finishes_partial_packets():
    with fake_server() as (server, devices), udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        assert isinstance(tunnel.device, ups.NoOffloadDevice)
        hear_from_peer(server, peer, ACCEPTS)
        devices.outer["udp2"].recv(65535)
        devices.outer["udp2"].send(bytes(packets.super_packet(4, ups.UDP, b"x")[0]))
        server.loop.dispatch(tunnel.fd)
        assert peer.recv(65535)[1] == 0
        assert (tunnel.describe()["checksums"], tunnel.describe()["peerOffload"]) == ("full", True)
        # A peer that has not yet seen our datagrams may send a partial one: it is summed here.
        packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(900))
        datagram = cut(packet, ups.TCP, l4, 65535)[0]
        peer.sendto(datagram, ("127.0.0.1", server.data_port))
        server.loop.dispatch(server.data_sock.fileno())
        written = devices.outer["udp2"].recv(65535)
    assert packets.valid(written) and written == finish(datagram[4:], l4)


def partial_run(payload, mss=1000, flags=ups.TCP_ACK):
    packet, l4 = packets.super_packet(4, ups.TCP, payload, flags=flags)
    return cut(packet, ups.TCP, l4, mss), l4


def test_a_partial_packet_written_alone_has_the_kernel_finish_its_sum(offload_server):
    server, devices = offload_server
    syn, l4 = partial_run(os.urandom(100), mss=65535, flags=0x12)  # a SYN is never joined
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        deliver(tunnel, memoryview(bytearray(syn[0])), len(syn[0]))
    write = devices.outer["udp2"].recv(65535)
    assert ups.VNET_HDR.unpack_from(write) == (ups.VNET_F_NEEDS_CSUM, ups.GSO_NONE, 0, 0, l4, 16)
    assert write[ups.VNET_HDR_LEN:] == syn[0][4:]


def test_a_refused_joined_write_of_partial_and_full_packets_writes_each_as_it_is(offload_server,
                                                                                 monkeypatch):
    server, devices = offload_server
    partial, l4 = partial_run(os.urandom(2000))
    packet, _ = packets.super_packet(4, ups.TCP, os.urandom(1000), seq=3000, flags=ups.TCP_ACK)
    full = cut(packet, ups.TCP, l4, 1000, partial=False)
    run = bytearray(b"".join(partial + full))
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        refuse_joined_writes(monkeypatch, tunnel.device)
        deliver(tunnel, memoryview(run), len(partial[0]))
        writes = [devices.outer["udp2"].recv(65535) for _ in range(3)]
    headers = [ups.VNET_HDR.unpack_from(w) for w in writes]
    assert headers[:2] == [(ups.VNET_F_NEEDS_CSUM, ups.GSO_NONE, 0, 0, l4, 16)] * 2
    assert bytes(writes[2][:ups.VNET_HDR_LEN]) == ups.ZERO_VNET_HDR
    assert packets.valid(writes[2][ups.VNET_HDR_LEN:])


def test_a_partial_flag_on_what_is_not_tcp_or_udp_is_dropped_and_counted(offload_server):
    server, devices = offload_server
    icmp = bytearray(packets.super_packet(4, ups.UDP, b"ping")[0])
    icmp[9] = 1
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        deliver(tunnel, memoryview(bytes([0, ACCEPTS | PARTIAL, 8, 0]) + icmp), len(icmp) + 4)
    assert tunnel.counters.drops == {"bad_partial": 1} and tunnel.counters.rx_packets == 0


header_fields = st.tuples(
    st.sampled_from([4, 6]), st.sampled_from([ups.TCP, ups.UDP, 1, 58]),
    st.integers(0, 15), st.integers(0, 255), st.binary(max_size=80), st.integers(0, 255))


@given(fields=header_fields, cut=st.integers(0, 120))
@settings(max_examples=400, deadline=None)
def test_any_datagram_flagged_partial_is_written_or_counted_never_an_error(fields, cut):
    """Packets that pass for TCP or UDP up to some byte: a lying IHL, a short header, another
    protocol, cut anywhere. Each tunnel kind writes it or counts it as dropped."""
    version, proto, ihl, flags, tail, tcp_offset = fields
    packet = bytearray(packets.super_packet(version, ups.TCP if proto == ups.TCP else ups.UDP,
                                            tail)[0])
    if version == 4:
        packet[0], packet[9] = 0x40 | ihl, proto
    else:
        packet[6] = proto
    if proto == ups.TCP and len(packet) > (40 if version == 6 else 20) + 12:
        packet[(40 if version == 6 else 20) + 12] = tcp_offset
    datagram = bytearray([0, flags | PARTIAL]) + b"\x08\x00" + packet[:cut]
    for made in (fake_offload_server, fake_server):
        with made() as (server, devices), udp() as peer:
            tunnel = add_loopback_tunnel(server, peer)
            deliver(tunnel, memoryview(bytearray(datagram)), len(datagram))
            assert tunnel.counters.rx_packets + sum(tunnel.counters.drops.values()) == 1
