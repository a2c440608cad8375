"""The Python each data path costs a packet, without the kernel's TCP or a second core:
two daemons in this process on loopback (tests/fakes.py: socketpair ends for devices), one
tunnel between them of each kind; packets written into one's device, and the time its
loop's handlers take to send them, and the other's to write them into its device.

    python3 bench/paths.py [ROUNDS]

Prints microseconds a packet, sending and receiving, for small packets (64-byte UDP, each
alone) and for TCP super-packets cut at MTU 1400 (by segment). A quick check between two
versions of the daemon; make bench gives the figures that count.
"""

import os
import struct
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import udpProxyServer as ups  # noqa: E402
from fakes import add, fake_server, ipv4_packet  # noqa: E402
import packets  # noqa: E402

KINDS = (("plain", True, False), ("plain --no-offload", None, False),
         ("encrypted", True, True), ("encrypted --no-offload", None, True))
BATCH = 32
MTU = 1400
# Each kind measured this many times, the least kept: the machine's noise only adds.
TRIES = 5


def pair(offloads, encrypted, stack):
    keys = [ups.generate_private_key() for _ in range(2)] if encrypted else [None, None]
    a, a_devices = stack.enter_context(fake_server(offloads=offloads, private_key=keys[0]))
    b, b_devices = stack.enter_context(fake_server(offloads=offloads, private_key=keys[1]))
    for server, peer, name, address, key in ((a, b, "t", "10.0.1.1", keys[1]),
                                             (b, a, "t", "10.0.1.2", keys[0])):
        entry = {"name": name, "tunnelIP": address, "remoteServer": "127.0.0.1",
                 "remotePort": peer.data_port, "mtu": MTU}
        if encrypted:
            entry["publicKey"] = ups.key_to_base64(ups.public_key(key))
        assert add(server, entry)["ok"]
    return a, a_devices, b, b_devices


def pump(server):
    for tunnel in list(server.registry.by_name.values()):
        server.loop.dispatch(tunnel.fd)
    server.loop.dispatch(server.data_sock.fileno())
    if server.wireguard:
        server.wireguard.tick()


def measure(kind, offloads, encrypted, rounds):
    import contextlib
    with contextlib.ExitStack() as stack:
        a, a_devices, b, b_devices = pair(offloads, encrypted, stack)
        header = ups.ZERO_VNET_HDR if offloads else b""
        small = header + ipv4_packet("10.0.1.1", "10.0.1.2", bytes(64))
        for _ in range(20):  # handshakes, and everything settled
            for server in (a, b):
                pump(server)
            a_devices.outer["t"].send(small)
        a_devices.written("t"), b_devices.written("t")
        results = {}
        payload = bytes(60000)
        super_packet, l4 = packets.super_packet(4, ups.TCP, payload)
        struct.pack_into("!H", super_packet, 2, len(super_packet))
        if offloads:
            big = [ups.VNET_HDR.pack(ups.VNET_F_NEEDS_CSUM, ups.GSO_TCPV4, 0, MTU - 52, l4, 16)
                   + bytes(super_packet)]
        else:
            big = None
        for label, frames, per_frame in (("small", [small] * BATCH, 1),
                                         ("TCP", big, -(-len(payload) // (MTU - 52)))):
            if frames is None:
                continue
            send = receive = 0.0
            count = 0
            for _ in range(rounds):
                for frame in frames:
                    a_devices.outer["t"].send(frame)
                started = time.perf_counter()
                a.loop.dispatch(a.registry.by_name["t"].fd)
                send += time.perf_counter() - started
                started = time.perf_counter()
                b.loop.dispatch(b.data_sock.fileno())
                receive += time.perf_counter() - started
                if a.wireguard:
                    a.wireguard.tick()
                    b.wireguard.tick()
                count += len(frames) * per_frame
                b_devices.written("t")
            results[label] = (1e6 * send / count, 1e6 * receive / count)
        return results


def main(argv):
    rounds = int(argv[0]) if argv else 300
    print("us a packet (send, receive), the least of %d tries of %d rounds" % (TRIES, rounds))
    for kind, offloads, encrypted in KINDS:
        tries = [measure(kind, offloads, encrypted, rounds) for _ in range(TRIES)]
        best = {label: tuple(min(t[label][i] for t in tries) for i in (0, 1)) for label in tries[0]}
        print("%-24s %s" % (kind, "  ".join("%s %.2f / %.2f" % (label, *pair_)
                                            for label, pair_ in best.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
