"""The daemon without root: the parser, and a Server whose devices are socketpair ends."""

import contextlib
import errno
import json
import logging
import os
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

import packets
import udpProxyServer as ups
from fakes import (Wire, add_loopback_tunnel, answer, deliver, fake_server,
                   internal_errors, refuse_joined_writes, told_partial, udp, vnet)
from udpProxyServer import ControlError, TunnelSpec, parse_request

PACKET = b"E" + bytes(27)  # a 28-byte IPv4 packet, as a device without offloads gives it
DATAGRAM = ups.PI_BY_VERSION[4] + PACKET  # and as it goes on the wire, in the 2015 format


def spec(**changes):
    entry = {"name": "udp2", "tunnelIP": "10.0.1.1", "netmask": "255.255.255.252",
             "mtu": 1500, "remoteServer": "198.18.0.2"}
    entry.update(changes)
    return TunnelSpec.from_entry(entry)


def test_spec_takes_the_documented_fields():
    s = spec()
    assert (s.name, str(s.interface), s.mtu, str(s.remote), s.remote_port) == \
        ("udp2", "10.0.1.1/30", 1500, "198.18.0.2", None)


@pytest.mark.parametrize("mtu", [1400, "1400", " 1400 "])
def test_mtu_as_int_or_numeric_string(mtu):
    assert spec(mtu=mtu).mtu == 1400


@pytest.mark.parametrize("mtu", [True, None, 1400.0, "14OO", "-1", [1400]])
def test_mtu_of_another_type_is_refused(mtu):
    with pytest.raises(ControlError, match="invalid mtu"):
        spec(mtu=mtu)


@pytest.mark.parametrize("netmask, prefix", [("255.255.255.0", 24), ("24", 24), (31, 31),
                                              ("255.255.255.255", 32)])
def test_netmask_dotted_or_prefix_length(netmask, prefix):
    assert spec(netmask=netmask).interface.network.prefixlen == prefix


def test_defaults_match_the_2015_control_script():
    entry = {"name": "udp2", "tunnelIP": "10.0.1.1", "remoteServer": "198.18.0.2"}
    s = TunnelSpec.from_entry(entry)
    assert (str(s.interface.netmask), s.mtu) == ("255.255.255.252", 1500)


def test_fifteen_byte_name_is_the_longest():
    assert spec(name="a" * 15).name == "a" * 15
    with pytest.raises(ControlError, match="16 bytes, the limit is 15"):
        spec(name="a" * 16)


@pytest.mark.parametrize("name", ["udp%d", "a b", "a:b", ".", "..", "tun\n", "tün"])
def test_names_the_kernel_would_refuse_or_rewrite(name):
    with pytest.raises(ControlError, match="invalid tunnel name"):
        spec(name=name)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parser_refuses_any_bytes_with_control_error_only(datagram):
    try:
        request = parse_request(datagram)
    except ControlError:
        return
    assert isinstance(request.op, str) and isinstance(request.entries, list)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10)
entries = st.fixed_dictionaries({}, optional={k: json_values | st.text(max_size=20)
                                              for k in ups.TUNNEL_FIELDS})


@given(st.sampled_from(["add", "del", "list", "x"]), st.lists(entries, max_size=3))
@settings(max_examples=300, deadline=None)
def test_any_json_request_gets_an_answer(op, tunnels):
    with fake_server(netlink=True) as (server, _):
        reply, _, _ = answer(server, json.dumps({"op": op, "tunnel": tunnels}).encode(),
                                 ("127.0.0.1", 9))
    assert isinstance(reply["ok"], bool)
    assert reply["ok"] or reply["error"]
    assert not internal_errors(reply), reply


@pytest.fixture
def server():
    with fake_server(netlink=True) as made:
        yield made


def test_packets_cross_both_ways_with_header_intact(server):
    server, devices = server
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        devices.outer["udp2"].send(PACKET)
        server.loop.dispatch(tunnel.fd)
        datagram, source = peer.recvfrom(65535)
        assert datagram == DATAGRAM and source[1] == server.data_port

        peer.sendto(DATAGRAM[:4] + PACKET[::-1], ("127.0.0.1", server.data_port))
        server.loop.dispatch(server.data_sock.fileno())
        assert devices.outer["udp2"].recv(65535) == PACKET[::-1]
    assert (tunnel.counters.tx_packets, tunnel.counters.rx_packets) == (1, 1)
    assert tunnel.counters.tx_bytes == tunnel.counters.rx_bytes == len(DATAGRAM)


