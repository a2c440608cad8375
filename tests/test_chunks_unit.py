"""Super-packets across the wire in chunks, without root: a TCP super-packet cut into
chunks by one daemon and taken by another, whatever the path did to the chunks (lost,
reordered, duplicated, cut short, mixed with other datagrams), is written into the device
as exactly the segments the sender's kernel would have made of it, or some of them, or
nothing; never anything else, and never an internal error."""

import os
import socket
import struct

import pytest
from hypothesis import example, given, settings, strategies as st

import packets
import udpProxyServer as ups
from fakes import (WirePeer, add, add_loopback_tunnel, deliver, drain, fake_offload_server,
                   ipv4_packet,
                   fake_server, receive, udp, vnet)

SAYS = ups.PI_ACCEPTS_PARTIAL | ups.PI_TAKES_CHUNKS
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def segments(packet, l4, mss):
    """The segments the kernel makes of a TCP super-packet, full checksums and all."""
    out, made, done = bytearray(ups.BUFFER_SIZE + ups.BUFFER_SIZE // 8), [], 0
    while done is not None:  # in rounds, for small segments
        stride, total, done = ups.split_gso(memoryview(bytes(packet)), ups.TCP, l4, mss, out,
                                            done)
        made += [bytes(out[at:min(at + stride, total)]) for at in range(0, total, stride)]
    return made


def chunks(packet, l4, mss, chunk_id=3):
    pi = bytes((0, SAYS | ups.PI_CHUNK | chunk_id))
    train, stride = ups.cut_chunks(memoryview(bytes(packet)), l4, mss, pi)
    return [train[at:at + stride] for at in range(0, len(train), stride)]


def as_the_kernel_takes(written):
    """What the kernel makes of one write into the device: a GSO packet cut into its
    segments, a packet with a partial checksum finished."""
    flags, gso_type, hdr_len, gso_size, start, offset = ups.VNET_HDR.unpack(
        written[:ups.VNET_HDR_LEN])
    packet = bytearray(written[ups.VNET_HDR_LEN:])
    if gso_type == ups.GSO_NONE:
        if flags & ups.VNET_F_NEEDS_CSUM:
            ups.complete_checksum(packet, start, offset)
        return [bytes(packet)]
    assert gso_type in (ups.GSO_TCPV4, ups.GSO_TCPV6) and hdr_len <= len(packet)
    return segments(packet, start, gso_size)


def written(devices, name="udp2"):
    """What the daemon wrote into the device so far."""
    outer, out = devices.outer[name], []
    timeout = outer.gettimeout()
    outer.setblocking(False)
    try:
        while True:
            out.append(outer.recv(70000))
    except BlockingIOError:
        return out
    finally:
        outer.settimeout(timeout)


def reorder(items, kind, at):
    """What the network does to a list of datagrams in place: drop the one at at, send it
    twice, or swap it with the last; False for any other kind of harm."""
    if kind == "drop":
        del items[at]
    elif kind == "dup":
        items.insert(at, items[at])
    elif kind == "swap":
        items[at], items[-1] = items[-1], items[at]
    else:
        return False
    return True


def trains(datagrams):
    """The datagrams as UDP GRO hands them over: runs of one size (the last may be
    shorter), at most 64 a run."""
    runs = []
    for datagram in datagrams:
        run = runs[-1] if runs else None
        if (run and len(run[1]) < ups.GSO_MAX_SEGMENTS and len(run[1][-1]) == run[0]
                and len(datagram) <= run[0]):
            run[1].append(datagram)
        else:
            runs.append((len(datagram), [datagram]))
    return [(b"".join(run), stride) for stride, run in runs]


CASES = [4, 6]


@given(version=st.sampled_from(CASES), length=st.integers(1, 30000), mss=st.integers(36, 1400),
       seq=st.integers(0, 2**32 - 1),
       flags=st.sampled_from([ups.TCP_ACK, ups.TCP_ACK | ups.TCP_PSH,
                              ups.TCP_ACK | ups.TCP_PSH | ups.TCP_FIN | ups.TCP_CWR]),
       harm=st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap", "cut", "flip", "stranger",
                                                 "twin"]),
                               st.integers(0, 900), st.integers(0, 2000)), max_size=6),
       gro=st.booleans())
