"""Count, on a test host's interface, the TCP packets arriving for an IPv4 address and
port whose TCP checksum is right and wrong: bounded in time, and ended early by a line
on standard input. Prints "GOOD BAD".

    checksums.py IFACE ADDRESS PORT SECONDS
"""

import os
import select
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the daemon

import packets  # noqa: E402  (needs the daemon's folder on the path)

ETH_P_IP = 0x0800
PACKET_HOST = 0  # a packet addressed to this host, not one it sends
SO_RCVBUFFORCE = 33


def main(iface, address, port, seconds):
    destination, port = socket.inet_aton(address), int(port)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sock.bind((iface, ETH_P_IP))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)  # as root: room for a burst
    deadline, good, bad = time.monotonic() + float(seconds), 0, 0
    print("capturing", flush=True)
    while time.monotonic() < deadline:
        ready = select.select([sock, sys.stdin], [], [], 0.1)[0]
        if sys.stdin in ready:
            break
        if not ready:
            continue
        packet, (_, _, kind, *_) = sock.recvfrom(65535)
        header = (packet[0] & 0x0F) * 4
        if (kind != PACKET_HOST or packet[9] != 6 or packet[16:20] != destination
                or int.from_bytes(packet[header + 2:header + 4], "big") != port):
            continue
        if packets.valid(packet):
            good += 1
        else:
            bad += 1
    print(good, bad, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
