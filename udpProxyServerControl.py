#!/usr/bin/env python3
"""udpProxyServerControl: add, delete and list the tunnels of a udpProxyServer daemon.

Builds the documented control message, sends it to the daemon's control port
over UDP, waits for the reply and prints it. Standard library only, so it runs
when copied alone to a management host.

Exit status: 0 when everything was done, 1 when the daemon refused something,
2 for bad arguments, 3 when no reply came.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import time

__version__ = "2.0.0"

CONTROL_PORT = 5001
DEFAULT_NETMASK = "255.255.255.252"
DEFAULT_MTU = 1500
TIMEOUT = 2.0
# A reply is one UDP datagram.
MAX_REPLY = 65535
# Authenticated requests (--secret-file): HMAC-SHA256 over the kind, time, nonce and
# payload; the daemon's reply is signed over its kind, our nonce and its payload.
REQUEST_MAC_PREFIX = b"udpProxyServer request\n"
REPLY_MAC_PREFIX = b"udpProxyServer reply\n"
NONCE_BYTES = 16
MIN_SECRET_LEN = 16

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3

EXAMPLES = """\
examples:
  %(prog)s -s 172.100.1.1 -o add -n udp2 -t 10.0.1.1 -r 172.100.1.2
  %(prog)s 172.100.1.1 -o add -n udp0 -t 10.0.0.1 -r 172.100.1.2 -p 5001
  %(prog)s -s 172.100.1.1 -o del -n udp2
  %(prog)s -s 172.100.1.1 -o list
  %(prog)s -s 172.100.1.1 --secret-file /etc/udpProxyServer/secret -o list
