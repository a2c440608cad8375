"""Watch what a host's kernel receives on one device (a TUN device: what the daemon wrote
into it) and count the packets holding each of some markers. Bounded in time, and ended
early by SIGTERM. Prints JSON: {"packets": N, "MARKER": N, ...}.

    devwatch.py IFACE SECONDS MARKER [MARKER ...]
"""

import json
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # what the host sends into the device, not what the daemon writes
SO_RCVBUFFORCE = 33


def main(iface, seconds, *markers):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.bind((iface, ETH_P_ALL))
    counts = dict.fromkeys(markers, 0)
    counts["packets"] = 0
    deadline = [time.monotonic() + float(seconds)]
    signal.signal(signal.SIGTERM, lambda *_: deadline.clear())
    print("watching", flush=True)
    while deadline and time.monotonic() < deadline[0]:
        select.select([sock], [], [], 0.1)
        while True:
            try:
                packet, address = sock.recvfrom(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if address[2] == PACKET_OUTGOING:
                continue
            counts["packets"] += 1
            for marker in markers:
                counts[marker] += marker.encode() in packet
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
