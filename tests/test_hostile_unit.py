"""Encrypted tunnels against a hostile peer, without root: an authenticated peer that sends
broken inner packets, alone and in GRO trains mixed with good ones, on a daemon with two
tunnels; nothing may reach the other tunnel's device, every drop is counted, no traceback."""

import logging

import pytest

import udpProxyServer as ups
from fakes import Clock, WirePeer, add, drain, fake_server, ipv4_packet, receive
from fakes import udp as fakes_udp

ATTACKER, VICTIM = "10.0.1.2", "10.0.2.2"


def two_tunnels(server):
    """Two encrypted tunnels of server, each to a WirePeer that has completed a handshake:
    (attacker, victim), each with its tunnel's name and the daemon's address in it."""
    public = server.wireguard.local_public
    attacker, victim = WirePeer(public), WirePeer(public)
    reply = add(server, attacker.entry("wga", "10.0.1.1"), victim.entry("wgv", "10.0.2.1"))
    assert reply["ok"], reply
    port = server.data_port
    attacker.handshake(server, port)
    victim.handshake(server, port)
    return attacker, victim


@pytest.fixture(params=[True, None], ids=["offload", "no-offload"])
def encrypted_server(request):
    with fake_server(offloads=request.param, private_key=ups.generate_private_key(),
                     clock=Clock()) as made:
        yield made


def written_packets(devices, name, offload):
    """The packets the daemon wrote into a device, headers taken off."""
    skip = ups.VNET_HDR_LEN if offload else 0
    return [write[skip:] for write in devices.written(name)]


