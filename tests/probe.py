"""Send control datagrams from one socket and count every byte that comes back.

    probe.py ADDRESS PORT WAIT [burst] < [hex datagram, ...]

Each datagram is sent and its reply awaited for at most WAIT seconds (with
burst: all are sent in a quick stream, no reply awaited); then whatever else arrives
within WAIT is counted too. Prints JSON:
{"pairs": [[bytes sent, reply or null], ...], "sent": N, "received": N, "late": N}.
"""

import json
import socket
import sys
import time

# With burst, the pause between two datagrams: about 2,000 a second, far past the reply
# budget of an unvalidated source and well within what the daemon reads (none is lost
# to a full socket buffer, so what it does with each one is what is measured).
BURST_PAUSE = 0.0005


def main():
    address, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    burst = sys.argv[4:] == ["burst"]
    datagrams = [bytes.fromhex(text) for text in json.load(sys.stdin)]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(wait)
    pairs, received = [], 0
    for datagram in datagrams:
        sock.sendto(datagram, (address, port))
        if burst:
            time.sleep(BURST_PAUSE)
            continue
        try:
            reply = sock.recv(65535)
        except socket.timeout:
            reply = None
        received += len(reply or b"")
        pairs.append([len(datagram), reply.decode("utf-8", "replace") if reply else None])
    late = 0
    try:
        while True:
            late += len(sock.recv(65535))
    except socket.timeout:
        pass
    print(json.dumps({"pairs": pairs, "sent": sum(len(d) for d in datagrams),
                      "received": received + late, "late": late}))


if __name__ == "__main__":
    main()
