"""Packets for the offload tests, and an independent check of their checksums."""

import struct

import udpProxyServer as ups


def rfc1071(data):
    """The Internet checksum the slow, obvious way: a word at a time, carries folded."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(packet, l4):
    proto = packet[9] if packet[0] >> 4 == 4 else packet[6]
    length = len(packet) - l4
    if packet[0] >> 4 == 4:
        return bytes(packet[12:20]) + struct.pack("!BBH", 0, proto, length)
    return bytes(packet[8:40]) + struct.pack("!IxxxB", length, proto)


def valid(packet):
    """True when packet's IP header and TCP or UDP checksum are right."""
    if packet[0] >> 4 == 4:
        l4 = (packet[0] & 15) * 4
        if rfc1071(packet[:l4]) or struct.unpack_from("!H", packet, 2)[0] != len(packet):
            return False
    else:
        l4 = 40
        if struct.unpack_from("!H", packet, 4)[0] != len(packet) - 40:
            return False
    return rfc1071(pseudo(packet, l4) + bytes(packet[l4:])) == 0


def super_packet(version, proto, payload, seq=1000, flags=ups.TCP_ACK | ups.TCP_PSH, options=12):
    """A GSO super-packet as the kernel hands it over (its lengths may be anything)."""
    if proto == ups.TCP:
        l4 = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (20 + options) // 4 << 4, flags,
                         500, 0, 0) + b"\x01\x01\x08\x0a" + bytes(range(8))[:options - 4]
        l4 = l4[:20 + options]
    else:
        l4 = struct.pack("!HHHH", 40000, 5201, 0, 0)
    if version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 7, 0x4000, 64, proto, 0,
                         bytes([10, 0, 1, 1]), bytes([10, 0, 1, 2]))
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, 0, proto, 64, b"\xfd" + bytes(14) + b"\x01",
                         b"\xfd" + bytes(14) + b"\x02")
    return memoryview(bytearray(ip + l4 + payload)), len(ip)
