"""Send control requests one after another and time each answer; run inside the daemon's namespace.

Reads a JSON list of requests on stdin, writes a JSON list of
{"seconds", "reply"} (reply null when none came) on stdout. Standard library
only, like the control script, so the timing holds no start-up of ours.
"""

import json
import socket
import sys
import time

# The largest datagram UDP/IPv4 carries; a bigger reply cannot exist.
MAX_DATAGRAM = 65507


def send_all(requests, port, timeout):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    answers = []
    for request in requests:
        started = time.perf_counter()
        sock.sendto(json.dumps(request).encode(), ("127.0.0.1", port))
        try:
            reply = json.loads(sock.recv(MAX_DATAGRAM))
        except socket.timeout:
            answers.append({"seconds": time.perf_counter() - started, "reply": None})
            break  # the daemon is stuck or gone: later answers would be mixed up
        answers.append({"seconds": time.perf_counter() - started, "reply": reply})
    return answers


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    port, timeout = int(argv[0]), float(argv[1])
    json.dump(send_all(json.load(sys.stdin), port, timeout), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
