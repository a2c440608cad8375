"""A malicious WireGuard peer: it holds real keys for tunnels of a daemon, completes real
handshakes, then sends transport messages whose inner packets are broken in structured ways,
mixed with valid pings, in UDP GSO trains, on several tunnels at once. Bounded in count;
prints a JSON summary of what it sent and which pings were answered.

    evilpeer.py MODULE_DIR CONFIG

CONFIG is a JSON file: {"target": [address, port], "target_public": base64, "messages": N,
"identities": [{"private": base64, "bind": [address, port], "inner": our tunnel address,
"theirs": the daemon's tunnel address, "marker": text}, ...]}. Every broken packet carries
its identity's marker, so a capture on another tunnel's device can tell it apart.
"""

import json
import random
import socket
import struct
import sys
import time

# Every message carries an inner packet padded to this size, so GRO joins them into trains.
INNER = 112
TRAIN = 32
TIMEOUT = 10
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
SO_RCVBUFFORCE = 33


def checksum(data):
    data = bytes(data) + b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(source, destination, payload, proto=17, total=None, ihl=5, version=4, frag=0x4000):
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0,
                         20 + len(payload) if total is None else total, 7, frag, 64, proto, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def echo(source, destination, ident, seq):
    payload = b"ping %d" % seq
    payload += bytes(INNER - 28 - len(payload))
    icmp = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ipv4(source, destination, icmp, proto=1)


def ipv6(source, payload, next_header=17, payload_length=None):
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload) if payload_length is None
                       else payload_length, next_header, 64,
                       socket.inet_pton(socket.AF_INET6, source),
                       socket.inet_pton(socket.AF_INET6, "fd00::1")) + payload


def chunk(source, destination, marker, gso_size, offset, total=3000):
    """A sealed chunk as a daemon of ours reads one (an IP version of 0: IPv4's chunk), of
    a super-packet said to carry total payload bytes in segments of gso_size, carrying
    marker at offset."""
    tcp = struct.pack("!HHIIBBHHH", 4000, 4001, 1, 0, 0x50, 0x10, 0, gso_size, offset)
    packet = bytearray(ipv4(source, destination, tcp + marker, proto=6, total=40 + total))
    packet[0] = 0x05
    return bytes(packet)


def broken(kind, identity, marker):
    """An inner packet broken the kind-th way, carrying marker."""
    ours, theirs = identity["inner"], identity["theirs"]
    udp = struct.pack("!HHHH", 4000, 4001, 8 + len(marker), 0) + marker
    return [
        lambda: ipv4(ours, theirs, udp, total=0),
        lambda: ipv4(ours, theirs, udp, total=12),
        lambda: ipv4(ours, theirs, udp, ihl=3),
        lambda: ipv4(ours, theirs, udp, ihl=15, total=40),
        lambda: ipv4(ours, theirs, udp, total=1400),
        lambda: ipv4(ours, theirs, udp, version=0),
        lambda: ipv4(ours, theirs, udp, version=5),
        lambda: ipv4(ours, theirs, udp, version=15),
        lambda: ipv6("fd00::9", b"\x11\x00" + bytes(6) + udp, next_header=0),  # hop-by-hop
        lambda: ipv6("fd00::9", udp, payload_length=900),
        lambda: ipv4("10.9.9.9", theirs, udp),
        lambda: ipv4(theirs, theirs, udp),
        lambda: ipv4(identity["victim"], theirs, udp),
        lambda: ipv4(ours, theirs, udp),  # valid: to a closed port, of our own tunnel
        lambda: ipv4(ours, theirs, struct.pack("!HHIIBBHHH", 4000, 4001, 1, 0, 0xF0, 0x10, 0,
                                               0, 0) + marker, proto=6),
        lambda: ipv4(ours, theirs, udp, frag=0x2000),  # a first fragment
        lambda: b"\x45\x00" + marker[:4],
        lambda: marker,
        lambda: chunk(identity["victim"], theirs, marker, 1000, 0),  # from another's address
        lambda: chunk(ours, theirs, marker, 0, 0),  # no segment size
        lambda: chunk(ours, theirs, marker, 1000, 500),  # not on a segment's boundary
        lambda: chunk(ours, theirs, marker, 1000, 3000),  # past the end
        lambda: chunk(ours, theirs, marker, 1000, 2000)[:30],  # cut short
        lambda: chunk(ours, theirs, marker, 1000, 1000),  # a chunk, of our own tunnel
    ][kind % KINDS]()


