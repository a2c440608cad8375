"""A flood of WireGuard handshake initiations at a daemon, as an attacker who knows its public
key (public by design) and receives at its own addresses would make it: each initiation
with a valid mac1, and, once the daemon under load has sent that source a cookie, a valid
mac2 too (the cookie opened from the reply, as the protocol lets its receiver). Bounded in
rate and time (SIGTERM ends it early); prints a JSON summary.

    flood.py MODULE_DIR PUBLIC_KEY ADDRESS PORT RATE SECONDS SOURCE [SOURCE ...] [--bad-mac1]

MODULE_DIR holds udpProxyServer.py, whose protocol functions make the messages. With
--bad-mac1 every mac1 is wrong: the same datagrams at the same cost to the attacker, which
the daemon refuses at its first check. The initiations' static keys are made up, so no
handshake can complete; their DH is what the daemon spends on them.
"""

import collections
import json
import os
import signal
import socket
import sys
import time

# Initiations made ahead: making one costs three DHs, far more than sending it. Each goes
# out again and again under a new sender index, so its MACs are new each time.
TEMPLATES = 64
# Sent in bursts this long apart, so the rate holds without a sleep a datagram.
TICK = 0.002
# The mac1s of a source's last initiations: a cookie reply is opened with its message's.
MAC1S_KEPT = 512


def main(argv):
    bad_mac1 = "--bad-mac1" in argv
    argv = [arg for arg in argv if arg != "--bad-mac1"]
    module_dir, public, address, port, rate, seconds, *sources = argv
    sys.path.insert(0, module_dir)
    import udpProxyServer as ups

    target = ups.key_from_base64(public)
    destination = (address, int(port))
    bodies = []
    for _ in range(TEMPLATES):
        _, message = ups.create_initiation(ups.generate_private_key(),
                                           target, 0, ups.tai64n(time.time_ns()))
        bodies.append(bytearray(message[:-2 * ups.MAC_LEN]))
    mac1_key = ups.HASH(ups.LABEL_MAC1 + target)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    senders = []
    for source in sources:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        senders.append({"sock": sock, "cookie": None, "mac1s": collections.OrderedDict()})
    sent = with_mac2 = cookies = 0
    index = 0
    started = time.monotonic()
    deadline = [started + float(seconds)]
    signal.signal(signal.SIGTERM, lambda *_: deadline.clear())  # stop now, and say what was done
    per_tick = max(1, int(float(rate) * TICK))
    next_tick = started
    while deadline and time.monotonic() < deadline[0]:
        for _ in range(per_tick):
            sender = senders[index % len(senders)]
            body = bodies[index % TEMPLATES]
            body[4:8] = (index & 0xFFFFFFFF).to_bytes(4, "little")
            mac1 = os.urandom(ups.MAC_LEN) if bad_mac1 else ups.MAC(mac1_key, bytes(body))
            mac2 = (ups.MAC(sender["cookie"], bytes(body) + mac1) if sender["cookie"]
                    else bytes(ups.MAC_LEN))
            try:
                sender["sock"].sendto(bytes(body) + mac1 + mac2, destination)
                sent += 1
                with_mac2 += sender["cookie"] is not None
            except OSError:  # a full buffer: not sent, not counted
                pass
            # What opens a cookie reply to it: kept for the last few sent from this source.
            sender["mac1s"][index & 0xFFFFFFFF] = mac1
            if len(sender["mac1s"]) > MAC1S_KEPT:
                sender["mac1s"].popitem(last=False)
            index += 1
        for sender in senders:
            cookies += take_cookies(ups, sender, target)
        next_tick += TICK
        pause = next_tick - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.monotonic() - started
    print(json.dumps({"sent": sent, "with_mac2": with_mac2, "cookies": cookies,
                      "seconds": round(elapsed, 2), "rate": round(sent / elapsed)}))
    return 0


def take_cookies(ups, sender, target):
    """Open the cookie replies that came to this source: the cookie makes its next mac2s."""
    taken = 0
    while True:
        try:
            reply = sender["sock"].recv(1024)
        except BlockingIOError:
            return taken
        if ups.message_type(reply) != ups.MESSAGE_COOKIE_REPLY:
            continue
        receiver = int.from_bytes(reply[4:8], "little")
        mac1 = sender["mac1s"].get(receiver)
        if mac1 is None:
            continue
        try:
            sender["cookie"] = ups.consume_cookie_reply(reply, target, mac1)
            taken += 1
        except ups.WireGuardRefused:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
