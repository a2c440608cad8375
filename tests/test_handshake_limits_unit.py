"""What handshakes may cost a daemon, without root: one DH before the peer is known, none
for a refusal, a limit per source under load and one per peer, a share of the loop's time,
keys that cannot make a DH refused at add, timers that sleep when nothing is pending, and
keys let go of when done."""

import logging

import pytest

import udpProxyServer as ups
from fakes import Clock, WirePeer, add, drain, answer, fake_server, ipv4_packet, receive


class FakeCost:
    """A cost clock: every handshake worked on takes `each` seconds by it."""

    def __init__(self, each):
        self.now, self.each, self.calls = 0.0, each, 0

    def __call__(self):
        self.calls += 1
        if self.calls % 2 == 0:
            self.now += self.each
        return self.now


@pytest.fixture
def daemon():
    clock = Clock()
    with fake_server(offloads=True, private_key=ups.generate_private_key(),
                     clock=clock) as (server, devices):
        yield server, devices, clock


def count_dh(monkeypatch, server):
    """The DHs the daemon makes from now on, as (with its static key?, public key)."""
    calls = []
    real = ups.DH

    def counted(private, public):
        if not isinstance(private, (bytes, bytearray)):  # the test's peers give raw bytes
            calls.append((private is server.wireguard.private_key, public))
        return real(private, public)

    monkeypatch.setattr(ups, "DH", counted)
    return calls


def test_an_initiation_from_an_unknown_key_costs_one_dh(daemon, monkeypatch):
    server, _, _ = daemon
    stranger = WirePeer(server.wireguard.local_public)  # knows our public key, has no tunnel
    _, message = stranger.initiation()
    calls = count_dh(monkeypatch, server)
    stranger.sock.sendto(message, ("127.0.0.1", server.data_port))
    receive(server)
    assert len([c for c in calls if c[0]]) == 1 and server.drops["unknown_peer"] == 1
    assert drain(stranger.sock) == []


def test_a_known_peers_initiation_uses_the_static_dh_made_at_add(daemon, monkeypatch):
    server, _, _ = daemon
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    _, message = peer.initiation()
    calls = count_dh(monkeypatch, server)
    peer.sock.sendto(message, ("127.0.0.1", server.data_port))
    receive(server)
    # The ephemeral DH to open it, and the response's two: not the static-static one.
    assert len(calls) == 3 and (True, peer.public) not in calls
    assert [ups.message_type(d) for d in drain(peer.sock)] == [ups.MESSAGE_RESPONSE]


def test_a_peers_initiations_are_taken_one_in_20_ms(daemon):
    server, _, clock = daemon
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    for step, answered in ((0, True), (0.01, False), (0.011, True)):
        clock.advance(step)
        _, message = peer.initiation()
        peer.sock.sendto(message, ("127.0.0.1", server.data_port))
        receive(server)
        types = [ups.message_type(d) for d in drain(peer.sock)]
        assert (ups.MESSAGE_RESPONSE in types) == answered, step
    assert server.registry.by_name["wgp"].counters.drops["initiation_flood"] == 1


@pytest.mark.parametrize("key", [bytes(32), bytes([1]) + bytes(31),
                                 bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd86"
                                               "6205165f49b800")],
                         ids=["zero", "order-1", "order-8"])
def test_a_public_key_of_small_order_is_refused_at_add(daemon, key):
    server, _, _ = daemon
    reply = add(server, {"name": "wgp", "tunnelIP": "10.0.1.1", "remoteServer": "127.0.0.1",
                         "publicKey": ups.key_to_base64(key)})
    assert not reply["ok"] and "invalid publicKey" in reply["error"]
    assert "small order" in reply["error"] and "wgp" not in server.registry.by_name


def flood_from(peer, server, count, cookie_aware=True):
    """count initiations from peer's socket, answering cookie replies as an attacker would
    (so later ones carry a valid mac2); what came back, by type."""
    back = []
    for _ in range(count):
        _, message = peer.initiation()
        peer.sock.sendto(message, ("127.0.0.1", server.data_port))
        receive(server)
        for datagram in drain(peer.sock):
            back.append(ups.message_type(datagram))
            if cookie_aware and ups.message_type(datagram) == ups.MESSAGE_COOKIE_REPLY:
                peer.cookies.consume_reply(datagram, 0)
    return back