# Inner packets broken in structured ways, each with the reason the daemon counts it under.
BROKEN = {
    "total length 0": (lambda m: ipv4_packet(ATTACKER, "10.0.1.1", m, total=0), "malformed"),
    "shorter than its header": (lambda m: ipv4_packet(ATTACKER, "10.0.1.1", m, total=12),
                                "malformed"),
    "header length 3": (lambda m: ipv4_packet(ATTACKER, "10.0.1.1", m, ihl=3), "malformed"),
    "longer than the datagram": (lambda m: ipv4_packet(ATTACKER, "10.0.1.1", m, total=1400),
                                 "malformed"),
    "version 5": (lambda m: b"\x50" + ipv4_packet(ATTACKER, "10.0.1.1", m)[1:], "malformed"),
    "a few bytes": (lambda m: b"\x45\x00" + m[:4], "malformed"),
    "source outside": (lambda m: ipv4_packet("10.9.9.9", "10.0.1.1", m), "not_allowed_source"),
    "source the victim's": (lambda m: ipv4_packet(VICTIM, "10.0.2.1", m), "not_allowed_source"),
    "source our own address": (lambda m: ipv4_packet("10.0.1.1", "10.0.1.1", m),
                               "not_allowed_source"),
    "source the subnet's broadcast": (lambda m: ipv4_packet("10.0.1.3", "10.0.1.1", m),
                                      "not_allowed_source"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
@pytest.mark.parametrize("train", [False, True], ids=["one-by-one", "train"])
def test_broken_inner_packets_never_reach_another_tunnels_device(encrypted_server, broken, train,
                                                                 caplog):
    server, devices = encrypted_server
    offload = bool(server.offloads.tun_flags)
    attacker, victim = two_tunnels(server)
    devices.written("wga"), devices.written("wgv")
    marker = b"ATTACKER" * 8
    good = ipv4_packet(ATTACKER, "10.0.1.1", marker)
    make, reason = BROKEN[broken]
    bad = make(marker)
    # Good and broken ones of one padded size in one train, as a peer's GSO send makes it.
    messages = [attacker.seal(packet, 128) for packet in (good, bad, good, bad, good)]
    with caplog.at_level(logging.DEBUG, "udpProxyServer"):
        attacker.send_messages(messages, server.data_port, train)
        receive(server)
        victim.send([ipv4_packet(VICTIM, "10.0.2.1", b"victim" * 10)], server.data_port)
        receive(server)
    to_victim = written_packets(devices, "wgv", offload)
    assert [p for p in to_victim if marker in p] == []
    assert len(to_victim) == 1 and b"victim" in to_victim[0]
    assert sum(p.count(marker) for p in written_packets(devices, "wga", offload)) == 3
    assert server.registry.by_name["wga"].counters.drops == {reason: 2}
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


# --- GRO trains of more than one kind --------------------------------------------


def sealed_with(peer, keys, cipher, counter, packet, size=128):
    padded = bytes(packet) + bytes(size - len(packet))
    return ups.seal_transport(cipher, keys.remote_index, counter, padded)


def test_a_train_across_a_rekey_delivers_both_keypairs_messages(encrypted_server):
    server, devices = encrypted_server
    offload = bool(server.offloads.tun_flags)
    attacker, victim = two_tunnels(server)
    old_keys, old_cipher, old_counter = victim.keys, victim.cipher, victim.counter
    server.clock.advance(1)
    victim.handshake(server, server.data_port)  # a new session; the old one is previous
    devices.written("wgv")
    old = [sealed_with(victim, old_keys, old_cipher, old_counter + i,
                       ipv4_packet(VICTIM, "10.0.2.1", b"old %d" % i + bytes(40)))
           for i in range(3)]
    new = [victim.seal(ipv4_packet(VICTIM, "10.0.2.1", b"new %d" % i + bytes(40)), 128)
           for i in range(3)]
    victim.send_messages(old[:2] + new[:2] + old[2:] + new[2:], server.data_port, train=True)
    receive(server)
    written = b"".join(written_packets(devices, "wgv", offload))
    assert all(b"old %d" % i in written and b"new %d" % i in written for i in range(3))
    assert not server.registry.by_name["wgv"].counters.drops


def test_a_spoofed_datagram_heading_a_train_costs_only_itself(encrypted_server):
    server, devices = encrypted_server
    offload = bool(server.offloads.tun_flags)
    attacker, victim = two_tunnels(server)
    devices.written("wgv")
    good = [victim.seal(ipv4_packet(VICTIM, "10.0.2.1", b"good %d" % i + bytes(40)), 128)
            for i in range(3)]
    size = len(good[0])  # one size, as GRO joins them
    spoofed = [b"\x04\x00\x00\x00" + bytes(size - 4), bytes(size),
               b"\x01\x00\x00\x00" + bytes(size - 4)]
    victim.send_messages(spoofed[:1] + good[:1] + spoofed[1:] + good[1:], server.data_port,
                         train=True)
    receive(server)
    written = b"".join(written_packets(devices, "wgv", offload))
    assert all(b"good %d" % i in written for i in range(3))


def test_plain_and_encrypted_datagrams_of_one_peer_daemon_in_one_train(encrypted_server):
    """The peer daemon has a plain and an encrypted tunnel to us: both come from its data
    port to ours, and GRO may join them into one train."""
    server, devices = encrypted_server
    offload = bool(server.offloads.tun_flags)
    attacker, victim = two_tunnels(server)
    assert add(server, {"name": "udpv", "tunnelIP": "10.0.3.1", "remoteServer": "127.0.0.1",
                        "remotePort": victim.port})["ok"]
    devices.written("wgv")
    encrypted = [victim.seal(ipv4_packet(VICTIM, "10.0.2.1", b"sealed %d" % i + bytes(40)), 128)
                 for i in range(3)]
    size = len(encrypted[0])  # one size, as GRO joins them
    plain = [ups.PI_BY_VERSION[4] + ipv4_packet("10.0.3.2", "10.0.3.1", b"plain %d" % i
                                                 + bytes(size - 4 - 20 - 7))
             for i in range(3)]
    assert {len(m) for m in encrypted + plain} == {size}
    victim.send_messages([plain[0], encrypted[0], encrypted[1], plain[1], plain[2],
                          encrypted[2]], server.data_port, train=True)
    receive(server)
    sealed = b"".join(written_packets(devices, "wgv", offload))
    opened = b"".join(written_packets(devices, "udpv", offload))
    assert all(b"sealed %d" % i in sealed and b"plain %d" % i in opened for i in range(3))
    assert b"plain" not in sealed and b"sealed" not in opened


# --- The responder's handshake, complete once confirmed ------------------------


def test_a_responder_whose_initiation_crossed_the_peers_is_done_once_confirmed():
    clock = Clock()
    with fake_server(offloads=True, private_key=ups.generate_private_key(),
                     clock=clock) as (server, devices):
        peer = WirePeer(server.wireguard.local_public)
        assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
        # A packet for the peer: the daemon initiates, and the peer does not answer that.
        devices.outer["wgp"].send(ups.ZERO_VNET_HDR + ipv4_packet("10.0.1.1", "10.0.1.2", b"x"))
        server.loop.dispatch(server.registry.by_name["wgp"].fd)
        server.wireguard.run_timers()
        assert [ups.message_type(d) for d in drain(peer.sock)] == [ups.MESSAGE_INITIATION]
        # The peer's own initiation crosses it: the daemon answers; the handshake is not
        # complete on the daemon's side until a message comes with the new keys.
        sent, message = peer.initiation()
        peer.sock.sendto(message, ("127.0.0.1", server.data_port))
        receive(server)
        peer.keys = ups.consume_response(sent, peer.receive(ups.MESSAGE_RESPONSE))
        peer.cipher = ups.transport_cipher(peer.keys.send_key)
        assert server.registry.by_name["wgp"].describe()["latestHandshake"] is None
        clock.advance(1)
        peer.send([b""], server.data_port)  # a keepalive confirms it
        receive(server)
        assert server.registry.by_name["wgp"].describe()["latestHandshake"] is not None
        # The staged packet (after the beacon that says this daemon takes sealed chunks).
        assert [ups.message_type(d) for d in drain(peer.sock)] == [ups.MESSAGE_TRANSPORT] * 2
        for _ in range(40):  # long past the retry of the daemon's own initiation
            clock.advance(0.5)
            peer.send([b""], server.data_port)
            receive(server)
        sent_types = {ups.message_type(d) for d in drain(peer.sock)}
        assert ups.MESSAGE_INITIATION not in sent_types
        assert server.registry.by_name["wgp"].wg_peer.initiation is None  # its keys let go of, not at 540 s


def test_an_authenticated_packet_that_is_dropped_still_tells_the_timers(encrypted_server):
    """As wireguard-go: data received is data received, whatever its inner packet; so the
    daemon answers with a keepalive in time, and a session is not thought silent."""
    server, devices = encrypted_server
    attacker, _ = two_tunnels(server)
    timers = server.registry.by_name["wga"].wg_peer.timers
    timers.deadlines.pop("send_keepalive", None)
    attacker.send([ipv4_packet(ATTACKER, "10.0.1.1", b"x", total=0)], server.data_port)
    receive(server)
    assert server.registry.by_name["wga"].counters.drops == {"malformed": 1}
    assert "send_keepalive" in timers.deadlines


def test_a_source_belongs_to_the_tunnel_of_the_longest_prefix(encrypted_server):
    """Cryptokey routing across tunnels, as wireguard-go's allowed IPs: a peer whose tunnel
    routes 192.168.0.0/16 may not send as 192.168.2.5 when another tunnel routes
    192.168.2.0/24; nor as an address of another tunnel's subnet."""
    server, devices = encrypted_server
    public = server.wireguard.local_public
    wide, narrow = WirePeer(public), WirePeer(public)
    assert add(server, wide.entry("wgw", "10.0.1.1", routes=["192.168.0.0/16"]),
               narrow.entry("wgn", "10.0.2.1", routes=["192.168.2.0/24"]))["ok"]
    for peer in (wide, narrow):
        peer.handshake(server, server.data_port)
    wide.send([ipv4_packet("192.168.2.5", "10.0.1.1", b"mine?"),
               ipv4_packet("192.168.3.5", "10.0.1.1", b"mine!"),
               ipv4_packet("10.0.2.2", "10.0.1.1", b"theirs")], server.data_port)
    narrow.send([ipv4_packet("192.168.2.5", "10.0.2.1", b"ours")], server.data_port)
    receive(server)
    offload = bool(server.offloads.tun_flags)
    assert [p[-5:] for p in written_packets(devices, "wgw", offload)] == [b"mine!"]
    assert [p[-4:] for p in written_packets(devices, "wgn", offload)] == [b"ours"]
    assert server.registry.by_name["wgw"].counters.drops == {"not_allowed_source": 2}


@pytest.mark.parametrize("prefix, peer, refused", [
    (31, "10.0.1.0", ["10.0.1.1"]),  # a /31: both addresses are hosts
    (30, "10.0.1.2", ["10.0.1.0", "10.0.1.1", "10.0.1.3"]),
    (24, "10.0.1.77", ["10.0.1.0", "10.0.1.1", "10.0.1.255"]),
])
def test_a_subnets_sources_are_its_hosts_but_ours(encrypted_server, prefix, peer, refused):
    server, devices = encrypted_server
    offload = bool(server.offloads.tun_flags)
    attacker = WirePeer(server.wireguard.local_public)
    assert add(server, attacker.entry("wga", "10.0.1.1/%d" % prefix))["ok"]
    attacker.handshake(server, server.data_port)
    devices.written("wga")
    attacker.send([ipv4_packet(source, "10.0.1.1", source.encode())
                   for source in [peer] + refused], server.data_port)
    receive(server)
    assert [p[20:].decode() for p in written_packets(devices, "wga", offload)] == [peer]
    assert server.registry.by_name["wga"].counters.drops == {"not_allowed_source": len(refused)}


def test_a_bug_on_the_receive_path_costs_that_datagram_and_no_more(encrypted_server, monkeypatch,
                                                                  caplog):
    server, devices = encrypted_server
    offload = bool(server.offloads.tun_flags)
    attacker, victim = two_tunnels(server)
    devices.written("wgv")
    real = ups.DataPort._receive_wireguard
    calls = []

    def buggy(self, datagrams, stride, source):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(self, datagrams, stride, source)

    monkeypatch.setattr(ups.DataPort, "_receive_wireguard", buggy)
    victim.send([ipv4_packet(VICTIM, "10.0.2.1", b"lost %d" % i) for i in range(3)],
                server.data_port)
    with caplog.at_level(logging.ERROR, "udpProxyServer"):
        receive(server)
    written = b"".join(written_packets(devices, "wgv", offload))
    assert b"lost 0" not in written and b"lost 1" in written and b"lost 2" in written
    assert server.drops["internal_error"] == 1 and "a bug" in caplog.text


def test_a_bug_while_sending_leaves_nothing_queued_for_the_next_send(monkeypatch):
    """The buffer single packets wait in is every tunnel's: a send that fails must not
    leave a count of it behind, or the next send of this tunnel would carry what another
    tunnel put there since."""
    with fake_server(offloads=True) as (server, devices):
        peer, other = fakes_udp(), fakes_udp()
        for name, sock, address in (("udp2", peer, "10.0.1.1"), ("udp3", other, "10.0.2.1")):
            assert add(server, {"name": name, "tunnelIP": address, "remoteServer": "127.0.0.1",
                                "remotePort": sock.getsockname()[1]})["ok"]
        tunnel = server.registry.by_name["udp2"]
        monkeypatch.setattr(tunnel, "send", lambda *_: (_ for _ in ()).throw(RuntimeError("x")))
        devices.outer["udp2"].send(ups.ZERO_VNET_HDR + ipv4_packet("10.0.1.1", "10.0.1.2",
                                                                   b"mine"))
        server.loop.dispatch(tunnel.fd)
        devices.outer["udp3"].send(ups.ZERO_VNET_HDR + ipv4_packet("10.0.2.1", "10.0.2.2",
                                                                   b"other's"))
        server.loop.dispatch(server.registry.by_name["udp3"].fd)
        monkeypatch.undo()
        server.loop.dispatch(tunnel.fd)  # nothing to read: nothing must go
        peer.settimeout(0.2)
        with pytest.raises(OSError):
            peer.recv(65535)
        assert tunnel.codec.small_len == 0