"""


# --- Building the message -----------------------------------------------------


def build_message(args):
    """The documented control dict for the parsed arguments."""
    if args.operation == "list":
        return {"op": "list"}
    if args.operation == "del":
        return {"op": "del", "tunnel": [{"name": args.name}]}
    tunnel = {
        "name": args.name,
        "tunnelIP": args.tunnel,
        "netmask": args.mask,
        "mtu": args.mtu,
        "remoteServer": args.remote,
    }
    if args.remote_port is not None:
        tunnel["remotePort"] = args.remote_port
    return {"op": "add", "tunnel": [tunnel]}


# --- Sending and waiting for the reply ----------------------------------------


class NoReply(Exception):
    """The daemon could not be reached or did not answer in time."""


class BadSecret(Exception):
    """The secret file cannot be used."""


def read_secret(path):
    """The shared secret in path, refused if others could read it."""
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise BadSecret("cannot read secret file %s: %s" % (path, e.strerror)) from None
    if mode & 0o077:
        raise BadSecret("secret file %s is readable by group or others (mode %03o): chmod 600 it"
                        % (path, mode & 0o777))
    if len(secret) < MIN_SECRET_LEN:
        raise BadSecret("secret file %s holds %d bytes; it needs at least %d"
                        % (path, len(secret), MIN_SECRET_LEN))
    return secret


class Session:
    """How requests go out and replies are believed: plain, or sealed with the secret."""

    def __init__(self, secret=None, clock=time.time):
        self.secret = secret
        self.clock = clock
        self.nonce = None

    def seal(self, message):
        payload = json.dumps(message)
        if self.secret is None:
            return payload.encode()
        ts, self.nonce = int(self.clock()), secrets.token_hex(NONCE_BYTES)
        text = REQUEST_MAC_PREFIX + b"%d\n%s\n%s" % (ts, self.nonce.encode(), payload.encode())
        mac = hmac.new(self.secret, text, hashlib.sha256).hexdigest()
        return json.dumps({"auth": {"ts": ts, "nonce": self.nonce, "mac": mac},
                           "payload": payload}).encode()

    def open(self, reply):
        """The reply to believe, or None. With a secret, an unsigned reply is believed
        only when it reports a failure: a forger could do no more than that."""
        if self.secret is None or "auth" not in reply:
            return reply if self.secret is None or reply.get("ok") is False else None
        auth, payload = reply.get("auth"), reply.get("payload")
        if not isinstance(auth, dict) or not isinstance(payload, str) or auth.get("nonce") != self.nonce:
            return None
        text = REPLY_MAC_PREFIX + b"%s\n%s" % (self.nonce.encode(), payload.encode())
        expected = hmac.new(self.secret, text, hashlib.sha256).hexdigest()
        if not isinstance(auth.get("mac"), str) or not hmac.compare_digest(expected, auth["mac"]):
            return None
        try:
            opened = json.loads(payload)
        except ValueError:
            return None
        return opened if isinstance(opened, dict) else None


def resolve(host, port):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise NoReply("cannot resolve %r: %s" % (host, e.strerror)) from None
    family, _, _, _, address = infos[0]
    return family, address


def send_request(server, port, message, timeout, session=None):
    """Send message to the daemon; return its reply as a dict, or None when not waiting."""
    session = session or Session()
    family, address = resolve(server, port)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(session.seal(message), address)
        except OSError as e:
            raise NoReply("cannot send to %s port %d: %s" % (server, port, e.strerror)) from None
        if timeout == 0:
            return None
        return wait_for_reply(sock, port, timeout, session)


def fetch_list(server, port, timeout, session):
    """The whole list, asked for part by part: each part fits in one datagram."""
    reply = send_request(server, port, {"op": "list"}, timeout, session)
    tunnels = list(reply.get("tunnels", []))
    for part in range(1, reply.get("parts", 1) if reply.get("ok") else 1):
        more = send_request(server, port, {"op": "list", "part": part}, timeout, session)
        if not more.get("ok"):
            return more
        tunnels += more.get("tunnels", [])
    reply["tunnels"] = tunnels
    reply.pop("part", None)
    reply.pop("parts", None)
    return reply


def wait_for_reply(sock, port, timeout, session):
    """The first reply to believe that comes back from the control port before the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoReply("no reply within %g s (a daemon older than 2.0 never replies:"
                          " --timeout 0 sends without waiting)" % timeout)
        sock.settimeout(left)
        try:
            datagram, sender = sock.recvfrom(MAX_REPLY)
        except socket.timeout:
            continue
        except OSError as e:  # e.g. ICMP port unreachable: nothing listens there
            raise NoReply(e.strerror) from None
        if sender[1] != port:
            continue
        try:
            reply = json.loads(datagram)
        except ValueError:
            continue
        if isinstance(reply, dict):
            reply = session.open(reply)
            if reply is not None:
                return reply


# --- Printing -----------------------------------------------------------------


def format_reply(reply):
    """The reply of an add or del, a line per tunnel."""
    results = reply.get("results")
    if not results:
        return "error: %s" % reply.get("error", "the daemon refused the request")
    lines = []
    for result in results:
        if result.get("ok"):
            lines.append("%s: %s done" % (result.get("name"), reply.get("op")))
        else:
            lines.append("%s: error: %s" % (result.get("name"), result.get("error")))
    if reply.get("warning"):
        lines.append("warning: %s" % reply["warning"])
    return "\n".join(lines)


LIST_COLUMNS = ("NAME", "TUNNEL", "REMOTE", "MTU", "RX PKTS", "RX BYTES",
                "TX PKTS", "TX BYTES", "DROPS", "LAST RX")


