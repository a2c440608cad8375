"""Send a bounded barrage of random and malformed datagrams, then print what was sent.

    barrage.py control|data|wireguard ADDRESS PORT COUNT SEED

control: broken JSON, wrong types, fake envelopes, deep nesting and plain noise;
data: noise, datagrams too short for a packet, a PI header before noise, and super-packet
chunks with headers of anything.
Prints "<datagrams sent> <seconds>".
"""

import json
import random
import socket
import struct
import sys
import time

# Fields a request may have, and values of every type to put in them. No value names a
# tunnel under test: a daemon without a secret rightly obeys a well-formed del.
FIELDS = ("op", "tunnel", "part", "auth", "payload", "name", "tunnelIP", "netmask", "mtu",
          "remoteServer", "remotePort")
VALUES = (None, True, -1, 0, 1500, 70000, 2**64, 1.5, "", "add", "del", "list", "udp9",
          "10.0.1.1", "255.255.255.252", "198.18.0.2", "x" * 300, [], {}, [1, "a"])


def control_datagram(rnd):
    kind = rnd.randrange(6)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(0, 1500))
    if kind == 1:
        text = json.dumps(request(rnd))
        return text[:rnd.randrange(len(text) + 1)].encode()
    if kind == 2:
        depth = rnd.randrange(1, 5000)
        return b"[" * depth + b"]" * rnd.randrange(depth + 1)
    if kind == 3:
        auth = {"ts": rnd.choice(VALUES + (int(time.time()),)), "nonce": rnd.randbytes(16).hex(),
                "mac": rnd.randbytes(32).hex()}
        return json.dumps({"auth": auth, "payload": json.dumps(request(rnd))}).encode()
    return json.dumps(request(rnd)).encode()


def request(rnd):
    tunnel = {rnd.choice(FIELDS): rnd.choice(VALUES) for _ in range(rnd.randrange(8))}
    message = {rnd.choice(FIELDS): rnd.choice(VALUES) for _ in range(rnd.randrange(3))}
    message.setdefault("op", rnd.choice(("add", "del", "list", "move")))
    message["tunnel"] = rnd.choice(([tunnel], tunnel, [tunnel, 5], "udp2"))
    return message


def data_datagram(rnd):
    kind = rnd.randrange(4)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(0, 5))
    if kind == 1:
        return b"\x00\x00\x08\x00" + rnd.randbytes(rnd.randrange(0, 1400))
    if kind == 2:
        return chunk_datagram(rnd)
    return rnd.randbytes(rnd.randrange(0, 1500))


def chunk_datagram(rnd):
    """A super-packet chunk past the first checks: the PI header says chunk, an IPv4 and
    TCP header follow, the lengths, segment size and offset anything, then noise."""
    pi = bytes((0, 0xB0 | rnd.randrange(16))) + rnd.randrange(0, 1 << 16).to_bytes(2, "big")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, rnd.randrange(40, 1 << 16), 1, 0x4000, 64, 6, 0,
                     bytes([10, 0, 1, 2]), bytes([10, 0, 1, 1]))
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, rnd.randrange(1 << 32), 1, 0x50, 0x10, 500,
                      rnd.choice((0, 1, rnd.randrange(1 << 16))), 0)
    return pi + ip + tcp + rnd.randbytes(rnd.randrange(0, 1400))


# WireGuard messages' first four bytes (types 1 to 4) and sizes: 148, 92, 64, transport.
WIREGUARD_SHAPES = ((b"\x01\x00\x00\x00", 144), (b"\x02\x00\x00\x00", 88),
                    (b"\x03\x00\x00\x00", 60), (b"\x04\x00\x00\x00", None))


def wireguard_datagram(rnd):
    """Noise shaped as a WireGuard message of each type: right type, right size, so it
    gets past the first check to the MACs, the index table and the AEAD."""
    kind, size = rnd.choice(WIREGUARD_SHAPES)
    return kind + rnd.randbytes(rnd.randrange(12, 1500) if size is None else size)


def main(mode, address, port, count, seed):
    rnd = random.Random(int(seed))
    make = {"control": control_datagram, "data": data_datagram,
            "wireguard": wireguard_datagram}[mode]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    started, sent = time.monotonic(), 0
    for index in range(int(count)):
        try:
            sock.sendto(make(rnd), (address, int(port)))
            sent += 1
        except OSError:  # e.g. ENOBUFS: not sent, not counted
            pass
        if index % 64 == 63:
            time.sleep(0.0002)  # let the target read some, so it parses more than it drops
    print(sent, round(time.monotonic() - started, 2))


if __name__ == "__main__":
    main(*sys.argv[1:])