@settings(max_examples=300, deadline=None)
@example(version=4, length=5000, mss=1000, seq=2**32 - 10, flags=ups.TCP_ACK | ups.TCP_PSH,
         harm=[], gro=True)
@example(version=4, length=5000, mss=1000, seq=7, flags=ups.TCP_ACK | ups.TCP_FIN,
         harm=[("drop", 0, 0), ("drop", 3, 0)], gro=False)
@example(version=4, length=252, mss=36, seq=7, flags=ups.TCP_ACK, harm=[("drop", 1, 0)],
         gro=True)  # the offsets' high bytes agree: only their low ones tell
@example(version=6, length=5000, mss=1000, seq=7, flags=ups.TCP_ACK, harm=[("twin", 2, 0)],
         gro=True)  # only the headers tell
def test_chunks_are_rebuilt_into_the_kernel_s_segments_or_nothing(version, length, mss, seq,
                                                                   flags, harm, gro):
    payload = os.urandom(length)
    packet, l4 = packets.super_packet(version, ups.TCP, payload, seq=seq, flags=flags)
    reference = segments(packet, l4, mss)
    sent = chunks(packet, l4, mss) if length > mss else []
    datagrams = list(sent)
    allowed = list(reference)  # and the segments of super-packets whose chunks got in
    for kind, at, value in harm:
        if not datagrams:
            break
        at %= len(datagrams)
        if reorder(datagrams, kind, at):
            continue
        if kind == "cut":
            datagrams[at] = datagrams[at][:value % max(len(datagrams[at]), 1)]
        elif kind == "flip":  # a bit changed in the PI header or the headers (the UDP
            # checksum keeps a payload changed on the way from arriving)
            damaged = bytearray(datagrams[at])
            if damaged:
                damaged[value % min(len(damaged), 4 + l4 + 32)] ^= 1 << (value % 8)
            datagrams[at] = bytes(damaged)
        elif kind == "twin":  # the chunk in that place of another super-packet of that size
            other, other_l4 = packets.super_packet(version, ups.TCP, os.urandom(length),
                                                   seq=seq ^ 0x8000, flags=flags)
            if at < len(sent):
                datagrams[at] = chunks(other, other_l4, mss)[at]
                allowed += segments(other, other_l4, mss)
        else:  # a plain datagram of another super-packet, spoofed in among them
            other, other_l4 = packets.super_packet(version, ups.TCP, os.urandom(3 * mss),
                                                   seq=value)
            datagrams.insert(at, chunks(other, other_l4, mss, chunk_id=value % 16)[0])
            allowed += segments(other, other_l4, mss)
    with fake_offload_server() as (server, devices), udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        writes = []
        for train, stride in (trains(datagrams) if gro else [(d, len(d)) for d in datagrams]):
            deliver(tunnel, train, stride)
            writes += written(devices)  # read at once: the fake device's queue is short
        got = [segment for write in writes for segment in as_the_kernel_takes(write)]
        assert tunnel.counters.drops.get("internal_error", 0) == 0
        assert not tunnel.counters.drops.get("bug")
    if not harm and length > mss:
        assert got == reference
    elif not any(kind == "flip" for kind, _, _ in harm):
        assert all(segment in allowed for segment in got)
    else:  # a bit flipped makes the chunk another super-packet's (on the wire the UDP
        # checksum stops it; a peer may send anything): it is handled as such, each packet
        # written whole and consistent, never an internal error
        assert all(packets.valid(segment) for segment in got)


