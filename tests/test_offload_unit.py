"""The offload packet work without root: cutting super-packets for the wire and joining them again."""

import os
import struct

import pytest
from hypothesis import example, given, settings, strategies as st

import udpProxyServer as ups
from packets import pseudo, rfc1071, super_packet, valid
from udpProxyServer import Joiner, SharedBuffers, flow_of, split_gso


def split(packet, proto, l4, mss):
    """The 2015-format datagrams packet is cut into (each a PI header and a packet), round
    by round, in the daemon's own shared buffer held as the daemon holds it: it cannot grow."""
    scratch, datagrams, done = SharedBuffers(), [], 0
    prefix = ups.PI_BY_VERSION[packet[0] >> 4]
    while done is not None:
        stride, total, done = split_gso(packet, proto, l4, mss, scratch.out, done, prefix)
        datagrams += [bytes(scratch.out[at:min(at + stride, total)])
                      for at in range(0, total, stride)]
    return datagrams


CASES = [(4, ups.TCP), (6, ups.TCP), (4, ups.UDP), (6, ups.UDP)]


@pytest.mark.parametrize("version, proto", CASES)
def test_split_makes_valid_packets_carrying_the_payload_in_order(version, proto):
    payload = os.urandom(10001)
    packet, l4 = super_packet(version, proto, payload)
    datagrams = split(packet, proto, l4, 1348)
    assert len(datagrams) == 8
    header = len(packet) - len(payload)
    carried = b""
    for index, datagram in enumerate(datagrams):
        assert bytes(datagram[:4]) == ups.PI_BY_VERSION[version]
        segment = datagram[4:]
        assert valid(segment)
        assert len(segment) == header + (1348 if index < 7 else 10001 - 7 * 1348)
        carried += bytes(segment[header:])
        if proto == ups.TCP:
            seq, flags = struct.unpack_from("!I5xB", segment, l4 + 4)
            assert seq == 1000 + index * 1348
            assert flags == (ups.TCP_ACK | ups.TCP_PSH if index == 7 else ups.TCP_ACK)
        else:
            assert struct.unpack_from("!H", segment, l4 + 4)[0] == len(segment) - l4
        if version == 4:
            assert struct.unpack_from("!H", segment, 4)[0] == 7 + index
    assert carried == payload


@pytest.mark.parametrize("version, proto", CASES)
@pytest.mark.parametrize("mss", [9, 1349])  # an odd MTU makes an odd MSS: 1349 at MTU 1401
def test_segments_of_an_odd_size_get_right_checksums(version, proto, mss):
    payload = os.urandom(3 * mss + 1)
    packet, l4 = super_packet(version, proto, payload)
    datagrams = split(packet, proto, l4, mss)
    assert len(datagrams) == 4
    assert all(valid(d[4:]) for d in datagrams)


