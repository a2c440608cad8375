"""The kernel part of docs/scaling.md, tried: several UDP sockets bound to one port, one
per peer connected to that peer, and one left unconnected. Each peer's datagrams must
reach its own connected socket, and only that one; datagrams from any other source the
unconnected one. A worker process reading each connected socket then gets its peers'
traffic with no dispatch in user space.

    python3 bench/scaling.py

Loopback only (127.0.0.0/8 is all local): no root, nothing left behind. Prints what each
socket got, and exits 1 when a datagram reached another socket than its peer's.
"""

import argparse
import sys
import socket

# The daemon's socket and the peers, all on loopback.
HOST = "127.0.0.1"
PEERS = [("127.0.0.2", 40002), ("127.0.0.3", 40003)]
STRANGER = ("127.0.0.9", 40009)
PAYLOAD = b"x" * 64


def bound(port, peer=None):
    """A socket on HOST:port beside the others there; connected to peer when given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    if peer:
        sock.connect(peer)
    sock.settimeout(1)
    return sock


def sender(address, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.connect((HOST, port))
    return sock


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def demultiplexed(count=100):
    """{receiving socket: {source: datagrams}} after count datagrams from each peer and
    the stranger, the unconnected socket bound first, as the daemon's is."""
    port = free_port()
    sockets = {"unconnected": bound(port)}
    sockets.update(("connected to %s" % peer[0], bound(port, peer)) for peer in PEERS)
    senders = [sender(address, port) for address in PEERS + [STRANGER]]
    for _ in range(count):
        for sock in senders:
            sock.send(PAYLOAD)
    seen = {}
    for name, sock in sockets.items():
        sock.setblocking(False)
        counts = seen.setdefault(name, {})
        while True:
            try:
                _, source = sock.recvfrom(2048)
            except BlockingIOError:
                break
            counts[source[0]] = counts.get(source[0], 0) + 1
    for sock in list(sockets.values()) + senders:
        sock.close()
    return seen


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    seen = demultiplexed()
    for name, counts in seen.items():
        print("%-24s got %s" % (name, ", ".join("%d from %s" % (n, source)
                                                 for source, n in sorted(counts.items()))))
    wanted = {"unconnected": {STRANGER[0]: 100}}
    wanted.update(("connected to %s" % peer[0], {peer[0]: 100}) for peer in PEERS)
    print("each peer's datagrams reached its own socket only: %s" % (seen == wanted))
    return 0 if seen == wanted else 1


if __name__ == "__main__":
    sys.exit(main())
