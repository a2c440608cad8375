#!/usr/bin/env python3
"""udpProxyServerControl: add, delete and list the tunnels of a udpProxyServer daemon.

Builds the documented control message, sends it to the daemon's control port
over UDP, waits for the reply and prints it; with --mesh, brings every daemon of
a mesh file to what the file says, or with --down deletes the mesh's tunnels.
Standard library only, so it runs when copied alone to a management host.

Exit status: 0 when everything was done, 1 when the daemon refused something,
2 for bad arguments, 3 when no reply came.

The map. The sections, in order, each using only those above it:

    Constants
    Building and sealing a request      build_message, Session (the secret's envelope)
    Sending it and waiting for the reply   Daemon: the cookie first, then the request
    Printing               format_reply, format_table
    The mesh               parse_mesh and its checks, then the plan, a pure function of
                           the file and the daemons' lists: plan_mesh (pair_subnets,
                           mesh_plan, host_plans), and pair_states against it
    Applying the mesh      read_tunnels, then print_plan (--dry-run) or apply_plan
                           (change_host), or --status
    main

A request: main -> build_message -> Daemon.request (the cookie, then Session.seal ->
Daemon.exchange -> Daemon.wait_for_reply -> Session.open) -> format_reply. A mesh: main
-> main_mesh -> load_mesh -> apply_mesh -> read_tunnels (Daemon.fetch_list on every host)
-> plan_mesh -> print_plan or apply_plan; main_status -> read_mesh -> pair_states.
"""

import argparse
import contextlib
import base64
import binascii
import collections
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
import socket
import sys
import time


# --- Constants ------------------------------------------------------------------


__version__ = "2.1.0"

CONTROL_PORT = 5001
DATA_PORT = 5000
DEFAULT_NETMASK = "255.255.255.252"
# What the daemon gives an IPv6 tunnel address that comes without a prefix length.
DEFAULT_IPV6_PREFIX = 64
DEFAULT_MTU = 1500
TIMEOUT = 2.0
# A reply is one UDP datagram.
MAX_REPLY = 65535
# --mesh --status: a tunnel end with no handshake (encrypted) or packet received (plain)
# for longer is down; WireGuard's REJECT_AFTER_TIME, after which no session is valid.
STATUS_DOWN_AFTER = 180
# A tunnel end's states, as daemons list them: up (a session, or a packet received lately),
# idle (nothing sent or wanted lately), connecting, down (sent, and no answer); and what
# --status adds. Those not up, the worst first, as the condensed status lists them.
TUNNEL_STATES = ("up", "idle", "connecting", "down")
HEALTHY = ("up", "idle")
NOT_UP = ("no answer", "missing", "differs", "down", "connecting", "idle")
# Authenticated requests (--secret-file): HMAC-SHA256 over the kind, time, nonce and
# payload; the daemon's reply is signed over its kind, our nonce and its payload.
REQUEST_MAC_PREFIX = b"udpProxyServer request\n"
REPLY_MAC_PREFIX = b"udpProxyServer reply\n"
NONCE_BYTES = 16
MIN_SECRET_LEN = 16
# A secret file holds one secret a line: two while the fleet moves from one to the next.
MAX_SECRETS = 2
# A daemon answers a source that has not yet shown it receives at its address with no
# more bytes than it was sent; plain requests are padded (JSON allows trailing blanks)
# so that the cookie that proves our address, or a refusal with its reason, fits.
PADDED_REQUEST = 512
# Asks a daemon for the cookie that proves our address; the empty tunnel list keeps a 2015
# daemon, which takes every message as a request with tunnels, from tripping over it.
COOKIE_REQUEST = {"op": "cookie", "tunnel": []}
# A list whose tunnels change while it is fetched part by part is fetched again, this often.
LIST_ATTEMPTS = 5

# The mesh file's fields; tunnels named with the prefix belong to the mesh (and only
# they are deleted when the file no longer wants them); adds go this many a message.
MESH_FIELDS = ("controlPort", "mtu", "tunnelNet", "tunnelPrefix", "encrypt",
               "persistentKeepalive", "hosts")
MESH_HOST_FIELDS = ("name", "address", "lan", "publicKey", "persistentKeepalive")
# What a daemon changes in a tunnel in place (the set op), its device and session kept;
# set remakes a tunnel for any other change.
IN_PLACE = ("mtu", "routes", "persistentKeepalive")
MESH_TUNNEL_PREFIX = "m-"
MESH_BATCH = 50
# A mesh's default MTU fits its tunnels' datagrams in the usual 1500-byte underlay, as
# wg-quick's 1420 does, so none is fragmented and GSO stays on (-m keeps the 2015 default).
# A plain pair's overhead over IPv6: IP 40, UDP 8 and the 4-byte packet information header.
PLAIN_MESH_MTU = 1500 - 40 - 8 - 4
# An encrypted pair's: WireGuard's 60 bytes over IPv4 (IP 20, UDP 8, its header 16, tag 16),
# 80 over IPv6.
ENCRYPTED_MESH_MTU = 1420
# A Curve25519 public key is 32 bytes; files and daemons give it in base64, as wg pubkey.
KEY_BYTES = 32

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
  %(prog)s -s 172.100.1.1 -o add -n udp2 -t 10.0.1.1 -r 172.100.1.2 --route 192.168.2.0/24 --route fd00:2::/64
  %(prog)s -s 2001:db8::1 -o add -n udp6 -t fd00:1::1/64 -r 2001:db8::2 --mtu 1400
  %(prog)s --mesh mesh.json --dry-run
  %(prog)s --mesh mesh.json --secret-file /etc/udpProxyServer/secret
  %(prog)s --mesh mesh.json --down --secret-file /etc/udpProxyServer/secret
  %(prog)s --mesh mesh.json --status --secret-file /etc/udpProxyServer/secret