@given(st.binary(min_size=1, max_size=20000), st.integers(200, 1400),
       st.sampled_from(CASES), st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_split_then_join_gives_back_the_stream(payload, mss, case, seq):
    version, proto = case
    packet, l4 = super_packet(version, proto, payload, seq=seq)
    datagrams = split(packet, proto, l4, mss)
    assert all(valid(d[4:]) for d in datagrams)
    writes = join([d[4:] for d in datagrams])
    # Every datagram joins: one write, its payload the stream, its lengths consistent.
    assert len(writes) == 1
    (buffers, packets), = writes
    assert len(packets) == len(datagrams)
    body = b"".join(bytes(b) for b in buffers[2:]) if len(packets) > 1 else bytes(buffers[1])[
        len(packet) - len(payload):]
    assert body == payload
    if len(packets) > 1:
        flags, gso_type, hdr_len, gso_size, start, offset = ups.VNET_HDR.unpack(buffers[0])
        assert (flags, gso_size, start) == (ups.VNET_F_NEEDS_CSUM, mss, l4)
        assert gso_type == {(4, ups.TCP): 1, (6, ups.TCP): 4}.get(case, ups.GSO_UDP_L4)
        header = bytes(buffers[1])
        assert hdr_len == len(header)
        joined = header + payload
        if version == 4:
            assert struct.unpack_from("!H", joined, 2)[0] == len(joined)
            assert rfc1071(joined[:20]) == 0
        # The partial checksum is the pseudo-header sum, which the kernel completes.
        partial, = struct.unpack_from("!H", joined, start + offset)
        assert rfc1071(pseudo(joined, l4)) == (~partial & 0xFFFF) or partial == 0xFFFF


def join(packets):
    joiner, writes = Joiner(), []
    for packet in packets:
        flow = flow_of(packet)
        assert flow is not None
        if not joiner.offer(packet, flow):
            writes.append(joiner.take())
            joiner.offer(packet, flow)
    writes.append(joiner.take())
    return writes


def test_packets_of_other_flows_or_out_of_order_are_not_joined():
    first, l4 = super_packet(4, ups.TCP, bytes(1000), seq=1, flags=ups.TCP_ACK)
    second, _ = super_packet(4, ups.TCP, bytes(1000), seq=1001, flags=ups.TCP_ACK)
    gap, _ = super_packet(4, ups.TCP, bytes(1000), seq=5001, flags=ups.TCP_ACK)
    segments = [split(p, ups.TCP, l4, 1000)[0][4:] for p in (first, second, gap)]
    other = bytearray(segments[1])
    other[l4 + 1] ^= 1  # another destination port
    assert [len(p) for _, p in join([segments[0], segments[1], segments[2]])] == [2, 1]
    assert [len(p) for _, p in join([segments[0], bytes(other)])] == [1, 1]


@pytest.mark.parametrize("flags", [ups.TCP_ACK | ups.TCP_FIN, 0x02, ups.TCP_ACK | 0x04])
def test_syn_fin_and_rst_are_never_joined(flags):
    packet, l4 = super_packet(4, ups.TCP, bytes(100), flags=flags)
    assert flow_of(split(packet, ups.TCP, l4, 1000)[0][4:]) is None


def test_a_psh_or_short_packet_ends_its_group():
    whole, l4 = super_packet(4, ups.TCP, bytes(3000), flags=ups.TCP_ACK)
    segments = [d[4:] for d in split(whole, ups.TCP, l4, 1000)]
    short, _ = super_packet(4, ups.TCP, bytes(500), seq=1000 + 3000, flags=ups.TCP_ACK)
    after, _ = super_packet(4, ups.TCP, bytes(1000), seq=1000 + 3500, flags=ups.TCP_ACK)
    tail = [split(p, ups.TCP, l4, 1000)[0][4:] for p in (short, after)]
    assert [len(p) for _, p in join(segments + tail)] == [4, 1]


@pytest.mark.parametrize("proto, offset", [(ups.TCP, 16), (ups.UDP, 6)])
def test_a_partial_checksum_is_completed(proto, offset):
    packet, l4 = super_packet(4, proto, os.urandom(333))
    packet = bytearray(split(packet, proto, l4, 1400)[0][4:])
    struct.pack_into("!H", packet, l4 + offset, 0)
    partial = ~rfc1071(pseudo(packet, l4)) & 0xFFFF
    struct.pack_into("!H", packet, l4 + offset, partial)
    ups.complete_checksum(memoryview(packet), l4, offset)
    assert valid(packet)


@given(st.binary(max_size=3000))
def test_ones_sum_agrees_with_the_word_by_word_sum(data):
    total = ups.ones_sum(data)
    expected = ~rfc1071(data) & 0xFFFF
    assert total == expected % 0xFFFF


@given(st.binary(max_size=200))
def test_flow_of_takes_any_bytes(data):
    flow = flow_of(memoryview(data))
    assert flow is None or isinstance(flow[0], bytes)


def test_scratch_buffers_hold_the_largest_split():
    scratch = SharedBuffers()  # held while it cuts, as the daemon holds it: its buffers cannot grow
    packet, l4 = super_packet(4, ups.TCP, bytes(65535 - 52))
    total, done = 0, 0
    while done is not None:
        stride, cut, done = split_gso(packet, ups.TCP, l4, 68, scratch.out, done)
        total += cut
    assert total > 65535


# A payload whose bytes say where they were, so a segment cut from the wrong place shows.
PATTERN = bytes(range(251)) * 262


# Payloads of 32 KB and up: cut in segments under about 450 bytes, they take rounds.
@given(st.integers(32768, 65535 - 52), st.integers(8, 600), st.sampled_from(CASES),
       st.integers(0, 2**32 - 1))
@example(65535 - 52, 36, (4, ups.TCP), 2**32 - 50000)  # MTU 88; seq wraps in a later round
@settings(max_examples=40, deadline=None)
def test_small_mtus_cut_in_rounds_lose_nothing(length, mss, case, seq):
    version, proto = case
    payload = PATTERN[:length]
    packet, l4 = super_packet(version, proto, payload, seq=seq)
    header = len(packet) - length
    datagrams = split(packet, proto, l4, mss)
    assert len(datagrams) == -(-length // mss)
    assert b"".join(d[4 + header:] for d in datagrams) == payload
    last = len(datagrams) - 1
    for index, datagram in enumerate(datagrams):
        segment = datagram[4:]
        assert valid(segment)
        if version == 4:
            assert struct.unpack_from("!H", segment, 4)[0] == 7 + index
        if proto == ups.TCP:
            this_seq, flags = struct.unpack_from("!I5xB", segment, l4 + 4)
            assert this_seq == (seq + index * mss) & 0xFFFFFFFF
            assert flags == (ups.TCP_ACK | ups.TCP_PSH if index == last else ups.TCP_ACK)


def writes_of(packets, fast):
    """The TUN writes a tunnel makes of packets, with Joiner.continues tried first (as the
    tunnel does) or with offer alone: a packet that flow_of refuses is written alone."""
    joiner, writes = Joiner(), []
    for packet in packets:
        if fast and joiner.continues(packet, False):
            continue
        flow = flow_of(packet)
        if flow is None or not joiner.offer(packet, flow):
            if joiner.packets:
                writes.append(joiner.take()[0])
            if flow is None:
                writes.append([packet])
            else:
                joiner.offer(packet, flow)
    if joiner.packets:
        writes.append(joiner.take()[0])
    return [[bytes(buffer) for buffer in write] for write in writes]


@given(st.sampled_from(CASES), st.integers(1, 12000), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(0, 20), st.integers(0, 59), st.integers(1, 255)),
                max_size=6),
       st.lists(st.integers(0, 20), max_size=3))
@settings(max_examples=300, deadline=None)
@example(case=(4, ups.TCP), length=5000, seq=0, changes=[(2, 33, ups.TCP_PSH)], dropped=[])
@example(case=(4, ups.TCP), length=5000, seq=0, changes=[(2, 33, 0x01)], dropped=[])
def test_the_fast_join_makes_the_writes_the_full_parse_makes(case, length, seq, changes, dropped):
    """Segments of one super-packet, some with a header byte changed (another flow, flags,
    TTL, options, a sequence gap) or missing: joined the fast way or the full way, the
    writes are the same, so the fast way never joins what the full parse would not."""
    version, proto = case
    packet, l4 = super_packet(version, proto, os.urandom(length), seq=seq, flags=ups.TCP_ACK)
    packets = [bytearray(d[4:]) for d in split(packet, proto, l4, 1000)]
    for index, offset, change in changes:
        if index < len(packets) and offset < len(packets[index]):
            packets[index][offset] ^= change
    packets = [p for index, p in enumerate(packets) if index not in dropped]
    assert writes_of(packets, fast=True) == writes_of(packets, fast=False)