KINDS = 24  # the ways broken() breaks an inner packet


class Identity:
    def __init__(self, ups, config, target, target_public, index):
        self.ups, self.config, self.target, self.index = ups, config, target, index
        self.private = ups.key_from_base64(config["private"])
        self.marker = config["marker"].encode() * 4
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind(tuple(config["bind"]))
        self.sock.settimeout(TIMEOUT)
        self.cookies = ups.CookieGenerator(target_public)
        sent, message = ups.create_initiation(self.private, target_public, 0x100 + index,
                                              ups.tai64n(time.time_ns()))
        self.sock.sendto(self.cookies.add_macs(message, 0), target)
        while True:
            response = self.sock.recv(2048)
            if ups.message_type(response) == ups.MESSAGE_RESPONSE:
                break
        self.keys = ups.consume_response(sent, response)
        self.seal_cipher = ups.transport_cipher(self.keys.send_key)
        self.open_cipher = ups.transport_cipher(self.keys.receive_key)
        self.counter = 0
        self.sent = {"valid": 0, "broken": 0}
        self.answered = set()
        self.sock.setblocking(False)

    def message(self, packet):
        padded = bytes(packet[:INNER]) + bytes(max(0, INNER - len(packet)))
        sealed = self.ups.seal_transport(self.seal_cipher, self.keys.remote_index, self.counter,
                                         padded)
        self.counter += 1
        return sealed

    def train(self, rnd, start, count):
        messages = []
        for seq in range(start, start + count):
            if rnd.random() < 0.5:
                packet = echo(self.config["inner"], self.config["theirs"], self.index, seq & 0xFFFF)
                self.sent["valid"] += 1
            else:
                packet = broken(rnd.randrange(KINDS), self.config, self.marker)
                self.sent["broken"] += 1
            messages.append(self.message(packet))
        return messages

    def send(self, messages):
        size = struct.pack("=H", len(messages[0]))
        while True:
            try:
                self.sock.sendmsg([b"".join(messages)],
                                  [(self.ups.SOL_UDP, self.ups.UDP_SEGMENT, size)], 0, self.target)
                return
            except BlockingIOError:
                time.sleep(0.001)

    def read_replies(self):
        while True:
            try:
                message = self.sock.recv(65535)
            except BlockingIOError:
                return
            if self.ups.message_type(message) != self.ups.MESSAGE_TRANSPORT:
                continue
            try:
                _, packet = self.ups.open_transport(self.open_cipher, message)
            except self.ups.WireGuardRefused:
                continue
            if len(packet) >= 28 and packet[9] == 1 and packet[20] == ICMP_ECHO_REPLY:
                self.answered.add(struct.unpack_from("!H", packet, 26)[0])


def main(argv):
    module_dir, config_path = argv
    sys.path.insert(0, module_dir)
    import udpProxyServer as ups
    with open(config_path) as f:
        config = json.load(f)
    target = tuple(config["target"])
    target_public = ups.key_from_base64(config["target_public"])
    identities = [Identity(ups, identity, target, target_public, index)
                  for index, identity in enumerate(config["identities"])]
    rnd = random.Random(config.get("seed", 1))
    per_identity = config["messages"] // len(identities)
    for start in range(0, per_identity, TRAIN):
        for identity in identities:
            identity.send(identity.train(rnd, start, min(TRAIN, per_identity - start)))
            identity.read_replies()
        time.sleep(0.0005)  # about the daemon's pace: its socket takes the rest meanwhile
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for identity in identities:
            identity.read_replies()
        time.sleep(0.05)
    print(json.dumps([{"marker": i.config["marker"], "sent": i.sent, "answered": len(i.answered)}
                      for i in identities]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