def test_largest_packet_crosses_whole(server):
    server, devices = server
    packet = b"E" + os.urandom(ups.MAX_MTU - 1)
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        devices.outer["udp2"].send(packet)
        server.loop.dispatch(tunnel.fd)
        assert peer.recv(65535) == ups.PI_BY_VERSION[4] + packet


def test_a_handler_takes_one_batch_per_wake_up(server):
    server, devices = server
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        for _ in range(ups.BATCH + 5):
            devices.outer["udp2"].send(PACKET)
        server.loop.dispatch(tunnel.fd)
        assert tunnel.counters.tx_packets == ups.BATCH
        server.loop.dispatch(tunnel.fd)
        assert tunnel.counters.tx_packets == ups.BATCH + 5


def test_datagrams_from_unknown_sources_are_counted(server):
    server, devices = server
    with udp() as peer, udp() as stranger:
        add_loopback_tunnel(server, peer)
        stranger.sendto(DATAGRAM, ("127.0.0.1", server.data_port))
        server.loop.dispatch(server.data_sock.fileno())
    assert server.drops == {"unknown_source": 1}


def test_device_that_cannot_be_created_is_an_error_reply(server):
    server, devices = server
    devices.fail_with = errno.EBUSY
    reply, _, _ = answer(server, b'{"op": "add", "tunnel": [{"name": "udp2", "tunnelIP": "10.0.1.1",'
                          b' "remoteServer": "198.18.0.2"}]}', ("127.0.0.1", 9))
    assert reply["ok"] is False
    assert reply["results"][0]["error"] == "cannot create device 'udp2': Device or resource busy"
    assert not server.registry.by_name and not server.registry.by_source


def test_del_unregisters_and_closes_the_device(server):
    server, devices = server
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
    reply, _, _ = answer(server, b'{"op": "del", "tunnel": [{"name": "udp2"}]}', ("127.0.0.1", 9))
    assert reply["ok"] and tunnel.fd not in server.loop.handlers
    assert tunnel.device.tun.fileno() == -1


def test_every_control_datagram_is_answered(server):
    server, _ = server
    with udp() as client:
        for request in (b"nonsense", b'{"op": "list"}'):
            client.sendto(request, server.control.sock.getsockname())
        server.loop.dispatch(server.control.sock.fileno())
        first, second = (json.loads(client.recv(65535)) for _ in range(2))
    assert first["ok"] is False and "not JSON" in first["error"]
    assert second["ok"] is True and second["tunnels"] == []


def test_a_ready_fd_without_handler_is_reported(server, caplog):
    server, _ = server
    stray, other = socket.socketpair()
    with stray, other:
        server.loop.poller.register(stray.fileno())
        with caplog.at_level(logging.ERROR, logger="udpProxyServer"):
            server.loop.dispatch(stray.fileno())
    assert "no handler" in caplog.text


def test_an_error_in_a_handler_is_logged_and_the_loop_goes_on(server, caplog):
    server, _ = server

    def broken():
        raise RuntimeError("boom")

    server.loop.handlers[server.data_sock.fileno()] = broken
    with caplog.at_level(logging.ERROR, logger="udpProxyServer"):
        server.loop.dispatch(server.data_sock.fileno())
    assert "boom" in caplog.text


# --- The offload tunnel, its device a socketpair end speaking virtio headers ------------


def test_a_super_packet_from_the_device_goes_out_as_valid_datagrams(offload_server):
    server, devices = offload_server
    payload = os.urandom(5000)
    packet, l4 = packets.super_packet(4, ups.TCP, payload)
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        assert isinstance(tunnel.device, ups.OffloadDevice)
        devices.outer["udp2"].send(vnet(ups.GSO_TCPV4, 1000, l4, 16, ups.VNET_F_NEEDS_CSUM)
                                   + bytes(packet))
        server.loop.dispatch(tunnel.fd)
        datagrams = [peer.recv(65535) for _ in range(5)]
    assert all(d[:4] == bytes([0, ups.PI_ACCEPTS_PARTIAL | ups.PI_TAKES_CHUNKS]) + b"\x08\x00"
               and packets.valid(d[4:])
               for d in datagrams)  # full checksums: the peer has not said it takes partial ones
    assert b"".join(d[4 + l4 + 32:] for d in datagrams) == payload
    assert (tunnel.counters.tx_packets, tunnel.counters.tx_bytes) == (5, sum(map(len, datagrams)))


# The smallest TSO segment the kernel makes: TCP sends at least 48 bytes a segment
# (tcp_min_snd_mss), 12 of them timestamps. Its packets are 88 bytes, so at MTU 88.
SMALLEST_MSS, ITS_MTU = 36, 88