a mesh file (JSON; the README's "The mesh file" says what each field means):
  {"tunnelNet": "10.0.0.0/24", "encrypt": true,
   "hosts": [{"name": "minion-1", "address": "172.100.1.1", "lan": ["192.168.1.0/24"]},
             {"name": "minion-2", "address": "172.100.1.2", "lan": ["192.168.2.0/24"]}]}
  mesh-wide: tunnelNet, tunnelPrefix, mtu, encrypt, controlPort, persistentKeepalive;
  each host: name, address, lan, publicKey, persistentKeepalive

exit status: 0 done; 1 refused (the reason printed), or with --mesh a host not done,
or with --status a tunnel end neither up nor idle; 2 bad arguments or a bad mesh file;
3 no reply
"""


# --- Building and sealing a request -------------------------------------------


def build_message(args):
    """The documented control dict for the parsed arguments."""
    if args.operation == "list":
        return {"op": "list"}
    if args.operation == "del":
        return {"op": "del", "tunnel": [{"name": args.name}]}
    if args.operation == "set":
        tunnel = {"name": args.name}
        for field, value in (("mtu", args.mtu), ("routes", args.route),
                             ("persistentKeepalive", args.keepalive)):
            if value is not None:
                tunnel[field] = value
        return {"op": "set", "tunnel": [tunnel]}
    tunnel = {"name": args.name, "tunnelIP": args.tunnel}
    # The 2015 default netmask goes with a bare IPv4 address; an IPv6 one or one with a
    # prefix length carries its own.
    if args.mask is not None or not (":" in args.tunnel or "/" in args.tunnel):
        tunnel["netmask"] = args.mask or DEFAULT_NETMASK
    tunnel["mtu"] = DEFAULT_MTU if args.mtu is None else args.mtu
    if args.remote is not None:  # only an encrypted tunnel may wait for its peer
        tunnel["remoteServer"] = args.remote
    if args.remote_port is not None:
        tunnel["remotePort"] = args.remote_port
    if args.route:
        tunnel["routes"] = args.route
    if args.peer_key:
        tunnel["publicKey"] = args.peer_key
    if args.psk_file:  # a path on the daemon's host: the key never crosses the network
        tunnel["presharedKeyFile"] = args.psk_file
    if args.keepalive is not None:
        tunnel["persistentKeepalive"] = args.keepalive
    return {"op": "add", "tunnel": [tunnel]}


class BadSecret(Exception):
    """The secret file cannot be used."""


def read_secret(path):
    """The secret to sign with: the first line of path (a second one is the daemons' while
    secrets are rotated), refused if others could read the file."""
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise BadSecret("cannot read secret file %s: %s" % (path, e.strerror)) from None
    if mode & 0o077:
        raise BadSecret("secret file %s is readable by group or others (mode %03o): chmod 600 it"
                        % (path, mode & 0o777))
    if not 1 <= len(lines) <= MAX_SECRETS:
        raise BadSecret("secret file %s holds %d secrets; it holds one a line, one or two"
                        " (while they are rotated)" % (path, len(lines)))
    for number, secret in enumerate(lines, 1):
        if len(secret) < MIN_SECRET_LEN:
            raise BadSecret("secret file %s: line %d holds %d bytes; a secret needs at least %d"
                            % (path, number, len(secret), MIN_SECRET_LEN))
    return lines[0]


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
        """The reply to believe and whether it is authentic (signed, or no secret is used),
        or None. With a secret, an unsigned reply is believed only when it reports a
        failure, and only as that: a forger could do no more than make a command fail, so
        nothing in it (a retry, a cookie) is followed."""
        if self.secret is None:
            return reply, True
        if "auth" not in reply:
            return (reply, False) if reply.get("ok") is False else None
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
        return (opened, True) if isinstance(opened, dict) else None


# --- Sending it and waiting for the reply, the sender's address validated -----


class NoReply(Exception):
    """The daemon could not be reached or did not answer in time."""


def resolve(host, port):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise NoReply("cannot resolve %r: %s" % (host, e.strerror)) from None
    family, _, _, _, address = infos[0]
    return family, address


class Daemon:
    """One daemon's control port, spoken to from one socket. Without a secret, the
    first request asks for a cookie: it proves our address and port, so the daemon
    then answers in full (a list too) and acts once on each request."""

    def __init__(self, server, port, timeout, session=None):
        self.server, self.port, self.timeout = server, port, timeout
        self.session = session or Session()
        family, self.address = resolve(server, port)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.cookie = None
        self.validates = True  # false for a daemon of 2.0.0, which has no cookies

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def request(self, message):
        """The daemon's reply to message as a dict, or None when not waiting (--timeout 0)."""
        if self.timeout == 0:
            self.send(message)
            return None
        if self.validates and self.cookie is None:
            try:
                reply, authentic = self.exchange(COOKIE_REQUEST)
            except NoReply as e:
                return self.without_cookie(message, e)
            if reply.get("cookie") and authentic:
                self.cookie = reply["cookie"]
            elif "unknown op 'cookie'" in str(reply.get("error")) and authentic:
                self.validates = False  # a daemon of 2.0.0, which has no cookies
            else:
                return reply  # a refusal the user must see, e.g. the daemon has a secret
        if not self.validates:
            return self.exchange(message)[0]
        reply, authentic = self.exchange(dict(message, cookie=self.cookie))
        if reply.get("retry") and reply.get("cookie") and authentic:
            # The cookie expired or the daemon restarted, and it did not act: once more.
            self.cookie = reply["cookie"]
            reply = self.exchange(dict(message, cookie=self.cookie))[0]
        return reply

    def without_cookie(self, message, no_reply):
        """No answer to the cookie request: a 2015 daemon never answers, and takes a plain
        request sent once (a daemon of ours acts on it once too, and answers what fits).
        With a secret there is no such daemon, and nothing more is sent."""
        if self.session.secret is not None:
            raise no_reply
        try:
            reply, _ = self.exchange(message)
        except NoReply:
            raise NoReply("%s (the request was sent once without a cookie, as a 2015 daemon"
                          " takes it)" % no_reply) from None
        self.cookie = reply.get("cookie")
        if message["op"] == "list" and "tunnels" not in reply and self.cookie:
            return self.exchange(dict(message, cookie=self.cookie))[0]  # a list is safe to ask again
        return reply

    def send(self, message):
        datagram = self.session.seal(message)
        if len(datagram) < PADDED_REQUEST:
            datagram = datagram.ljust(PADDED_REQUEST)
        try:
            self.sock.sendto(datagram, self.address)
        except OSError as e:
            raise NoReply("cannot send to %s port %d: %s"
                          % (self.server, self.port, e.strerror)) from None

    def exchange(self, message):
        """Send message and wait: the reply and whether it is authentic."""
        self.send(message)
        return self.wait_for_reply()

    def wait_for_reply(self):
        """The first reply to believe that comes back from the control port before the deadline."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReply(no_reply_causes(self.server, self.port, self.timeout))
            self.sock.settimeout(left)
            try:
                datagram, sender = self.sock.recvfrom(MAX_REPLY)
            except socket.timeout:
                continue
            except OSError as e:  # e.g. ICMP port unreachable: nothing listens there
                raise NoReply(e.strerror) from None
            if sender[1] != self.port:
                continue
            try:
                reply = json.loads(datagram)
            except ValueError:
                continue
            if isinstance(reply, dict):
                opened = self.session.open(reply)
                if opened is not None:
                    return opened

    def fetch_list(self):
        """The whole list, asked for part by part (each fits in one datagram), all of one
        generation of the daemon's tunnels: when they change meanwhile, from the start."""
        for _ in range(LIST_ATTEMPTS):
            reply = self.fetch_parts()
            if not reply.get("retry"):
                return reply
        return reply

    def fetch_parts(self):
        """The list, or the first refusal: one with retry when the tunnels changed."""
        reply = self.request({"op": "list"})
        if not reply.get("ok"):
            return reply
        tunnels = list(reply.get("tunnels", []))
        for part in range(1, reply.get("parts", 1)):
            message = {"op": "list", "part": part}
            if "generation" in reply:  # a daemon of 2.0.0 has none
                message["generation"] = reply["generation"]
            more = self.request(message)
            if not more.get("ok"):
                return more
            tunnels += more.get("tunnels", [])
        reply["tunnels"] = tunnels
        for field in ("part", "parts", "cookie"):
            reply.pop(field, None)
        return reply


def no_reply_causes(server, port, timeout):
    """What to tell a user who got no reply: the likely causes, the likeliest first."""
    return ("no reply within %g s. Likely causes: nothing listens at %s port %d (is the"
            " daemon running there, on that port? -p sets it); a firewall drops UDP to port %d"
            " (or the replies); the daemon's --allow list or --control-bind leaves this host"
            " out; a daemon of 2.0.0 with a secret wants --secret-file; a 2015 daemon never"
            " replies (--timeout 0 sends without waiting)" % (timeout, server, port, port))


def send_request(server, port, message, timeout, session=None):
    """Send message to the daemon; return its reply as a dict, or None when not waiting."""
    with Daemon(server, port, timeout, session) as daemon:
        return daemon.request(message)


def fetch_list(server, port, timeout, session=None):
    with Daemon(server, port, timeout, session) as daemon:
        return daemon.fetch_list()


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


def listed_interface(listed):
    """A listed tunnel's address with its prefix length, from its entry: the tunnelIP with
    its prefix length, or with its netmask (a daemon of 2.0.0 also gives prefixlen)."""
    address = listed["tunnelIP"]
    if "/" in address:
        return ipaddress.ip_interface(address)
    return ipaddress.ip_interface("%s/%s" % (address, listed.get("prefixlen")
                                             or listed.get("netmask", DEFAULT_NETMASK)))


LIST_COLUMNS = ("NAME", "TUNNEL", "REMOTE", "MTU", "RX PKTS", "RX BYTES",
                "TX PKTS", "TX BYTES", "DROPS", "LAST RX", "HANDSHAKE", "CHECKSUMS", "ROUTES")
# What a plain tunnel's CHECKSUMS column says when it sends full ones, by whether the
# peer's last datagram said it takes partial ones (a new daemon with offloads).
FULL_BECAUSE = {None: "full (peer not heard)", False: "full (old peer)",
                True: "full (no offloads here)"}


def format_table(reply, now=None):
    """The reply of a list, as a table for a person."""
    now = time.time() if now is None else now
    rows = [LIST_COLUMNS]
    for tunnel in reply.get("tunnels", []):
        rows.append((
            tunnel["name"],
            str(listed_interface(tunnel)),
            format_remote(tunnel, reply),
            str(tunnel["mtu"]),
            str(tunnel["rx_packets"]),
            str(tunnel["rx_bytes"]),
            str(tunnel["tx_packets"]),
            str(tunnel["tx_bytes"]),
            format_drops(tunnel.get("drops", {})),
            format_age(tunnel.get("last_rx"), now),
            format_age(tunnel.get("latestHandshake"), now) if "publicKey" in tunnel else "plain",
            format_checksums(tunnel),
            ",".join(tunnel.get("routes", [])) or "-",
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
    if reply.get("unmade"):
        lines.append("in the state file but not made (see the daemon's log): %s"
                     % ", ".join(reply["unmade"]))
    return "\n".join(lines)


def format_checksums(tunnel):
    """What a plain tunnel sends, partial checksums or full ones and why; "-" for an
    encrypted tunnel (always full, as WireGuard peers need) or a daemon that does not say."""
    checksums = tunnel.get("checksums")
    if checksums == "full":
        return FULL_BECAUSE.get(tunnel.get("peerOffload"), "full")
    return checksums or "-"


def format_remote(tunnel, reply):
    """Where the peer is: its address and port as added, or, for an encrypted tunnel that
    waits for its peer, where it last sent from (or that it has not yet)."""
    remote = tunnel.get("remoteServer")
    if remote is None:
        return tunnel.get("endpoint") or "(waiting)"
    port = tunnel.get("remotePort", reply.get("dataPort", DATA_PORT))
    return ("[%s]:%s" if ":" in remote else "%s:%s") % (remote, port)


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


# --- The mesh: the file checked, and each host's plan from what it has (no I/O) ---


class MeshError(ValueError):
    """A mesh file that cannot be used; the text points at the entry."""


@dataclasses.dataclass
class MeshHost:
    name: str
    address: object  # ipaddress.IPv4Address or IPv6Address
    lans: list  # ipaddress networks reached through this host
    public_key: str = None  # its daemon's, in base64 as wg pubkey writes it; None: as it says
    keepalive: int = None  # its tunnels' persistentKeepalive; None: the mesh's


@dataclasses.dataclass
class Mesh:
    hosts: list
    tunnel_net: object  # the network the tunnels' subnets come from
    prefix: int  # each tunnel's subnet: /30 (or /31) for IPv4, /127 (or /126) for IPv6
    mtu: int
    control_port: int
    encrypt: bool = False  # every pair an encrypted (WireGuard) tunnel
    keepalive: int = 0  # every host's tunnels' persistentKeepalive, unless the host says

    def keepalive_of(self, host):
        return self.keepalive if host.keepalive is None else host.keepalive


def parse_mesh(data):
    """The Mesh a mesh file's JSON describes, checked whole before anything is sent."""
    if not isinstance(data, dict):
        raise MeshError("the mesh must be a JSON object")
    unknown = sorted(set(data) - set(MESH_FIELDS))
    if unknown:
        raise MeshError("unknown field %r (expected %s)" % (unknown[0], ", ".join(MESH_FIELDS)))
    tunnel_net = mesh_network(data.get("tunnelNet"), "tunnelNet")
    prefix = data.get("tunnelPrefix", 30 if tunnel_net.version == 4 else 127)
    if prefix not in ((30, 31) if tunnel_net.version == 4 else (126, 127)):
        raise MeshError("tunnelPrefix %r: must be 30 or 31 for IPv4, 126 or 127 for IPv6"
                        % (prefix,))
    encrypt = data.get("encrypt", False)
    if not isinstance(encrypt, bool):
        raise MeshError("encrypt %r: must be true or false" % (encrypt,))
    keepalive = mesh_keepalive(data.get("persistentKeepalive", 0), "persistentKeepalive")
    hosts = [mesh_host(entry, index) for index, entry in enumerate(data.get("hosts") or [])]
    if len(hosts) < 2:
        raise MeshError("a mesh needs at least two hosts in 'hosts'")
    check_keys(hosts, encrypt)
    if not encrypt and (keepalive or any(host.keepalive for host in hosts)):
        raise MeshError("persistentKeepalive given, but the mesh is not encrypted (plain"
                        " tunnels have no keepalives; add \"encrypt\": true)")
    check_unique(hosts)
    check_lans(hosts, tunnel_net)
    pairs = len(hosts) * (len(hosts) - 1) // 2
    subnets = 2 ** (prefix - tunnel_net.prefixlen) if prefix >= tunnel_net.prefixlen else 0
    if subnets < pairs:
        raise MeshError("tunnelNet %s holds %d /%d subnets; %d hosts need %d (one for each pair)"
                        % (tunnel_net, subnets, prefix, len(hosts), pairs))
    mtu = data.get("mtu", ENCRYPTED_MESH_MTU if encrypt else PLAIN_MESH_MTU)
    port = data.get("controlPort", CONTROL_PORT)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65503:
        raise MeshError("mtu %r: must be a whole number from 68 to 65503" % (mtu,))
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise MeshError("controlPort %r: must be a whole number from 1 to 65535" % (port,))
    return Mesh(hosts, tunnel_net, prefix, mtu, port, encrypt, keepalive)


def mesh_keepalive(value, where):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise MeshError("%s %r: seconds from 0 (none) to 65535" % (where, value))
    return value


def mesh_network(value, where):
    try:
        return ipaddress.ip_network(value)
    except (TypeError, ValueError) as e:
        raise MeshError("%s %r: not a network (%s)" % (where, value, e)) from None


def mesh_host(entry, index):
    where = "hosts[%d]" % index
    if not isinstance(entry, dict):
        raise MeshError("%s: must be an object with name, address and lan" % where)
    unknown = sorted(set(entry) - set(MESH_HOST_FIELDS))
    if unknown:
        raise MeshError("%s: unknown field %r (expected %s)"
                        % (where, unknown[0], ", ".join(MESH_HOST_FIELDS)))
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise MeshError("%s: name %r must be a non-empty string" % (where, name))
    where = "%s (%s)" % (where, name)
    try:
        address = ipaddress.ip_address(entry.get("address"))
    except ValueError:
        raise MeshError("%s: address %r is not an IP address" % (where, entry.get("address"))) from None
    lans = entry.get("lan", [])
    if not isinstance(lans, list):
        raise MeshError("%s: lan must be a list of networks" % where)
    lans = [mesh_network(lan, "%s: lan[%d]" % (where, i)) for i, lan in enumerate(lans)]
    given = entry.get("publicKey")
    key = None if given is None else public_key(given)
    if given is not None and key is None:
        raise MeshError("%s: publicKey %r is not a key: %d bytes in base64, as wg pubkey writes"
                        % (where, given, KEY_BYTES))
    keepalive = entry.get("persistentKeepalive")
    if keepalive is not None:
        keepalive = mesh_keepalive(keepalive, "%s: persistentKeepalive" % where)
    return MeshHost(name, address, lans, key, keepalive)


def public_key(text):
    """text as a public key in the one base64 form daemons list keys in; None if it is not one."""
    try:
        key = base64.b64decode(text, validate=True)
    except (TypeError, binascii.Error, ValueError):
        return None
    return base64.b64encode(key).decode() if len(key) == KEY_BYTES else None


def check_keys(hosts, encrypt):
    # Keys in a plain mesh would be ignored: refused, so that no one takes it for encrypted.
    for index, host in enumerate(hosts):
        if host.public_key and not encrypt:
            raise MeshError("hosts[%d] (%s): publicKey given, but the mesh is not encrypted"
                            " (add \"encrypt\": true)" % (index, host.name))


def check_unique(hosts):
    for kind, field in (("name", "name"), ("address", "address"), ("public_key", "publicKey")):
        seen = {}
        for index, host in enumerate(hosts):
            value = getattr(host, kind)
            if value is None:
                continue
            if value in seen:
                raise MeshError("hosts[%d] (%s): %s %s is also that of hosts[%d]"
                                % (index, host.name, field, value, seen[value]))
            seen[value] = index
    names = {}
    for index, host in enumerate(hosts):
        name = tunnel_name(host.name)
        if name in names:
            raise MeshError("hosts[%d] (%s): its tunnel name %s is also that of hosts[%d]"
                            % (index, host.name, name, names[name]))
        names[name] = index


def check_lans(hosts, tunnel_net):
    # The tunnels' subnets and every LAN are routed into tunnels: a host address inside
    # one would send a tunnel's own packets into the tunnel.
    check_covers_no_host(tunnel_net, "tunnelNet %s" % tunnel_net, hosts)
    seen = [(tunnel_net, "tunnelNet")]
    for index, host in enumerate(hosts):
        for i, lan in enumerate(host.lans):
            where = "hosts[%d] (%s) lan[%d] %s" % (index, host.name, i, lan)
            check_covers_no_host(lan, where, hosts)
            for other, other_where in seen:
                if lan.version == other.version and lan.overlaps(other):
                    raise MeshError("%s overlaps %s %s" % (where, other_where, other))
            seen.append((lan, "hosts[%d] (%s) lan[%d]" % (index, host.name, i)))


def check_covers_no_host(network, where, hosts):
    for index, host in enumerate(hosts):
        if network.version == host.address.version and host.address in network:
            raise MeshError("%s covers the address %s of hosts[%d] (%s)"
                            % (where, host.address, index, host.name))


def tunnel_name(peer):
    """The name of the tunnel to peer: m- and the peer's name, or its start and a short
    hash when that is too long for an interface name (15 bytes)."""
    plain = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in peer)
    if len(plain) <= 13 and plain == peer:
        return MESH_TUNNEL_PREFIX + plain
    return MESH_TUNNEL_PREFIX + plain[:8] + "-" + hashlib.sha1(peer.encode()).hexdigest()[:4]


def pair_subnets(mesh, current, unanswered=frozenset()):
    """The subnet of every pair of hosts that answered: the one both its tunnels have now,
    if any, so that applying the file again changes nothing; the free ones in a fixed
    order else. A pair with a host in unanswered gets none, and the subnets its answering
    end holds go to no other pair."""
    subnets = list(mesh.tunnel_net.subnets(new_prefix=mesh.prefix))
    taken = held_subnets(mesh, current, held_tunnels(mesh, current, unanswered))
    chosen = {}
    # By the later host first: adding hosts moves nothing.
    pairs = [(a, b) for j, b in enumerate(mesh.hosts) for a in mesh.hosts[:j]
             if a.name not in unanswered and b.name not in unanswered]
    for a, b in pairs:
        here = current.get(a.name, {}).get(tunnel_name(b.name))
        there = current.get(b.name, {}).get(tunnel_name(a.name))
        if here and there:
            net = listed_interface(here).network
            here_ip, there_ip = listed_interface(here).ip, listed_interface(there).ip
            if (net.prefixlen == mesh.prefix and net.subnet_of(mesh.tunnel_net)
                    and listed_interface(there).network == net and net not in taken
                    and here_ip != there_ip):
                chosen[a.name, b.name] = (net, str(here_ip), str(there_ip))
                taken.add(net)
    free = (net for net in subnets if net not in taken)
    for a, b in pairs:
        if (a.name, b.name) not in chosen:
            net = next(free, None)
            if net is None:
                raise MeshError("tunnelNet %s has no /%d left for %s and %s: tunnels to hosts"
                                " that did not answer hold the rest"
                                % (mesh.tunnel_net, mesh.prefix, a.name, b.name))
            first, second = net.hosts() if mesh.prefix in (30, 126) else (net[0], net[1])
            chosen[a.name, b.name] = (net, str(first), str(second))
    return chosen


def held_tunnels(mesh, current, unanswered):
    """For each host in current, its tunnels to hosts in unanswered: tunnel name -> the
    peer's name. They stay as they are: remaking one end of a pair alone breaks it."""
    silent = {tunnel_name(host.name): host.name for host in mesh.hosts if host.name in unanswered}
    return {name: {tunnel: silent[tunnel] for tunnel in have if tunnel in silent}
            for name, have in current.items()}


def held_subnets(mesh, current, held):
    """The tunnelNet subnets that held tunnels lie in or cover."""
    taken = set()
    for name, tunnels in held.items():
        for tunnel in tunnels:
            net = listed_interface(current[name][tunnel]).network
            if net.version != mesh.tunnel_net.version or not net.overlaps(mesh.tunnel_net):
                continue
            if net.prefixlen >= mesh.prefix:
                taken.add(net.supernet(new_prefix=mesh.prefix))
            else:  # made with another tunnelPrefix, or by hand
                inside = net if net.subnet_of(mesh.tunnel_net) else mesh.tunnel_net
                taken.update(inside.subnets(new_prefix=mesh.prefix))
    return taken


@dataclasses.dataclass
class Listings:
    """What the daemons of a mesh gave: for each host that answered, its mesh tunnels
    (name -> listed tunnel), data port and own public key (None without --key-file); for
    the others, why not."""
    tunnels: dict
    data_ports: dict
    keys: dict
    unanswered: dict


def mesh_keys(mesh, daemon_keys):
    """For an encrypted mesh, each host's public key: the one its daemon gives (daemon_keys:
    name -> the publicKey of its list reply, for the hosts that answered), which must be
    the file's when the file has one; the file's for a host that did not answer. And the
    hosts that answered with no key to use: name -> why."""
    keys, keyless = {}, {}
    for host in mesh.hosts:
        if host.name not in daemon_keys:
            if host.public_key:
                keys[host.name] = host.public_key
            continue
        given = daemon_keys[host.name]
        key = None if given is None else public_key(given)
        if given is None:
            keyless[host.name] = "its daemon has no key (start it with --key-file)"
        elif key is None:
            keyless[host.name] = "its daemon gives publicKey %r, which is not a key" % (given,)
        elif host.public_key and key != host.public_key:
            keyless[host.name] = ("its daemon's publicKey %s is not the file's %s"
                                  % (key, host.public_key))
        else:
            keys[host.name] = key
    # One key on two hosts (a key file copied): which is which cannot be told.
    holders = {}
    for name, key in keys.items():
        holders.setdefault(key, []).append(name)
    for key, names in holders.items():
        for name in names if len(names) > 1 else ():
            del keys[name]
            keyless[name] = "publicKey %s is also that of %s" % (
                key, ", ".join(other for other in names if other != name))
    return keys, keyless


def plannable(mesh, tunnels, daemon_keys):
    """What a plan may take from the daemons' lists: the mesh tunnels of the hosts that
    answered and have a key to use (all, in a plain mesh), the hosts' keys, and the hosts
    whose key cannot be used, name -> why: their pairs are held as a silent host's."""
    keys, keyless = mesh_keys(mesh, daemon_keys) if mesh.encrypt else ({}, {})
    return {name: have for name, have in tunnels.items() if name not in keyless}, keys, keyless


def mesh_plan(mesh, current, unanswered=frozenset(), keys=None):
    """For each host, the tunnels it should have: name -> control entry; none between a
    host in unanswered and another (see held_tunnels). An encrypted mesh's entries carry
    the peer's key from keys (name -> public key)."""
    wanted = {host.name: {} for host in mesh.hosts}
    for (a_name, b_name), (net, a_ip, b_ip) in pair_subnets(mesh, current, unanswered).items():
        a = next(h for h in mesh.hosts if h.name == a_name)
        b = next(h for h in mesh.hosts if h.name == b_name)
        for here, there, ip in ((a, b, a_ip), (b, a, b_ip)):
            wanted[here.name][tunnel_name(there.name)] = {
                "name": tunnel_name(there.name),
                "tunnelIP": "%s/%d" % (ip, net.prefixlen),
                "mtu": mesh.mtu,
                "remoteServer": str(there.address),
                "routes": sorted(str(lan) for lan in there.lans),
            }
            if mesh.encrypt:
                wanted[here.name][tunnel_name(there.name)]["publicKey"] = keys[there.name]
                if mesh.keepalive_of(here):
                    wanted[here.name][tunnel_name(there.name)]["persistentKeepalive"] = \
                        mesh.keepalive_of(here)
    return wanted


@dataclasses.dataclass
class HostPlan:
    """What applying the mesh does on one host: delete stale, change changed in place, then
    add new; held stays."""
    stale: list  # names of the tunnels to delete
    new: list  # control entries of the tunnels to add
    unchanged: int  # how many of the tunnels it should have it has already
    held: dict  # its tunnels to hosts that did not answer (or have no usable key), left as
    # they are: name -> peer
    changed: list = dataclasses.field(default_factory=list)  # set entries: changes in place
    # The changed tunnels' whole control entries: for a daemon older than set, deleted and added.
    changed_whole: list = dataclasses.field(default_factory=list)


def host_plans(mesh, current, data_ports, unanswered=frozenset(), keys=None, wanted=None):
    """For each host in current (those that answered), only the difference between its
    tunnels and the file's (wanted: mesh_plan's, made here if not given; with keys, an
    encrypted mesh's); its tunnels to hosts in unanswered are neither deleted nor added."""
    if wanted is None:
        wanted = mesh_plan(mesh, current, unanswered, keys)
    held = held_tunnels(mesh, current, unanswered)
    plans = {}
    for name, have in current.items():
        want, port, kept = wanted[name], data_ports[name], held[name]
        differ = {tunnel: difference(want[tunnel], listed, port)
                  for tunnel, listed in sorted(have.items()) if tunnel in want and tunnel not in kept}
        changed = [dict(fields, name=tunnel) for tunnel, fields in differ.items() if fields]
        stale = sorted(tunnel for tunnel in have if tunnel not in kept and tunnel not in want)
        new = [want[tunnel] for tunnel in sorted(want) if tunnel not in have]
        plans[name] = HostPlan(stale, new, len(want) - len(new) - len(changed), kept, changed,
                               [want[entry["name"]] for entry in changed])
    return plans


def difference(entry, listed, data_port):
    """What a tunnel a daemon lists lacks to be the one the mesh wants: each field that
    differs, as wanted (None: the daemon's default), as the set op takes them; {} when it
    is that one: encrypted to the peer's key of now, with the keepalive wanted and no
    preshared key of its own, or plain, as wanted."""
    fields = {}
    if listed_interface(listed) != ipaddress.ip_interface(entry["tunnelIP"]):
        fields["tunnelIP"] = entry["tunnelIP"]
    if listed.get("remoteServer") is None or ipaddress.ip_address(
            listed["remoteServer"]) != ipaddress.ip_address(entry["remoteServer"]):
        fields["remoteServer"] = entry["remoteServer"]
    if listed.get("remotePort", data_port) != data_port:
        fields["remotePort"] = None
    if listed.get("publicKey") != entry.get("publicKey"):
        fields["publicKey"] = entry.get("publicKey")
    for field in ("presharedKey", "presharedKeyFile"):
        if listed.get(field) is not None:
            fields[field] = None
    for field in IN_PLACE:
        if sorted_field(listed, field) != sorted_field(entry, field):
            fields[field] = entry.get(field)
    return fields


def sorted_field(entry, field):
    """A field as the mesh compares it: routes in order, none given as none."""
    value = entry.get(field)
    if field == "routes":
        return sorted(value or [])
    if field == "persistentKeepalive":
        return value or None  # 0 is none
    return value


def down_plans(mesh, current):
    """For each host in current, the mesh tunnels the file names on it, to delete: its
    tunnel to every other host of the file. Its other tunnels, m- ones too, stay."""
    plans = {}
    for host in mesh.hosts:
        if host.name in current:
            named = {tunnel_name(peer.name) for peer in mesh.hosts if peer is not host}
            plans[host.name] = HostPlan(sorted(named & set(current[host.name])), [], 0, {})
    return plans


@dataclasses.dataclass
class MeshPlan:
    """What applying the mesh file does, host by host, from what the daemons listed: the
    HostPlan of each host that can be changed; the hosts that cannot, name -> why (no
    answer, or an encrypted mesh's host with no key to use), all in one place; and what
    each host should have (name -> tunnel name -> control entry), which --status holds
    the hosts' tunnels to."""
    hosts: dict
    failed: dict
    wanted: dict
    keyless: frozenset = frozenset()  # of failed, the hosts that answered but have no key


def plan_mesh(mesh, listings, down=False):
    """The MeshPlan of bringing every daemon to the file (or, down, of deleting the mesh's
    tunnels): --dry-run prints it, applying runs it, --status compares against it. A pure
    function of the file and the daemons' lists."""
    in_order = lambda why: {h.name: why[h.name] for h in mesh.hosts if h.name in why}  # noqa: E731
    if down:
        return MeshPlan(down_plans(mesh, listings.tunnels), in_order(listings.unanswered), {})
    tunnels, keys, keyless = plannable(mesh, listings.tunnels, listings.keys)
    failed = in_order(dict(listings.unanswered, **keyless))
    wanted = mesh_plan(mesh, tunnels, failed, keys)
    return MeshPlan(host_plans(mesh, tunnels, listings.data_ports, failed, keys, wanted),
                    failed, wanted, frozenset(keyless))


def pair_states(mesh, listings, now):
    """Each host's end of each pair, as its daemon lists it: host -> peer -> (state, age):
    "no answer" (its daemon gave no list), "missing", "differs" (not what applying the
    file would leave), "up" or "down" by the age in whole seconds (None: never) of its
    latest handshake (encrypted) or packet received (plain). An end towards a host that
    did not answer or has no key to use is judged by its age alone. And the hosts that
    gave no list or no key to use: name -> why."""
    plan = plan_mesh(mesh, listings)
    failed, wanted = plan.failed, plan.wanted
    states = {}
    for host in mesh.hosts:
        row = states[host.name] = {}
        for peer in mesh.hosts:
            if peer is host:
                continue
            name = tunnel_name(peer.name)
            if host.name in listings.unanswered:
                row[peer.name] = ("no answer", None)
            elif name not in listings.tunnels[host.name]:
                row[peer.name] = ("missing", None)
            elif name in wanted[host.name] and not same_tunnel(
                    wanted[host.name][name], listings.tunnels[host.name][name],
                    listings.data_ports[host.name]):
                row[peer.name] = ("differs", None)
            else:
                row[peer.name] = liveness(listings.tunnels[host.name][name], now)
    return states, failed


def liveness(listed, now):
    """A listed tunnel's state as its daemon gives it (TUNNEL_STATES; a daemon before 2.1
    gives none: "up" or "down" by the age), and the age of its latest handshake
    (encrypted) or packet received (plain)."""
    stamp = listed.get("latestHandshake") if listed.get("publicKey") else listed.get("last_rx")
    age = None if stamp is None else max(0, int(now - stamp))
    state = listed.get("state")
    if state not in TUNNEL_STATES:
        state = "up" if age is not None and age <= STATUS_DOWN_AFTER else "down"
    return state, age


def healthy(states, failed):
    """Whether every host answered and every tunnel end is up or idle."""
    return not failed and all(state in HEALTHY for row in states.values()
                              for state, _ in row.values())


def same_tunnel(entry, listed, data_port):
    """Whether a tunnel a daemon lists is the one the mesh wants."""
    return not difference(entry, listed, data_port)


# --- Applying the mesh: reading the file and the daemons, changing them, saying so ---


def load_mesh(path):
    """The mesh in a JSON file, checked whole before anything is sent."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise MeshError("cannot read %s: %s" % (path, e.strerror)) from None
    except ValueError as e:
        raise MeshError("%s is not JSON: %s" % (path, e)) from None
    return parse_mesh(data)


def apply_mesh(mesh, session, timeout, dry_run, say, down=False):
    """Bring every daemon of the mesh to the file: each host's tunnels, only the
    difference; or, down, delete the mesh's tunnels on every host."""
    with mesh_daemons(mesh, session, timeout) as daemons:
        return apply_to_daemons(mesh, daemons, dry_run, say, down)


def read_mesh(mesh, session, timeout):
    """Every daemon's list, as Listings; nothing is changed."""
    with mesh_daemons(mesh, session, timeout) as daemons:
        return read_tunnels(mesh, daemons)


@contextlib.contextmanager
def mesh_daemons(mesh, session, timeout):
    """Every host's Daemon, name -> Daemon, their sockets closed when done."""
    with contextlib.ExitStack() as stack:
        yield {host.name: stack.enter_context(Daemon(str(host.address), mesh.control_port,
                                                     timeout, session))
               for host in mesh.hosts}


def apply_to_daemons(mesh, daemons, dry_run, say, down=False):
    """Read every host's tunnels, plan, and print the plan (dry_run) or apply it; the hosts
    that failed: name -> why."""
    plan = plan_mesh(mesh, read_tunnels(mesh, daemons), down)
    return (print_plan if dry_run else apply_plan)(mesh, plan, daemons, say)


def print_plan(mesh, plan, daemons, say):
    """--dry-run: each host's lines of what would change; the hosts that cannot be changed."""
    for host in mesh.hosts:
        label = "%s (%s)" % (host.name, host.address)
        if host.name in plan.failed:
            say("%s: FAILED: %s" % (label, plan.failed[host.name]))
        else:
            say_plan(label, plan.hosts[host.name], say, plan.keyless)
    return dict(plan.failed)


def apply_plan(mesh, plan, daemons, say):
    """Change each host as its plan says, a line each; the hosts that failed, those that
    could not be changed and those that refused or did not answer a change."""
    failed = dict(plan.failed)
    for host in mesh.hosts:
        label = "%s (%s)" % (host.name, host.address)
        if host.name in plan.failed:
            say("%s: FAILED: %s" % (label, plan.failed[host.name]))
            continue
        host_plan = plan.hosts[host.name]
        error = change_host(daemons[host.name], host_plan)
        if error:
            failed[host.name] = error
            say("%s: FAILED: %s" % (label, error))
        else:
            say("%s: %d added, %d deleted, %s%d unchanged%s" % (
                label, len(host_plan.new), len(host_plan.stale),
                changed_note(host_plan, "changed"), host_plan.unchanged,
                held_note(host_plan, plan.keyless)))
    return failed


def read_tunnels(mesh, daemons):
    """Every host's list, as Listings."""
    listings = Listings({}, {}, {}, {})
    for host in mesh.hosts:
        try:
            reply = daemons[host.name].fetch_list()
        except NoReply as e:
            listings.unanswered[host.name] = str(e)
            continue
        if not reply.get("ok"):
            listings.unanswered[host.name] = reply.get("error", "refused")
            continue
        listings.tunnels[host.name] = {t["name"]: t for t in reply["tunnels"]
                                       if t["name"].startswith(MESH_TUNNEL_PREFIX)}
        listings.data_ports[host.name] = reply.get("dataPort", DATA_PORT)
        listings.keys[host.name] = reply.get("publicKey")
    return listings


def say_plan(label, plan, say, keyless=()):
    """A dry run's lines for one host: what would change."""
    for name in plan.stale:
        say("%s: would delete %s" % (label, name))
    for entry in plan.new:
        say("%s: would add %s %s -> %s, routes %s%s" % (
            label, entry["name"], entry["tunnelIP"], entry["remoteServer"],
            ", ".join(entry["routes"]) or "none",
            ", publicKey %s" % entry["publicKey"] if "publicKey" in entry else ""))
    for entry in plan.changed:
        fields = [field for field in entry if field != "name"]
        say("%s: would change %s %s: %s" % (
            label, entry["name"], "in place" if set(fields) <= set(IN_PLACE) else "(remade)",
            ", ".join("%s %s" % (field, json.dumps(entry[field])) for field in fields)))
    for name, peer in sorted(plan.held.items()):
        say("%s: would leave %s as is (%s)" % (label, name, held_why([peer], keyless)))
    say("%s: %d to add, %d to delete, %s%d unchanged%s" % (
        label, len(plan.new), len(plan.stale), changed_note(plan, "to change"), plan.unchanged,
        held_note(plan, keyless)))


def changed_note(plan, verb):
    """What a host's line says of the tunnels changed, if any."""
    return "%d %s, " % (len(plan.changed), verb) if plan.changed else ""


def held_note(plan, keyless=()):
    """What a host's line adds about the tunnels it keeps for hosts that did not answer
    or have no key to use (keyless)."""
    if not plan.held:
        return ""
    return ", %d left as is (%s)" % (len(plan.held), held_why(plan.held.values(), keyless))


def held_why(peers, keyless):
    """Why the tunnels to peers are left as they are, in a few words."""
    peers = sorted(set(peers))
    silent = [peer for peer in peers if peer not in keyless]
    unkeyed = [peer for peer in peers if peer in keyless]
    return "; ".join(what + ", ".join(names) for what, names in (
        ("no answer from ", silent), ("no usable key from ", unkeyed)) if names)


def format_status(mesh, states, failed, width=None):
    """The lines of --status: a host x host matrix of the pairs' ends (or, wider than
    width, each end that is not up, a line each), why hosts failed, and a summary."""
    labels = ["%s (%s)" % (host.name, host.address) for host in mesh.hosts]
    cells = [["-" if peer is host else format_state(*states[host.name][peer.name])
              for peer in mesh.hosts] for host in mesh.hosts]
    first = max(len(label) for label in labels + ["from \\ to"])
    widths = [max([len(peer.name)] + [len(row[i]) for row in cells])
              for i, peer in enumerate(mesh.hosts)]
    rows = [["from \\ to"] + [peer.name for peer in mesh.hosts]]
    rows += [[label] + row for label, row in zip(labels, cells)]
    matrix = ["  ".join(cell.ljust(size) for cell, size in zip(row, [first] + widths)).rstrip()
              for row in rows]
    if width is None or max(len(line) for line in matrix) <= width:
        lines = ["each host's tunnel (row) to each other host (column), as its daemon lists it:"]
        lines += matrix
    else:
        lines = ["each host's tunnel to each other host that is not up, as its daemon lists it"
                 " (the matrix is wider than the terminal):"]
        ends = [(NOT_UP.index(state), host.name, peer.name, format_state(state, age))
                for host in mesh.hosts for peer in mesh.hosts if peer is not host
                for state, age in [states[host.name][peer.name]] if state != "up"]
        lines += ["  %s -> %s: %s" % (host, peer, cell) for _, host, peer, cell in sorted(ends)]
    for host, label in zip(mesh.hosts, labels):
        if host.name in failed:
            silent = all(state == "no answer" for state, _ in states[host.name].values())
            lines.append("%s: %s: %s" % (label, "no answer" if silent else "no usable key",
                                         failed[host.name]))
    lines.append(status_summary(mesh, states))
    return lines


def status_summary(mesh, states):
    """mesh: 28 hosts, 756 of 756 tunnel ends up, 0 down (and how many are in each other
    state, where any are)."""
    counts = collections.Counter(state for row in states.values() for state, _ in row.values())
    return "mesh: %d hosts, %d of %d tunnel ends up, %d down%s" % (
        len(mesh.hosts), counts["up"], sum(counts.values()), counts["down"], "".join(
            ", %d %s" % (counts[state], state) for state in NOT_UP if state != "down" and counts[state]))


def format_state(state, age):
    if age is None or state not in TUNNEL_STATES:
        return state
    return "%s %s" % (state, format_span(age))


def format_span(seconds):
    """An age in a few characters: seconds, minutes, hours or days."""
    for unit, size, below in (("s", 1, 120), ("m", 60, 7200), ("h", 3600, 172800)):
        if seconds < below:
            return "%d%s" % (seconds // size, unit)
    return "%dd" % (seconds // 86400)


def status_json(mesh, states, failed):
    """--status --json: the same as data."""
    return {"ok": healthy(states, failed), "hosts": [host.name for host in mesh.hosts],
            "pairs": {host: {peer: {"state": state, "age": age}
                             for peer, (state, age) in row.items()}
                      for host, row in states.items()},
            "failed": failed}


def change_host(daemon, plan):
    """Delete, change (in place where the daemon can), then add, in messages of a bounded
    size; the first error, or None. A daemon older than the set op has the tunnels to
    change deleted and added again."""
    stale, new = list(plan.stale), list(plan.new)
    if stale:
        error, refused = send(daemon, {"op": "del", "tunnel": [{"name": name} for name in stale]})
        if error or refused:
            return error or refused
    for start in range(0, len(plan.changed), MESH_BATCH):
        error, refused = send(daemon, {"op": "set",
                                       "tunnel": plan.changed[start:start + MESH_BATCH]})
        if refused and "unknown op" in refused:  # a daemon before 2.1: deleted, then added
            error, refused = send(daemon, {"op": "del", "tunnel": [
                {"name": entry["name"]} for entry in plan.changed_whole]})
            new += plan.changed_whole
            if error or refused:
                return error or refused
            break
        if error or refused:
            return error or refused
    for start in range(0, len(new), MESH_BATCH):
        error, refused = send(daemon, {"op": "add", "tunnel": new[start:start + MESH_BATCH]})
        if error or refused:
            return error or refused
    return None


def send(daemon, message):
    """Send a request: (why no reply came, None), or (None, the error of a refusal, or None)."""
    try:
        reply = daemon.request(message)
    except NoReply as e:
        return str(e), None
    return None, None if reply.get("ok") else reply.get("error", "refused")


def main_mesh(args, session):
    try:
        mesh = load_mesh(args.mesh)
    except MeshError as e:
        print("udpProxyServerControl: %s: %s" % (args.mesh, e), file=sys.stderr)
        return EXIT_USAGE
    if args.status:
        return main_status(args, session, mesh)
    pairs = len(mesh.hosts) * (len(mesh.hosts) - 1) // 2
    print("mesh %s: %d hosts, %d tunnels%s%s" % (
        args.mesh, len(mesh.hosts), pairs, " to take down" if args.down else "",
        " (dry run: nothing is changed)" if args.dry_run else ""))
    try:
        failed = apply_mesh(mesh, session, args.timeout, args.dry_run, print, args.down)
    except MeshError as e:  # the hosts' tunnels leave no plan; nothing was changed
        print("udpProxyServerControl: %s: %s" % (args.mesh, e), file=sys.stderr)
        return EXIT_REFUSED
    if failed:
        print("mesh: %d of %d hosts failed: %s" % (len(failed), len(mesh.hosts), ", ".join(
            "%s (%s)" % item for item in failed.items())))
        return EXIT_REFUSED
    print("mesh: all %d hosts %s" % (len(mesh.hosts), "planned" if args.dry_run else "done"))
    return EXIT_OK


def main_status(args, session, mesh):
    listings = read_mesh(mesh, session, args.timeout)
    try:
        states, failed = pair_states(mesh, listings, time.time())
    except MeshError as e:  # the hosts' tunnels leave no plan to hold them against
        print("udpProxyServerControl: %s: %s" % (args.mesh, e), file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(status_json(mesh, states, failed)))
    else:
        pairs = len(mesh.hosts) * (len(mesh.hosts) - 1) // 2
        print("mesh %s: %d hosts, %d tunnels" % (args.mesh, len(mesh.hosts), pairs))
        width = shutil.get_terminal_size().columns
        print("\n".join(format_status(mesh, states, failed, width)))
    return EXIT_OK if healthy(states, failed) else EXIT_REFUSED


# --- main -----------------------------------------------------------------------


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


def build_parser():
    """The command line, as --help and the man page give it."""
    parser = argparse.ArgumentParser(
        description="Add, delete or list the tunnels of udpProxyServer daemons, one by one or a"
                    " whole mesh from one file.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server_arg", nargs="?", metavar="SERVER",
                        help="the daemon's host (the same as -s)")
    parser.add_argument("-s", "--server", help="the daemon's host")
    parser.add_argument("-p", "--port", type=port, default=CONTROL_PORT,
                        help="the daemon's control port (default %(default)s)")
    parser.add_argument("-o", "--operation", choices=("add", "del", "set", "list"),
                        default="add", help="what to do (default %(default)s); set changes a"
                        " tunnel's --mtu, --route and --keepalive in place")
    parser.add_argument("-n", "--name", help="tunnel name, at most 15 bytes")
    parser.add_argument("-t", "--tunnel", help="the tunnel's own IP address")
    parser.add_argument("-tm", "--mask",
                        help="the tunnel's netmask or prefix length (default %s for an IPv4"
                             " -t, /%d for an IPv6 one; -t fd00::1/64 carries its own)"
                             % (DEFAULT_NETMASK, DEFAULT_IPV6_PREFIX))
    parser.add_argument("-m", "--mtu", type=int,
                        help="the tunnel's MTU (default %d)" % DEFAULT_MTU)
    parser.add_argument("-r", "--remote", help="the IP address of the peer's daemon")
    parser.add_argument("--remote-port", type=port,
                        help="the peer's data port, when it is not this daemon's")
    parser.add_argument("--route", action="append", metavar="CIDR",
                        help="a network the daemon routes through the tunnel; give the flag"
                             " once for each network")
    parser.add_argument("--peer-key", metavar="BASE64",
                        help="the peer's WireGuard public key: the tunnel is encrypted, and -r"
                             " may be left out on the side that waits for a peer behind NAT")
    parser.add_argument("--psk-file", metavar="PATH",
                        help="with --peer-key: a preshared key file on the daemon's host, by"
                             " its absolute path (base64, as wg genpsk writes it; mode 600): the"
                             " daemon reads it, so the key never crosses the network")
    parser.add_argument("--keepalive", type=int, metavar="SECONDS",
                        help="with --peer-key: send a keepalive this often (0: never), to keep"
                             " a NAT's mapping open")
    parser.add_argument("--mesh", metavar="FILE",
                        help="configure every daemon of the mesh in FILE (see below)")
    parser.add_argument("--down", action="store_true",
                        help="with --mesh: delete the mesh's tunnels (those the file names) on"
                             " every host, leaving the others")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --mesh: ask the daemons for their tunnels and print what"
                             " would change, changing nothing")
    parser.add_argument("--status", action="store_true",
                        help="with --mesh: print the state of every host's tunnel to every"
                             " other (up, idle, connecting, down, missing, differs, no answer),"
                             " changing nothing; exit 0 when every one is up or idle")
    parser.add_argument("--timeout", type=timeout, default=TIMEOUT, metavar="SECONDS",
                        help="seconds to wait for each reply (default %(default)s); 0 sends once"
                             " without waiting, for a 2015 daemon, and is refused with --mesh")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="authenticate with the shared secret in PATH (mode 600), as the"
                             " daemon's --secret-file")
    parser.add_argument("--write-state", metavar="FILE",
                        help="with -o add or del: change the daemon state file FILE (made if"
                             " missing, mode 600) instead of asking a daemon, for one started"
                             " later with --state-file FILE: how a 2015 host's tunnels are"
                             " carried over")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's reply (or with --mesh --status, the states)"
                             " as JSON instead of for a person")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mesh:
        for flag in ("down", "dry_run"):
            if args.status and getattr(args, flag):
                parser.error("--status changes nothing: not with --%s" % flag.replace("_", "-"))
        if args.timeout == 0:
            # Even --down asks every daemon for its tunnels first: there is nothing to do blind.
            parser.error("--timeout %g: --mesh needs every daemon's reply; give more than 0 s"
                         % args.timeout)
        if args.json and not args.status:
            parser.error("--json goes with --status when given --mesh")
        return args
    for flag in ("dry_run", "down", "status"):
        if getattr(args, flag):
            parser.error("--%s goes with --mesh" % flag.replace("_", "-"))
    if args.write_state and args.operation not in ("add", "del"):
        parser.error("--write-state goes with -o add or -o del")

    if args.route and args.server_arg and "/" in args.server_arg:
        # The README once wrote --route CIDR ...: a second network after one --route lands here.
        parser.error("%r is not a server: give --route once for each network" % args.server_arg)
    if args.server and args.server_arg and args.server != args.server_arg:
        parser.error("two servers given: %r and %r" % (args.server_arg, args.server))
    args.server = args.server or args.server_arg
    if not args.server and not args.write_state:
        parser.error("the server is required (-s SERVER)")
    needed = {"add": ("name", "tunnel") + (() if args.peer_key else ("remote",)),
              "del": ("name",), "set": ("name",), "list": ()}
    for field in needed[args.operation]:
        if getattr(args, field) is None:
            parser.error("-o %s needs --%s" % (args.operation, field))
    if args.operation == "set" and args.mtu is None and args.route is None \
            and args.keepalive is None:
        parser.error("-o set needs --mtu, --route or --keepalive")
    if args.psk_file and not args.peer_key or (
            args.keepalive is not None and not args.peer_key and args.operation != "set"):
        parser.error("--psk-file and --keepalive go with --peer-key")
    if args.psk_file and not os.path.isabs(args.psk_file):
        parser.error("--psk-file %r: give the file's absolute path on the daemon's host"
                     % args.psk_file)
    return args


def write_state(path, message):
    """--write-state: the add or del of message made in the state file at path, as the
    daemon writes it ({"version": 1, "tunnels": [...]}; a tunnel of the same name replaced),
    whole or not at all (a temporary file renamed over it), readable by root alone."""
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("tunnels"), list):
            raise ValueError("it has no list 'tunnels'")
    except FileNotFoundError:
        state = {"version": 1, "tunnels": []}
    except (OSError, ValueError) as e:
        print("udpProxyServerControl: state file %s: %s" % (path, e), file=sys.stderr)
        return EXIT_USAGE
    names = {entry["name"] for entry in message["tunnel"]}
    state["tunnels"] = [entry for entry in state["tunnels"]
                        if not (isinstance(entry, dict) and entry.get("name") in names)]
    if message["op"] == "add":
        state["tunnels"] += message["tunnel"]
    temporary = path + ".tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as f:
            json.dump(state, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except OSError as e:
        print("udpProxyServerControl: cannot write %s: %s" % (path, e.strerror), file=sys.stderr)
        return EXIT_USAGE
    print("%s: %s %s; it holds %d tunnels" % (path, message["op"], ", ".join(sorted(names)),
                                             len(state["tunnels"])))
    return EXIT_OK


def main(argv=None):
    args = parse_args(argv)
    try:
        session = Session(read_secret(args.secret_file) if args.secret_file else None)
    except BadSecret as e:
        print("udpProxyServerControl: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    if args.mesh:
        return main_mesh(args, session)
    message = build_message(args)
    if args.write_state:
        return write_state(args.write_state, message)
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
