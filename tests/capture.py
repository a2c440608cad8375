"""Capture, on a test host's interface, the UDP payloads sent to an IPv4 address and port
that start with a byte: bounded in count and time. Prints them in hex, one a line.

    capture.py IFACE ADDRESS PORT FIRST_BYTE COUNT SECONDS
"""

import select
import socket
import sys
import time

ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800  # what a host sends reaches only ETH_P_ALL sockets


def main(iface, address, port, first, count, seconds):
    destination = socket.inet_aton(address)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((iface, ETH_P_ALL))
    deadline, found = time.monotonic() + float(seconds), 0
    print("capturing", flush=True)
    while found < int(count) and time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.1)[0]:
            continue
        packet, (_, protocol, *_) = sock.recvfrom(65535)
        if protocol != ETH_P_IP:
            continue
        header = (packet[0] & 0x0F) * 4
        if packet[9] != 17 or packet[16:20] != destination or len(packet) < header + 9:
            continue
        udp = packet[header:]
        if int.from_bytes(udp[2:4], "big") == int(port) and udp[8] == int(first):
            print(udp[8:].hex(), flush=True)
            found += 1


if __name__ == "__main__":
    main(*sys.argv[1:])