def test_the_largest_super_packet_in_the_smallest_segments_goes_out_whole(offload_server):
    server, devices = offload_server
    payload = os.urandom(ups.MAX_IP_PACKET - 52)  # IPv4 and TCP with timestamps
    packet, l4 = packets.super_packet(4, ups.TCP, payload)
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        tunnel.sock = wire = Wire()
        devices.outer["udp2"].send(vnet(ups.GSO_TCPV4, SMALLEST_MSS, l4, 16,
                                        ups.VNET_F_NEEDS_CSUM) + bytes(packet))
        server.loop.dispatch(tunnel.fd)  # cut in the server's own shared buffers
    count = -(-len(payload) // SMALLEST_MSS)
    assert len(wire.datagrams) == count
    assert all(len(d) <= 4 + ITS_MTU and packets.valid(d[4:]) for d in wire.datagrams)
    assert b"".join(d[4 + l4 + 32:] for d in wire.datagrams) == payload
    assert (tunnel.counters.tx_packets, tunnel.counters.drops) == (count, {})


def test_single_packets_go_out_in_order_with_checksums_completed(offload_server):
    server, devices = offload_server
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        sent = []
        for size in (300, 300, 300, 120):
            packet, l4 = packets.super_packet(4, ups.UDP, os.urandom(size))
            segment = bytearray(split_one(packet, ups.UDP, l4))
            struct.pack_into("!H", segment, l4 + 6, ~packets.rfc1071(packets.pseudo(segment, l4))
                             & 0xFFFF)  # partial, as the kernel leaves it
            devices.outer["udp2"].send(vnet(start=l4, offset=6, flags=ups.VNET_F_NEEDS_CSUM)
                                       + bytes(segment))
            sent.append(segment)
        server.loop.dispatch(tunnel.fd)
        received = [peer.recv(65535) for _ in sent]
    assert [r[4:] for r in received] != [bytes(s) for s in sent]  # checksums were filled in
    assert all(packets.valid(r[4:]) for r in received)
    assert [r[4 + 28:] for r in received] == [bytes(s[28:]) for s in sent]


def split_one(packet, proto, l4):
    out = bytearray(ups.BUFFER_SIZE)
    _, total, _ = ups.split_gso(packet, proto, l4, 65535, out)
    return out[:total]


def datagrams_of(payload, mss, seq=1000):
    """2015-format datagrams of a TCP stream cut at mss, laid end to end, and their stride."""
    packet, l4 = packets.super_packet(4, ups.TCP, payload, seq=seq, flags=ups.TCP_ACK)
    out = bytearray(ups.BUFFER_SIZE + ups.BUFFER_SIZE // 8)
    stride, total, _ = ups.split_gso(packet, ups.TCP, l4, mss, out, 0, ups.PI_BY_VERSION[4])
    return memoryview(out)[:total], stride


def test_datagrams_of_one_flow_are_joined_into_one_write(offload_server):
    server, devices = offload_server
    payload = os.urandom(6000)
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        view, stride = datagrams_of(payload, 1000)
        deliver(tunnel, view, stride)
    write = devices.outer["udp2"].recv(65535)
    flags, gso_type, hdr_len, gso_size, start, offset = ups.VNET_HDR.unpack_from(write)
    assert (flags, gso_type, gso_size, start, offset) == (ups.VNET_F_NEEDS_CSUM, ups.GSO_TCPV4,
                                                          1000, 20, 16)
    assert write[ups.VNET_HDR_LEN + hdr_len:] == payload
    assert (tunnel.counters.rx_packets, tunnel.counters.rx_bytes) == (6, len(view))


def test_a_refused_joined_write_turns_joining_off_for_that_tunnel_only(offload_server,
                                                                       monkeypatch):
    server, devices = offload_server
    with udp() as peer, udp() as other_peer:
        tunnel = add_loopback_tunnel(server, peer)
        other = add_loopback_tunnel(server, other_peer, "udp3", "10.0.2.1")
        refusals = refuse_joined_writes(monkeypatch, tunnel.device)
        view, stride = datagrams_of(os.urandom(3000), 1000)
        deliver(tunnel, view, stride)
        # Nothing lost: the refused write's packets are written one by one.
        assert [len(devices.outer["udp2"].recv(65535)) for _ in range(3)] == \
            [ups.VNET_HDR_LEN + stride - 4] * 3
        assert (tunnel.counters.rx_packets, tunnel.counters.drops, len(refusals)) == (3, {}, 1)
        deliver(tunnel, view, stride)  # one by one, without trying again
        assert (tunnel.counters.rx_packets, len(refusals)) == (6, 1)
        deliver(other, view, stride)  # another tunnel still joins
        write = devices.outer["udp3"].recv(65535)
        assert ups.VNET_HDR.unpack_from(write)[1] == ups.GSO_TCPV4
        assert other.counters.rx_packets == 3


def test_a_tunnel_tries_joining_again_after_a_while(offload_server, monkeypatch):
    server, devices = offload_server
    clock = [1000.0]  # seconds, as time.monotonic counts them
    server.clock = lambda: clock[0]
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        refusals = refuse_joined_writes(monkeypatch, tunnel.device)
        view, stride = datagrams_of(os.urandom(3000), 1000)
        deliver(tunnel, view, stride)
        clock[0] += ups.JOIN_RETRY - 1
        deliver(tunnel, view, stride)
        assert len(refusals) == 1
        clock[0] += 1
        deliver(tunnel, view, stride)  # tried again, refused again, nothing lost
        assert len(refusals) == 2 and tunnel.counters.rx_packets == 9 and not tunnel.counters.drops
        monkeypatch.undo()  # the kernel takes joined writes again
        clock[0] += ups.JOIN_RETRY
        for _ in range(9):
            devices.outer["udp2"].recv(65535)
        deliver(tunnel, view, stride)
        write = devices.outer["udp2"].recv(65535)
    assert ups.VNET_HDR.unpack_from(write)[1] == ups.GSO_TCPV4
    assert tunnel.counters.rx_packets == 12


class RefusingGSO:
    """A data socket whose GSO sends fail as a device without checksum offload makes them."""

    def __init__(self, sock):
        self.sock = sock

    def sendmsg(self, *args):
        raise OSError(errno.EIO, "Input/output error")

    def sendto(self, *args):
        return self.sock.sendto(*args)


# With partial checksums (a new peer) the datagrams go as pieces, headers and payloads.
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_gso_refused_with_eio_is_turned_off_and_nothing_is_lost(offload_server, partial):
    server, devices = offload_server
    packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(3000))
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        told_partial(tunnel, partial)
        tunnel.sock = RefusingGSO(server.data_sock)
        devices.outer["udp2"].send(vnet(ups.GSO_TCPV4, 1000, l4, 16, ups.VNET_F_NEEDS_CSUM)
                                   + bytes(packet))
        server.loop.dispatch(tunnel.fd)
        assert len([peer.recv(65535) for _ in range(3)]) == 3
    assert server.offloads.udp_gso is False
    assert tunnel.counters.tx_packets == 3 and not tunnel.counters.drops


def send_super_packet(server, devices, tunnel):
    """The device hands the tunnel 3,000 bytes of TCP to cut into three datagrams and send."""
    packet, l4 = packets.super_packet(4, ups.TCP, os.urandom(3000))
    devices.outer[tunnel.name].send(vnet(ups.GSO_TCPV4, 1000, l4, 16, ups.VNET_F_NEEDS_CSUM)
                                    + bytes(packet))
    server.loop.dispatch(tunnel.fd)


# A route that flaps, a firewall rule, the kernel short of memory, a full socket buffer.
@pytest.mark.parametrize("code", [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPERM,
                                  errno.ENOBUFS, errno.EAGAIN], ids=errno.errorcode.get)
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_a_passing_send_error_drops_that_send_and_gso_stays_on(offload_server, code, partial):
    server, devices = offload_server
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        told_partial(tunnel, partial)
        tunnel.sock = wire = Wire(gso_errors=[code])
        send_super_packet(server, devices, tunnel)  # refused, and counted
        send_super_packet(server, devices, tunnel)  # the error has passed: one GSO send
    assert tunnel.counters.drops == {"socket_full" if code == errno.EAGAIN else "send_error": 3}
    assert (wire.gso_sends, len(wire.datagrams), tunnel.counters.tx_packets) == (1, 3, 3)
    assert server.offloads.udp_gso


# EMSGSIZE: datagrams larger than the underlay MTU, which GSO cannot fragment; EINVAL
# says so too before Linux 6.14, or that the send has more segments than the kernel takes.
@pytest.mark.parametrize("code", [errno.EMSGSIZE, errno.EINVAL], ids=errno.errorcode.get)
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_datagrams_gso_cannot_send_go_one_by_one_on_that_tunnel_only(offload_server, code,
                                                                     partial):
    server, devices = offload_server
    with udp() as peer, udp() as other_peer:
        tunnel = add_loopback_tunnel(server, peer)
        other = add_loopback_tunnel(server, other_peer, "udp3", "10.0.2.1")
        told_partial(tunnel, partial)
        told_partial(other, partial)
        tunnel.sock = wire = Wire(gso_errors=[code])
        other.sock = other_wire = Wire()
        send_super_packet(server, devices, tunnel)
        send_super_packet(server, devices, tunnel)
        send_super_packet(server, devices, other)
    assert (wire.gso_sends, len(wire.datagrams), tunnel.counters.tx_packets, tunnel.counters.drops) == (0, 6, 6, {})
    assert (other_wire.gso_sends, len(other_wire.datagrams)) == (1, 3)


def test_without_udp_gro_an_offload_tunnel_still_writes_virtio_framing(offload_server):
    server, devices = offload_server
    server.offloads.udp_gro = False
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        peer.sendto(DATAGRAM, ("127.0.0.1", server.data_port))
        server.loop.dispatch(server.data_sock.fileno())
    assert devices.outer["udp2"].recv(65535) == ups.ZERO_VNET_HDR + PACKET
    assert tunnel.counters.rx_packets == 1


def test_udp_is_not_joined_where_the_kernel_has_no_uso(offload_server):
    server, devices = offload_server  # TSO4 but no USO, as before Linux 6.2
    packet, l4 = packets.super_packet(4, ups.UDP, os.urandom(3000))
    out = bytearray(ups.BUFFER_SIZE)
    stride, total, _ = ups.split_gso(packet, ups.UDP, l4, 1000, out, 0, ups.PI_BY_VERSION[4])
    with udp() as peer:
        tunnel = add_loopback_tunnel(server, peer)
        deliver(tunnel, memoryview(out)[:total], stride)
    writes = [devices.outer["udp2"].recv(65535) for _ in range(3)]
    assert all(w[:ups.VNET_HDR_LEN] == ups.ZERO_VNET_HDR for w in writes)
    assert server.offloads.join is True


MANAGER = ("198.18.0.9", 40000)
ADD = {"op": "add", "tunnel": [{"name": "udp2", "tunnelIP": "10.0.1.1",
                                "remoteServer": "198.18.0.2"}]}


def test_a_valid_cookie_proves_the_sender_and_a_bad_one_is_not_acted_on():
    clock = [1795000000.0]
    with fake_server(netlink=True) as (server, _):
        server.control.cookies = ups.ControlCookies(clock=lambda: clock[0])
        reply, _, proven = answer(server, b'{"op": "cookie"}', MANAGER)
        assert reply["ok"] and not proven
        cookie = reply["cookie"]
        reply, _, proven = answer(server, json.dumps({"op": "list", "cookie": cookie}).encode(),
                                         MANAGER)
        assert reply["ok"] and proven
        for sender, later in ((("198.18.0.7", 40000), 0), (MANAGER, 2 * ups.COOKIE_PERIOD)):
            clock[0] += later  # another address, then the cookie's own after it expired
            reply, _, proven = answer(server, json.dumps(dict(ADD, cookie=cookie)).encode(), sender)
            assert reply["retry"] and not reply["ok"] and not proven
            assert "udp2" not in server.registry.by_name  # not acted on: the sender asks again
        assert server.control.counts["bad_cookie"] == 2
        reply, _, proven = answer(server, json.dumps(ADD).encode(), MANAGER)
        assert reply["ok"] and not proven  # a plain request, as in 2015, is acted on


def test_an_unproven_sender_gets_no_more_than_it_sent_and_its_cookie():
    with fake_server(netlink=True) as (server, _):
        request = json.dumps({"op": "list"}).encode()
        unproven = ups.Answer(answer(server, request, MANAGER)[0], None, False, ())
        assert server.control.reply_datagram(unproven, len(request), MANAGER) == \
            (None, ("withheld",))
        cut, counted = server.control.reply_datagram(unproven, 100, MANAGER)
        assert json.loads(cut) == {"ok": True, "op": "list",
                                   "cookie": server.control.cookies.make(MANAGER)}
        assert counted == ("cut",)


def entry(name, third, **changes):
    return dict({"name": name, "tunnelIP": "10.0.%d.1" % third,
                 "remoteServer": "198.18.0.%d" % third}, **changes)


@contextlib.contextmanager
def server_with_state(tmp_path):
    with fake_server(netlink=True, state=ups.StateFile(str(tmp_path / "state.json"))) as made:
        yield made


def saved_names(server):
    return [e["name"] for e in server.keeper.state.load()]


class NoNetlink:
    def __init__(self):
        raise OSError(errno.EPROTONOSUPPORT, "netlink is not there")


def test_an_add_that_fails_with_any_error_leaves_nothing_and_the_others_go_on(tmp_path,
                                                                              monkeypatch):
    with server_with_state(tmp_path) as (server, devices):
        monkeypatch.setattr(ups, "IPRoute", NoNetlink)
        made = []
        opened = server.open_device
        server.open_device = lambda *args: made.append(opened(*args)) or made[-1]
        reply, _, _ = answer(server, json.dumps({"op": "add", "tunnel": [
            entry("udp2", 2, routes=["192.168.2.0/24"]), entry("udp3", 3)]}).encode(),
            ("127.0.0.1", 9))
        assert [r["ok"] for r in reply["results"]] == [False, True]
        assert "cannot configure udp2 through netlink" in reply["results"][0]["error"]
        # The half-made device is closed, not kept (with a state file, devices are), so the
        # kernel deletes it.
        assert made[0].fileno() == -1 and devices.persistent == {"udp3"}
        assert list(server.registry.by_name) == ["udp3"] and len(server.loop.handlers) == 3
        assert saved_names(server) == ["udp3"]


def test_a_bug_while_adding_one_tunnel_costs_only_that_tunnel(tmp_path):
    with server_with_state(tmp_path) as (server, devices):
        opened = server.open_device

        def open_device(spec, *args):
            if spec.name == "udp2":
                raise RuntimeError("a bug")
            return opened(spec, *args)

        server.open_device = open_device
        reply, _, _ = answer(server, json.dumps({"op": "add", "tunnel": [
            entry("udp2", 2), entry("udp3", 3)]}).encode(), ("127.0.0.1", 9))
        assert reply["results"][0] == {"name": "udp2", "ok": False, "error": "internal error: a bug"}
        assert reply["results"][1]["ok"] and saved_names(server) == ["udp3"]


def test_a_tunnel_whose_device_failed_leaves_the_state_file(tmp_path):
    with server_with_state(tmp_path) as (server, devices):
        answer(server, json.dumps({"op": "add", "tunnel": [entry("udp2", 2), entry("udp3", 3)]})
                      .encode(), ("127.0.0.1", 9))
        tunnel = server.registry.by_name["udp2"]

        def gone():
            raise ups.DeviceGone("No such device")

        tunnel.forward_from_device = gone
        server.loop.dispatch(tunnel.fd)
        assert list(server.registry.by_name) == ["udp3"] and saved_names(server) == ["udp3"]


@pytest.mark.parametrize("content", [None, b'{"version": 1, "tunn', b"\xff\xfe", b"[]"])
def test_sighup_with_a_missing_or_corrupt_state_file_keeps_every_tunnel(tmp_path, content):
    with server_with_state(tmp_path) as (server, devices):
        answer(server, json.dumps({"op": "add", "tunnel": [entry("udp2", 2)]}).encode(),
                      ("127.0.0.1", 9))
        os.remove(server.keeper.state.path)
        if content is not None:
            with open(server.keeper.state.path, "wb") as f:
                f.write(content)
        server.keeper.reload()
        assert list(server.registry.by_name) == ["udp2"]


def test_sighup_with_a_readable_file_listing_fewer_tunnels_removes_them(tmp_path):
    with server_with_state(tmp_path) as (server, devices):
        answer(server, json.dumps({"op": "add", "tunnel": [entry("udp2", 2), entry("udp3", 3)]})
                      .encode(), ("127.0.0.1", 9))
        server.keeper.state.save([entry("udp3", 3)])
        server.keeper.reload()
        assert list(server.registry.by_name) == ["udp3"]


def test_a_tunnel_that_cannot_be_made_again_stays_in_the_state_file_until_made_or_deleted(
        tmp_path, monkeypatch):
    with server_with_state(tmp_path) as (server, devices):
        server.keeper.state.save([entry("udp2", 2, routes=["192.168.2.0/24"]), entry("udp3", 3),
                           entry("udp4", 4)])
        missing = monkeypatch.context()
        with missing as patch:
            patch.setattr(ups, "IPRoute", NoNetlink)  # e.g. pyroute2 gone after an upgrade
            server.keeper.restore()
        assert sorted(server.registry.by_name) == ["udp3", "udp4"] and list(server.registry.unmade) == ["udp2"]
        assert list_of(server)["unmade"] == ["udp2"]
        answer(server, json.dumps({"op": "del", "tunnel": [{"name": "udp4"}]}).encode(),
                      ("127.0.0.1", 9))
        assert sorted(saved_names(server)) == ["udp2", "udp3"]  # udp2 is still wanted
        reply, _, _ = answer(server, b'{"op": "del", "tunnel": [{"name": "udp2"}]}',
                                    ("127.0.0.1", 9))
        assert reply["ok"] and saved_names(server) == ["udp3"] and not server.registry.unmade


@pytest.mark.parametrize("bad", [42, {"name": "udp3", "tunnelIP": "10.0.3.1", "mtu": "1400x",
                                      "remoteServer": "198.18.0.3"}])
def test_sighup_with_a_bad_entry_changes_nothing(tmp_path, bad):
    with server_with_state(tmp_path) as (server, devices):
        answer(server, json.dumps({"op": "add", "tunnel": [entry("udp2", 2), entry("udp3", 3)]})
                      .encode(), ("127.0.0.1", 9))
        server.keeper.state.save([entry("udp2", 2), bad])
        server.keeper.reload()
        assert sorted(server.registry.by_name) == ["udp2", "udp3"]


def list_of(server, **request):
    reply, _, _ = answer(server, json.dumps(dict({"op": "list"}, **request)).encode(),
                                ("127.0.0.1", 9))
    return reply


def add_many(server, count, start=0):
    for first in range(start, start + count, 50):
        answer(server, json.dumps({"op": "add", "tunnel": [
            {"name": "t%d" % i, "tunnelIP": "10.64.%d.%d" % (i // 64, i % 64 * 4 + 1),
             "remoteServer": "198.19.%d.%d" % (i // 250, i % 250 + 1)}
            for i in range(first, min(first + 50, start + count))]})
            .encode(), ("127.0.0.1", 9))


def test_a_list_in_parts_shows_every_tunnel_once_while_counters_grow():
    with fake_server(netlink=True) as (server, _):
        add_many(server, 150)
        first = list_of(server)
        assert first["parts"] > 1
        for tunnel in server.registry.by_name.values():  # counters at their largest
            tunnel.counters.rx_packets = tunnel.counters.rx_bytes = tunnel.counters.tx_packets = tunnel.counters.tx_bytes = 2**64
            tunnel.counters.last_rx = tunnel.counters.last_tx = 1795000000.123456
            tunnel.counters.drops.update({reason: 2**64 for reason in (
                "short", "truncated", "tun_refused", "tun_full", "socket_full", "send_error")})
        names = [t["name"] for part in range(first["parts"]) for t in list_of(
            server, part=part, generation=first["generation"])["tunnels"]]
        assert sorted(names) == sorted(server.registry.by_name)
        for part in range(first["parts"]):  # each part, counters and all, fits a datagram
            reply = list_of(server, part=part)
            assert len(json.dumps(reply)) + len(json.dumps(json.dumps(reply))) < ups.MAX_REPLY


def test_a_part_of_an_older_generation_is_refused_so_the_list_starts_again():
    with fake_server(netlink=True) as (server, _):
        add_many(server, 150)
        first = list_of(server)
        add_many(server, 1, start=150)
        reply = list_of(server, part=1, generation=first["generation"])
        assert reply["ok"] is False and reply["retry"] and "changed while" in reply["error"]


def test_a_refusal_inside_an_op_is_a_refusal_not_an_internal_error(caplog):
    with fake_server(netlink=True) as (server, _), caplog.at_level(logging.ERROR, logger="udpProxyServer"):
        reply = list_of(server, part=1)
    assert reply == {"ok": False, "op": "list", "error": "no part 1: the list has 1 parts"}
    assert not caplog.records  # no traceback, no error line


def test_refusals_under_a_barrage_are_logged_a_few_then_counted(caplog):
    clock = [0.0]
    with fake_server(netlink=True) as (server, _), caplog.at_level(logging.WARNING, logger="udpProxyServer"):
        server.control.quiet.clock = lambda: clock[0]
        for _ in range(1000):
            answer(server, b"garbage", ("198.18.0.7", 9))
        clock[0] += ups.REFUSAL_LOG_PERIOD
        answer(server, b"garbage", ("198.18.0.7", 9))
        assert server.control.counts["refused"] == 1001
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == ups.REFUSALS_LOGGED + 2
    assert "990 more refused control requests or unsent replies in 60 s" in lines[-2]


def test_without_cryptography_an_encrypted_tunnel_is_refused_saying_what_to_install(
        monkeypatch):
    monkeypatch.setattr(ups, "ChaCha20Poly1305", None)
    with fake_server(netlink=True) as (server, _):
        reply, _, _ = answer(server, json.dumps({"op": "add", "tunnel": [
            entry("udp3", 3), entry("wg2", 2, publicKey="a" * 43 + "=")]}).encode(),
            ("127.0.0.1", 9))
    assert [r["ok"] for r in reply["results"]] == [True, False]  # plain tunnels go on
    assert reply["results"][1]["error"] == \
        "encrypted tunnels: the cryptography package is needed (pip install cryptography)"


def test_an_encrypted_tunnel_needs_the_daemons_key():
    with fake_server(netlink=True) as (server, _):
        reply, _, _ = answer(server, json.dumps({"op": "add", "tunnel": [
            entry("wg2", 2, publicKey="a" * 43 + "=")]}).encode(), ("127.0.0.1", 9))
    assert "needs this daemon's own key: start it with --key-file" in reply["error"]


class GroupNetlink:
    """Stands in for pyroute2's IPRoute at deleting devices together: the interface group of
    each device by index, and the requests it was sent; refused, if given, is the command it
    refuses (set or del) and the error."""

    def __init__(self, indexes, refused=(None, None)):
        self.groups = dict.fromkeys(indexes, 0)
        self.refused = refused
        self.requests = []

    def __call__(self):
        return self

    def link(self, command, index=None, group=None):
        self.requests.append((command, index, group))
        if command == self.refused[0]:
            raise ups.NetlinkError(self.refused[1], os.strerror(self.refused[1]))
        if command == "set":
            self.groups[index] = group
        else:
            self.groups = {i: g for i, g in self.groups.items() if g != group}

    def close(self):
        pass


@contextlib.contextmanager
def tunnels_on_netlink(tmp_path, monkeypatch, count, **netlink):
    """A server with a state file and count tunnels udp2... whose fake devices have indexes
    (their fds' numbers) that a GroupNetlink knows, with a device not the server's (index
    1000, in an administrator's group)."""
    with server_with_state(tmp_path) as (server, devices):
        answer(server, json.dumps({"op": "add", "tunnel": [entry("udp%d" % i, i)
                                   for i in range(2, count + 2)]}).encode(), ("127.0.0.1", 9))
        fake = GroupNetlink([t.fd for t in server.registry.by_name.values()], **netlink)
        fake.groups[1000] = 7
        monkeypatch.setattr(ups, "IPRoute", fake)
        monkeypatch.setattr(ups, "held_device_index",
                            lambda fd: fd if fd in fake.groups and fd != 1000 else None)
        yield server, fake


def delete(server, *names):
    reply, _, _ = answer(server, json.dumps({"op": "del", "tunnel": [{"name": n} for n in names]})
                         .encode(), ("127.0.0.1", 9))
    return reply


def test_one_del_puts_just_its_devices_in_a_group_and_deletes_that_group_once(tmp_path,
                                                                           monkeypatch, caplog):
    with tunnels_on_netlink(tmp_path, monkeypatch, 4) as (server, netlink), \
            caplog.at_level(logging.INFO, logger="udpProxyServer"):
        removed = [server.registry.by_name[name] for name in ("udp2", "udp3", "udp5")]
        assert delete(server, "udp2", "udp3", "udp5")["ok"]
        group = netlink.requests[-1][2]
        assert ups.DELETE_GROUPS[0] <= group < ups.DELETE_GROUPS[1]
        assert sorted(netlink.requests[:-1]) == sorted(("set", t.fd, group) for t in removed)
        assert netlink.requests[-1] == ("del", None, group)
        assert netlink.groups == {server.registry.by_name["udp4"].fd: 0, 1000: 7}
        assert all(tunnel.device.tun.fileno() == -1 for tunnel in removed)  # closed after
        assert list(server.registry.by_name) == ["udp4"] and saved_names(server) == ["udp4"]
        assert "3 devices deleted together" in caplog.text
        netlink.requests.clear()
        assert delete(server, "udp4")["ok"]
        assert netlink.requests == []  # one device: its fd closed deletes it as soon


@pytest.mark.parametrize("command", ["set", "del"])
def test_devices_not_deleted_together_are_closed_one_by_one_said_in_one_line(
        tmp_path, monkeypatch, caplog, command):
    refused = (command, errno.EOPNOTSUPP)
    with tunnels_on_netlink(tmp_path, monkeypatch, 4, refused=refused) as (server, netlink), \
            caplog.at_level(logging.INFO, logger="udpProxyServer"):
        removed = [server.registry.by_name[name] for name in ("udp2", "udp3", "udp5")]
        assert delete(server, "udp2", "udp3", "udp5")["ok"]
        assert netlink.requests[-1][0] == command  # nothing asked after the refusal
        assert all(tunnel.device.tun.fileno() == -1 for tunnel in removed)
        assert list(server.registry.by_name) == ["udp4"] and saved_names(server) == ["udp4"]
        said = [r.getMessage() for r in caplog.records if "together" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].startswith("3 devices not deleted together (netlink: ")
        assert said[0].endswith("): closing them one by one")