def format_table(reply, now=None):
    """The reply of a list, as a table for a person."""
    now = time.time() if now is None else now
    rows = [LIST_COLUMNS]
    for tunnel in reply.get("tunnels", []):
        rows.append((
            tunnel["name"],
            "%s/%s" % (tunnel["tunnelIP"], netmask_bits(tunnel["netmask"])),
            "%s:%s" % (tunnel["remoteServer"], tunnel["remotePort"]),
            str(tunnel["mtu"]),
            str(tunnel["rx_packets"]),
            str(tunnel["rx_bytes"]),
            str(tunnel["tx_packets"]),
            str(tunnel["tx_bytes"]),
            format_drops(tunnel.get("drops", {})),
            format_age(tunnel.get("last_rx"), now),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    if len(rows) == 1:
        lines.append("(no tunnels)")
    drops = reply.get("drops")
    if drops:
        lines.append("dropped by the daemon: %s" % format_drops(drops))
    control = reply.get("control")
    if control:
        lines.append("control port: %s" % format_drops(control))
    return "\n".join(lines)


def netmask_bits(netmask):
    return bin(int.from_bytes(socket.inet_aton(netmask), "big")).count("1")


def format_drops(drops):
    if not drops:
        return "0"
    return ",".join("%s=%d" % item for item in sorted(drops.items()))


def format_age(stamp, now):
    if stamp is None:
        return "never"
    seconds = max(0, now - stamp)
    if seconds < 120:
        return "%ds ago" % seconds
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


# --- main ---------------------------------------------------------------------


def port(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("port %r out of range (1-65535)" % text)
    return value


def timeout(text):
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError("timeout %r out of range (0-3600 s)" % text)
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Add, delete or list the tunnels of a udpProxyServer daemon.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server_arg", nargs="?", metavar="SERVER",
                        help="the daemon's host (the same as -s)")
    parser.add_argument("-s", "--server", help="the daemon's host")
    parser.add_argument("-p", "--port", type=port, default=CONTROL_PORT,
                        help="the daemon's control port (default %(default)s)")
    parser.add_argument("-o", "--operation", choices=("add", "del", "list"), default="add",
                        help="what to do (default %(default)s)")
    parser.add_argument("-n", "--name", help="tunnel name, at most 15 bytes")
    parser.add_argument("-t", "--tunnel", help="the tunnel's own IP address")
    parser.add_argument("-tm", "--mask", default=DEFAULT_NETMASK,
                        help="the tunnel's netmask (default %(default)s)")
    parser.add_argument("-m", "--mtu", type=int, default=DEFAULT_MTU,
                        help="the tunnel's MTU (default %(default)s)")
    parser.add_argument("-r", "--remote", help="the IP address of the peer's daemon")
    parser.add_argument("--remote-port", type=port,
                        help="the peer's data port, when it is not this daemon's")
    parser.add_argument("--timeout", type=timeout, default=TIMEOUT,
                        help="seconds to wait for the reply; 0 sends without waiting"
                             " (default %(default)s)")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="authenticate with the shared secret in PATH (mode 600), as the"
                             " daemon's --secret-file")
    parser.add_argument("--json", action="store_true", help="print the reply as it came")
    args = parser.parse_args(argv)

    if args.server and args.server_arg and args.server != args.server_arg:
        parser.error("two servers given: %r and %r" % (args.server_arg, args.server))
    args.server = args.server or args.server_arg
    if not args.server:
        parser.error("the server is required (-s SERVER)")
    needed = {"add": ("name", "tunnel", "remote"), "del": ("name",), "list": ()}
    for field in needed[args.operation]:
        if getattr(args, field) is None:
            parser.error("-o %s needs --%s" % (args.operation, field))
    return args


def main(argv=None):
    args = parse_args(argv)
    message = build_message(args)
    try:
        session = Session(read_secret(args.secret_file) if args.secret_file else None)
    except BadSecret as e:
        print("udpProxyServerControl: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.operation == "list" and args.timeout:
            reply = fetch_list(args.server, args.port, args.timeout, session)
        else:
            reply = send_request(args.server, args.port, message, args.timeout, session)
    except NoReply as e:
        print("udpProxyServerControl: %s:%d: %s" % (args.server, args.port, e), file=sys.stderr)
        return EXIT_NO_REPLY
    if reply is None:
        print("sent %s to %s:%d (not waiting for a reply)"
              % (json.dumps(message), args.server, args.port))
        return EXIT_OK
    if args.json:
        print(json.dumps(reply))
    elif args.operation == "list" and reply.get("ok"):
        print(format_table(reply))
    else:
        print(format_reply(reply))
    return EXIT_OK if reply.get("ok") else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
