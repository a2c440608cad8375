"""A WireGuard peer made of nothing but udpProxyServer's WireGuard functions and a UDP socket,
for the interop tests; it speaks for the tunnel address 10.9.0.1 and prints what happened.

    wgpeer.py initiate MODULE_DIR KEYS PEER_HOST PORT   handshake as initiator, send one ping
                                                        (ICMP echo request to 10.9.0.2), exit 0
                                                        once its echo reply came back
    wgpeer.py respond MODULE_DIR KEYS PORT COUNT        print "listening", answer the peer's
                                                        initiation, then its keepalives and pings,
                                                        exit 0 after answering COUNT pings

KEYS is a JSON file: our private key, the peer's public key and the preshared key (or null), in
base64 as wg writes them. MODULE_DIR holds the lone copy of udpProxyServer.py.
"""

import json
import socket
import struct
import sys
import time

# Bounds every wait, so a peer that never answers fails the test instead of hanging it.
TIMEOUT = 15
OURS, THEIRS = "10.9.0.1", "10.9.0.2"
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8


def checksum(data):
    """The Internet checksum (RFC 1071)."""
    data = data + b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_icmp(source, destination, kind, ident, seq, payload):
    icmp = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def parse_icmp(packet):
    """(source, destination, type, id, seq, payload) of an IPv4 ICMP packet whose padding
    is trimmed by its total length, checksums checked; None for anything else."""
    if len(packet) < 28 or packet[0] != 0x45 or packet[9] != 1:
        return None
    length, = struct.unpack_from("!H", packet, 2)
    packet = packet[:length]
    if checksum(packet[:20]) or checksum(packet[20:]):
        return None
    kind, _, _, ident, seq = struct.unpack_from("!BBHHH", packet, 20)
    return (socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), kind, ident, seq,
            packet[28:])


class Peer:
    def __init__(self, ups, keys_path, port):
        self.ups = ups
        with open(keys_path) as f:
            keys = json.load(f)
        self.private = ups.key_from_base64(keys["private"])
        self.public = ups.public_key(self.private)
        self.peer_public = ups.key_from_base64(keys["peer"])
        self.psk = ups.key_from_base64(keys["psk"]) if keys["psk"] else None
        self.checker = ups.CookieChecker(self.public)
        self.cookies = ups.CookieGenerator(self.peer_public)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", port))
        self.sock.settimeout(TIMEOUT)
        self.keys = self.send_cipher = self.receive_cipher = None
        self.counter = 0

    def receive(self, kind):
        """The next datagram that is a WireGuard message of kind, and where it came from."""
        while True:
            datagram, source = self.sock.recvfrom(65535)
            if self.ups.message_type(datagram) == kind:
                return datagram, source
            print("ignored a datagram of %d bytes" % len(datagram), flush=True)

    def begin(self, keys):
        self.keys = keys
        self.send_cipher = self.ups.transport_cipher(keys.send_key)
        self.receive_cipher = self.ups.transport_cipher(keys.receive_key)

    def send_packet(self, packet, to):
        message = self.ups.seal_transport(self.send_cipher, self.keys.remote_index,
                                          self.counter, packet)
        self.counter += 1
        self.sock.sendto(message, to)

    def receive_packet(self):
        message, source = self.receive(self.ups.MESSAGE_TRANSPORT)
        assert self.ups.receiver_index(message) == self.keys.local_index, "to another index"
        counter, packet = self.ups.open_transport(self.receive_cipher, message)
        print("transport message %d: %d bytes" % (counter, len(packet)), flush=True)
        return packet, source


def initiate(peer, host, port):
    ups = peer.ups
    sent, initiation = ups.create_initiation(peer.private, peer.peer_public, 0x1234,
                                             ups.tai64n(time.time_ns()))
    peer.sock.sendto(peer.cookies.add_macs(initiation, time.monotonic()), (host, port))
    response, source = peer.receive(ups.MESSAGE_RESPONSE)
    assert peer.checker.check_mac1(response), "the response's mac1 is wrong"
    peer.begin(ups.consume_response(sent, response, peer.psk))
    print("handshake done", flush=True)
    payload = b"udpProxyServer " * 4
    peer.send_packet(ipv4_icmp(OURS, THEIRS, ICMP_ECHO_REQUEST, 77, 1, payload), source)
    while True:
        packet, _ = peer.receive_packet()
        if packet and parse_icmp(packet) == (THEIRS, OURS, ICMP_ECHO_REPLY, 77, 1, payload):
            print("echo reply", flush=True)
            return 0


def respond(peer, count):
    ups = peer.ups
    print("listening", flush=True)
    initiation, source = peer.receive(ups.MESSAGE_INITIATION)
    assert peer.checker.check_mac1(initiation), "the initiation's mac1 is wrong"
    received = ups.consume_initiation(peer.private, initiation, peer.public)
    assert received.remote_public == peer.peer_public, "an initiation from another peer"
    keys, response = ups.create_response(received, 0x5678, peer.psk)
    peer.sock.sendto(peer.cookies.add_macs(response, time.monotonic()), source)
    peer.begin(keys)
    print("handshake answered", flush=True)
    answered = 0
    while answered < count:
        packet, source = peer.receive_packet()
        if not packet:
            print("keepalive", flush=True)
            continue
        icmp = parse_icmp(packet)
        if icmp and icmp[:3] == (THEIRS, OURS, ICMP_ECHO_REQUEST):
            peer.send_packet(ipv4_icmp(OURS, THEIRS, ICMP_ECHO_REPLY, *icmp[3:]), source)
            answered += 1
            print("echo request %d answered" % icmp[4], flush=True)
    return 0


def main(argv):
    mode, module_dir = argv[1], argv[2]
    sys.path.insert(0, module_dir)
    import udpProxyServer as ups
    if mode == "initiate":
        keys, host, port = argv[3:]
        return initiate(Peer(ups, keys, int(port)), host, int(port))
    keys, port, count = argv[3:]
    return respond(Peer(ups, keys, int(port)), int(count))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