def test_under_load_a_source_with_a_valid_cookie_is_limited_to_its_bucket(daemon, monkeypatch):
    server, _, clock = daemon
    stranger = WirePeer(server.wireguard.local_public)
    calls = count_dh(monkeypatch, server)
    back = flood_from(stranger, server, 200)  # all within one instant of the clock
    assert back.count(ups.MESSAGE_COOKIE_REPLY) >= 1
    drops = server.drops
    # Before load: every one worked on; under load: a cookie, then the bucket's burst.
    assert drops["unknown_peer"] == ups.HANDSHAKES_UNDER_LOAD + ups.HANDSHAKE_BURST
    assert drops["handshake_rate_limited"] == 200 - drops["unknown_peer"] - drops["cookie_sent"]
    assert len([c for c in calls if c[0]]) == drops["unknown_peer"]  # one DH each, no more
    clock.advance(0.5)  # still under load; the bucket refills at 20 a second, up to its burst
    flood_from(stranger, server, 10)
    assert drops["unknown_peer"] == ups.HANDSHAKES_UNDER_LOAD + 2 * ups.HANDSHAKE_BURST


def test_under_load_a_peer_elsewhere_still_gets_its_handshake(daemon):
    """The side the limit must not hurt: a legitimate peer at another address, with its
    cookie, during a flood from one source that keeps the daemon under load."""
    server, _, clock = daemon
    stranger = WirePeer(server.wireguard.local_public, address="127.0.0.2")
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    receive(server)
    drain(peer.sock)  # the daemon's own initiation, at add: this peer does not answer it
    flood_from(stranger, server, 200)
    assert flood_from(peer, server, 1) == [ups.MESSAGE_COOKIE_REPLY]  # its first: a cookie
    limited = server.drops["handshake_rate_limited"]
    for _ in range(int(ups.REKEY_TIMEOUT / 0.5)):  # the flood goes on until its retry
        clock.advance(0.5)
        flood_from(stranger, server, 60)
    assert server.drops["handshake_rate_limited"] > limited
    assert ups.MESSAGE_RESPONSE in flood_from(peer, server, 1)  # its retry, with mac2


def test_ipv6_sources_are_limited_by_their_64(daemon):
    limits = ups.HandshakeLimits(Clock())
    same = ["2001:2::%x" % i for i in range(1, 20)]
    assert sum(limits.source_allows(ip, 0) for ip in same) == ups.HANDSHAKE_BURST
    assert limits.source_allows("2001:2:0:1::1", 0)  # another /64
    assert limits.source_allows("::ffff:198.18.0.1", 0) and limits.source_allows("198.18.0.2", 0)


