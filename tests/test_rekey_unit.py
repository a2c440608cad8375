"""Two daemons of ours with an encrypted tunnel between them, on loopback, their clock the
test's: a stream both ways for ten minutes of that clock, across rekeys (every
REKEY_AFTER_TIME the initiator makes a new session while the old one still carries what is
under way); not one packet may be lost to a rekey."""

import random
import struct

import pytest

import udpProxyServer as ups
from fakes import Clock, add, fake_server, ipv4_packet

STEP = 0.2  # seconds of the test's clock between two rounds of packets
MINUTES = 10


def pump(servers, rnd):
    """Let both daemons take what waits for them until nothing moves, timers included, in
    an order drawn anew each round: so that packets are sealed and opened at every point
    of a handshake under way, as when they cross it on the wire."""
    for _ in range(8):
        steps = [step for server in servers for step in (
            *[lambda s=server, t=tunnel: s.loop.dispatch(t.fd) for tunnel in server.registry.by_name.values()],
            lambda s=server: s.loop.dispatch(s.data_sock.fileno()),
            lambda s=server: s.wireguard.tick())]
        rnd.shuffle(steps)
        for step in steps:
            step()


def numbered(source, destination, number):
    return ipv4_packet(source, destination, b"seq" + struct.pack("!I", number) + bytes(40))


def numbers(devices, name):
    """The numbers of the packets written into a device, in order."""
    return [struct.unpack_from("!I", write, ups.VNET_HDR_LEN + 20 + 3)[0]
            for write in devices.written(name)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("offloads", [True, None], ids=["offload", "no-offload"])
def test_a_stream_both_ways_loses_nothing_across_rekeys(offloads, seed):
    clock = Clock()
    keys = [ups.generate_private_key() for _ in range(2)]
    with fake_server(offloads=offloads, private_key=keys[0], clock=clock) as (a, a_devices), \
            fake_server(offloads=offloads, private_key=keys[1], clock=clock) as (b, b_devices):
        for server, peer, name, address, key in ((a, b, "wgb", "10.0.1.1", keys[1]),
                                                 (b, a, "wga", "10.0.1.2", keys[0])):
            assert add(server, {"name": name, "tunnelIP": address, "remoteServer": "127.0.0.1",
                                "remotePort": peer.data_port,
                                "publicKey": ups.key_to_base64(ups.public_key(key))})["ok"]
        header = ups.ZERO_VNET_HDR if offloads else b""  # a device without offloads: bare packets
        skip = ups.VNET_HDR_LEN if offloads else 0
        sessions, sent = set(), {"ab": 0, "ba": 0}
        rnd = random.Random(seed)
        got = {"ab": [], "ba": []}
        for _ in range(int(MINUTES * 60 / STEP)):
            clock.advance(STEP)
            for _ in range(3):
                a_devices.outer["wgb"].send(header + numbered("10.0.1.1", "10.0.1.2", sent["ab"]))
                sent["ab"] += 1
            b_devices.outer["wga"].send(header + numbered("10.0.1.2", "10.0.1.1", sent["ba"]))
            sent["ba"] += 1
            pump((a, b), rnd)
            for key, devices, name in (("ab", b_devices, "wga"), ("ba", a_devices, "wgb")):
                got[key] += [struct.unpack_from("!I", w, skip + 23)[0]
                             for w in devices.written(name)]
            current = a.registry.by_name["wgb"].wg_peer.keypairs.current
            if current is not None:
                sessions.add(current.local_index)
        assert got["ab"] == list(range(sent["ab"])) and got["ba"] == list(range(sent["ba"]))
        assert len(sessions) >= 5  # the first session and four rekeys at least
        for server, name in ((a, "wgb"), (b, "wga")):
            assert not server.registry.by_name[name].counters.drops and not server.drops


def test_a_message_sealed_with_the_old_keys_after_the_rekey_was_answered_is_taken():
    """The race a rekey has on the wire: the responder answers the initiator's new
    initiation, then sends a packet still under the old keys (the new ones are not yet
    confirmed), which arrives after the response made the initiator switch."""
    clock = Clock()
    keys = [ups.generate_private_key() for _ in range(2)]
    with fake_server(offloads=True, private_key=keys[0], clock=clock) as (a, a_devices), \
            fake_server(offloads=True, private_key=keys[1], clock=clock) as (b, b_devices):
        # b waits for a to show where it is: a alone initiates, and rekeys.
        assert add(a, {"name": "wgb", "tunnelIP": "10.0.1.1", "remoteServer": "127.0.0.1",
                       "remotePort": b.data_port,
                       "publicKey": ups.key_to_base64(ups.public_key(keys[1]))})["ok"]
        assert add(b, {"name": "wga", "tunnelIP": "10.0.1.2",
                       "publicKey": ups.key_to_base64(ups.public_key(keys[0]))})["ok"]
        a_tunnel, b_tunnel = a.registry.by_name["wgb"], b.registry.by_name["wga"]
        a_devices.outer["wgb"].send(ups.ZERO_VNET_HDR + numbered("10.0.1.1", "10.0.1.2", 0))
        pump((a, b), random.Random(0))  # a initiates the first session; b answers
        assert a_tunnel.wg_peer.keypairs.current.is_initiator
        first = a_tunnel.wg_peer.keypairs.current.local_index
        clock.advance(ups.REKEY_AFTER_TIME + 1)
        a_devices.outer["wgb"].send(ups.ZERO_VNET_HDR + numbered("10.0.1.1", "10.0.1.2", 1))
        a.loop.dispatch(a_tunnel.fd)  # sent under the old keys; a rekey is wanted
        a.wireguard.tick()  # the initiation goes
        b.loop.dispatch(b.data_sock.fileno())  # b takes the packet and answers the initiation
        b.wireguard.tick()
        b_devices.outer["wga"].send(ups.ZERO_VNET_HDR + numbered("10.0.1.2", "10.0.1.1", 2))
        b.loop.dispatch(b_tunnel.fd)  # still under the old keys: the new are not confirmed
        a.loop.dispatch(a.data_sock.fileno())  # the response, then that packet
        assert [struct.unpack_from("!I", w, ups.VNET_HDR_LEN + 23)[0]
                for w in a_devices.written("wgb")] == [2]
        assert not a_tunnel.counters.drops and not a.drops and not b_tunnel.counters.drops and not b.drops
        assert a_tunnel.wg_peer.keypairs.current.local_index != first
