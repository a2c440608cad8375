"""Send or receive a byte stream over TCP and print its length and SHA-256.

    transfer.py serve ADDRESS PORT       prints "listening", then "<bytes> <sha256>" of what came
    transfer.py send ADDRESS PORT SIZE   sends SIZE random bytes, prints "<bytes> <sha256>"
"""

import hashlib
import os
import socket
import sys

CHUNK = 65536
# Bounds every wait, so a broken tunnel fails the test instead of hanging it.
TIMEOUT = 60


def serve(address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.create_server((address, port), family=family) as listener:
        listener.settimeout(TIMEOUT)
        print("listening", flush=True)
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        digest, total = hashlib.sha256(), 0
        while chunk := conn.recv(CHUNK):
            digest.update(chunk)
            total += len(chunk)
    print(total, digest.hexdigest())


def send(address, port, size):
    digest, left = hashlib.sha256(), size
    with socket.create_connection((address, port), timeout=TIMEOUT) as conn:
        while left:
            chunk = os.urandom(min(CHUNK, left))
            conn.sendall(chunk)
            digest.update(chunk)
            left -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the receiver closes once it has read everything
    print(size, digest.hexdigest())


def main(argv):
    mode, address, port, *rest = argv
    if mode == "serve":
        serve(address, int(port))
    else:
        send(address, int(port), int(rest[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