def test_a_daemon_that_takes_chunks_says_so_and_a_super_packet_goes_in_chunks_once_told():
    payload = os.urandom(5000)
    packet, l4 = packets.super_packet(4, ups.TCP, payload)
    with fake_offload_server() as (server, devices), udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)

        def send():
            devices.outer["udp2"].send(vnet(ups.GSO_TCPV4, 1000, l4, 16, ups.VNET_F_NEEDS_CSUM)
                                       + bytes(packet))
            server.loop.dispatch(tunnel.fd)
            return [peer.recv(65535) for _ in range(5)]

        before = send()
        assert all(d[1] == SAYS and packets.valid(d[4:]) for d in before)  # not yet told
        hello, _ = packets.super_packet(4, ups.UDP, b"hello")
        peer.sendto(bytes([0, SAYS, 8, 0]) + bytes(hello), ("127.0.0.1", server.data_port))
        server.loop.dispatch(server.data_sock.fileno())
        written(devices)
        during = send()
        assert [d[:4] for d in during] == [bytes((0, SAYS | ups.PI_CHUNK, offset >> 8,
                                                  offset & 255))
                                           for offset in range(0, 5000, 1000)]
        assert [len(d) for d in during] == [len(d) for d in before]  # the size per-segment ones have
        assert during == chunks(packet, l4, 1000, chunk_id=0)


def test_chunks_to_a_daemon_without_offloads_are_dropped_and_counted():
    packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(3000))
    with fake_server() as (server, devices), udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        train = chunks(packet, l4, 1000)
        deliver(tunnel, b"".join(train), len(train[0]))
        assert written(devices) == []
        assert tunnel.counters.drops["unwanted_chunk"] == 3


@pytest.mark.parametrize("mss", [1000, 36])  # 36: the smallest, cut in rounds
def test_a_device_that_refuses_joined_writes_gets_the_run_cut_into_segments(mss):
    payload = os.urandom(4000)
    packet, l4 = packets.super_packet(6, ups.TCP, payload)
    with fake_offload_server() as (server, devices), udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        tunnel.device.joining = False
        writes = []
        for train, stride in trains(chunks(packet, l4, mss)):  # runs of up to 64 chunks
            deliver(tunnel, train, stride)
            writes += written(devices)
        assert all(w[:ups.VNET_HDR_LEN] == ups.ZERO_VNET_HDR for w in writes)
        assert [w[ups.VNET_HDR_LEN:] for w in writes] == segments(packet, l4, mss)
        assert tunnel.counters.rx_packets == len(writes) == -(-4000 // mss)


def test_the_offset_and_size_in_a_chunk_are_checked_against_its_headers():
    packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(3000))
    good = chunks(packet, l4, 1000)
    bad = bytearray(good[1])
    struct.pack_into("!H", bad, 2, 500)  # not on a segment's boundary
    with fake_offload_server() as (server, devices), udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        deliver(tunnel, bytes(bad), len(bad))
        deliver(tunnel, good[1][:-1], len(good[1]) - 1)  # a middle chunk cut short
        assert written(devices) == []
        assert tunnel.counters.drops["bad_chunk"] == 2


# --- Encrypted tunnels: chunks sealed a message each -----------------------------------


def sealed_chunks(packet, l4, mss):
    """The plaintexts of a super-packet's sealed chunks, padded as a daemon pads them."""
    header = ups.sealed_chunk_header(memoryview(bytes(packet)), l4, mss)
    plaintexts = []
    for offset in range(0, len(packet) - len(header), mss):
        chunk = bytearray(header)
        struct.pack_into("!H", chunk, l4 + 18, offset)
        chunk += packet[len(header) + offset:len(header) + offset + mss]
        plaintexts.append(bytes(chunk) + bytes(-len(chunk) % 16))
    return plaintexts


def encrypted_pair(offloads=True):
    """A daemon with an encrypted tunnel to a WireGuard peer on loopback, the handshake
    done; the peer sends from the tunnel's far end, 10.0.1.1."""
    made = fake_server(offloads=offloads, private_key=ups.generate_private_key())
    server, devices = made.__enter__()
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.2"))["ok"]
    peer.handshake(server, server.data_port)
    return made, server, devices, peer


@given(length=st.integers(1, 20000), mss=st.integers(36, 1380), seq=st.integers(0, 2**32 - 1),
       harm=st.lists(st.tuples(st.sampled_from(["drop", "dup", "swap", "twin"]),
                               st.integers(0, 900)), max_size=4),
       train=st.booleans())