def test_the_table_of_sources_is_bounded_and_a_newcomer_is_never_shut_out():
    """Past the bound, the source seen least recently is forgotten, in O(1): a legitimate
    source that comes while thousands are busy is served, and the table stays bounded."""
    limits = ups.HandshakeLimits(Clock())
    many = ["198.18.%d.%d" % (i // 250, i % 250) for i in range(ups.MAX_HANDSHAKE_SOURCES + 100)]
    for ip in many:
        for _ in range(ups.HANDSHAKE_BURST):
            assert limits.source_allows(ip, 0)
        assert not limits.source_allows(ip, 0)
    assert len(limits.sources) == ups.MAX_HANDSHAKE_SOURCES
    assert limits.source_allows("2001:2::1", 0)  # a newcomer, while all are busy
    assert not limits.source_allows(many[-1], 0)  # the most recent are still remembered
    assert len(limits.sources) == ups.MAX_HANDSHAKE_SOURCES


def test_past_its_share_of_the_loop_handshake_work_waits(daemon):
    server, _, clock = daemon
    server.wireguard.cost_clock = FakeCost(ups.HANDSHAKE_SHARE_BURST)  # each takes it all
    stranger = WirePeer(server.wireguard.local_public)
    flood_from(stranger, server, 3, cookie_aware=False)
    assert server.drops["unknown_peer"] == 1 and server.drops["handshake_share_spent"] == 2
    clock.advance(ups.HANDSHAKE_SHARE_BURST / ups.HANDSHAKE_SHARE)  # the share comes back
    flood_from(stranger, server, 1, cookie_aware=False)
    assert server.drops["unknown_peer"] == 2


def test_a_tunnels_endpoint_is_served_past_the_share(daemon):
    server, _, clock = daemon
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    receive(server)
    drain(peer.sock)  # the daemon's own initiation, at add: this peer does not answer it
    server.wireguard.limits.share = -1  # spent for a long while
    server.wireguard.endpoints.clear()
    assert flood_from(peer, server, 1) == []  # not a known endpoint: waits
    server.wireguard.endpoints[server.registry.by_name["wgp"].endpoint[0]] += 1  # as the tunnel names it
    clock.advance(1)
    assert flood_from(peer, server, 1) == [ups.MESSAGE_RESPONSE]


def test_cookie_replies_are_the_protocols_and_never_share_a_nonce():
    public = ups.public_key(ups.generate_private_key())
    checker = ups.CookieChecker(public)
    sent, message = ups.create_initiation(ups.generate_private_key(), public, 7,
                                          ups.tai64n(0))
    message = ups.add_macs(message, public)
    replies = [checker.create_reply(message, "198.18.0.1", 5000, 0) for _ in range(100)]
    nonces = {reply[8:32] for reply in replies}
    assert len(nonces) == 100
    cookie = checker.cookie("198.18.0.1", 5000, 0)
    for reply in replies[:3]:
        assert reply == ups.create_cookie_reply(message, cookie, public, reply[8:32])


def test_a_bug_in_one_tunnels_timers_costs_only_that_tunnel(daemon, monkeypatch, caplog):
    server, devices, clock = daemon
    good, bad = WirePeer(server.wireguard.local_public), WirePeer(server.wireguard.local_public)
    assert add(server, bad.entry("wgb", "10.0.2.1"), good.entry("wgg", "10.0.1.1"))["ok"]
    monkeypatch.setattr(server.registry.by_name["wgb"].wg_peer.timers, "due",
                        lambda now: (_ for _ in ()).throw(RuntimeError("boom")))
    devices.outer["wgg"].send(ups.ZERO_VNET_HDR + ipv4_packet("10.0.1.1", "10.0.1.2", b"x"))
    server.loop.dispatch(server.registry.by_name["wgg"].fd)
    with caplog.at_level(logging.ERROR, "udpProxyServer"):
        server.wireguard.run_timers()
    assert [ups.message_type(d) for d in drain(good.sock)] == [ups.MESSAGE_INITIATION]
    assert server.registry.by_name["wgb"].counters.drops["internal_error"] == 1 and "boom" in caplog.text


def test_packets_pushed_out_of_the_staged_queue_are_counted(daemon):
    server, devices, _ = daemon
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    tunnel = server.registry.by_name["wgp"]
    for i in range(ups.MAX_STAGED_PACKETS + 7):
        devices.outer["wgp"].send(ups.ZERO_VNET_HDR + ipv4_packet("10.0.1.1", "10.0.1.2",
                                                                  b"%d" % i))
        server.loop.dispatch(tunnel.fd)
    assert len(tunnel.wg_peer.staged) == ups.MAX_STAGED_PACKETS
    assert tunnel.counters.drops["staged_overflow"] == 7


def test_tunnels_to_dead_peers_are_not_looked_at_once_given_up(daemon, monkeypatch):
    server, _, clock = daemon
    peers = [WirePeer(server.wireguard.local_public) for _ in range(20)]
    assert add(server, *[p.entry("wg%d" % i, "10.0.%d.1" % i) for i, p in enumerate(peers)])["ok"]
    for _ in range(4 * (ups.REKEY_ATTEMPT_TIME + 4 * ups.REKEY_TIMEOUT)):  # tried, given up
        clock.advance(0.25)
        server.wireguard.tick()
    # The first initiation and the retries of REKEY_ATTEMPT_TIME, as wireguard-go counts them.
    assert {len(drain(p.sock)) for p in peers} == {ups.MAX_TIMER_HANDSHAKES + 2}
    looked = []
    real = ups.PeerTimers.due
    monkeypatch.setattr(ups.PeerTimers, "due", lambda self, now: looked.append(self) or
                        real(self, now))
    for _ in range(300):  # nothing to do until their key material is erased
        clock.advance(1)
        server.wireguard.tick()
    assert looked == [] and server.wireguard.poll_timeout() > 100
    # Told something, one tunnel is looked at, and wakes when its timer comes.
    tunnel = server.registry.by_name["wg3"]
    tunnel.wg_peer.timers.set_persistent_keepalive(25)
    server.wireguard.touch(tunnel)
    assert server.wireguard.poll_timeout() == 0
    server.wireguard.tick()
    assert looked == [tunnel.wg_peer.timers]


def test_keys_are_let_go_of_when_a_session_and_a_handshake_end(daemon):
    server, devices, clock = daemon
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    peer.handshake(server, server.data_port)
    tunnel = server.registry.by_name["wgp"]
    keypair = tunnel.wg_peer.keypairs.current
    assert keypair.send_cipher is not None
    # The daemon initiates (a packet, no session of its own making needed): then deletes.
    devices.outer["wgp"].send(ups.ZERO_VNET_HDR + ipv4_packet("10.0.1.1", "10.0.1.2", b"x"))
    clock.advance(ups.REKEY_AFTER_TIME)
    keypair.is_initiator = True  # so that sending with it asks for a rekey
    server.loop.dispatch(tunnel.fd)
    server.wireguard.tick()
    initiation = tunnel.wg_peer.initiation
    assert initiation is not None and initiation.ephemeral_private is not None
    answer(server, b'{"op": "del", "tunnel": [{"name": "wgp"}]}', ("127.0.0.1", 9))
    assert keypair.send_cipher is None and keypair.receive_cipher is None
    assert keypair.send_key == bytes(32) and keypair.receive_key == bytes(32)
    assert initiation.ephemeral_private is None and initiation.chaining_key == bytes(32)


def test_a_tunnel_removed_and_made_again_with_the_same_key_has_only_its_own_timers(daemon):
    server, _, clock = daemon
    peer = WirePeer(server.wireguard.local_public)
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    server.wireguard.tick()
    old = server.registry.by_name["wgp"]
    answer(server, b'{"op": "del", "tunnel": [{"name": "wgp"}]}', ("127.0.0.1", 9))
    assert add(server, peer.entry("wgp", "10.0.1.1"))["ok"]
    looked = []
    real = old.wg_peer.timers.due
    old.wg_peer.timers.due = lambda now: looked.append(now) or real(now)
    for _ in range(60):
        clock.advance(1)
        server.wireguard.tick()
    assert looked == [] and old.wg_peer.static_static is None


def test_initiations_grow_newer_whatever_the_wall_clock_does(daemon, monkeypatch):
    server, _, _ = daemon
    wall = [10 ** 18]
    monkeypatch.setattr(ups.time, "time_ns", lambda: wall[0])
    stamps = [server.wireguard.timestamp()]
    for step in (-10 ** 12, 0, 1, 10 ** 15):  # set back an hour..., then NTP puts it right
        wall[0] += step
        stamps.append(server.wireguard.timestamp())
    assert stamps == sorted(set(stamps))
    assert stamps[-1] == ups.tai64n(wall[0])  # the wall time again, once it is ahead


def test_a_read_only_proc_costs_the_link_local_setting_not_the_tunnel(monkeypatch, caplog):
    real = open

    def read_only(path, *args, **kwargs):
        if str(path).startswith("/proc/sys/net/ipv6/conf/"):
            raise OSError(30, "Read-only file system")
        return real(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with caplog.at_level(logging.WARNING, "udpProxyServer"):
        ups.no_ipv6_link_local("udp2")
    assert "cannot turn its IPv6 link-local address off" in caplog.text