@settings(max_examples=100, deadline=None)
@example(length=5000, mss=1000, seq=5, harm=[], train=True)
def test_sealed_chunks_are_rebuilt_into_the_kernel_s_segments_or_nothing(length, mss, seq,
                                                                         harm, train):
    payload = os.urandom(length)
    packet, l4 = packets.super_packet(4, ups.TCP, payload, seq=seq)
    reference = segments(packet, l4, mss)
    plaintexts = sealed_chunks(packet, l4, mss) if length > mss else []
    allowed = list(reference)
    for kind, at in harm:
        if not plaintexts:
            break
        at %= len(plaintexts)
        if not reorder(plaintexts, kind, at):  # twin
            other, _ = packets.super_packet(4, ups.TCP, os.urandom(length), seq=seq ^ 0x8000)
            twins = sealed_chunks(other, l4, mss)
            if at < len(twins):
                plaintexts[at] = twins[at]
                allowed += segments(other, l4, mss)
    made, server, devices, peer = encrypted_pair()
    try:
        tunnel = server.registry.by_name["wgp"]
        written(devices, "wgp")
        writes = []
        for at in range(0, len(plaintexts), 64):  # as many as a dispatch reads
            batch = plaintexts[at:at + 64]
            one_size = all(len(p) == len(batch[0]) for p in batch[:-1]) and len(
                batch[-1]) <= len(batch[0])  # what a GSO send takes
            peer.send(batch, server.data_port, train=train and one_size)
            receive(server)
            writes += written(devices, "wgp")  # at once: the fake device's queue is short
        got = [segment for write in writes for segment in as_the_kernel_takes(write)]
        assert not {"internal_error", "bug", "bad_chunk"} & set(tunnel.counters.drops)
    finally:
        made.__exit__(None, None, None)
    if not harm and length > mss:
        assert got == reference
    else:
        assert all(segment in allowed for segment in got)


def test_an_encrypted_tunnel_says_it_takes_chunks_and_sends_them_once_told():
    made, server, devices, peer = encrypted_pair()
    try:
        tunnel = server.registry.by_name["wgp"]
        receive_cipher = ups.transport_cipher(peer.keys.receive_key)

        def send_super_packet(length=5000, mss=1000):
            packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(length), flags=ups.TCP_ACK)
            packet[12:20] = bytes([10, 0, 1, 2, 10, 0, 1, 1])
            packet[2:4] = len(packet).to_bytes(2, "big")
            devices.outer["wgp"].send(vnet(ups.GSO_TCPV4, mss, l4, 16, ups.VNET_F_NEEDS_CSUM)
                                      + bytes(packet))
            server.loop.dispatch(tunnel.fd)
            sent.append((packet, l4))
            return [bytes(ups.open_transport(receive_cipher, m)[1]) for m in drain(peer.sock)]

        sent, cases = [], [(5500, 1000), (60000, 40)]
        try:  # room for the 1,500 chunks of the second case (root only)
            peer.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except PermissionError:
            cases.pop()

        first = send_super_packet()
        assert ups.CHUNKS_BEACON in first  # said, under this keypair
        assert [p[0] >> 4 for p in first if p != ups.CHUNKS_BEACON] == [4] * 5  # not told yet
        assert tunnel.describe()["superPackets"] == "segments"
        peer.send([ups.CHUNKS_BEACON], server.data_port)
        receive(server)
        assert tunnel.describe()["superPackets"] == "chunks"
        chunked = [p for p in send_super_packet() if p != ups.CHUNKS_BEACON]
        assert [p[0] >> 4 for p in chunked] == [0] * 5  # chunks, IPv4's
        assert [struct.unpack_from("!H", p, 20 + 18)[0] for p in chunked] == \
            list(range(0, 5000, 1000))
        assert chunked == sealed_chunks(*sent[-1], 1000)
        # A last chunk shorter than the others, and more chunks than one send takes.
        for length, mss in cases:
            chunked = [p for p in send_super_packet(length, mss) if p != ups.CHUNKS_BEACON]
            assert chunked == sealed_chunks(*sent[-1], mss)
        assert "malformed" not in tunnel.counters.drops
    finally:
        made.__exit__(None, None, None)


def test_sealed_chunks_from_outside_the_tunnel_or_to_a_daemon_without_offloads_go_nowhere():
    packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(3000))
    packet[12:16] = bytes([10, 9, 9, 9])  # a source the tunnel does not take
    made, server, devices, peer = encrypted_pair()
    try:
        tunnel = server.registry.by_name["wgp"]
        written(devices, "wgp")
        peer.send(sealed_chunks(packet, l4, 1000), server.data_port)
        receive(server)
        assert written(devices, "wgp") == []
        assert tunnel.counters.drops["not_allowed_source"] == 3
    finally:
        made.__exit__(None, None, None)
    packet[12:16] = bytes([10, 0, 1, 1])
    made, server, devices, peer = encrypted_pair(offloads=None)
    try:
        tunnel = server.registry.by_name["wgp"]
        peer.send(sealed_chunks(packet, l4, 1000), server.data_port)
        receive(server)
        assert tunnel.counters.drops["unwanted_chunk"] == 3
        assert tunnel.describe()["superPackets"] == "segments"
    finally:
        made.__exit__(None, None, None)


@st.composite
def broken_chunks(draw):
    """A real sealed chunk of an IPv4 or IPv6 super-packet, then fields of its headers set
    to anything, and perhaps cut short: past the first checks, as a fuzzer should be."""
    version = draw(st.sampled_from([4, 6]))
    packet, l4 = packets.super_packet(version, ups.TCP, bytes(3000), seq=draw(st.integers(0, 99)))
    if version == 6:
        packet[8:24] = bytes([0xFD] + [0] * 14 + [1])
    chunk = bytearray(draw(st.sampled_from(sealed_chunks(packet, l4, 1000))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, l4 + 31))
        chunk[at] = draw(st.integers(0, 255))
    chunk[0] = chunk[0] & 0x1F  # still says chunk
    # Cut anywhere, most often within or just after the headers.
    return bytes(chunk[:draw(st.one_of(st.integers(1, l4 + 40), st.integers(1, len(chunk))))])


def cut_v6_chunk():
    packet, l4 = packets.super_packet(6, ups.TCP, bytes(3000))
    return sealed_chunks(packet, l4, 1000)[1][:45]  # its TCP header cut in the middle


def a_run_then_a_cut_chunk():
    packet, l4 = packets.super_packet(4, ups.TCP, bytes(3000))
    first, second, _ = sealed_chunks(packet, l4, 1000)
    return [first, second[:30]]  # the second cut before its offset


@given(st.lists(broken_chunks(), min_size=1, max_size=12), st.booleans())
@example(broken=[cut_v6_chunk()], train=False)
@example(broken=a_run_then_a_cut_chunk(), train=True)
@settings(max_examples=100, deadline=None)
def test_an_authenticated_peer_sending_broken_chunks_costs_only_them(broken, train):
    """Plaintexts that say chunk (an IP version of 0 or 1), their rest anything: each is
    dropped, counted, or written as the super-packet it claims to be part of; never an
    internal error, and the tunnel takes a good packet after them."""
    made, server, devices, peer = encrypted_pair()
    try:
        tunnel = server.registry.by_name["wgp"]
        plaintexts = list(broken)
        if train:  # one size but the last, which may be shorter, as a GRO train has them
            size = max(len(p) for p in plaintexts)
            plaintexts = [p + bytes(size - len(p)) for p in plaintexts[:-1]] + plaintexts[-1:]
        peer.send(plaintexts, server.data_port, train=train)
        receive(server)
        good = ipv4_packet("10.0.1.1", "10.0.1.2", b"still here")
        written(devices, "wgp")
        peer.send([good], server.data_port)
        receive(server)
        assert [w[ups.VNET_HDR_LEN:] for w in written(devices, "wgp")] == [good]
        assert not {"internal_error", "bug"} & set(tunnel.counters.drops)
    finally:
        made.__exit__(None, None, None)
