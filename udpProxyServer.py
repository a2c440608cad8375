#!/usr/bin/env python3
"""udpProxyServer: carry the packets of TUN devices to peer hosts over UDP.

One daemon runs on every host of a mesh. Each point-to-point tunnel is a TUN device and a
peer: what the kernel routes into the device goes to the peer in UDP datagrams, and what
the peer sends is written into the device. A plain tunnel speaks the 2015 wire format (a
PI header and a packet a datagram); an encrypted one speaks WireGuard. Tunnels are added,
deleted and listed at run time with JSON messages on the control port (see
udpProxyServerControl.py). Needs the standard library and python-pytun, pyroute2 for IPv6
tunnel addresses and routes, and cryptography for encrypted tunnels, so it runs when
copied alone to a host.

The map. The sections, in order, each using only those above it:

    Constants shared by the sections, exceptions, the logger
    Control messages       TunnelSpec: a tunnel as asked for, every field checked
    Packet arithmetic      checksums; split_gso cuts a super-packet, Joiner joins packets
    Offloads               Offloads: what the kernel offers, found at start-up
    Devices                OffloadDevice (virtio headers, super-packets), NoOffloadDevice
    The 2015 wire format   PlainCodec: a datagram a packet, after a PI header
    WireGuard: keys and the handshake      pure functions of keys and bytes
    WireGuard: cookies under load          mac1 and mac2, CookieChecker, CookieGenerator
    WireGuard: transport messages          seal_transport, open_transport
    WireGuard: sessions, counters and the replay window   ReplayWindow, Keypair(s)
    WireGuard: timers                      PeerTimers: decisions from an injected clock
    WireGuard: a peer, and its codec       WireGuardPeer, WireGuardCodec, CryptokeyRouting
    WireGuard: the daemon's handshakes, and every peer's timers   HandshakeLimits, WireGuard
    The tunnel             Tunnel: spec, endpoint, counters, a device and a codec composed
    The data port          DataPort: each datagram, or GRO train, to the tunnel it is for
    The loop               Loop: one readiness loop, a dict fd -> handler
    Netlink                IPv6 addresses, routes, what a kept device has (Kept),
                           devices deleted together
    The registry           Registry: the tunnels by name and by source
    The control port       who may ask (AllowList, Authenticator, ControlCookies,
                           ReplyBudget) and ControlPort with its ops
    The state              StateFile, and StateKeeper: the tunnels kept across restarts
    The metrics            metrics_text, MetricsFile: the counters for Prometheus
    The server             Server: the sockets, the loop and the parts together
    Start-up               main

The data path, as the methods called in order; a device is an OffloadDevice, or a
NoOffloadDevice where named:

    A plain tunnel, outbound (the loop: the device's fd is ready):
        Server._forward -> Tunnel.forward_from_device -> OffloadDevice.read
        -> PlainCodec.encode_super_packet (cut_chunks to a daemon that takes chunks, else
        split_gso) or PlainCodec.encode_packet (queued)
        -> PlainCodec.encode_end -> Tunnel.send (sendmsg with UDP GSO)
        NoOffloadDevice.read -> PlainCodec.encode_packet (one sendto, the PI header in the
        room before the packet)
    A plain tunnel, inbound (the loop: the data socket is ready):
        DataPort.receive (recvmsg_into: one datagram, or a GRO train)
        -> PlainCodec.decode -> OffloadDevice.write (Joiner.continues, Joiner.offer)
        -> OffloadDevice.flush (one writev); chunks: PlainCodec._decode_chunks
        -> OffloadDevice.write_chunks (a run of them, one writev)
        DataPort._receive_one_by_one -> PlainCodec.decode -> NoOffloadDevice.write
    An encrypted tunnel, outbound:
        Server._forward -> Tunnel.forward_from_device -> OffloadDevice.read
        -> WireGuardCodec.encode_begin (Keypairs.current_for_sending)
        -> WireGuardCodec.encode_super_packet (WireGuardCodec._seal_chunks to a daemon
           that takes chunks, else split_gso, each chunk or segment sealed:
           seal_transport_into) or WireGuardCodec.encode_packet (WireGuardCodec._seal)
        -> WireGuardCodec.encode_end -> Tunnel.send
    An encrypted tunnel, inbound:
        DataPort.receive -> DataPort._receive_wireguard -> WireGuard.receive (the tunnel of
        the receiver index) -> WireGuardCodec.decode (Keypairs.lookup, open_transport_into,
        ReplayWindow.accept, ip_length, CryptokeyRouting.owner) -> OffloadDevice.write
        -> OffloadDevice.flush; chunks: WireGuardCodec._take_chunk -> SealedRun.write
        -> OffloadDevice.write_chunks
    Handshakes: DataPort.receive -> DataPort._receive_wireguard -> WireGuard.receive
        -> WireGuard.handshake_message (size, mac1, mac2 under load, the loop's share,
        the source's bucket) -> WireGuard._take_initiation (open_initiation, the peer by
        its key, finish_initiation, create_response) or WireGuard._take_response
    Timers: Loop.run -> WireGuard.tick -> WireGuard._run_timers_of (PeerTimers.due)
        -> WireGuard._act (create_initiation, WireGuardCodec.send_staged, send_keepalive)

Copies made on purpose on the hot paths, a Python call less a packet, each marked at
both places: PlainCodec.encode_packet holds Tunnel.send_one's work; PlainCodec.decode
holds its loop's work for a datagram alone; WireGuardCodec.encode_super_packet holds
WireGuardCodec._seal's; DataPort._receive_one_by_one holds DataPort.receive's, and
Registry.find_by_source's.
"""

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import os
import random
import resource
import select
import signal
import socket
import stat
import struct
import sys
import time
try:
    import pytun
except ImportError:  # reported by main(); the parser and tests work without it
    pytun = None
try:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
except ImportError:  # needed only for IPv6 tunnel addresses and routes, and said so then
    IPRoute = None
    NetlinkError = OSError
try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
except ImportError:  # needed only for encrypted tunnels: need_cryptography() says so then
    InvalidTag = X25519PrivateKey = X25519PublicKey = Cipher = algorithms = None
    ChaCha20Poly1305 = None


# --- Constants shared by the sections, exceptions, the logger -----------------


__version__ = "2.1.0"

DATA_PORT = 5000
CONTROL_PORT = 5001
# Where both sockets listen by default: every address of both families.
BIND_ANY = "::"

# struct tun_pi (flags, EtherType) heads every packet of a TUN opened without
# IFF_NO_PI; the 2015 version put it on the wire, so we keep it for interop.
PI_HEADER_LEN = 4
# Linux interface names are at most IFNAMSIZ - 1 bytes.
IFNAMSIZ = 16
# Room for any datagram, and for any packet a TUN device hands us.
BUFFER_SIZE = 65536 + PI_HEADER_LEN
# Refused control requests logged one by one in each period, the rest only counted.
REFUSALS_LOGGED, REFUSAL_LOG_PERIOD = 10, 60
# X25519 keys, preshared keys, BLAKE2s hashes and ChaCha20 keys: 32 bytes each (and a
# key in base64, as wg genkey and wg pubkey write it).
KEY_LEN = 32
COOKIE_HEX_LEN = 32
# Packets or requests a handler takes per wake-up, so one busy fd cannot starve the rest.
BATCH = 64

# Offloads. With IFF_VNET_HDR every TUN read and write starts with a struct
# virtio_net_hdr (linux/virtio_net.h), in the host's byte order for TUN.
VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size
VNET_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5
# linux/if_tun.h: TUNSETOFFLOAD = _IOW('T', 208, unsigned int), and what it may enable.
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
# linux/udp.h: send many datagrams in one sendmsg, receive many in one recvmsg.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
# The kernel takes at most 64 segments per UDP GSO send (UDP_MAX_SEGMENTS),
# and one send is a single UDP/IPv4 datagram before it is cut.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65535 - 20 - 8
# Where the checksum field is in a TCP and in a UDP header, and the protocol by where.
CHECKSUM_OFFSET = {6: 16, 17: 6}
TCP, UDP = 6, 17


class ControlError(ValueError):
    """A control request the daemon refuses; the text goes back to the sender, and
    reason, if any, names the control port's counter it adds to besides refused."""

    def __init__(self, text, reason=None):
        super().__init__(text)
        self.reason = reason


class Retry(ControlError):
    """A request not acted on that the sender should send again: fields go in the reply
    (a new cookie), reason names the counter (it is not counted as refused)."""

    def __init__(self, text, reason, **fields):
        super().__init__(text, reason)
        self.fields = fields


class StartupError(Exception):
    """The daemon cannot start; the text is the one line the user sees."""


class CryptographyMissing(ControlError, StartupError):
    """What needs the cryptography package, where it is missing: a refusal, or the one line
    at start-up, saying what to install."""

    def __init__(self, what="encrypted tunnels"):
        super().__init__("%s: the cryptography package is needed (pip install cryptography)"
                         % what)


class DeviceGone(Exception):
    """The tunnel's device failed for good, e.g. deleted from outside."""


class StateUnreadable(Exception):
    """The state file cannot be read or parsed: nothing may be concluded from it."""


log = logging.getLogger("udpProxyServer")


class QuietLog:
    """Warnings about what any source can cause (refused requests, replies that cannot
    be sent, a bug a datagram meets), logged without flooding the journal under a barrage:
    the first few of every period one by one, then how many more there were."""

    def __init__(self, what, clock=time.monotonic):
        self.what = what
        self.clock = clock
        self.since = None  # when this period began
        self.logged = self.more = 0

    def warning(self, message, *args):
        self.log(logging.WARNING, message, *args)

    def log(self, level, message, *args, **kwargs):
        self.flush()
        if self.since is None:
            self.since = self.clock()
        if self.logged < REFUSALS_LOGGED:
            self.logged += 1
            log.log(level, message, *args, **kwargs)
        else:
            self.more += 1

    def flush(self, force=False):
        """Say how many were not logged once their period is over (or now, with force)."""
        if self.since is None:
            return
        elapsed = self.clock() - self.since
        if elapsed >= REFUSAL_LOG_PERIOD or force:
            if self.more:
                log.warning("%d more %s in %d s, not logged one by one (-o list counts them)",
                            self.more, self.what, elapsed)
            self.since, self.logged, self.more = None, 0, 0


# A bug that a datagram meets costs that datagram (counted as internal_error), never the
# loop: logged with its traceback a few times a period, so a flood cannot fill the journal.
DATA_PATH_BUGS = QuietLog("internal errors on the data path")


# What cannot be set on a device, the same for every device of a host: said a few times.
SETUP_WARNINGS = QuietLog("warnings about devices")


# --- Control messages: parsed and checked into frozen dataclasses -------------


DEFAULT_NETMASK = "255.255.255.252"
DEFAULT_MTU = 1500
# An IPv6 tunnel address without a prefix length gets the usual subnet size.
DEFAULT_IPV6_PREFIX = 64
# RFC 8200: IPv6 needs links of at least 1280 bytes; the kernel turns IPv6 off below.
MIN_IPV6_MTU = 1280
# Routes one tunnel may carry: more than a mesh of any size needs.
MAX_ROUTES = 1000
# RFC 791: every IPv4 host must take 68-byte packets; the kernel refuses less.
MIN_MTU = 68
# The largest packet whose datagram (PI header + packet) fits in one UDP/IPv4 datagram.
MAX_MTU = 65535 - 20 - 8 - PI_HEADER_LEN
# A key file holds a key in base64 and a newline: more is not read.
KEY_FILE_MAX = 256

TUNNEL_FIELDS = ("name", "tunnelIP", "netmask", "mtu", "remoteServer", "remotePort", "routes",
                 "publicKey", "presharedKey", "presharedKeyFile", "persistentKeepalive")
REQUEST_FIELDS = ("op", "tunnel", "part", "generation", "cookie")
# What a tunnel can have changed in place (the set op, SIGHUP), its device and sessions
# kept: field -> TunnelSpec's. Any other change remakes it.
IN_PLACE = {"mtu": "mtu", "routes": "routes", "persistentKeepalive": "keepalive"}


@dataclasses.dataclass(frozen=True)
class Request:
    op: str
    entries: list  # the tunnel dicts, each checked later on its own
    part: int = 0  # which part of a list reply
    generation: int = None  # of the tunnels, as part 0 of the list gave it
    cookie: str = None  # the address validation cookie the sender was given, if any


def decode(datagram, what="request"):
    """The JSON object a datagram holds, or ControlError."""
    try:
        obj = json.loads(datagram)
    except (UnicodeDecodeError, ValueError) as e:
        raise ControlError("%s is not JSON: %s" % (what, e)) from None
    except RecursionError:
        raise ControlError("%s is nested too deeply" % what) from None
    if not isinstance(obj, dict):
        raise ControlError("%s must be a JSON object, got %s" % (what, type(obj).__name__))
    return obj


def parse_request(request):
    """A Request from a control datagram or its decoded object, or ControlError."""
    if not isinstance(request, dict):
        request = decode(request)
    check_fields(request, REQUEST_FIELDS, "request")
    op = request.get("op")
    if op is None:
        raise ControlError("missing field 'op'")
    if not isinstance(op, str):
        raise ControlError("invalid op %r: must be a string" % (op,))
    entries = request.get("tunnel", [])
    if not isinstance(entries, list):
        raise ControlError("field 'tunnel' must be a list, got %s" % type(entries).__name__)
    for entry in entries:
        if not isinstance(entry, dict):
            raise ControlError("each tunnel must be a JSON object, got %r" % (entry,))
        check_fields(entry, TUNNEL_FIELDS, "tunnel")
    part = request.get("part", 0)
    if not isinstance(part, int) or isinstance(part, bool) or part < 0:
        raise ControlError("invalid part %r: must be a whole number from 0" % (part,))
    generation = request.get("generation")
    if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise ControlError("invalid generation %r: must be a whole number" % (generation,))
    cookie = request.get("cookie")
    if cookie is not None and not is_hex(cookie, COOKIE_HEX_LEN):
        raise ControlError("invalid cookie %r: must be %d hex digits" % (cookie, COOKIE_HEX_LEN))
    return Request(op, entries, part, generation, cookie)


def check_fields(obj, known, where):
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ControlError("unknown field %r in %s (expected %s)"
                           % (unknown[0], where, ", ".join(known)))


def parse_name(value):
    """A name the kernel takes as an interface name, exactly as given."""
    if not isinstance(value, str):
        raise ControlError("invalid tunnel name %r: must be a string" % (value,))
    # The kernel refuses '/', ':' and blanks; '%' would make it pick the name itself. ASCII
    # alone, so a byte a character (and a lone surrogate, which JSON can carry, is refused).
    if (not value or value in (".", "..") or not value.isascii() or not value.isprintable()
            or any(c in value for c in "/:% ")):
        raise ControlError("invalid tunnel name %r" % (value,))
    if len(value) >= IFNAMSIZ:
        raise ControlError("tunnel name %r is %d bytes, the limit is %d"
                           % (value, len(value), IFNAMSIZ - 1))
    return value


def parse_address(value, field):
    if not isinstance(value, str):
        raise ControlError("invalid %s %r: must be a string" % (field, value))
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ControlError("invalid %s %r: not an IP address" % (field, value)) from None


def parse_interface(address, netmask):
    """The tunnel's own address and prefix: IPv4 with a dotted netmask or a prefix length
    (the 2015 way), or IPv6 with its prefix length in tunnelIP or in netmask."""
    if isinstance(address, str) and "/" in address:
        if netmask is not None:
            raise ControlError("tunnelIP %r has a prefix length: give no netmask" % address)
        address, netmask = address.split("/", 1)
    ip = parse_address(address, "tunnelIP")
    if netmask is None:
        netmask = DEFAULT_NETMASK if ip.version == 4 else str(DEFAULT_IPV6_PREFIX)
    if isinstance(netmask, int) and not isinstance(netmask, bool):
        netmask = str(netmask)
    if not isinstance(netmask, str):
        raise ControlError("invalid netmask %r: must be a string" % (netmask,))
    if ip.version == 6 and not netmask.isdigit():
        raise ControlError("invalid netmask %r: an IPv6 tunnel takes a prefix length" % netmask)
    try:
        interface = ipaddress.ip_interface("%s/%s" % (ip, netmask))
    except ValueError:
        raise ControlError("invalid netmask %r" % (netmask,)) from None
    # ipaddress also reads host masks such as 0.0.0.3; a netmask must be one.
    if not netmask.isdigit() and str(interface.netmask) != netmask:
        raise ControlError("invalid netmask %r" % (netmask,))
    if interface.network.prefixlen == 0:
        raise ControlError("invalid netmask %r: the tunnel would take every address" % (netmask,))
    if (ip.version == 4 and interface.network.prefixlen <= 30
            and ip in (interface.network.network_address, interface.network.broadcast_address)):
        raise ControlError("invalid tunnelIP %r: it is not a host address of %s"
                           % (address, interface.network))
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        raise ControlError("invalid tunnelIP %r" % (address,))
    return interface


def parse_mtu(value):
    """The MTU as an int; the 2015 control script sent an int, others send a numeric string."""
    if isinstance(value, str) and value.strip().isdigit():
        mtu = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        mtu = value
    else:
        raise ControlError("invalid mtu %r: must be a whole number" % (value,))
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ControlError("mtu %d out of range (%d-%d)" % (mtu, MIN_MTU, MAX_MTU))
    return mtu


def parse_remote(value):
    remote = parse_address(value, "remoteServer")
    if (remote.is_unspecified or remote.is_multicast or remote.is_link_local
            or remote == ipaddress.IPv4Address("255.255.255.255")):
        raise ControlError("invalid remoteServer %r: not a routable host address" % (value,))
    return remote


def parse_port(value):
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ControlError("invalid remotePort %r: must be a number from 1 to 65535" % (value,))
    return value


def parse_routes(value):
    """The networks to route through the tunnel, e.g. ["192.168.2.0/24", "fd00:2::/64"]."""
    if not isinstance(value, list) or not all(isinstance(route, str) for route in value):
        raise ControlError("invalid routes %r: must be a list of networks" % (value,))
    if len(value) > MAX_ROUTES:
        raise ControlError("%d routes: at most %d a tunnel" % (len(value), MAX_ROUTES))
    routes = []
    for route in value:
        try:
            network = ipaddress.ip_network(route)
        except ValueError as e:
            raise ControlError("invalid route %r: %s" % (route, e)) from None
        if network not in routes:
            routes.append(network)
    return tuple(routes)


@dataclasses.dataclass(frozen=True)
class TunnelSpec:
    """One tunnel as asked for, every field checked."""

    name: str
    interface: object  # ipaddress.IPv4Interface or IPv6Interface
    mtu: int
    remote: object  # ipaddress.IPv4Address or IPv6Address; None: learned from the peer
    remote_port: int = None  # None: the peer's data port is ours
    routes: tuple = ()  # networks the daemon routes through the tunnel
    peer_key: bytes = None  # the peer's public key: the tunnel is encrypted (WireGuard)
    preshared_key: bytes = None
    preshared_key_file: str = None  # where preshared_key was read, on this host
    keepalive: int = None  # seconds between persistent keepalives; None or 0: none

    @classmethod
    def from_entry(cls, entry):
        # An encrypted tunnel may wait for its peer (behind NAT) to show where it is. A
        # field given as null is as one not given.
        needed = ("name", "tunnelIP") if entry.get("publicKey") is not None else (
            "name", "tunnelIP", "remoteServer")
        for field in needed:
            if entry.get(field) is None:
                raise ControlError("missing field %r" % field)
        port, remote = entry.get("remotePort"), entry.get("remoteServer")
        spec = cls(
            name=parse_name(entry["name"]),
            interface=parse_interface(entry["tunnelIP"], entry.get("netmask")),
            mtu=parse_mtu(entry.get("mtu", DEFAULT_MTU)),
            remote=None if remote is None else parse_remote(remote),
            remote_port=None if port is None else parse_port(port),
            routes=parse_routes(entry.get("routes", [])),
            peer_key=optional(entry, "publicKey", parse_key),
            preshared_key=(optional(entry, "presharedKey", parse_key)
                           or optional(entry, "presharedKeyFile", read_key_file_field)),
            preshared_key_file=optional(entry, "presharedKeyFile", lambda path, _: path),
            keepalive=optional(entry, "persistentKeepalive", parse_keepalive),
        )
        if entry.get("presharedKey") is not None and spec.preshared_key_file is not None:
            raise ControlError("give presharedKey or presharedKeyFile, not both")
        if spec.peer_key is None and (spec.preshared_key or spec.keepalive is not None):
            raise ControlError("presharedKey, presharedKeyFile and persistentKeepalive go with"
                               " publicKey")
        if spec.interface.version == 6 and spec.mtu < MIN_IPV6_MTU:
            raise ControlError("mtu %d is too small for IPv6 (at least %d)"
                               % (spec.mtu, MIN_IPV6_MTU))
        return spec

    def entry(self):
        """The tunnel as a control message and the state file give it."""
        if self.interface.version == 4:
            entry = {"name": self.name, "tunnelIP": str(self.interface.ip),
                     "netmask": str(self.interface.netmask)}
        else:
            entry = {"name": self.name, "tunnelIP": str(self.interface)}
        entry["mtu"] = self.mtu
        if self.remote is not None:
            entry["remoteServer"] = str(self.remote)
        if self.remote_port is not None:
            entry["remotePort"] = self.remote_port
        if self.routes:
            entry["routes"] = [str(route) for route in self.routes]
        if self.peer_key is not None:
            entry["publicKey"] = base64.b64encode(self.peer_key).decode()
        if self.preshared_key_file is not None:  # read again from there at each start
            entry["presharedKeyFile"] = self.preshared_key_file
        elif self.preshared_key is not None:  # given from this host, as it was given
            entry["presharedKey"] = base64.b64encode(self.preshared_key).decode()
        if self.keepalive is not None:
            entry["persistentKeepalive"] = self.keepalive
        return entry

    def changed(self, entry):
        """This tunnel with what a set entry gives changed: each field given replaces this
        tunnel's (null takes it away: the default again), the others stay; ControlError
        for a field that cannot be so, or a tunnel that would not be valid."""
        if len(entry) < 2:
            raise ControlError("nothing to change: give the fields to change beside the name")
        merged = self.entry()
        if "tunnelIP" in entry and "netmask" not in entry:
            merged.pop("netmask", None)  # the new address carries its own, or the default
        if "presharedKey" in entry or "presharedKeyFile" in entry:
            merged.pop("presharedKey", None)
            merged.pop("presharedKeyFile", None)
        for field, value in entry.items():
            if value is None:
                merged.pop(field, None)
            else:
                merged[field] = value
        return TunnelSpec.from_entry(merged)

    def differs_in_place(self, other):
        """Whether other is this tunnel but for what can be changed in place."""
        return dataclasses.replace(other, mtu=self.mtu, routes=self.routes,
                                   keepalive=self.keepalive) == self

    @property
    def encrypted(self):
        return self.peer_key is not None

    @property
    def needs_netlink(self):
        """pytun sets IPv4 addresses by ioctl; IPv6 addresses and routes take netlink."""
        return self.interface.version == 6 or bool(self.routes)


def optional(entry, field, parse):
    """The parsed value of an optional field, None when the entry lacks it."""
    return None if entry.get(field) is None else parse(entry[field], field)


def parse_keepalive(value, field="persistentKeepalive"):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ControlError("invalid %s %r: seconds from 0 (none) to 65535" % (field, value))
    return value


def entry_name(entry):
    """The name to report a result under, whatever its validity."""
    name = entry.get("name")
    return name if isinstance(name, str) else repr(name)


def parse_key(value, field):
    """A Curve25519 key (or a preshared key) given in base64, as wg writes them. The error
    does not quote the value: it may be a secret key."""
    if not isinstance(value, str):
        raise ControlError("invalid %s: must be a string of base64" % field)
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("invalid %s: a key is %d bytes in base64, as wg genkey writes;"
                           " this is not base64" % (field, KEY_LEN)) from None
    if len(key) != KEY_LEN:
        raise ControlError("invalid %s: a key is %d bytes in base64, as wg genkey writes;"
                           " this is %d bytes" % (field, KEY_LEN, len(key)))
    return key


def read_key_file_field(value, field):
    """The key in a file named by a request (presharedKeyFile): an absolute path on the
    daemon's host, to a regular file of the daemon's user that others cannot read, holding
    a key in base64 as wg genpsk writes it. Opened so that nothing can make it wait (a FIFO,
    a device) or follow a link. Every refusal reads alike, so that a request cannot learn
    what is on the host; the log says why."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ControlError("invalid %s %r: an absolute path on the daemon's host"
                           % (field, value))
    try:
        fd = os.open(value, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except (OSError, ValueError, UnicodeError) as e:  # ValueError: a NUL; UnicodeError: a lone surrogate
        return _key_file_refused(field, value, getattr(e, "strerror", None) or str(e))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return _key_file_refused(field, value, "not a regular file")
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            return _key_file_refused(field, value, "owner %d, mode %03o: it must be this"
                                     " daemon's user's, mode 600" % (info.st_uid,
                                                                     info.st_mode & 0o777))
        text = os.read(fd, KEY_FILE_MAX)
    except OSError as e:
        return _key_file_refused(field, value, e.strerror)
    finally:
        os.close(fd)
    try:
        return parse_key(text.decode("ascii").strip(), field)
    except (ControlError, UnicodeDecodeError):
        return _key_file_refused(field, value, "it holds no key in base64")


def _key_file_refused(field, value, why):
    log.warning("%s %r refused: %s", field, value, why)
    raise ControlError("%s %r is no key file this daemon can use: a regular file of its user,"
                       " mode 600, holding a key in base64 as wg genpsk writes (its log says"
                       " why)" % (field, value))


def is_hex(value, length):
    return (isinstance(value, str) and len(value) == length
            and all(c in "0123456789abcdef" for c in value))


def plain_address(host):
    """The address a socket reports, an IPv4 one seen on a dual-stack socket as itself."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    return getattr(address, "ipv4_mapped", None) or address


# --- Packet arithmetic: checksums, super-packets cut and joined (pure functions) ---


# An IP packet, and so a packet the kernel joins from our pieces, is at most 64 KB.
MAX_IP_PACKET = 65535
TCP_FIN, TCP_PSH, TCP_ACK, TCP_URG, TCP_CWR = 0x01, 0x08, 0x10, 0x20, 0x80
# Wire formats of what the packet arithmetic rewrites for each segment, and of what it reads.
IPV4_VARYING = struct.Struct("!HHHHH")  # total length, id, flags+fragment, ttl+protocol, checksum
TCP_VARYING = struct.Struct("!IIBBHH")  # seq, ack, data offset, flags, window, checksum
UDP_VARYING = struct.Struct("!HH")  # length, checksum
# IPv4 (no options) and TCP fixed headers, but the fields that change from one
# segment of a flow to the next (lengths, ids, sequence numbers, checksums, PSH).
IPV4_TCP = struct.Struct("!BB4xHBB2x8s4s4x4sBB2s2x2s")
# What a packet written into an offload TUN device with nothing to offload starts with.
ZERO_VNET_HDR = bytes(VNET_HDR_LEN)
# virtio_net.h: the packet's checksums need no checking: a WireGuard packet's AEAD tag has
# authenticated it whole, so the kernel is spared summing it again (as its WireGuard does).
VNET_F_DATA_VALID = 2
VERIFIED_VNET_HDR = VNET_HDR.pack(VNET_F_DATA_VALID, 0, 0, 0, 0, 0)


def ones_sum(data):
    """The one's-complement sum (RFC 1071) of data, modulo 0xFFFF: since 2**16 == 1
    modulo 0xFFFF, the integer of the bytes has the same remainder as the sum of its
    words."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    for half, mask in _folds(len(data)):
        value = (value >> half) + (value & mask)
    return value % 0xFFFF


@functools.lru_cache(maxsize=256)
def _folds(size):
    """How to fold the integer of size bytes in halves, at multiples of 16 bits, before
    taking it modulo 0xFFFF: cheaper than one long division. Made once for each of the
    few packet sizes a tunnel sees."""
    steps = []
    half = size * 4 & ~15
    while half >= 1024:
        steps.append((half, (1 << half) - 1))
        half = half // 2 & ~15
    return tuple(steps)


def checksum(total):
    """The checksum field for a one's-complement sum taken modulo 0xFFFF."""
    return 0xFFFF - total if total else 0


def pseudo_sum(packet, proto, length):
    """The sum of the IPv4 or IPv6 pseudo-header of packet for an L4 part of length bytes."""
    addresses = packet[12:20] if packet[0] >> 4 == 4 else packet[8:40]
    return ones_sum(addresses) + proto + length


def complete_checksum(packet, start, offset):
    """Fill in a checksum the kernel left partial: the field holds the pseudo-header
    sum, and the checksum covers everything from start on."""
    value = checksum(ones_sum(packet[start:]))
    if offset == 6 and value == 0:  # UDP sends a zero checksum as 0xFFFF (RFC 768)
        value = 0xFFFF
    struct.pack_into("!H", packet, start + offset, value)


def transport_start(packet):
    """Where a TCP or UDP header starts in packet, and which, when it follows the IP
    header directly (no IPv6 extension headers): (start, protocol); else (None, None).
    The receiver of a partial checksum finds the field there, so only such are sent."""
    if len(packet) < 20:
        return None, None
    version = packet[0] >> 4
    if version == 4:
        start, proto = (packet[0] & 15) * 4, packet[9]
    elif version == 6:
        start, proto = 40, packet[6]
    else:
        return None, None
    if proto not in CHECKSUM_OFFSET or start < 20 or start + CHECKSUM_OFFSET[proto] + 2 > len(packet):
        return None, None
    return start, proto


def finish_partial(packet):
    """Sum a packet the peer sent with a partial checksum (it took us for a daemon with
    offloads until our datagrams told it otherwise); False if it has nothing to sum."""
    start, proto = transport_start(packet)
    if start is None:
        return False
    complete_checksum(packet, start, CHECKSUM_OFFSET[proto])
    return True


# What a packet written into a device says of its checksums: whole (the kernel checks
# them), its TCP or UDP one partial (the pseudo-header sum, for the kernel to finish), or
# whole and authenticated (a WireGuard message's AEAD covered it: no need to check).
SUMS_FULL, SUMS_PARTIAL, SUMS_VERIFIED = 0, 1, 2


def single_header(packet, sums):
    """The virtio header of a packet written alone, as its checksums are; None for a
    partial one with no TCP or UDP header where its sum is looked for."""
    if sums == SUMS_PARTIAL:
        return partial_header(packet)
    return VERIFIED_VNET_HDR if sums == SUMS_VERIFIED else ZERO_VNET_HDR


def partial_header(packet):
    """The virtio header that has the kernel finish packet's partial TCP or UDP checksum,
    or None when packet has no TCP or UDP header where one is looked for."""
    start, proto = transport_start(packet)
    if start is None:
        return None
    return VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, start, CHECKSUM_OFFSET[proto])


def split_gso(packet, proto, l4_start, gso_size, out, done=0, prefix=b"", partial=False):
    """Cut a TCP or UDP GSO super-packet into packets of at most gso_size payload bytes
    laid end to end in out, each after prefix (a codec's header, the same for all) and
    with its own IP and L4 header and full checksums, as the kernel's own segmentation
    would; with partial, the L4 checksums are left as the pseudo-header sum (the caller
    has made sure, with transport_start, that the peer finds them).

    One call is one round: from payload byte done on, as many datagrams as out holds
    (at small MTUs the headers outgrow the payload, so a 64 KB packet takes several).
    Returns the length of every datagram but the last, their total length, and where
    the next round starts, or None once the payload is all cut.

    Only the payload is summed for each segment: the header sums are taken once,
    without the fields that change, and those are added as numbers."""
    version = packet[0] >> 4
    l4_len = (packet[l4_start + 12] >> 4) * 4 if proto == TCP else 8
    header_len = l4_start + l4_len
    template = bytearray(prefix) + packet[:header_len]
    ip, l4 = len(prefix), len(prefix) + l4_start
    if version == 4:
        ip_id, frag, ttl_proto = struct.unpack_from("!2xH2H", template, ip + 2)
        template[ip + 2:ip + 6] = bytes(4)  # total length and id
        template[ip + 10:ip + 12] = bytes(2)  # checksum
    if proto == TCP:
        seq, ack, offset, flags, window = struct.unpack_from("!IIBBH", template, l4 + 4)
        template[l4 + 4:l4 + 8] = bytes(4)  # seq
        template[l4 + 13] = 0  # flags
        template[l4 + 16:l4 + 18] = bytes(2)  # checksum
    else:
        flags = 0
        template[l4 + 4:l4 + 8] = bytes(4)  # length and checksum
    ip_sum = ones_sum(template[ip:l4]) if version == 4 else 0
    pseudo = proto + ones_sum(packet[12:20] if version == 4 else packet[8:40])
    l4_sum = pseudo if partial else ones_sum(template[l4:]) + pseudo
    stride = len(template) + gso_size
    payload_len = len(packet) - header_len
    head = len(template)
    pack_ipv4, pack_tcp, from_bytes = IPV4_VARYING.pack_into, TCP_VARYING.pack_into, int.from_bytes
    middle_flags = flags & ~(TCP_FIN | TCP_PSH)  # FIN and PSH belong to the last segment
    # Full segments are summed inline, which is right for an even size only; an odd size
    # (an odd MTU makes one) goes through ones_sum, which pads it as RFC 1071 says.
    inline_size = gso_size if gso_size % 2 == 0 else None
    rest = payload_len - done
    if rest + -(-rest // gso_size) * head <= len(out):
        round_end = payload_len
    else:  # whole segments as out holds them, at least one, so a caller's loop ends
        round_end = min(payload_len, done + max(len(out) // stride, 1) * gso_size)
    at, index = 0, done // gso_size  # a round starts after whole segments
    while done < round_end:
        size = min(gso_size, payload_len - done)
        end = at + head + size
        payload = packet[header_len + done:header_len + done + size]
        out[at:end - size] = template
        out[end - size:end] = payload
        segment_l4 = l4_len + size
        if partial:
            payload_sum = 0
        elif size == inline_size:
            payload_sum = from_bytes(payload, "big")
            for half, mask in _folds(size):
                payload_sum = (payload_sum >> half) + (payload_sum & mask)
        else:
            payload_sum = ones_sum(payload)
        if version == 4:
            total, this_id = l4_start + segment_l4, (ip_id + index) & 0xFFFF
            value = (ip_sum + total + this_id) % 0xFFFF
            pack_ipv4(out, at + ip + 2, total, this_id, frag, ttl_proto, 0xFFFF - value if value else 0)
        else:
            struct.pack_into("!H", out, at + ip + 4, l4_start - 40 + segment_l4)
        if proto == TCP:
            this_seq = (seq + done) & 0xFFFFFFFF
            this_flags = middle_flags if done + size < payload_len else flags
            if index:  # CWR belongs to the first segment, as in tcp_gso_segment
                this_flags &= ~TCP_CWR
            if partial:
                value = (l4_sum + segment_l4) % 0xFFFF or 0xFFFF
            else:
                value = (l4_sum + segment_l4 + (this_seq >> 16) + (this_seq & 0xFFFF) + this_flags
                         + payload_sum) % 0xFFFF
                value = 0xFFFF - value if value else 0
            pack_tcp(out, at + l4 + 4, this_seq, ack, offset, this_flags, window, value)
        else:
            if partial:
                value = (l4_sum + segment_l4) % 0xFFFF or 0xFFFF
            else:
                value = (l4_sum + 2 * segment_l4 + payload_sum) % 0xFFFF
                value = 0xFFFF - value if value else 0xFFFF
            UDP_VARYING.pack_into(out, at + l4 + 4, segment_l4, value)
        at, done, index = end, done + size, index + 1
    return stride, at, done if done < payload_len else None


# Super-packets across the wire, between two daemons of ours with offloads: a TCP
# super-packet goes as a train of chunks, a datagram each, each of the size its segment
# would have had: the PI header (PI_CHUNK, the super-packet's id, the chunk's offset in
# the payload), the super-packet's headers as read but for the TCP checksum field, which
# carries the segment size, and that slice of the payload. Nothing is summed or rewritten
# a chunk; the receiver writes each run of contiguous chunks as one GSO packet, and its
# kernel cuts that into the very segments the sender's kernel would have made, so a lost
# chunk costs its own bytes alone.
CHUNK_PI = struct.Struct("!2sH")  # PI header's first two bytes, the chunk's payload offset
# recvmsg's flag as a plain int: socket's is an IntFlag, whose & runs in Python.
MSG_TRUNC = int(socket.MSG_TRUNC)


def chunk_header(packet, l4, gso_size):
    """The headers of TCP super-packet packet as its chunks carry them: its lengths the
    whole super-packet's (the kernel's may say anything), which tell the receiver where
    the last chunk ends, and the segment size in the TCP checksum field; None when it
    makes one chunk, or is larger than an IP packet."""
    header_len = l4 + (packet[l4 + 12] >> 4) * 4
    if len(packet) - header_len <= gso_size or len(packet) > MAX_IP_PACKET:
        return None
    header = bytearray(packet[:header_len])
    if packet[0] >> 4 == 4:
        struct.pack_into("!H", header, 2, len(packet))
    else:
        struct.pack_into("!H", header, 4, len(packet) - 40)
    struct.pack_into("!H", header, l4 + 16, gso_size)
    return header


def cut_chunks(packet, l4, gso_size, pi):
    """The chunks of TCP super-packet packet (its TCP header at l4, no IPv6 extension
    headers) laid end to end, each after pi (the PI header's first two bytes) and its
    offset, and their stride; None when it makes one chunk. One join: nothing is done a
    chunk but slicing."""
    header = chunk_header(packet, l4, gso_size)
    if header is None:
        return None
    header_len, pack, parts = len(header), CHUNK_PI.pack, []
    header = bytes(header)
    add = parts.extend
    for offset in range(header_len, len(packet), gso_size):
        add((pack(pi, offset - header_len), header, packet[offset:offset + gso_size]))
    return b"".join(parts), PI_HEADER_LEN + header_len + gso_size


def chunk_layout(buffer, at, version):
    """What the IP and TCP headers of a chunk at buffer[at:] say, read as an IPv4 or IPv6
    packet of version: (l4, header length, segment size, payload total), or None when
    they are not those of a TCP super-packet it can belong to, or no payload follows."""
    size = len(buffer) - at
    if size < 40:
        return None
    if version == 4:
        l4 = (buffer[at] & 15) * 4
        if l4 < 20 or buffer[at + 9] != TCP:
            return None
        total = buffer[at + 2] << 8 | buffer[at + 3]
    elif version == 6 and buffer[at + 6] == TCP:
        l4 = 40
        total = (buffer[at + 4] << 8 | buffer[at + 5]) + 40
    else:
        return None
    if size < l4 + 20:
        return None
    header_len = l4 + (buffer[at + l4 + 12] >> 4) * 4
    gso_size = buffer[at + l4 + 16] << 8 | buffer[at + l4 + 17]
    total -= header_len
    if header_len < l4 + 20 or size <= header_len or gso_size == 0 or total <= 0:
        return None
    return l4, header_len, gso_size, total


def run_header(header, l4, gso_size, offset, run_len, last):
    """The virtio header and the IP and TCP headers to write the run of chunks from payload
    byte offset on, run_len bytes, as one packet: the headers the first of its segments had
    when the sender's kernel cut the super-packet (IPv4 id, sequence number, CWR on the
    first segment only, FIN and PSH on the last only), with the lengths of the run and its
    checksum left partial for the kernel to finish."""
    header = bytearray(header)
    header_len = len(header)
    if header[0] >> 4 == 4:
        ip_id = (header[4] << 8 | header[5]) + offset // gso_size & 0xFFFF
        struct.pack_into("!HH", header, 2, header_len + run_len, ip_id)
        header[10:12] = b"\0\0"
        struct.pack_into("!H", header, 10, checksum(ones_sum(header[:l4])))
        gso_type = GSO_TCPV4
    else:
        struct.pack_into("!H", header, 4, header_len - 40 + run_len)
        gso_type = GSO_TCPV6
    seq = int.from_bytes(header[l4 + 4:l4 + 8], "big") + offset & 0xFFFFFFFF
    struct.pack_into("!I", header, l4 + 4, seq)
    flags = header[l4 + 13]
    if not last:
        flags &= ~(TCP_FIN | TCP_PSH)
    if offset:
        flags &= ~TCP_CWR
    header[l4 + 13] = flags
    partial = pseudo_sum(header, TCP, header_len - l4 + run_len) % 0xFFFF
    struct.pack_into("!H", header, l4 + 16, partial or 0xFFFF)
    if run_len > gso_size:
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso_type, header_len, gso_size, l4, 16)
    else:
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, 16)
    return vnet, header


# Between two daemons of ours with offloads an encrypted tunnel sends a TCP super-packet
# in chunks too, each sealed into a transport message of its own: the plaintext is the
# super-packet's headers and a slice of its payload, the IP version nibble 0 (for IPv4)
# or 1 (for IPv6) to say it is a chunk (wireguard-go drops any such plaintext, and is
# never sent one), the lengths the whole super-packet's, the TCP checksum field the
# segment size and the urgent pointer the chunk's offset (only a super-packet without
# URG goes so). No byte more than the segment had. Each daemon says, under each keypair,
# that it takes them: a transport message whose plaintext is CHUNKS_BEACON, padded,
# sent with the first rounds of the keypair (an IP version of 0 again: dropped by any
# other peer).
CHUNK_VERSION = {4: 0x00, 6: 0x10}
OFFSET_FIELD = struct.Struct("!H")  # a sealed chunk's offset, in its TCP urgent pointer


def sealed_chunk_header(packet, l4, gso_size):
    """The headers every sealed chunk of TCP super-packet packet starts with (the
    urgent pointer, the offset, left zero), or None when it does not go in chunks."""
    if packet[l4 + 13] & TCP_URG or packet[l4 + 18] or packet[l4 + 19]:
        return None
    header = chunk_header(packet, l4, gso_size)
    if header is not None:
        header[0] = CHUNK_VERSION[packet[0] >> 4] | header[0] & 0x0F
    return header


def sealed_chunk_layout(plaintext):
    """What an opened chunk says: (IP version, l4, header length, segment size, offset,
    payload length, payload total), or None when it is no chunk that can be."""
    version = 4 if plaintext[0] >> 4 == 0 else 6
    layout = chunk_layout(plaintext, 0, version)
    if layout is None:
        return None
    l4, header_len, gso_size, total = layout
    offset = plaintext[l4 + 18] << 8 | plaintext[l4 + 19]
    if offset % gso_size or offset >= total:
        return None
    length = min(gso_size, total - offset)
    if len(plaintext) < header_len + length:
        return None
    return version, l4, header_len, gso_size, offset, length, total


def flow_of(packet):
    """How packet may be joined with its neighbours: (key, header length, L4 start,
    protocol) for a TCP or UDP packet that can be, or None. Packets join when their
    keys are equal: the same flow, IP fields and TCP options, ack and window."""
    if len(packet) < 28:
        return None
    if packet[0] == 0x45 and packet[9] == TCP and len(packet) >= 40:  # the common case, in one unpack
        (_, tos, frag, ttl, _, addresses, ports, ack, offset, flags, window,
         urgent) = IPV4_TCP.unpack_from(packet)
        header_len = 20 + (offset >> 4) * 4
        if (frag & 0x3FFF or (packet[2] << 8 | packet[3]) != len(packet) or flags & ~TCP_PSH != TCP_ACK
                or not 40 <= header_len <= len(packet)):
            return None
        return (tos, ttl, addresses, ports, ack, offset, window, urgent,
                bytes(packet[40:header_len])), header_len, 20, TCP
    first = packet[0]
    if first == 0x45:
        # Not a fragment, and no more or less than its length says.
        if packet[6] & 0x3F or packet[7] or (packet[2] << 8 | packet[3]) != len(packet):
            return None
        l4, proto = 20, packet[9]
        fixed = bytes(packet[0:2]) + bytes(packet[6:10])
    elif first >> 4 == 6 and len(packet) >= 48:
        if (packet[4] << 8 | packet[5]) + 40 != len(packet):
            return None
        l4, proto = 40, packet[6]
        fixed = bytes(packet[0:4]) + bytes(packet[6:8])
    else:
        return None
    if proto == TCP:
        if len(packet) < l4 + 20:
            return None
        header_len = l4 + (packet[l4 + 12] >> 4) * 4
        if (packet[l4 + 13] & ~TCP_PSH != TCP_ACK or header_len > len(packet)
                or header_len < l4 + 20):
            return None
        key = (fixed + bytes(packet[12 if l4 == 20 else 8:l4 + 4])
               + bytes(packet[l4 + 8:l4 + 13]) + bytes(packet[l4 + 14:l4 + 16])
               + bytes(packet[l4 + 18:header_len]))
    elif proto == UDP:
        header_len = l4 + 8
        key = fixed + bytes(packet[12 if l4 == 20 else 8:l4 + 4])
    else:
        return None
    return key, header_len, l4, proto


class Joiner:
    """Joins consecutive packets of one TCP or UDP flow into one GSO packet for a
    single TUN write, as GRO would: same flow key, TCP sequence numbers in order,
    every packet but the last of the same payload size, 64 KB at most."""

    def __init__(self):
        self.packets = []
        self.sums = []  # for each packet, what its checksums are (SUMS_FULL ...)
        self.flow = None

    def offer(self, packet, flow, sums=0):
        """Add packet to the group if it fits; False if the group must be written first."""
        if not self.packets:
            self._start(packet, flow)
            self.sums = [sums]
            return True
        key, header_len, l4, proto = flow
        size = len(packet) - header_len
        if (key != self.flow[0] or self.closed or size == 0 or size > self.gso_size
                or self.length + size > MAX_IP_PACKET or len(self.packets) >= GSO_MAX_SEGMENTS):
            return False
        if proto == TCP:
            seq, = struct.unpack_from("!I", packet, l4 + 4)
            if seq != self.next_seq:
                return False
            self.next_seq = (seq + size) & 0xFFFFFFFF
            self.closed = bool(packet[l4 + 13] & TCP_PSH)
        self.packets.append(packet)
        self.sums.append(sums)
        self.length += size
        self.closed = self.closed or size < self.gso_size
        return True

    def _start(self, packet, flow):
        key, header_len, l4, proto = flow
        self.packets = [packet]
        self.flow = flow
        self.gso_size = len(packet) - header_len
        self.length = self.length_first = len(packet)
        self.closed = self.gso_size == 0
        # What a packet of the same size continuing the group has in its headers.
        self.mask = _join_mask(packet[0] >> 4, proto, l4, header_len)
        self.expected = int.from_bytes(packet[:header_len], "big") & self.mask
        self.seq_at = l4 + 4 if proto == TCP else None
        if proto == TCP:
            seq, = struct.unpack_from("!I", packet, l4 + 4)
            self.next_seq = (seq + self.gso_size) & 0xFFFFFFFF
            self.closed = self.closed or bool(packet[l4 + 13] & TCP_PSH)

    def continues(self, packet, sums):
        """Add packet to the group at once, without parsing it, if it is the group's next
        segment as one super-packet cut makes it: of the first one's size, its headers the
        first one's but for what changes from one segment to the next (_join_mask), the
        sequence number next. False for anything else, which offer() then looks at."""
        if (not self.packets or self.closed or len(packet) != self.length_first
                or len(self.packets) >= GSO_MAX_SEGMENTS
                or self.length + self.gso_size > MAX_IP_PACKET
                or int.from_bytes(packet[:self.flow[1]], "big") & self.mask != self.expected):
            return False
        if self.seq_at is not None:
            at = self.seq_at
            if int.from_bytes(packet[at:at + 4], "big") != self.next_seq:
                return False
            self.next_seq = (self.next_seq + self.gso_size) & 0xFFFFFFFF
            self.closed = bool(packet[at + 9] & TCP_PSH)
        self.packets.append(packet)
        self.sums.append(sums)
        self.length += self.gso_size
        return True

    def take(self):
        """The group as one TUN write (a list of buffers for writev), and its packets, each
        with what its checksums are."""
        packets, self.packets = self.packets, []
        packets_sums = list(zip(packets, self.sums))
        if len(packets) == 1:
            return [single_header(packets[0], self.sums[0]), packets[0]], packets_sums
        _, header_len, l4, proto = self.flow
        header = bytearray(packets[0][:header_len])
        l4_len = self.length - l4
        if header[0] >> 4 == 4:
            struct.pack_into("!H", header, 2, self.length)
            header[10:12] = b"\0\0"
            struct.pack_into("!H", header, 10, checksum(ones_sum(header[:20])))
            gso_type = GSO_TCPV4 if proto == TCP else GSO_UDP_L4
        else:
            struct.pack_into("!H", header, 4, self.length - 40)
            gso_type = GSO_TCPV6 if proto == TCP else GSO_UDP_L4
        if proto == TCP:
            header[l4 + 13] |= packets[-1][l4 + 13] & TCP_PSH
            field = l4 + 16
        else:
            struct.pack_into("!H", header, l4 + 4, l4_len)
            field = l4 + 6
        # A partial checksum: the pseudo-header sum, which the kernel completes.
        partial = pseudo_sum(header, proto, l4_len) % 0xFFFF
        struct.pack_into("!H", header, field, partial or 0xFFFF)
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso_type, header_len, self.gso_size, l4, field - l4)
        return [vnet, header] + [p[header_len:] for p in packets], packets_sums


@functools.lru_cache(maxsize=64)
def _join_mask(version, proto, l4, header_len):
    """The bits of a packet's headers, header_len bytes read as one number, that the next
    segment of its flow has the same: all but the IPv4 id and checksum, the TCP sequence
    number, PSH and checksum, and the UDP checksum."""
    mask = bytearray(b"\xff" * header_len)
    if version == 4:
        mask[4:6] = mask[10:12] = bytes(2)
    if proto == TCP:
        mask[l4 + 4:l4 + 8] = bytes(4)
        mask[l4 + 13] = 0xFF & ~TCP_PSH
        mask[l4 + 16:l4 + 18] = bytes(2)
    else:
        mask[l4 + 6:l4 + 8] = bytes(2)
    return int.from_bytes(mask, "big")


def gro_size(ancdata):
    """The segment size of a datagram UDP GRO joined, from its control message, or None."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            return int.from_bytes(data[:4], sys.byteorder)
    return None


# --- Offloads: what the kernel offers -----------------------------------------


@dataclasses.dataclass
class Offloads:
    """What the kernel offers, found at start-up; UDP GSO is turned off if it fails later."""

    tun_flags: int = 0  # TUNSETOFFLOAD flags; 0: plain TUN devices with the PI header
    udp_gso: bool = False  # UDP_SEGMENT sends
    udp_gro: bool = False  # UDP_GRO receives
    join: bool = False  # GSO writes into TUN devices; each tunnel stops and starts on its own

    def describe(self):
        if not self.tun_flags:
            return "off"
        names = [name for flag, name in ((TUN_F_TSO4, "TSO4"), (TUN_F_TSO6, "TSO6"),
                                         (TUN_F_USO4, "USO")) if self.tun_flags & flag]
        names += [name for on, name in ((self.udp_gso, "UDP GSO"), (self.udp_gro, "UDP GRO"),
                                        (self.join, "TUN GRO writes")) if on]
        return ", ".join(names)

    def turn_off(self, feature, reason):
        if getattr(self, feature):
            setattr(self, feature, False)
            log.warning("offload %s turned off: %s", feature, reason)


def probe_offloads(data_sock):
    """Find what this kernel offers: a TUN device briefly made to ask, and the data socket."""
    offloads = Offloads()
    try:
        probe = pytun.TunTapDevice(name="upsprobe%d",
                                   flags=pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR)
    except OSError as e:
        log.warning("no TUN offloads: %s", e)
        return offloads
    try:
        base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        # USO came with Linux 6.2; older kernels refuse the whole set.
        for flags in (base | TUN_F_USO4 | TUN_F_USO6, base):
            try:
                fcntl.ioctl(probe.fileno(), TUNSETOFFLOAD, flags)
            except OSError:
                continue
            offloads.tun_flags = flags
            break
    finally:
        probe.close()
    try:
        data_sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        offloads.udp_gso = True
    except OSError:
        pass
    try:
        data_sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        offloads.udp_gro = True
    except OSError:
        pass
    offloads.join = bool(offloads.tun_flags)
    return offloads


# --- Devices: TUN with offloads, and without ----------------------------------


# linux/if_tun.h: TUNGETIFF = _IOR('T', 210, unsigned int) fills a struct ifreq (40 bytes)
# with the name of the device a TUN fd holds, or fails with EBADFD once it is deleted.
TUNGETIFF = 0x800454D2
IFREQ_LEN = 40
# linux/if_link.h: a device that makes itself no IPv6 link-local address.
IN6_ADDR_GEN_MODE_NONE = 1
# Seconds a tunnel whose joined TUN write was refused writes packets one by one before it
# joins again: a kernel that always refuses costs one refused write a minute, and a
# refusal that passes costs no more than a minute of single writes.
JOIN_RETRY = 60


def open_tun(spec, offload_flags=0, alias=None):
    """Create and configure the TUN device for spec, or take up the one of that name kept
    from before; it reads and writes bare IP packets (IFF_NO_PI: the kernel tells IPv4 from
    IPv6 by the version), after a virtio header each with offload flags. Without alias it
    vanishes when closed; with alias (a state file's: device_alias) it is kept (persistent,
    TUNSETPERSIST) until deleted for good (close_tun), and says whose it is in its alias.
    Made persistent last: a new device that fails here goes, a kept one stays."""
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offload_flags else 0)
    device = pytun.TunTapDevice(name=spec.name, flags=flags)
    try:
        # Set even to none: a kept device keeps the offloads of the daemon before, and one
        # without offloads must not be handed super-packets.
        fcntl.ioctl(device.fileno(), TUNSETOFFLOAD, offload_flags)
        if spec.interface.version == 4:
            device.addr = str(spec.interface.ip)
            device.netmask = str(spec.interface.netmask)
            no_ipv6_link_local(spec.name)
        device.mtu = spec.mtu
        device.up()
        os.set_blocking(device.fileno(), False)
        if alias is not None:
            with open(os.path.join(SYS_NET, spec.name, "ifalias"), "w") as f:
                f.write(alias + "\n")
            device.persist(True)
    except BaseException:
        device.close()
        raise
    return device


def close_tun(tun, delete):
    """Let go of a TUN device: deleted (made not persistent first, were it kept), or, not
    delete, kept with its addresses and routes (if persistent), dropping what is routed
    into it until a daemon takes it up again."""
    try:
        if delete:
            tun.persist(False)
    except OSError:
        pass  # deleted already (from outside, or together with others)
    finally:
        tun.close()


def no_ipv6_link_local(name):
    """Give an IPv4 tunnel's device no IPv6 link-local address when it comes up, so its own
    kernel sends nothing through it (router solicitations, which back off over minutes and
    each wanted a handshake); routed IPv6 still goes through it. Set before the device is
    up; a kernel without IPv6 has nothing to set, and where it cannot be set (/proc/sys
    read-only, as in some containers) the tunnel is made all the same, as before."""
    try:
        with open("/proc/sys/net/ipv6/conf/%s/addr_gen_mode" % name, "w") as f:
            f.write("%d\n" % IN6_ADDR_GEN_MODE_NONE)
    except FileNotFoundError:
        pass
    except OSError as e:
        SETUP_WARNINGS.log(logging.WARNING, "tunnel %s: cannot turn its IPv6 link-local address"
                           " off (%s): its kernel may send IPv6 through it", name, e)


# A device kept across restarts (with --state-file) says whose it is in its alias, as
# ip link shows it: this, and the state file that keeps its tunnel. Another daemon's
# device, or someone else's TUN device of the same name, is never taken up.
DEVICE_ALIAS = "udpProxyServer "
# linux/if.h: IFALIASZ, with its NUL.
MAX_ALIAS = 255
SYS_NET = "/sys/class/net"
# linux/if_tun.h: the kind of a device, in its tun_flags.
IFF_TUN = 0x0001


def device_alias(state_path):
    """The alias of the devices of the tunnels a state file keeps: its absolute path, or
    a digest of it where that is too long for an alias."""
    path = os.path.abspath(state_path)
    if len((DEVICE_ALIAS + path).encode()) > MAX_ALIAS or "\n" in path:
        path = "sha256:" + hashlib.sha256(path.encode()).hexdigest()
    return DEVICE_ALIAS + path


def read_sys_net(name, attribute):
    """A device's attribute as /sys/class/net shows it, None where it shows no such device."""
    try:
        with open(os.path.join(SYS_NET, name, attribute)) as f:
            return f.read().strip()
    except OSError:
        return None


def device_owner(name):
    """Whose the device of that name is: its alias, "" if it has none; None when no device
    has that name. Read in /sys, which must show this network namespace (ip netns exec
    mounts it so): where it shows another device of that name, or none, this fails."""
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        return None
    if read_sys_net(name, "ifindex") != str(index):
        raise ControlError("cannot tell whose device %r is: /sys/class/net does not show this"
                           " network namespace (mount sysfs in it, as ip netns exec does)" % name)
    return read_sys_net(name, "ifalias") or ""


def is_tun(name):
    flags = read_sys_net(name, "tun_flags")
    return flags is not None and bool(int(flags, 16) & IFF_TUN)


def kept_devices(alias):
    """The names of the TUN devices that carry alias: kept for a state file's tunnels."""
    try:
        names = os.listdir(SYS_NET)
    except OSError:
        return []
    return sorted(name for name in names
                  if read_sys_net(name, "ifalias") == alias and is_tun(name))


def delete_kept_device(name):
    """Delete a kept device for good: taken up, made not persistent, and closed."""
    tun = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
    close_tun(tun, delete=True)


def held_device_index(fd):
    """The interface index of the device a TUN fd holds; None when it holds none (the device
    was deleted from outside) or is no TUN fd. Asked of the fd, not found by the tunnel's
    name: a device renamed from outside is still the tunnel's, one that took its name is not."""
    try:
        ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_LEN))
        return socket.if_nametoindex(os.fsdecode(ifreq[:IFNAMSIZ].split(b"\0", 1)[0]))
    except OSError:
        return None


# Devices read each packet this far into the buffer: the bytes before it are the codec's,
# for its header, so a datagram goes without a copy (wireguard-go's tun offset). The 2015
# format's PI header is all a codec puts there.
HEADROOM = PI_HEADER_LEN


class SharedBuffers:
    """Buffers all tunnels use in turn: the loop serves one handler at a time, and
    each handler leaves nothing in them when it returns."""

    def __init__(self):
        self.packet = bytearray(HEADROOM + BUFFER_SIZE)  # a packet read, at HEADROOM
        self.packet_view = memoryview(self.packet)
        self.vnet = bytearray(VNET_HDR_LEN)
        # Room for a 64 KB super-packet cut for the wire, a header per segment, at MTUs of
        # 502 and up (TCP over IPv4; IPv6 needs 1280); split_gso cuts for smaller MTUs in
        # rounds, so the buffer never has to grow.
        self.out = bytearray(BUFFER_SIZE + BUFFER_SIZE // 8)
        self.out_view = memoryview(self.out)
        self.small = bytearray(GSO_MAX_BYTES + BUFFER_SIZE)  # single packets waiting to go
        self.small_view = memoryview(self.small)
        # Encrypted tunnels: transport messages sealed in place, a round of segments at a
        # time (each grows by a header, a tag and its padding), and one packet padded.
        self.sealed = bytearray(len(self.out) + GSO_MAX_SEGMENTS * 64 + BUFFER_SIZE)
        self.sealed_view = memoryview(self.sealed)
        self.padded = bytearray(BUFFER_SIZE)
        self.padded_view = memoryview(self.padded)
        # Messages received opened in place of each other: as large as a receive.
        self.opened = bytearray(2 * BUFFER_SIZE)
        self.opened_view = memoryview(self.opened)


class OffloadDevice:
    """A TUN device with virtio-net offloads (IFF_VNET_HDR), as one tunnel uses it: it hands
    over TCP and UDP super-packets of up to 64 KB, and takes packets of one flow joined into
    one write, as GRO would; every read and write starts with a virtio header. Knows nothing
    of peers: read() hands a codec what it reads, write() takes bare packets."""

    def __init__(self, tun, name, offloads, counters, buffers, clock):
        self.tun = tun
        self.fd = tun.fileno()
        self.name = name
        self.offloads = offloads  # what the kernel offers, found at start-up
        self.counters = counters  # the tunnel's
        self.buffers = buffers
        self.clock = clock
        # UDP packets join into a GSO_UDP_L4 write only where the kernel has USO (Linux 6.2 on).
        self.join_udp = bool(offloads.tun_flags & TUN_F_USO4)
        self.join_again_at = None  # while joined writes are off after a refusal: until when
        self.join_refusal_logged = False  # later refusals are logged at debug level only
        # The receive side's own: whether this run is joined, the packets being joined, and
        # those of the last joined write, should it be refused. Emptied at every flush.
        self.joining = self.offloads.join
        self.joiner = Joiner()
        self.joined = []

    # Outbound: from the kernel to a codec.

    def read(self, codec):
        """Up to BATCH packets the kernel routed into the device, each to the codec: a
        super-packet whole, a packet alone with where its checksum is left partial, if it
        is. A bug met in one packet costs that packet, counted."""
        buffers, counters = self.buffers, self.counters
        room = buffers.packet_view[HEADROOM:]
        codec.encode_begin()
        try:
            for _ in range(BATCH):
                try:
                    size = os.readv(self.fd, [buffers.vnet, room]) - VNET_HDR_LEN
                except BlockingIOError:
                    break
                except OSError as e:
                    raise DeviceGone(e) from None
                try:
                    flags, gso_type, _, gso_size, start, offset = VNET_HDR.unpack(buffers.vnet)
                    packet = buffers.packet_view[HEADROOM:HEADROOM + size]
                    if gso_type != GSO_NONE:
                        codec.encode_super_packet(packet, UDP if gso_type == GSO_UDP_L4 else TCP,
                                                  start, gso_size)
                    else:
                        codec.encode_packet(packet, (start, offset) if flags & VNET_F_NEEDS_CSUM
                                            else None)
                except Exception:
                    _count_bug(counters, self.name)
        finally:
            codec.encode_end()

    # Inbound: bare packets from a codec, into the kernel.

    def write(self, packet, size, sums):
        """One packet, which took size bytes on the wire, into the device: joined with the
        last ones where it can be, else written after them; a partial checksum is left for
        the kernel to finish (a joined write has it finish every one)."""
        joiner, joining = self.joiner, self.joining
        if not joining and self.join_again_at is not None:
            joining = self._join_again()
        if joining and joiner.continues(packet, sums):
            return
        flow = flow_of(packet) if joining else None
        if flow is None or (flow[3] == UDP and not self.join_udp):
            self._write_joined()
            header = single_header(packet, sums)
            if header is None:
                self.counters.drops["bad_partial"] += 1
            else:
                self._writev([header, packet], 1, size)
        elif not joiner.offer(packet, flow, sums):
            self._write_joined()
            joiner.offer(packet, flow, sums)

    def flush(self):
        """Write what is being joined: the end of a run of writes."""
        try:
            self._write_joined()
        finally:
            self.joiner.packets = []

    # A peer's super-packet chunks (PI_CHUNK): each run of them one GSO write.
    takes_chunks = True

    def write_chunks(self, header, l4, gso_size, offset, parts, size, last):
        """A run of chunks, parts the payload from byte offset on, into the device as one
        packet; or, where the device takes no joined writes, cut here into its segments,
        each written alone. size: the bytes they took on the wire."""
        self._write_joined()
        run_len = sum(len(part) for part in parts)
        vnet, run = run_header(header, l4, gso_size, offset, run_len, last)
        if self.joining or (self.join_again_at is not None and self._join_again()):
            try:
                os.writev(self.fd, [vnet, run, *parts])
            except OSError as e:
                if not (len(parts) > 1 and self._join_refused(e)):
                    self.counters.drops["tun_full" if isinstance(e, BlockingIOError)
                                        else "tun_refused"] += len(parts)
                    return
            else:
                self._count_written(len(parts), size)
                return
        packet, done = memoryview(bytes(run) + b"".join(parts)), 0
        while done is not None:  # several rounds only for small segments, as when sending
            stride, total, done = split_gso(packet, TCP, l4, gso_size, self.buffers.out, done)
            for at in range(0, total, stride):
                segment = self.buffers.out_view[at:min(at + stride, total)]
                self._writev([ZERO_VNET_HDR, segment], 1, PI_HEADER_LEN + len(segment))

    def _join_again(self):
        """Whether joining is on again, JOIN_RETRY after the kernel refused a joined write."""
        if self.clock() >= self.join_again_at:
            self.join_again_at = None
            self.joining = self.offloads.join
        return self.joining

    def _write_joined(self):
        if self.joiner.packets:
            iov, self.joined = self.joiner.take()
            size = sum(len(p) for p, _ in self.joined) + PI_HEADER_LEN * len(self.joined)
            try:
                self._writev(iov, len(self.joined), size)
            finally:
                self.joined = []

    def _writev(self, buffers, packets, size):
        """One write into the device, of packets packets that took size bytes on the wire."""
        try:
            os.writev(self.fd, buffers)
        except OSError as e:
            self._write_failed(e, packets)
        else:
            self._count_written(packets, size)

    def _count_written(self, packets, size):
        counters = self.counters
        counters.rx_packets += packets
        counters.rx_bytes += size
        counters.last_rx = time.time()

    def _write_failed(self, error, packets):
        if packets > 1 and self._join_refused(error):
            for packet, sums in self.joined:  # nothing lost: these first, one by one
                self._writev([single_header(packet, sums), packet], 1, PI_HEADER_LEN + len(packet))
        else:
            self.counters.drops["tun_full" if isinstance(error, BlockingIOError)
                                else "tun_refused"] += packets

    def _join_refused(self, error):
        """Whether error, on a joined write, means the TUN device refuses joined packets.
        Some kernels do (a regression), or refuse one: this device then writes packets one
        by one for a while."""
        if error.errno != errno.EINVAL:
            return False
        self.join_again_at = self.clock() + JOIN_RETRY
        self.joining = False
        log.log(logging.DEBUG if self.join_refusal_logged else logging.WARNING,
                "tunnel %s: the TUN device refuses joined packets (%s); writing them one"
                " by one for %d s", self.name, error, JOIN_RETRY)
        self.join_refusal_logged = True
        return True

    def set_mtu(self, mtu):
        self.tun.mtu = mtu

    def close(self, delete=True):
        close_tun(self.tun, delete)


class NoOffloadDevice:
    """A TUN device without offloads (--no-offload, or a kernel without them), as one
    tunnel uses it: bare packets of at most its MTU each way, a read or a write each."""

    takes_chunks = False  # its daemon never says it takes super-packet chunks

    def __init__(self, tun, name, counters, buffers):
        self.tun = tun
        self.fd = tun.fileno()
        self.name = name
        self.counters = counters  # the tunnel's
        self.buffers = buffers
        self.joining = False  # it writes every packet alone, at once: flush has nothing to do

    def read(self, codec):
        """Up to BATCH packets the kernel routed into the device, each to the codec."""
        view, fd = self.buffers.packet_view, self.fd
        room = view[HEADROOM:]
        codec.encode_begin()
        try:
            for _ in range(BATCH):
                try:
                    size = os.readv(fd, [room])
                except BlockingIOError:
                    break
                except OSError as e:
                    raise DeviceGone(e) from None
                try:
                    codec.encode_packet(view[HEADROOM:HEADROOM + size], None)
                except Exception:
                    _count_bug(self.counters, self.name)
        finally:
            codec.encode_end()

    def write(self, packet, size, sums):
        """One packet, which took size bytes on the wire, into the device; a partial
        checksum is finished here first, as such a device cannot leave it to the kernel."""
        try:
            if sums == SUMS_PARTIAL and not finish_partial(packet):
                self.counters.drops["bad_partial"] += 1
                return
            os.write(self.fd, packet)
        except OSError as e:
            self.counters.drops["tun_full" if isinstance(e, BlockingIOError)
                                else "tun_refused"] += 1
        else:
            counters = self.counters
            counters.rx_packets += 1
            counters.rx_bytes += size
            counters.last_rx = time.time()

    def flush(self):
        pass  # nothing is held back

    def set_mtu(self, mtu):
        self.tun.mtu = mtu

    def close(self, delete=True):
        close_tun(self.tun, delete)


def _count_bug(counters, name):
    """A bug met while handling one packet or datagram: it costs that one alone, counted as
    internal_error, and is logged with its traceback a few times a minute."""
    counters.drops["internal_error"] += 1
    DATA_PATH_BUGS.log(logging.ERROR, "tunnel %s: internal error on a packet (-o list counts"
                       " them as internal_error)", name, exc_info=True)


# A tunnel's state, as list gives it: a plain tunnel is up when its peer was heard this
# recently (WireGuard's REJECT_AFTER_TIME, after which no session is valid); an encrypted
# one is down once its handshake has been tried this long without an answer (three tries).
ACTIVE_WINDOW = 180
CONNECTING_TIME = 15


# --- The 2015 wire format: a codec --------------------------------------------


# The packet information header we put on the wire for each IP version.
PI_BY_VERSION = {4: b"\x00\x00\x08\x00", 6: b"\x00\x00\x86\xdd"}
# The same by a packet's first byte, for the data path: IPv6's for 0x6_, IPv4's for all else.
PI_BY_FIRST_BYTE = tuple(PI_BY_VERSION[6 if first >> 4 == 6 else 4] for first in range(256))
# Remote checksum offload between our daemons, negotiated in the PI header's flags, which
# the kernel ignores when a datagram is written into a TUN device (tun_get_user reads only
# the protocol), so 2015 hosts and socat take such datagrams as ever. The bits are in its
# second byte: the first stays zero, which tells a tunnel packet from a WireGuard message.
# On every datagram a daemon with offloads sends: send me partial checksums.
PI_ACCEPTS_PARTIAL = 0x80
# On a packet whose TCP or UDP checksum field holds only the pseudo-header sum, as a TSO
# super-packet's does: the receiver writes it with NEEDS_CSUM and the kernel (or the NIC
# it is routed on to) finishes the sum; the UDP checksum guards the datagram on the wire.
PI_PARTIAL = 0x40
# On every datagram a daemon with offloads sends: send me TCP super-packets in chunks
# (cut_chunks). And on each chunk: PI_CHUNK, the super-packet's id in the low bits of
# the same byte (chunks of one super-packet have the same), its payload offset in the
# PI header's last two bytes, where the EtherType was (the headers after it say the IP
# version). A 2015 daemon, socat and a daemon without offloads never say they take
# them, and never get one.
PI_TAKES_CHUNKS = 0x20
PI_CHUNK = 0x10
PI_CHUNK_ID = 0x0F
# Partial checksums go only while the peer's last datagram, which said it takes them, is
# this recent: a peer replaced by a 2015 daemon that has sent nothing yet (a connection
# opened from our side) gets full ones after this many seconds, not never. A flow that
# is up both ways hears from its peer every round trip.
PARTIAL_FRESH = 2
PROTOCOL_AT = {offset: proto for proto, offset in CHECKSUM_OFFSET.items()}


class PlainCodec:
    """The 2015 wire format for one tunnel: a datagram is a PI header (flags and EtherType)
    and one packet, as the 2015 daemon and socat send and take them. Between two daemons of
    ours the PI header's flags negotiate partial checksums (PI_ACCEPTS_PARTIAL, PI_PARTIAL).
    Knows nothing of TUN: it is handed packets to send, and writes into a device."""

    def __init__(self, tunnel, offloads, clock, buffers):
        self.tunnel = tunnel
        self.clock = clock
        self.buffers = buffers
        # A daemon whose device takes partial checksums says so on every datagram, and
        # sends several datagrams a send; one without offloads does neither, as in 2015.
        self.flags = PI_ACCEPTS_PARTIAL | PI_TAKES_CHUNKS if offloads else 0
        self.batch = offloads
        # The PI flags of the peer's last datagram (what it takes: partial checksums,
        # super-packets in chunks), None until one comes, and when its datagrams last came.
        self.peer_flags = None
        self.peer_heard_at = float("-inf")
        self.partial = False  # in this round of sends: whether checksums go partial
        self.chunks = False  # and whether TCP super-packets go in chunks
        self.chunk_id = 0  # the next super-packet's
        self.small_len = self.small_stride = 0  # single packets waiting in buffers.small
        self.sent_alone = self.sent_bytes = 0  # in this round: datagrams sent alone

    # Outbound: what the device hands over, to the wire.

    def encode_begin(self):
        """What the peer takes does not change while a read runs: asked once a round."""
        self.partial = bool(self.flags and self.peer_takes_partial
                            and self.clock() - self.peer_heard_at < PARTIAL_FRESH)
        self.chunks = self.partial and self.peer_takes_chunks

    def encode_super_packet(self, packet, proto, l4_start, gso_size):
        """A super-packet cut into datagrams and sent, its checksums partial while the peer
        takes them and finds the L4 header where it looks for it."""
        self._send_small()
        partial = self.partial and transport_start(packet) == (l4_start, proto)
        if partial and proto == TCP and self.chunks:
            pi = bytes((0, self.flags | PI_CHUNK | self.chunk_id))
            self.chunk_id = (self.chunk_id + 1) & PI_CHUNK_ID
            cut = cut_chunks(packet, l4_start, gso_size, pi)
            if cut is not None:
                self.tunnel.send(*cut)
                return
        prefix = bytearray(PI_BY_VERSION[packet[0] >> 4])
        prefix[1] = self.flags | PI_PARTIAL if partial else self.flags
        buffers, done = self.buffers, 0
        while done is not None:  # several rounds only for small segments: IPv4 MTU < 502
            stride, total, done = split_gso(packet, proto, l4_start, gso_size, buffers.out, done,
                                            prefix, partial)
            self.tunnel.send(buffers.out_view[:total], stride)

    def encode_packet(self, packet, partial_sum):
        """A packet alone, read into buffers.packet at HEADROOM; partial_sum: where its
        checksum is left partial (start, offset), if it is (only a device with offloads
        leaves one so). Single packets of one size gather to go in one GSO send, but from a
        daemon without offloads, as in 2015."""
        if not self.batch:  # a datagram a send, its PI header in the room before the packet
            # Tunnel.send_one's work inlined (a call less a packet, on the --no-offload path):
            # keep the two alike.
            tunnel = self.tunnel
            self.buffers.packet[0:PI_HEADER_LEN] = PI_BY_FIRST_BYTE[packet[0]]
            try:
                size = tunnel.sock.sendto(self.buffers.packet_view[:HEADROOM + len(packet)],
                                          tunnel.endpoint)
            except OSError as e:
                tunnel.count_send_failed(e, 1)
            else:
                self.sent_alone += 1
                self.sent_bytes += size
            return
        flags = self.flags
        if partial_sum is not None:
            start, offset = partial_sum
            if self.partial and transport_start(packet) == (start, PROTOCOL_AT.get(offset)):
                flags |= PI_PARTIAL
            else:
                complete_checksum(packet, start, offset)
        length = PI_HEADER_LEN + len(packet)
        if self.small_len and (length > self.small_stride
                               or self.small_len % self.small_stride
                               or self.small_len + length > GSO_MAX_BYTES
                               or self.small_len // self.small_stride >= GSO_MAX_SEGMENTS):
            self._send_small()
        if not self.small_len:
            self.small_stride = length
        at, small = self.small_len, self.buffers.small
        small[at:at + PI_HEADER_LEN] = PI_BY_FIRST_BYTE[packet[0]]
        small[at + 1] = flags
        small[at + PI_HEADER_LEN:at + length] = packet
        self.small_len = at + length

    def encode_end(self):
        try:
            self._send_small()
        finally:
            self.small_len = 0  # the buffer is every tunnel's: nothing queued outlives a read
        if self.sent_alone:  # counted here, once a round: a packet's work is the least
            self.tunnel.count_sent(self.sent_alone, self.sent_bytes)
            self.sent_alone = self.sent_bytes = 0

    def _send_small(self):
        length, self.small_len = self.small_len, 0  # nothing left, whatever send does
        if length:
            self.tunnel.send(self.buffers.small_view[:length], self.small_stride)

    # Inbound: datagrams from the peer, into the device.

    def decode(self, datagrams, stride, source):
        """Datagrams from the peer, laid end to end stride bytes apart (one alone, or a run
        UDP GRO joined), into the tunnel's device; each says whether the peer takes partial
        checksums, and whether its packet has one."""
        device, drops = self.tunnel.device, self.tunnel.counters.drops
        if len(datagrams) <= stride:  # one alone, as every one comes without UDP GRO
            # The loop's work below for one, without it (inlined: keep the two alike).
            if len(datagrams) <= PI_HEADER_LEN:
                drops["short"] += 1
                return
            flags = datagrams[1]
            self.peer_flags = flags
            try:
                if flags & PI_CHUNK:
                    self._decode_chunks(datagrams, stride)
                else:
                    device.write(datagrams[PI_HEADER_LEN:], len(datagrams),
                                 SUMS_PARTIAL if flags & PI_PARTIAL else SUMS_FULL)
                if device.joining:  # a device that joins packets may hold this one back
                    device.flush()
            except Exception:
                _count_bug(self.tunnel.counters, self.tunnel.name)
            if self.flags:  # a daemon with offloads: partial sums go while the peer is heard
                self.peer_heard_at = self.clock()
            return
        flags = datagrams[1]
        if flags & PI_CHUNK and datagrams[1::stride].tobytes().count(flags) == -(
                -len(datagrams) // stride):  # a train of chunks
            self.peer_flags = flags
            try:
                self._decode_chunks(datagrams, stride)
            except Exception:
                _count_bug(self.tunnel.counters, self.tunnel.name)
            if self.flags:
                self.peer_heard_at = self.clock()
            return
        try:  # a run; copied above for a datagram alone: keep the two alike
            for start in range(0, len(datagrams), stride):
                datagram = datagrams[start:start + stride]
                if len(datagram) <= PI_HEADER_LEN:
                    drops["short"] += 1
                    continue
                flags = datagram[1]
                self.peer_flags = flags
                try:
                    if flags & PI_CHUNK:
                        self._decode_chunks(datagram, stride)
                    else:
                        device.write(datagram[PI_HEADER_LEN:], len(datagram),
                                     SUMS_PARTIAL if flags & PI_PARTIAL else SUMS_FULL)
                except Exception:
                    _count_bug(self.tunnel.counters, self.tunnel.name)
        finally:
            device.flush()
        if self.flags:  # a daemon with offloads: partial sums go while the peer is heard
            self.peer_heard_at = self.clock()

    @property
    def peer_takes_partial(self):
        """Whether the peer's last datagram said it takes partial checksums; None before any."""
        return None if self.peer_flags is None else bool(self.peer_flags & PI_ACCEPTS_PARTIAL)

    @property
    def peer_takes_chunks(self):
        return bool(self.peer_flags and self.peer_flags & PI_TAKES_CHUNKS)

    def _decode_chunks(self, datagrams, stride):
        """Super-packet chunks from the peer, stride bytes apart: each run of contiguous
        chunks of one super-packet written as one packet; a chunk that fits no super-packet
        (a size, offset or header that disagree) is dropped, counted as bad_chunk."""
        device, drops = self.tunnel.device, self.tunnel.counters.drops
        if not device.takes_chunks:  # from the time we said otherwise
            drops["unwanted_chunk"] += -(-len(datagrams) // stride)
            return
        if len(datagrams) > stride:
            datagrams = self._whole_run(datagrams, stride, device)
            if datagrams is None:
                return
        parts, expected = [], -1  # the run so far, and the offset its next chunk has
        pi = header = None
        body = l4 = gso_size = total = first = wire = 0
        for start in range(0, len(datagrams), stride):
            datagram = datagrams[start:start + stride]
            if len(datagram) <= PI_HEADER_LEN:
                drops["short"] += 1
                continue
            offset = datagram[2] << 8 | datagram[3]
            if (offset == expected and datagram[1] == pi
                    and datagram[PI_HEADER_LEN:body] == header):
                payload = datagram[body:]
                if len(payload) == gso_size or offset + len(payload) == total:
                    parts.append(payload)
                    expected += len(payload)
                    wire += len(datagram)
                    continue
            if parts:
                device.write_chunks(header, l4, gso_size, first, parts, wire, expected == total)
                parts, expected = [], -1
            layout = chunk_layout(datagram, PI_HEADER_LEN, datagram[4] >> 4)
            if layout is None:
                drops["bad_chunk"] += 1
                continue
            l4, header_len, gso_size, total = layout
            body = PI_HEADER_LEN + header_len
            payload = datagram[body:]
            if (offset % gso_size or len(payload) > gso_size or offset + len(payload) > total
                    or len(payload) < gso_size and offset + len(payload) != total):
                drops["bad_chunk"] += 1
                continue
            pi, header, first = datagram[1], datagram[PI_HEADER_LEN:body].tobytes(), offset
            parts, expected, wire = [payload], offset + len(payload), len(datagram)
        if parts:
            device.write_chunks(header, l4, gso_size, first, parts, wire, expected == total)

    @staticmethod
    def _whole_run(datagrams, stride, device):
        """A GRO train of chunks that is one run (the common case: the chunks of one
        super-packet, in order, none missing), written at once, checked column by column
        rather than chunk by chunk; None once written, else the train, for the general
        case."""
        if stride <= PI_HEADER_LEN:
            return datagrams
        layout = chunk_layout(datagrams[:stride], PI_HEADER_LEN, datagrams[4] >> 4)
        if layout is None:
            return datagrams
        l4, header_len, gso_size, total = layout
        body, size = PI_HEADER_LEN + header_len, len(datagrams)
        count, first = -(-size // stride), datagrams[2] << 8 | datagrams[3]
        last_len = size - (count - 1) * stride - body
        end = first + (count - 1) * gso_size + last_len
        if (stride != body + gso_size or first % gso_size or last_len <= 0
                or end > total or last_len < gso_size and end != total):
            return datagrams
        data = datagrams.tobytes()
        offsets = struct.pack("!%dH" % count, *range(first, end, gso_size))
        header = data[PI_HEADER_LEN:body]
        if (data[2::stride] != offsets[0::2] or data[3::stride] != offsets[1::2]
                or not all(data.startswith(header, at) for at in range(
                    stride + PI_HEADER_LEN, size, stride))):
            return datagrams
        device.write_chunks(header, l4, gso_size, first,
                            [datagrams[at:at + stride - body] for at in range(body, size, stride)],
                            size, end == total)
        return None

    def describe(self):
        """What list adds for a plain tunnel: whether the peer takes partial checksums, and
        which this tunnel sends, and its state."""
        partial = self.flags and self.peer_takes_partial
        return {"peerOffload": self.peer_takes_partial,
                "checksums": "partial" if partial else "full",
                "superPackets": "chunks" if partial and self.peer_takes_chunks else "segments",
                "state": self.state()}

    def state(self, now=None):
        """up: the peer was heard within ACTIVE_WINDOW; down: we sent within it and heard
        nothing; idle: neither. (The 2015 format has no keepalives: an end that only sends
        is down.)"""
        counters, now = self.tunnel.counters, time.time() if now is None else now
        if counters.last_rx is not None and now - counters.last_rx <= ACTIVE_WINDOW:
            return "up"
        if counters.last_tx is not None and now - counters.last_tx <= ACTIVE_WINDOW:
            return "down"
        return "idle"


# --- WireGuard: keys and the handshake ----------------------------------------


# The specification is the WireGuard paper (Donenfeld, NDSS 2017, section 5.4) and
# wireguard-go's device/noise-protocol.go; names are the paper's, to be held against it.

# The Noise protocol's name: its hash is the first chaining key, so no other construction agrees.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"


# Hashed in next, so the transcript is WireGuard v1's and no other protocol's.
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"


# Put before a peer's public key to make the key of mac1, and that of the cookie reply's sealing.
LABEL_MAC1 = b"mac1----"


LABEL_COOKIE = b"cookie--"


# A message's first four bytes: its type and three zero bytes, read as a little-endian number.
MESSAGE_INITIATION, MESSAGE_RESPONSE, MESSAGE_COOKIE_REPLY, MESSAGE_TRANSPORT = 1, 2, 3, 4


# Each handshake message has one size: a datagram of another size is not one.
INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE = 148, 92, 64


# Type, receiver index and counter, before a transport message's sealed packet.
TRANSPORT_HEADER_SIZE = 16


# mac1, mac2 and cookies are BLAKE2s cut to 16 bytes; a Poly1305 tag is 16 bytes too.
MAC_LEN = TAG_LEN = 16


# Type, sender, ephemeral, static (sealed), timestamp (sealed), mac1, mac2.
INITIATION = struct.Struct("<II32s48s28s16s16s")


# Type, sender, receiver, ephemeral, empty (sealed), mac1, mac2.
RESPONSE = struct.Struct("<III32s16s16s16s")


# ChaCha20-Poly1305's 96-bit nonce in WireGuard: 32 zero bits, then the 64-bit counter.
AEAD_NONCE = struct.Struct("<4xQ")


# TAI64N: the TAI64 label of the second (2**62 is 1970, when TAI was 10 s ahead of UTC),
# then the nanoseconds, both big-endian, so labels compare as bytes as times do.
TAI64N = struct.Struct(">QI")


TAI64_EPOCH = 2 ** 62 + 10


# Nanoseconds are rounded down to 2**24 (about 17 ms), as wireguard-go and the kernel do, so
# an initiation does not tell our clock to the nanosecond; it is finer than 50 initiations a second.
TAI64N_WHITENER = 2 ** 24


class WireGuardRefused(ValueError):
    """A WireGuard message not taken; the text says why, and never holds a key."""


def need_cryptography(what="encrypted tunnels"):
    """Raise the one clear error when the cryptography package is missing: plain tunnels
    never call this, so the daemon runs them without it."""
    if ChaCha20Poly1305 is None:
        raise CryptographyMissing(what)


def HASH(data):
    """BLAKE2s-256."""
    return hashlib.blake2s(data).digest()


def MAC(key, data):
    """BLAKE2s keyed with key, cut to 16 bytes."""
    return hashlib.blake2s(data, digest_size=MAC_LEN, key=key).digest()


def HMAC(key, data):
    """HMAC (RFC 2104) over BLAKE2s, with its 64-byte blocks."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def KDF(n, key, data):
    """HKDF (RFC 5869) over HMAC-BLAKE2s: the paper's KDF_n, its n 32-byte outputs."""
    secret = HMAC(key, data)
    outputs, previous = [], b""
    for i in range(1, n + 1):
        previous = HMAC(secret, previous + bytes([i]))
        outputs.append(previous)
    return outputs


def KDF1(key, data):
    return KDF(1, key, data)[0]


def KDF2(key, data):
    return tuple(KDF(2, key, data))


def KDF3(key, data):
    return tuple(KDF(3, key, data))


def AEAD(key, counter, plaintext, authtext):
    """ChaCha20-Poly1305 (RFC 8439) with WireGuard's nonce made of the counter."""
    need_cryptography()
    return ChaCha20Poly1305(key).encrypt(AEAD_NONCE.pack(counter), plaintext, authtext)


def AEAD_OPEN(key, counter, ciphertext, authtext, what):
    """The plaintext AEAD sealed, or WireGuardRefused naming what did not open."""
    need_cryptography()
    try:
        return ChaCha20Poly1305(key).decrypt(AEAD_NONCE.pack(counter), ciphertext, authtext)
    except InvalidTag:
        raise WireGuardRefused("%s does not authenticate" % what) from None


def DH(private, public):
    """X25519 of a private key (raw bytes, or a private_key_object) and a public key in raw
    bytes; a public key of small order, whose result is all zero, is refused."""
    need_cryptography()
    try:
        return private_key_object(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise WireGuardRefused("a public key of small order or of the wrong size") from None


def private_key_object(private):
    """The X25519 key object of a private key given in raw bytes (or the object itself).
    Made once for a key used again: loading one costs as much as a DH. Dropped, OpenSSL
    clears its copy of the key, which a bytes object never is."""
    if isinstance(private, (bytes, bytearray)):
        return X25519PrivateKey.from_private_bytes(private)
    return private


def new_ephemeral():
    """A fresh X25519 private key object, for one handshake."""
    need_cryptography()
    return X25519PrivateKey.generate()


def generate_private_key(random=os.urandom):
    """A new private key as `wg genkey` makes one: random bytes, clamped for X25519."""
    key = bytearray(random(KEY_LEN))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key(private):
    """The public key of a private key (raw bytes, or its object), as `wg pubkey` gives it
    (raw bytes)."""
    need_cryptography()
    return private_key_object(private).public_key().public_bytes_raw()


def key_from_base64(text):
    """A key, private, public or preshared, from the base64 `wg genkey`, `wg pubkey` and
    `wg genpsk` write; the error (a ValueError) never quotes the text."""
    return parse_key(text.strip(), "key")


def key_to_base64(key):
    return base64.b64encode(key).decode("ascii")


def tai64n(unix_ns):
    """The TAI64N timestamp of a time in nanoseconds since 1970 (time.time_ns()): a later
    time never has a smaller one, and timestamps compare as bytes as their times do."""
    seconds, nanoseconds = divmod(unix_ns, 10 ** 9)
    return TAI64N.pack(TAI64_EPOCH + seconds, nanoseconds - nanoseconds % TAI64N_WHITENER)


def zero_psk(preshared_key):
    """The preshared key mixed in (psk2): all zero when the tunnel has none."""
    if preshared_key is None:
        return bytes(KEY_LEN)
    if len(preshared_key) != KEY_LEN:
        raise ValueError("a preshared key is %d bytes" % KEY_LEN)
    return preshared_key


# C and H before anything of a handshake is mixed in: the same for every handshake.
INITIAL_CHAINING_KEY = HASH(CONSTRUCTION)


INITIAL_HASH = HASH(INITIAL_CHAINING_KEY + IDENTIFIER)


class InitiationSent:
    """The initiator's handshake between its initiation and the peer's response; erase()
    lets go of its keys once the response came or the handshake was given up."""

    def __init__(self, local_index, remote_public, local_private, ephemeral_private,
                 chaining_key, hash):
        self.local_index = local_index
        self.remote_public = remote_public
        self.local_private = local_private  # raw bytes or key objects, as given
        self.ephemeral_private = ephemeral_private
        self.chaining_key = bytearray(chaining_key)
        self.hash = bytearray(hash)

    def __repr__(self):
        return "InitiationSent(local_index=%d)" % self.local_index  # never a key

    def erase(self):
        self.chaining_key[:] = self.hash[:] = bytes(KEY_LEN)
        self.local_private = self.ephemeral_private = None


@dataclasses.dataclass(frozen=True)
class InitiationOpened:
    """An initiation to us as far as our static key alone opens it (one DH): who says it
    sent it, to be looked up before any more work; the rest needs that peer's keys."""
    remote_public: bytes
    remote_index: int
    remote_ephemeral: bytes
    sealed_timestamp: bytes = dataclasses.field(repr=False)
    chaining_key: bytes = dataclasses.field(repr=False)
    hash: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class InitiationReceived:
    """What the responder learnt from an initiation: the sender's static public key (to find
    its tunnel), its timestamp (take it only if newer than that peer's last), its index, and
    the handshake so far, to answer it."""
    remote_public: bytes
    timestamp: bytes
    remote_index: int
    remote_ephemeral: bytes
    chaining_key: bytes = dataclasses.field(repr=False)
    hash: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class TransportKeys:
    """What a handshake gives each side: the keys it seals and opens transport messages
    with, the index the peer puts in the messages it sends us (local_index), and the one
    we put in the messages we send it (remote_index)."""
    local_index: int
    remote_index: int
    is_initiator: bool
    send_key: bytes = dataclasses.field(repr=False)
    receive_key: bytes = dataclasses.field(repr=False)


def check_message_kind(message, kind, size):
    if len(message) != size or struct.unpack_from("<I", message)[0] != kind:
        raise WireGuardRefused("not a handshake message of type %d and %d bytes" % (kind, size))


def create_initiation(local_private, remote_public, sender_index, timestamp,
                      ephemeral_private=None, static_static=None):
    """The first handshake message to the peer of remote_public, sent under sender_index,
    with timestamp (tai64n of now), and the state to read its response with. Private keys
    are raw bytes or key objects; static_static is DH(local_private, remote_public) when
    made already (a tunnel keeps it). Its mac1 and mac2 are zero: the cookie section's
    add_macs fills them in before it is sent."""
    ephemeral_private = private_key_object(ephemeral_private or new_ephemeral())
    ephemeral = public_key(ephemeral_private)
    transcript = HASH(INITIAL_HASH + remote_public)
    chaining_key = KDF1(INITIAL_CHAINING_KEY, ephemeral)
    transcript = HASH(transcript + ephemeral)
    chaining_key, key = KDF2(chaining_key, DH(ephemeral_private, remote_public))
    static = AEAD(key, 0, public_key(local_private), transcript)
    transcript = HASH(transcript + static)
    chaining_key, key = KDF2(chaining_key, static_static or DH(local_private, remote_public))
    sealed_timestamp = AEAD(key, 0, timestamp, transcript)
    transcript = HASH(transcript + sealed_timestamp)
    message = INITIATION.pack(MESSAGE_INITIATION, sender_index, ephemeral, static,
                              sealed_timestamp, bytes(MAC_LEN), bytes(MAC_LEN))
    return InitiationSent(sender_index, remote_public, local_private, ephemeral_private,
                          chaining_key, transcript), message


def open_initiation(local_private, message, local_public=None):
    """The first half of consuming an initiation to us: its sender's static key, opened
    with one DH (InitiationOpened), or WireGuardRefused. Its mac1 is the caller's to check
    first (CookieChecker.check_mac1), as that costs no DH."""
    check_message_kind(message, MESSAGE_INITIATION, INITIATION_SIZE)
    _, sender, ephemeral, static, sealed_timestamp, _, _ = INITIATION.unpack(message)
    transcript = HASH(INITIAL_HASH + (local_public or public_key(local_private)))
    chaining_key = KDF1(INITIAL_CHAINING_KEY, ephemeral)
    transcript = HASH(transcript + ephemeral)
    chaining_key, key = KDF2(chaining_key, DH(local_private, ephemeral))
    remote_public = AEAD_OPEN(key, 0, static, transcript, "the initiation's static key")
    transcript = HASH(transcript + static)
    return InitiationOpened(remote_public, sender, ephemeral, sealed_timestamp, chaining_key,
                            transcript)


def finish_initiation(opened, static_static):
    """The second half: the timestamp, opened with the static-static DH of us and the
    sender (which a tunnel keeps made), so the initiation is authentic
    (InitiationReceived), or WireGuardRefused."""
    chaining_key, key = KDF2(opened.chaining_key, static_static)
    timestamp = AEAD_OPEN(key, 0, opened.sealed_timestamp, opened.hash,
                          "the initiation's timestamp")
    transcript = HASH(opened.hash + opened.sealed_timestamp)
    return InitiationReceived(opened.remote_public, timestamp, opened.remote_index,
                              opened.remote_ephemeral, chaining_key, transcript)


def consume_initiation(local_private, message, local_public=None):
    """What an initiation to us says (InitiationReceived), or WireGuardRefused: both halves,
    for a caller that keeps no tunnels (the daemon looks its peer up between them)."""
    opened = open_initiation(local_private, message, local_public)
    return finish_initiation(opened, DH(local_private, opened.remote_public))


def create_response(received, sender_index, preshared_key=None, ephemeral_private=None):
    """The response to a consumed initiation, sent under sender_index, with the tunnel's
    preshared key (None: none), and the responder's transport keys. Its mac1 and mac2 are
    zero, for add_macs."""
    ephemeral_private = private_key_object(ephemeral_private or new_ephemeral())
    ephemeral = public_key(ephemeral_private)
    chaining_key = KDF1(received.chaining_key, ephemeral)
    transcript = HASH(received.hash + ephemeral)
    chaining_key = KDF1(chaining_key, DH(ephemeral_private, received.remote_ephemeral))
    chaining_key = KDF1(chaining_key, DH(ephemeral_private, received.remote_public))
    chaining_key, tau, key = KDF3(chaining_key, zero_psk(preshared_key))
    transcript = HASH(transcript + tau)
    empty = AEAD(key, 0, b"", transcript)
    message = RESPONSE.pack(MESSAGE_RESPONSE, sender_index, received.remote_index, ephemeral,
                            empty, bytes(MAC_LEN), bytes(MAC_LEN))
    receive_key, send_key = KDF2(chaining_key, b"")
    return TransportKeys(sender_index, received.remote_index, False, send_key,
                         receive_key), message


def consume_response(sent, message, preshared_key=None):
    """The initiator's transport keys from the response to its initiation, with the
    tunnel's preshared key (None: none), or WireGuardRefused. Its mac1 is the caller's
    to check first."""
    check_message_kind(message, MESSAGE_RESPONSE, RESPONSE_SIZE)
    _, sender, receiver, ephemeral, empty, _, _ = RESPONSE.unpack(message)
    if receiver != sent.local_index:
        raise WireGuardRefused("a response to another initiation")
    chaining_key = KDF1(bytes(sent.chaining_key), ephemeral)
    transcript = HASH(bytes(sent.hash) + ephemeral)
    chaining_key = KDF1(chaining_key, DH(sent.ephemeral_private, ephemeral))
    chaining_key = KDF1(chaining_key, DH(sent.local_private, ephemeral))
    chaining_key, tau, key = KDF3(chaining_key, zero_psk(preshared_key))
    transcript = HASH(transcript + tau)
    AEAD_OPEN(key, 0, empty, transcript, "the response")
    send_key, receive_key = KDF2(chaining_key, b"")
    return TransportKeys(sent.local_index, sender, True, send_key, receive_key)


# --- WireGuard: cookies under load --------------------------------------------


# The paper's sections 5.4.4 and 5.4.7, and wireguard-go's device/cookie.go: mac1 shows a
# handshake message was made by someone who knows our public key; under load, mac2 shows
# its sender receives at its address, with a cookie we sent it there.

# The responder's cookie secret lasts two minutes; so does a cookie for the initiator.
COOKIE_REFRESH_TIME = 120


# XChaCha20's nonce: long enough to be drawn at random for every cookie reply.
COOKIE_NONCE_LEN = 24


# Type, receiver (the index of the message it answers), nonce, cookie (sealed).
COOKIE_REPLY = struct.Struct("<II24s32s")


# The first four words of every ChaCha state: "expand 32-byte k".
CHACHA_CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")


def hchacha20(key, nonce):
    """HChaCha20 (draft-irtf-cfrg-xchacha, 2.2) of a 32-byte key and 16-byte nonce, from
    cryptography's ChaCha20 (we write no primitive): its one keystream block for that
    nonce as the four state words after the key is the rounds' output plus the input
    state; taking the input away again leaves the rounds' output, whose words 0..3 and
    12..15 are HChaCha20's."""
    need_cryptography()
    block = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    inputs = CHACHA_CONSTANTS + struct.unpack("<4I", nonce)
    return struct.pack("<8I", *((word - given) & 0xFFFFFFFF
                                for word, given in zip(words[:4] + words[12:], inputs)))


def xchacha_parts(key, nonce):
    """AEAD_XChaCha20_Poly1305 (draft-irtf-cfrg-xchacha, 2.3) as ChaCha20-Poly1305 under a
    subkey: the ChaCha20-Poly1305 and its 12-byte nonce for a 24-byte nonce."""
    if len(nonce) != COOKIE_NONCE_LEN:
        raise ValueError("an XChaCha20 nonce is %d bytes" % COOKIE_NONCE_LEN)
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])), bytes(4) + nonce[16:]


def XAEAD(key, nonce, plaintext, authtext):
    cipher, short_nonce = xchacha_parts(key, nonce)
    return cipher.encrypt(short_nonce, plaintext, authtext)


def XAEAD_OPEN(key, nonce, ciphertext, authtext, what):
    cipher, short_nonce = xchacha_parts(key, nonce)
    try:
        return cipher.decrypt(short_nonce, ciphertext, authtext)
    except InvalidTag:
        raise WireGuardRefused("%s does not authenticate" % what) from None


def add_macs(message, receiver_public, cookie=None):
    """A handshake message with its mac1, keyed by the receiver's public key, and its mac2,
    keyed by the cookie the receiver gave us (all zero when we hold none)."""
    body = bytes(message[:-2 * MAC_LEN])
    mac1 = MAC(HASH(LABEL_MAC1 + receiver_public), body)
    mac2 = MAC(cookie, body + mac1) if cookie else bytes(MAC_LEN)
    return body + mac1 + mac2


def mac1_valid(message, local_public):
    mac1 = MAC(HASH(LABEL_MAC1 + local_public), message[:-2 * MAC_LEN])
    return hmac.compare_digest(mac1, message[-2 * MAC_LEN:-MAC_LEN])


def mac2_valid(message, cookie):
    return hmac.compare_digest(MAC(cookie, message[:-MAC_LEN]), message[-MAC_LEN:])


def make_cookie(secret, address, port):
    """The cookie of a sender's address and port under the secret: what its mac2 must be
    keyed by. The address is packed and the port big-endian, as the kernel module does."""
    return MAC(secret, ipaddress.ip_address(address).packed + struct.pack("!H", port))


def create_cookie_reply(message, cookie, local_public, nonce):
    """The cookie reply to a handshake message: to its sender's index, the cookie sealed
    with a key from our public key and bound to the message's mac1."""
    sender, = struct.unpack_from("<I", message, 4)
    sealed = XAEAD(HASH(LABEL_COOKIE + local_public), nonce, cookie,
                   message[-2 * MAC_LEN:-MAC_LEN])
    return COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, sender, nonce, sealed)


def consume_cookie_reply(reply, remote_public, mac1):
    """The cookie in a peer's reply to the handshake message we sent with mac1, or
    WireGuardRefused."""
    check_message_kind(reply, MESSAGE_COOKIE_REPLY, COOKIE_REPLY_SIZE)
    _, _, nonce, sealed = COOKIE_REPLY.unpack(reply)
    return XAEAD_OPEN(HASH(LABEL_COOKIE + remote_public), nonce, sealed, mac1,
                      "the cookie reply")


class CookieChecker:
    """The side that receives handshake messages, for one static key of ours: checks their
    mac1, and under load their mac2 against the cookie of their source, and answers one
    without it with a cookie reply. now is any clock in seconds (time.monotonic()).

    Each costs a few microseconds, since a flood is made of them: mac1's key is made once,
    and replies are sealed under one XChaCha20 subkey a secret, their nonces a random
    prefix (which makes the subkey) and a counter, so no two are the same."""

    def __init__(self, local_public, random=os.urandom):
        self.local_public = local_public
        self.random = random
        self.mac1_key = HASH(LABEL_MAC1 + local_public)
        self.seal_key = HASH(LABEL_COOKIE + local_public)
        self.secret = None
        self.secret_made = None
        self.sealing = None  # (the subkey's cipher, the nonce prefix, the next counter)

    def check_mac1(self, message):
        mac1 = MAC(self.mac1_key, message[:-2 * MAC_LEN])
        return hmac.compare_digest(mac1, message[-2 * MAC_LEN:-MAC_LEN])

    def cookie(self, address, port, now):
        if self.secret is None or now - self.secret_made >= COOKIE_REFRESH_TIME:
            self.secret, self.secret_made = self.random(KEY_LEN), now
            self.sealing = None
        return make_cookie(self.secret, address, port)

    def check_mac2(self, message, address, port, now):
        return mac2_valid(message, self.cookie(address, port, now))

    def create_reply(self, message, address, port, now):
        cookie = self.cookie(address, port, now)
        if self.sealing is None:
            prefix = self.random(COOKIE_NONCE_LEN - 8)
            self.sealing = [xchacha_parts(self.seal_key, prefix + bytes(8))[0], prefix, 0]
        cipher, prefix, counter = self.sealing
        self.sealing[2] += 1
        nonce = prefix + counter.to_bytes(8, "little")
        sender, = struct.unpack_from("<I", message, 4)
        sealed = cipher.encrypt(bytes(4) + nonce[16:], cookie, message[-2 * MAC_LEN:-MAC_LEN])
        return COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, sender, nonce, sealed)


class CookieGenerator:
    """The side that sends handshake messages to one peer: fills in their mac1, and mac2
    while it holds a cookie of that peer younger than COOKIE_REFRESH_TIME; it takes a cookie
    reply only to the last message it sent. now is the clock CookieChecker's is."""

    def __init__(self, remote_public):
        self.remote_public = remote_public
        self.cookie = None
        self.cookie_received = None
        self.last_mac1 = None

    def add_macs(self, message, now):
        fresh = self.cookie is not None and now - self.cookie_received < COOKIE_REFRESH_TIME
        message = add_macs(message, self.remote_public, self.cookie if fresh else None)
        self.last_mac1 = message[-2 * MAC_LEN:-MAC_LEN]
        return message

    def consume_reply(self, reply, now):
        if self.last_mac1 is None:
            raise WireGuardRefused("a cookie reply to no message of ours")
        self.cookie = consume_cookie_reply(reply, self.remote_public, self.last_mac1)
        self.cookie_received = now


# --- WireGuard: transport messages --------------------------------------------


# The paper's section 5.4.6, and wireguard-go's device/send.go and receive.go.

# Packets are sealed padded with zeros to a multiple of this, so their sizes tell less.
PADDING_MULTIPLE = 16


# Type, receiver index, counter.
TRANSPORT_HEADER = struct.Struct("<IIQ")


# A keepalive: the sealed empty packet, the shortest transport message.
MIN_TRANSPORT_SIZE = TRANSPORT_HEADER_SIZE + TAG_LEN


HANDSHAKE_SIZES = {MESSAGE_INITIATION: INITIATION_SIZE, MESSAGE_RESPONSE: RESPONSE_SIZE,
                   MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE}


def message_type(datagram):
    """The type of the WireGuard message a datagram is, or None when it is none: each
    handshake message has its size, a transport message at least a header and a tag."""
    if len(datagram) < 4:
        return None
    kind, = struct.unpack_from("<I", datagram)
    if kind == MESSAGE_TRANSPORT:
        return kind if len(datagram) >= MIN_TRANSPORT_SIZE else None
    return kind if HANDSHAKE_SIZES.get(kind) == len(datagram) else None


def receiver_index(message):
    """The index a response, cookie reply or transport message is addressed to: ours, to
    find the handshake or keys it belongs to."""
    offset = 8 if message_type(message) == MESSAGE_RESPONSE else 4
    return struct.unpack_from("<I", message, offset)[0]


def transport_cipher(key):
    """The AEAD of one direction of a session's keys, made once for all its packets."""
    need_cryptography()
    return ChaCha20Poly1305(key)


def transport_size(length, mtu=None):
    """What a packet of length bytes is padded to: a multiple of 16, but not past the
    tunnel's mtu when given, as wireguard-go does."""
    size = length + -length % PADDING_MULTIPLE
    return size if mtu is None else max(length, min(size, mtu))


def seal_transport_into(cipher, receiver, counter, padded, out, at):
    """Seal an already padded packet into out at offset at, as seal_transport would, with
    no copy on the way; returns the message's length."""
    TRANSPORT_HEADER.pack_into(out, at, MESSAGE_TRANSPORT, receiver, counter)
    end = at + TRANSPORT_HEADER_SIZE + len(padded) + TAG_LEN
    if hasattr(cipher, "encrypt_into"):
        cipher.encrypt_into(AEAD_NONCE.pack(counter), padded, None,
                            out[at + TRANSPORT_HEADER_SIZE:end])
    else:  # cryptography before 45: one copy more
        out[at + TRANSPORT_HEADER_SIZE:end] = cipher.encrypt(AEAD_NONCE.pack(counter), padded, None)
    return end - at


def seal_transport(cipher, receiver, counter, packet, mtu=None):
    """A packet (b"" for a keepalive) as a transport message to the peer's index receiver,
    the counter-th under cipher: padded with zeros to a multiple of 16, but not past the
    tunnel's mtu when given, as wireguard-go does."""
    size = transport_size(len(packet), mtu)
    return (TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver, counter)
            + cipher.encrypt(AEAD_NONCE.pack(counter), bytes(packet) + bytes(size - len(packet)),
                             None))


def open_transport_into(cipher, message, out):
    """open_transport, the packet decrypted into out (at least len(message) - 32 bytes):
    the counter and a view of the padded packet there."""
    if message_type(message) != MESSAGE_TRANSPORT:
        raise WireGuardRefused("not a transport message")
    _, _, counter = TRANSPORT_HEADER.unpack_from(message)
    size = len(message) - TRANSPORT_HEADER_SIZE - TAG_LEN
    try:
        if hasattr(cipher, "decrypt_into"):
            cipher.decrypt_into(AEAD_NONCE.pack(counter), message[TRANSPORT_HEADER_SIZE:], None,
                                out[:size])
        else:  # cryptography before 45: one copy more
            out[:size] = cipher.decrypt(AEAD_NONCE.pack(counter),
                                        message[TRANSPORT_HEADER_SIZE:], None)
    except InvalidTag:
        raise WireGuardRefused("a transport message that does not authenticate") from None
    return counter, out[:size]


def open_transport(cipher, message):
    """The counter and padded packet of a transport message, or WireGuardRefused. The
    caller checks the counter against its replay window and trims the padding by the IP
    header's length; an empty packet is a keepalive."""
    if message_type(message) != MESSAGE_TRANSPORT:
        raise WireGuardRefused("not a transport message")
    _, _, counter = TRANSPORT_HEADER.unpack_from(message)
    try:
        packet = cipher.decrypt(AEAD_NONCE.pack(counter), message[TRANSPORT_HEADER_SIZE:], None)
    except InvalidTag:
        raise WireGuardRefused("a transport message that does not authenticate") from None
    return counter, packet


def is_wireguard(buffer, size):
    """Whether a data-port datagram is a WireGuard message: its first byte 1 to 4, then three
    zero bytes; a 2015-format one starts with the PI header, whose first byte is 0."""
    return size >= 4 and 0 < buffer[0] <= MESSAGE_TRANSPORT and not (buffer[1] or buffer[2]
                                                                     or buffer[3])


def ip_length(packet):
    """The length an IP packet says it has, what is left after it being padding; None when
    its header is not whole and sane (shorter than the least header, a length shorter than
    its header, or longer than what came), as wireguard-go drops it."""
    size = len(packet)
    if size >= 20 and packet[0] >> 4 == 4:
        length, header = packet[2] << 8 | packet[3], (packet[0] & 15) * 4
        return length if 20 <= header <= length <= size else None
    if size >= 40 and packet[0] >> 4 == 6:
        length = 40 + (packet[4] << 8 | packet[5])
        return length if length <= size else None
    return None


# --- WireGuard: sessions, counters and the replay window ----------------------


# The protocol's limits, named as the WireGuard paper names them (Donenfeld, NDSS 2017,
# section 6.1) so the code can be held against it. Times are in seconds.
# A keypair is replaced after this many messages, long before its nonces could wrap.
REKEY_AFTER_MESSAGES = 2 ** 60


# Counters from here on are never sent nor taken: 2**13 below 2**64, the replay window's room.
REJECT_AFTER_MESSAGES = 2 ** 64 - 2 ** 13 - 1


# The initiator of a session starts the next one when it sends with a keypair this old.
REKEY_AFTER_TIME = 120


# A keypair this old is used for nothing: it neither sends nor receives.
REJECT_AFTER_TIME = 180


# Unanswered initiations are sent again for this long, then given up (until there is data again).
REKEY_ATTEMPT_TIME = 90


# An initiation is sent again after this long unanswered; none is sent more often.
REKEY_TIMEOUT = 5


# Data received and nothing sent for this long: a keepalive tells the peer we are here.
KEEPALIVE_TIMEOUT = 10


# The jitter added to REKEY_TIMEOUT, drawn in ms below this as wireguard-go does (under 1/3 s),
# so two peers that started together do not retry in step.
REKEY_TIMEOUT_JITTER_MAX_MS = 334


# REKEY_ATTEMPT_TIME in retries, as the kernel and wireguard-go count it: the first
# initiation and this many + 1 retries, 5 s apart, then the give-up.
MAX_TIMER_HANDSHAKES = REKEY_ATTEMPT_TIME // REKEY_TIMEOUT


# RFC 6479's replay window, sized as the kernel and wireguard-go size it: 128 blocks of 64
# bits. A sender encrypting on many cores reorders its packets by thousands, and the paper's
# REJECT_AFTER_MESSAGES keeps 2**13 counters free for this window below 2**64.
REPLAY_BLOCK_BITS = 64


REPLAY_BLOCKS = 128


# How far behind the newest counter one is still told apart: the newest's own block is
# partly ahead of it, so one block of the ring is not window (RFC 6479's redundant block).
REPLAY_WINDOW = (REPLAY_BLOCKS - 1) * REPLAY_BLOCK_BITS


class KeypairExhausted(Exception):
    """A keypair has sent REJECT_AFTER_MESSAGES messages: no counter is left for sending."""


class ReplayWindow:
    """The receive counters of one keypair already taken, as RFC 6479 keeps them: a ring of
    bit blocks behind the newest counter. Ask only about an authenticated message, or a
    forged counter would move the window."""

    def __init__(self):
        self.newest = 0
        self.blocks = [0] * REPLAY_BLOCKS

    def accept(self, counter):
        """True if counter is new, and it is taken; False for a replay, for a counter more
        than REPLAY_WINDOW behind the newest, and for one at REJECT_AFTER_MESSAGES or beyond."""
        if not 0 <= counter < REJECT_AFTER_MESSAGES:
            return False
        block, bit = divmod(counter, REPLAY_BLOCK_BITS)
        if counter > self.newest:
            self._clear_blocks_up_to(block)
            self.newest = counter
        elif self.newest - counter > REPLAY_WINDOW:
            return False
        slot, mask = block % REPLAY_BLOCKS, 1 << bit
        if self.blocks[slot] & mask:
            return False
        self.blocks[slot] |= mask
        return True

    def _clear_blocks_up_to(self, block):
        """Empty the blocks the window moves onto: they last held counters now too old."""
        newest_block = self.newest // REPLAY_BLOCK_BITS
        for passed in range(newest_block + 1, min(block, newest_block + REPLAY_BLOCKS) + 1):
            self.blocks[passed % REPLAY_BLOCKS] = 0


class Keypair:
    """One session with a peer (wireguard-go's keypair.go): the keys seal_transport and
    open_transport are given, the indices, the next counter to send with, and the window
    of counters received. The AEAD is the caller's."""

    def __init__(self, send_key, receive_key, local_index, remote_index, is_initiator, created):
        self.send_key = bytearray(send_key)  # bytearrays, so that erase() can overwrite them
        self.receive_key = bytearray(receive_key)
        self.local_index = local_index  # the receiver index the peer puts on what it sends us
        self.remote_index = remote_index  # the receiver index we put on what we send the peer
        self.is_initiator = is_initiator
        self.created = created  # a time of the injected clock
        # Super-packets in sealed chunks: whether the peer said, under this keypair, that
        # it takes them (CHUNKS_BEACON), and how many times we said it.
        self.peer_takes_chunks = False
        self.beacons_sent = 0
        self.send_counter = 0  # the counter the next message sent gets
        self.replay_window = ReplayWindow()
        # The AEADs of each direction, made once (transport_cipher) by whoever uses them.
        self.send_cipher = self.receive_cipher = None

    def next_counter(self):
        """The counter for the next message sent, refused with KeypairExhausted once
        REJECT_AFTER_MESSAGES are sent."""
        counter = self.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            raise KeypairExhausted("keypair %d has sent all its messages" % self.local_index)
        self.send_counter = counter + 1
        return counter

    @property
    def rekey_after_messages_reached(self):
        """REKEY_AFTER_MESSAGES are sent: time for a new session, whoever initiated this one."""
        return self.send_counter >= REKEY_AFTER_MESSAGES

    def expired(self, now):
        """REJECT_AFTER_TIME old: it may neither send nor receive."""
        return now >= self.created + REJECT_AFTER_TIME

    def may_send(self, now):
        return self.send_counter < REJECT_AFTER_MESSAGES and not self.expired(now)

    def erase(self):
        """Overwrite the keys and let go of the AEADs made with them: OpenSSL clears its
        copies as it frees them. (The bytes a KDF returned are Python's to free, not ours
        to clear.)"""
        self.send_key[:] = bytes(len(self.send_key))
        self.receive_key[:] = bytes(len(self.receive_key))
        self.send_cipher = self.receive_cipher = None


class Keypairs:
    """A peer's keypairs as wireguard-go keeps them: current; previous, the one it replaced,
    still taken for the packets already on their way; and next, a responder's new keypair,
    which becomes current only when the first message sent with it arrives: until then the
    responder cannot know the initiator has its keys. retire is told of each keypair let go
    (its keys erased), so that its index can leave the device's table."""

    def __init__(self, clock, retire=lambda keypair: None):
        self.clock = clock
        self.retire = retire
        self.previous = self.current = self.next = None

    def begin_session(self, send_key, receive_key, local_index, remote_index, is_initiator):
        """Put in place the keypair a completed handshake derived, created now: the
        initiator's is current at once (the response shows the peer has it), the
        responder's is next. Returns the new keypair."""
        keypair = Keypair(send_key, receive_key, local_index, remote_index, is_initiator,
                          self.clock())
        if is_initiator:
            if self.next is not None:  # the peer may be sending with our unconfirmed one: keep it
                gone = (self.previous, self.current)
                self.previous, self.next = self.next, None
            else:
                gone = (self.previous,)
                self.previous = self.current
            self.current = keypair
        else:
            gone = (self.next, self.previous)
            self.next, self.previous = keypair, None
        self._retire(*gone)
        return keypair

    def received_with(self, keypair):
        """An authenticated message came with keypair: True when that confirms the next
        keypair, which is then current (the responder's session begins)."""
        if keypair is None or keypair is not self.next:
            return False
        self._retire(self.previous)
        self.previous, self.current, self.next = self.current, keypair, None
        return True

    def lookup(self, local_index):
        """The keypair a transport message with this receiver index is opened with: None
        when the index is none of ours or its keypair is REJECT_AFTER_TIME old."""
        now = self.clock()
        for keypair in (self.current, self.previous, self.next):
            if keypair is not None and keypair.local_index == local_index:
                return None if keypair.expired(now) else keypair
        return None

    def current_for_sending(self):
        """The current keypair if it may still send; None when there is none, or it is
        REJECT_AFTER_TIME old, or its counters are spent: then the packet waits for a
        handshake (PeerTimers.on_packet_staged)."""
        keypair = self.current
        return keypair if keypair is not None and keypair.may_send(self.clock()) else None

    def clear(self):
        self._retire(self.previous, self.current, self.next)
        self.previous = self.current = self.next = None

    def _retire(self, *keypairs):
        for keypair in keypairs:
            if keypair is not None:
                keypair.erase()
                self.retire(keypair)


# --- WireGuard: timers --------------------------------------------------------


# What PeerTimers.due asks of the data path, in the order it must be done.
DROP_KEYS = "drop_keys"  # the keypairs are erased: erase the handshake state too


FLUSH_STAGED = "flush_staged"  # drop the packets waiting for a keypair: no handshake came


SEND_INITIATION = "send_initiation"  # a new initiation, new ephemeral; then on_initiation_sent


SEND_STAGED = "send_staged"  # the keypair just confirmed is current: send what waited for one


SEND_KEEPALIVE = "send_keepalive"  # a keepalive, unless packets are staged; then what is staged


TIMER_ACTIONS = (DROP_KEYS, FLUSH_STAGED, SEND_INITIATION, SEND_STAGED, SEND_KEEPALIVE)


class PeerTimers:
    """The timers of one peer (the paper's section 6, wireguard-go's timers.go) as
    decisions, for a loop without threads: the data path tells what happened through the
    on_* hooks, does what due(now) lists, and sleeps until next_wakeup(). Deadlines are
    times of the injected clock; the jitter comes from the injected randbelow."""

    def __init__(self, keypairs, clock, randbelow=random.randrange, persistent_keepalive=0):
        self.keypairs = keypairs
        self.clock = clock
        self.randbelow = randbelow
        # The five timers of timers.go: the deadline of each one pending, and its expiry.
        self.deadlines = {}
        self.expiries = {"retransmit_handshake": self._expired_retransmit_handshake,
                         "send_keepalive": self._expired_send_keepalive,
                         "new_handshake": self._expired_new_handshake,
                         "zero_key_material": self._expired_zero_key_material,
                         "persistent_keepalive": self._expired_persistent_keepalive}
        self.wanted = {}  # action -> when a hook or an expiry asked for it
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_lastminute_handshake = False
        self.last_sent_handshake = None  # our last initiation or response: initiations' pace
        self.trying_since = None  # when our first initiation still unanswered went out
        self.persistent_keepalive_interval = 0
        self.set_persistent_keepalive(persistent_keepalive)

    def set_persistent_keepalive(self, interval):
        """Send a keepalive whenever no authenticated packet crossed for interval seconds
        (0: never); turned on, one goes at once, as wireguard-go does when told or brought up."""
        if interval and not self.persistent_keepalive_interval:
            self._want(SEND_KEEPALIVE, self.clock())
        if not interval:
            self.deadlines.pop("persistent_keepalive", None)
        self.persistent_keepalive_interval = interval

    def due(self, now):
        """What to do now, in TIMER_ACTIONS order: the expired timers' and the hooks' wishes.
        Call when next_wakeup() has come, and after handling a batch of events."""
        while True:
            expired = [(deadline, name) for name, deadline in self.deadlines.items()
                       if deadline <= now]
            if not expired:
                break
            name = min(expired)[1]  # the earliest first: an expiry may stop another timer
            del self.deadlines[name]
            self.expiries[name](now)
        wanted, self.wanted = self.wanted, {}
        if SEND_INITIATION in wanted:
            if self._initiation_paced(now):
                del wanted[SEND_INITIATION]  # one is under way, and its retries go on
            else:
                self.last_sent_handshake = now
        return [action for action in TIMER_ACTIONS if action in wanted]

    def next_wakeup(self):
        """When due() next has something to do (a time of the clock, perhaps already
        past); None when nothing is pending."""
        return min([*self.deadlines.values(), *self.wanted.values()], default=None)

    # The hooks: what the data path tells, each where it meets it.

    def on_packet_staged(self):
        """A packet or keepalive waits, as Keypairs.current_for_sending() gave None: a
        handshake is wanted, and its retries count from zero again."""
        self._want_initiation(self.clock(), retry=False)

    def on_tunnel_up(self):
        """The tunnel was just made (added, or made again at start), its peer's endpoint
        known: a handshake at once, so that it carries both ways from the start, even
        towards a peer that still holds a session this side no longer has."""
        self._want_initiation(self.clock(), retry=False)

    def on_initiation_sent(self):
        """A handshake initiation went out, a first one or a retry."""
        now = self.clock()
        self.last_sent_handshake = now
        if self.trying_since is None:
            self.trying_since = now
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent()
        self._handshake_initiated(now)

    def on_initiation_received(self):
        """A valid initiation from the peer was consumed; the response goes out next."""
        now = self.clock()
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_received()

    def on_response_sent(self):
        """Our response went out, its keypair in place (Keypairs.begin_session as responder)."""
        now = self.clock()
        self.last_sent_handshake = now
        self._session_derived(now)
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent()

    def on_response_received(self):
        """A valid response to our initiation was consumed, its keypair in place
        (Keypairs.begin_session as initiator): the handshake is complete, and a keepalive
        (or what is staged) confirms the session to the responder."""
        now = self.clock()
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_received()
        self._session_derived(now)
        self._handshake_complete(now)
        self._want(SEND_KEEPALIVE, now)

    def on_data_sent(self):
        """Transport data messages went out: once per batch is enough."""
        now = self.clock()
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent()
        self._data_sent(now)
        self._keep_key_fresh_sending(now)

    def on_keepalive_sent(self):
        """A keepalive (a transport message without data) went out."""
        now = self.clock()
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent()
        self._keep_key_fresh_sending(now)

    def on_transport_received(self, keypair, data):
        """Transport messages were opened with keypair, their counters accepted; data of
        them carried a packet (the rest were keepalives), whatever became of it. True when
        this confirmed the responder's keypair: its handshake is complete."""
        now = self.clock()
        confirmed = self._transport_received(keypair, now)
        if data:
            self._data_received(now)
        return confirmed

    def on_data_received(self, keypair):
        """A transport data message was opened with keypair, its counter accepted."""
        return self.on_transport_received(keypair, 1)

    def on_keepalive_received(self, keypair):
        """A keepalive was opened with keypair, its counter accepted."""
        return self.on_transport_received(keypair, 0)

    # The paper's rules for a new handshake, and for a message received.

    def _keep_key_fresh_sending(self, now):
        """Sending: a new session after REKEY_AFTER_MESSAGES, or after REKEY_AFTER_TIME when
        we initiated this one (only the initiator rekeys on time: no thundering herd)."""
        keypair = self.keypairs.current
        if keypair is not None and (keypair.rekey_after_messages_reached or (
                keypair.is_initiator and now >= keypair.created + REKEY_AFTER_TIME)):
            self._want_initiation(now, retry=False)

    def _keep_key_fresh_receiving(self, now):
        """Receiving, once a session: an initiator that only receives renews it in time for
        a handshake (with one retry) to finish before REJECT_AFTER_TIME."""
        keypair = self.keypairs.current
        if self.sent_lastminute_handshake or keypair is None or not keypair.is_initiator:
            return
        if now >= keypair.created + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT:
            self.sent_lastminute_handshake = True
            self._want_initiation(now, retry=False)

    def _transport_received(self, keypair, now):
        confirmed = self.keypairs.received_with(keypair)
        if confirmed:
            self._handshake_complete(now)
            self._want(SEND_STAGED, now)
        self._keep_key_fresh_receiving(now)
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_received()
        return confirmed

    # timers.go's events, which the hooks above combine.

    def _data_sent(self, now):
        if "new_handshake" not in self.deadlines:
            self._mod("new_handshake", now, KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter())

    def _data_received(self, now):
        if "send_keepalive" not in self.deadlines:
            self._mod("send_keepalive", now, KEEPALIVE_TIMEOUT)
        else:
            self.need_another_keepalive = True

    def _any_authenticated_packet_sent(self):
        self.deadlines.pop("send_keepalive", None)

    def _any_authenticated_packet_received(self):
        self.deadlines.pop("new_handshake", None)

    def _any_authenticated_packet_traversal(self, now):
        if self.persistent_keepalive_interval:
            self._mod("persistent_keepalive", now, self.persistent_keepalive_interval)

    def _handshake_initiated(self, now):
        self._mod("retransmit_handshake", now, REKEY_TIMEOUT + self._jitter())

    def _handshake_complete(self, now):
        self.deadlines.pop("retransmit_handshake", None)
        self.handshake_attempts = 0
        self.sent_lastminute_handshake = False

    def _session_derived(self, now):
        self._mod("zero_key_material", now, REJECT_AFTER_TIME * 3)
        self.trying_since = None  # the peer answers: a handshake with it went through

    # What each timer does when it expires.

    def _expired_retransmit_handshake(self, now):
        if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
            # Given up: what waited is dropped, and any half-made session erased in time.
            self.deadlines.pop("send_keepalive", None)
            self._want(FLUSH_STAGED, now)
            if "zero_key_material" not in self.deadlines:
                self._mod("zero_key_material", now, REJECT_AFTER_TIME * 3)
        else:
            self.handshake_attempts += 1
            self._want_initiation(now, retry=True)

    def _expired_send_keepalive(self, now):
        self._want(SEND_KEEPALIVE, now)
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self._mod("send_keepalive", now, KEEPALIVE_TIMEOUT)

    def _expired_new_handshake(self, now):
        self._want_initiation(now, retry=False)

    def _expired_zero_key_material(self, now):
        self.keypairs.clear()
        self._want(DROP_KEYS, now)
        self._want(FLUSH_STAGED, now)

    def _expired_persistent_keepalive(self, now):
        self._want(SEND_KEEPALIVE, now)

    # Small parts.

    def _want_initiation(self, now, retry):
        if not retry:
            self.handshake_attempts = 0
        self._want(SEND_INITIATION, now)

    def _initiation_paced(self, now):
        """Less than REKEY_TIMEOUT since our last initiation or response: none is sent."""
        last = self.last_sent_handshake
        return last is not None and now < last + REKEY_TIMEOUT

    def _want(self, action, now):
        self.wanted.setdefault(action, now)

    def _mod(self, name, now, delay):
        self.deadlines[name] = now + delay

    def _jitter(self):
        return self.randbelow(REKEY_TIMEOUT_JITTER_MAX_MS) / 1000


# --- WireGuard: a peer, and its codec -----------------------------------------


# Packets that wait for a session (wireguard-go's MaxStagedPackets): more push out the
# oldest, counted as staged_overflow.
MAX_STAGED_PACKETS = 128


class WireGuardPeer:
    """The WireGuard side of one encrypted tunnel's peer (wireguard-go's Peer, but for where
    it is, which is the tunnel's endpoint): its keys, the handshake under way, the sessions,
    the timers, and the packets waiting for a session."""

    def __init__(self, spec, static_static, clock=time.monotonic):
        self.remote_public = spec.peer_key  # the peer's public key
        self.preshared_key = spec.preshared_key
        self.static_static = static_static  # DH of our static key and the peer's, made once
        self.last_initiation_consumed = float("-inf")  # when its last initiation was taken
        self.keypairs = Keypairs(clock)
        self.timers = PeerTimers(self.keypairs, clock,
                                 persistent_keepalive=spec.keepalive or 0)
        self.cookies = CookieGenerator(spec.peer_key)
        self.initiation = None  # the InitiationSent awaiting its response
        self.last_timestamp = b""  # of the newest initiation taken: older ones are replays
        self.latest_handshake = None  # when a handshake last completed here, in Unix time
        self.staged = collections.deque(maxlen=MAX_STAGED_PACKETS)
        self.wakeup = None  # when its timers are next looked at, unless touched before


# What an encrypted tunnel says to a peer of ours that it takes sealed chunks (above
# sealed_chunk_header), in the first rounds of each keypair.
CHUNKS_BEACON = bytes((0, PI_TAKES_CHUNKS, 0, 0)) + bytes(12)
BEACONS = 3


class WireGuardCodec:
    """WireGuard's transport messages (the paper's 5.4.6) for one tunnel: every packet the
    device gives sealed into one to the peer under the current keypair, every one that
    comes opened, its counter checked and its inner packet held to cryptokey routing. The
    peer's keys, handshake and timers are its WireGuardPeer's (wg_peer), the handshakes
    the daemon's WireGuard's. Knows nothing of TUN."""

    def __init__(self, tunnel, wg_peer, wireguard, batch, buffers):
        self.tunnel = tunnel
        self.wg_peer = wg_peer
        self.wireguard = wireguard  # the daemon's: endpoints, cryptokey routing, the timers' loop
        self.batch = batch  # several messages a send (a device with offloads), or one
        self.buffers = buffers
        self.mtu = tunnel.spec.mtu
        self.keypair = None  # the keypair this round of sends seals with
        self.staged_now = False  # whether this round staged a packet
        self.sent_super = False  # whether this round sent the messages of a super-packet
        self.sealed_len = self.sealed_stride = 0  # messages waiting in buffers.sealed
        # Whether this end takes super-packets in sealed chunks (a device with offloads),
        # and says so to the peer under each keypair.
        self.chunking = bool(batch) and tunnel.device.takes_chunks

    # Outbound: what the device hands over, sealed, to the wire.

    def encode_begin(self):
        self.keypair = keypair = self.wg_peer.keypairs.current_for_sending()
        if self.tunnel.endpoint is None:
            self.keypair = None  # nowhere to send: what comes waits, as for a session
        elif self.chunking and keypair is not None and keypair.beacons_sent < BEACONS:
            keypair.beacons_sent += 1
            try:
                counter = keypair.next_counter()
            except KeypairExhausted:
                self.keypair = None
            else:
                self.tunnel.send_one([seal_transport(keypair.send_cipher, keypair.remote_index,
                                                     counter, CHUNKS_BEACON)])
        self.staged_now = self.sent_super = False

    def encode_super_packet(self, packet, proto, l4_start, gso_size):
        """A super-packet cut into packets with full checksums, each sealed, all sent in
        one GSO send (the messages of a round are of one size but the last); to a peer of
        ours that takes them, cut into chunks, each sealed."""
        keypair = self.keypair
        if (keypair is not None and keypair.peer_takes_chunks and proto == TCP
                and transport_start(packet) == (l4_start, TCP)):
            header = sealed_chunk_header(packet, l4_start, gso_size)
            count = -(-(len(packet) - len(header)) // gso_size) if header else 0
            if header is not None and keypair.send_counter + count < REJECT_AFTER_MESSAGES:
                self._send_sealed()
                self._seal_chunks(packet, l4_start, gso_size, header, keypair)
                return
        buffers, done = self.buffers, 0
        while done is not None:  # several rounds only for small segments: IPv4 MTU < 502
            stride, total, done = split_gso(packet, proto, l4_start, gso_size, buffers.out, done)
            keypair = self.keypair
            if keypair is None:
                for start in range(0, total, stride):
                    self._stage(buffers.out_view[start:min(start + stride, total)])
                continue
            self._send_sealed()
            # _seal's work, inlined for a round of segments (a call less each segment):
            # keep the two alike.
            cipher, receiver, mtu = keypair.send_cipher, keypair.remote_index, self.mtu
            sealed, padded, out = buffers.sealed_view, buffers.padded_view, buffers.out_view
            at = message_stride = 0
            for start in range(0, total, stride):
                segment = out[start:min(start + stride, total)]
                try:
                    counter = keypair.next_counter()
                except KeypairExhausted:
                    self.keypair = None
                    self._stage(segment)
                    continue
                size = transport_size(len(segment), mtu)
                if size != len(segment):  # zeros after it, in a copy: its neighbour follows it
                    padded[:len(segment)] = segment
                    padded[len(segment):size] = bytes(size - len(segment))
                    segment = padded[:size]
                at += seal_transport_into(cipher, receiver, counter, segment, sealed, at)
                message_stride = message_stride or at
            if at:
                self.sent_super = True
                self.tunnel.send(sealed[:at], message_stride)

    def _seal_chunks(self, packet, l4, gso_size, header, keypair):
        """The chunks of a super-packet (sealed_chunk_header), each sealed, sent in GSO
        sends: no header rewritten or payload summed a chunk. The caller has made sure the
        keypair has a counter for each. seal_transport_into's work inlined for the chunks
        of full size, which pad alike: keep the two alike."""
        cipher, receiver, mtu = keypair.send_cipher, keypair.remote_index, self.mtu
        sealed, padded = self.buffers.sealed_view, self.buffers.padded_view
        header_len, payload_len = len(header), len(packet) - len(header)
        padded[:header_len] = header
        full = header_len + gso_size
        full_padded = transport_size(full, mtu)
        padded[full:full_padded] = bytes(full_padded - full)
        plaintext = padded[:full_padded]
        stride = TRANSPORT_HEADER_SIZE + full_padded + TAG_LEN
        # Whole messages as the buffer holds, the last chunk's too: else sent in rounds.
        per_send = max(1, (len(sealed) - stride) // stride)
        encrypt_into = getattr(cipher, "encrypt_into", None)
        pack_header, pack_nonce = TRANSPORT_HEADER.pack_into, AEAD_NONCE.pack
        counter, at = keypair.send_counter, 0
        whole = payload_len - payload_len % gso_size if payload_len % gso_size else payload_len
        for offset in range(0, whole, gso_size):
            OFFSET_FIELD.pack_into(padded, l4 + 18, offset)
            padded[header_len:full] = packet[header_len + offset:full + offset]
            if encrypt_into is not None:
                pack_header(sealed, at, MESSAGE_TRANSPORT, receiver, counter)
                encrypt_into(pack_nonce(counter), plaintext, None,
                             sealed[at + TRANSPORT_HEADER_SIZE:at + stride])
            else:
                seal_transport_into(cipher, receiver, counter, plaintext, sealed, at)
            counter += 1
            at += stride
            if at >= per_send * stride:
                self.tunnel.send(sealed[:at], stride)
                at = 0
        if whole < payload_len:  # the last chunk, shorter
            size = payload_len - whole
            OFFSET_FIELD.pack_into(padded, l4 + 18, whole)
            padded[header_len:header_len + size] = packet[header_len + whole:]
            length = header_len + size
            padded_len = transport_size(length, mtu)
            padded[length:padded_len] = bytes(padded_len - length)
            at += seal_transport_into(cipher, receiver, counter, padded[:padded_len], sealed, at)
            counter += 1
        keypair.send_counter = counter
        if at:
            self.tunnel.send(sealed[:at], stride)
        self.sent_super = True

    def encode_packet(self, packet, partial_sum):
        """A packet alone (partial_sum: where its checksum is left partial, if it is, to be
        finished: a WireGuard peer wants whole ones), sealed."""
        if partial_sum is not None:
            complete_checksum(packet, *partial_sum)
        self._seal(packet)

    def _seal(self, packet):
        """Seal one packet into a message after those waiting, padded to a multiple of 16
        but not past the MTU; equal packets make equal messages, so a run goes out in one
        GSO send. Without a keypair that may send, the packet waits for a handshake.
        Inlined in encode_super_packet: keep the two alike."""
        keypair = self.keypair
        if keypair is None:
            self._stage(packet)
            return
        try:
            counter = keypair.next_counter()
        except KeypairExhausted:
            self.keypair = None
            self._stage(packet)
            return
        size = transport_size(len(packet), self.mtu)
        length = TRANSPORT_HEADER_SIZE + size + TAG_LEN
        if self.sealed_len and (length != self.sealed_stride or not self.batch
                                or self.sealed_len + length > GSO_MAX_BYTES
                                or self.sealed_len // self.sealed_stride >= GSO_MAX_SEGMENTS):
            self._send_sealed()
        if size != len(packet):  # zeros after it, in a copy: its neighbour follows it
            padded = self.buffers.padded_view
            padded[:len(packet)] = packet
            padded[len(packet):size] = bytes(size - len(packet))
            packet = padded[:size]
        if not self.sealed_len:
            self.sealed_stride = length
        self.sealed_len += seal_transport_into(keypair.send_cipher, keypair.remote_index,
                                               counter, packet, self.buffers.sealed_view,
                                               self.sealed_len)

    def encode_end(self):
        try:
            sent = self._send_sealed()
        finally:
            self.sealed_len = 0  # the buffer is every tunnel's: nothing sealed outlives a read
        if sent or self.sent_super:
            self.wg_peer.timers.on_data_sent()
        if self.staged_now:
            self.wg_peer.timers.on_packet_staged()
        self.wireguard.touch(self.tunnel)

    def _send_sealed(self):
        length, self.sealed_len = self.sealed_len, 0
        if length:
            self.tunnel.send(self.buffers.sealed_view[:length], self.sealed_stride)
        return length

    def _stage(self, packet):
        """Keep a packet until a session can carry it; past MAX_STAGED_PACKETS the oldest
        is pushed out, as wireguard-go drops it, and counted."""
        staged = self.wg_peer.staged
        if len(staged) == MAX_STAGED_PACKETS:
            self.tunnel.counters.drops["staged_overflow"] += 1
        staged.append(bytes(packet))
        self.staged_now = True

    def send_staged(self):
        """What waited for a session, sealed and sent now that one may send (the timers'
        SEND_STAGED, or a keepalive's turn)."""
        staged, self.wg_peer.staged = self.wg_peer.staged, collections.deque(
            maxlen=MAX_STAGED_PACKETS)
        self.encode_begin()
        try:
            for packet in staged:
                self._seal(packet)
        finally:
            self.encode_end()

    def send_keepalive(self):
        keypair, wg_peer = self.wg_peer.keypairs.current_for_sending(), self.wg_peer
        if keypair is None or self.tunnel.endpoint is None:
            wg_peer.timers.on_packet_staged()  # a keepalive wants a session too
            return
        message = seal_transport(keypair.send_cipher, keypair.remote_index,
                                 keypair.next_counter(), b"")
        self.tunnel.send_one([message])
        wg_peer.timers.on_keepalive_sent()

    # Inbound: transport messages from the peer, opened, into the device.

    def decode(self, messages, stride, source):
        """Open the transport messages laid end to end stride apart, all to one receiver
        index, and write what they carry into the tunnel's device; source is where they
        came from. What is authenticated tells the timers, whatever becomes of the packet
        it carries. False when the index is no keypair of the peer's (any more)."""
        keypair = self.wg_peer.keypairs.lookup(int.from_bytes(messages[4:8], "little"))
        if keypair is None:
            return False
        tunnel = self.tunnel
        device, drops, owner = tunnel.device, tunnel.counters.drops, self.wireguard.routing.owner
        authenticated = data = 0
        opened = self.buffers.opened_view  # each packet where its message was: a run's own
        run = None  # chunks of a super-packet being gathered (SealedRun)
        try:
            for start in range(0, len(messages), stride):
                message = messages[start:start + stride]
                try:
                    counter, packet = open_transport_into(keypair.receive_cipher, message,
                                                          opened[start:start + stride])
                    if not keypair.replay_window.accept(counter):
                        drops["replayed"] += 1
                        continue
                    authenticated += 1
                    if not packet:
                        continue  # a keepalive
                    data += 1
                    if packet[0] < 0x20:  # IP version 0 or 1: a chunk, or the beacon
                        run = self._take_chunk(keypair, packet, len(message), run)
                        continue
                    if run is not None:
                        run = run.write(device)
                    length = ip_length(packet)
                    if length is None:
                        drops["malformed"] += 1
                    elif owner(packet) is not tunnel:  # cryptokey routing
                        drops["not_allowed_source"] += 1
                    else:
                        device.write(packet[:length], len(message), SUMS_VERIFIED)
                except WireGuardRefused:
                    drops["not_authentic"] += 1
                except Exception:
                    _count_bug(tunnel.counters, tunnel.name)
            if run is not None:
                run.write(device)
        finally:
            device.flush()
        if authenticated:
            self._authenticated(keypair, data, source)
        return True

    def _take_chunk(self, keypair, plaintext, size, run):
        """An opened chunk (size bytes on the wire) added to run, or starting a run of its
        own, the run before written; the beacon marks keypair. Returns the run now."""
        if run is not None and run.continues(plaintext, size):
            return run
        if len(plaintext) == len(CHUNKS_BEACON) and plaintext == CHUNKS_BEACON:
            keypair.peer_takes_chunks = True
            return run
        drops = self.tunnel.counters.drops
        if not self.chunking:
            drops["unwanted_chunk"] += 1
            return run
        layout = sealed_chunk_layout(plaintext)
        if layout is None:
            drops["bad_chunk"] += 1
            return run
        if run is not None:
            run.write(self.tunnel.device)
        run = SealedRun(plaintext, layout, size)
        if self.wireguard.routing.owner(run.header) is not self.tunnel:  # cryptokey routing
            drops["not_allowed_source"] += 1
            return None
        return run

    def _authenticated(self, keypair, data, source):
        """Messages came authenticated with keypair, data of them with a packet, from source:
        the peer is there now (roaming), and the timers are told."""
        wireguard, wg_peer = self.wireguard, self.wg_peer
        if source != self.tunnel.endpoint:
            wireguard.set_endpoint(self.tunnel, source)
        if wg_peer.timers.on_transport_received(keypair, data):
            # The responder's session is confirmed: a handshake of ours crossing it is moot.
            wg_peer.latest_handshake = time.time()
            wireguard.drop_initiation(wg_peer)
        wireguard.touch(self.tunnel)

    def describe(self):
        """What list adds for an encrypted tunnel: where the peer last sent from, and when
        its latest handshake completed; a preshared key given inline is hidden."""
        endpoint = self.tunnel.endpoint
        if endpoint is not None:
            address = plain_address(endpoint[0])
            endpoint = ("[%s]:%d" if address.version == 6 else "%s:%d") % (address, endpoint[1])
        keypair = self.wg_peer.keypairs.current
        chunks = keypair is not None and keypair.peer_takes_chunks
        described = {"latestHandshake": self.wg_peer.latest_handshake, "endpoint": endpoint,
                     "superPackets": "chunks" if chunks else "segments",
                     "state": self.state()}
        spec = self.tunnel.spec
        if spec.preshared_key is not None and spec.preshared_key_file is None:
            described["presharedKey"] = "(hidden)"
        return described

    def state(self):
        """down: our handshake has had no answer for CONNECTING_TIME (and the timers may
        have given up); up: a session is valid; connecting: a handshake is under way;
        idle: no session, and nothing wanted one."""
        timers, now = self.wg_peer.timers, self.wg_peer.timers.clock()
        if timers.trying_since is not None and now - timers.trying_since >= CONNECTING_TIME:
            return "down"
        keypair = self.wg_peer.keypairs.current
        if keypair is not None and not keypair.expired(now):
            return "up"
        return "idle" if timers.trying_since is None else "connecting"


class SealedRun:
    """Opened chunks of one super-packet, contiguous, being gathered for one write: their
    headers as the super-packet's (the IP version given back, the urgent pointer zero),
    and views of their payloads."""

    def __init__(self, plaintext, layout, size):
        version, self.l4, header_len, self.gso_size, self.first, length, self.total = layout
        l4, self.header_len = self.l4, header_len
        self.head, self.tail = bytes(plaintext[:l4 + 18]), bytes(plaintext[l4 + 20:header_len])
        header = bytearray(plaintext[:header_len])
        header[0] = version << 4 | header[0] & 0x0F
        header[l4 + 18:l4 + 20] = b"\0\0"
        self.header = header
        self.parts = [plaintext[header_len:header_len + length]]
        self.expected = self.first + length
        self.wire = size

    def continues(self, plaintext, size):
        """Add the chunk if it is the next of this run's super-packet: its headers this
        run's (so its layout is), but for the offset, which is the next."""
        l4, header_len, expected = self.l4, self.header_len, self.expected
        if (len(plaintext) <= header_len
                or plaintext[l4 + 18] << 8 | plaintext[l4 + 19] != expected
                or plaintext[:l4 + 18] != self.head or plaintext[l4 + 20:header_len] != self.tail):
            return False
        length = min(self.gso_size, self.total - expected)
        if length <= 0 or len(plaintext) < header_len + length:
            return False
        self.parts.append(plaintext[header_len:header_len + length])
        self.expected = expected + length
        self.wire += size
        return True

    def write(self, device):
        """Into device, as one packet; returns None, the run done."""
        device.write_chunks(bytes(self.header), self.l4, self.gso_size, self.first, self.parts,
                            self.wire, self.expected == self.total)
        return None


class CryptokeyRouting:
    """wireguard-go's allowed IPs, for every encrypted tunnel at once: an inner source
    address belongs to the tunnel of the longest prefix that holds it, and a tunnel takes
    packets only from its own. A tunnel's prefixes are its subnet and its routes; those no
    peer sends from belong to none: the tunnel's own address, and its subnet's network
    address (and an IPv4 subnet's broadcast one). Looked up with a dict a prefix length,
    longest first, not with ipaddress."""

    def __init__(self):
        self.tables = {4: {}, 6: {}}  # version -> prefix length -> {prefix as int: holder}
        self.lengths = {4: [], 6: []}  # version -> [(length, shift, table)], longest first
        self.held = {}  # tunnel -> [(version, length, prefix)] it put in

    def add(self, tunnel):
        spec, refused = tunnel.spec, _NoPeer(tunnel)
        subnet = spec.interface.network
        networks = [(network, tunnel) for network in (subnet,) + spec.routes]
        nobody = {spec.interface.ip}
        if subnet.prefixlen <= subnet.max_prefixlen - 2:  # a /31 or /127 has two hosts, no more
            nobody.add(subnet.network_address)
            if subnet.version == 4:
                nobody.add(subnet.broadcast_address)
        networks += [(ipaddress.ip_network(address), refused) for address in nobody]
        held = self.held.setdefault(tunnel, [])
        for network, holder in networks:
            key = (network.version, network.prefixlen,
                   int(network.network_address) >> (network.max_prefixlen - network.prefixlen))
            self.tables[key[0]].setdefault(key[1], {})[key[2]] = holder
            held.append(key)
        self._reindex()

    def remove(self, tunnel):
        for version, length, prefix in self.held.pop(tunnel, ()):
            table = self.tables[version].get(length, {})
            holder = table.get(prefix)
            if holder is tunnel or (isinstance(holder, _NoPeer) and holder.tunnel is tunnel):
                del table[prefix]
                if not table:
                    del self.tables[version][length]
        self._reindex()

    def _reindex(self):
        for version, bits in ((4, 32), (6, 128)):
            self.lengths[version] = [(length, bits - length, table) for length, table in
                                     sorted(self.tables[version].items(), reverse=True)]

    def owner(self, packet):
        """The tunnel an inner packet's source address belongs to, or None."""
        version = packet[0] >> 4 if packet else None
        if version == 4 and len(packet) >= 20:
            source = int.from_bytes(packet[12:16], "big")
        elif version == 6 and len(packet) >= 40:
            source = int.from_bytes(packet[8:24], "big")
        else:
            return None
        for _, shift, table in self.lengths[version]:
            holder = table.get(source >> shift)
            if holder is not None:
                return None if isinstance(holder, _NoPeer) else holder
        return None


class _NoPeer:
    """What holds a tunnel's addresses that no peer sends from (CryptokeyRouting)."""

    def __init__(self, tunnel):
        self.tunnel = tunnel


# --- WireGuard: the daemon's handshakes, and every peer's timers --------------


# Handshake messages with a valid mac1 a second past which the daemon is under load: it
# asks for mac2 (a cookie) first and limits each source, as wireguard-go does about this
# rate; and stays so this long after (wireguard-go's UnderLoadAfterTime).
HANDSHAKES_UNDER_LOAD = 50


UNDER_LOAD_AFTER_TIME = 1


# Under load, the handshakes a source may have worked on (the DHs) a second, and at once,
# after its mac2 (wireguard-go's ratelimiter); an IPv6 source is its /64, since a host has
# one at least. The sources remembered are bounded: past the bound, the one seen least
# recently is forgotten (and would start again with a full bucket).
HANDSHAKES_PER_SOURCE, HANDSHAKE_BURST = 20, 5


MAX_HANDSHAKE_SOURCES = 4096


IPV6_SOURCE_BYTES = 8


# A peer's initiations are taken at most one in this many seconds (wireguard-go's
# HandshakeInitationRate): anyone holding its key gets no more responses out of us.
HANDSHAKE_INITIATION_RATE = 1 / 50


# The share of the loop's time handshake work (its DHs) may take, and how much of it may
# be spent at once: the rest is the data path's, whatever floods the data port. A source
# that is a tunnel's endpoint is served even past it (it passed mac2 under load), so a
# legitimate peer's handshake goes through a flood from elsewhere.
HANDSHAKE_SHARE, HANDSHAKE_SHARE_BURST = 0.1, 0.02


def _handshake_source(ip):
    """Who a source address is for the handshake limits: an IPv4 address (as the dual-stack
    data socket gives it), or an IPv6 address's /64."""
    if ip.startswith("::ffff:") or ":" not in ip:
        return ip
    try:
        return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])[:IPV6_SOURCE_BYTES]
    except OSError:
        return ip


class HandshakeLimits:
    """What handshakes may cost the daemon: whether it is under load (then mac2 is asked
    for), a token bucket per source past mac2, and the share of the loop's time their
    DHs may take. Every refusal is cheap: no DH is done for what is refused."""

    def __init__(self, clock):
        self.clock = clock
        self.window_start, self.in_window = float("-inf"), 0
        self.loaded_until = float("-inf")
        self.sources = collections.OrderedDict()  # _handshake_source -> (tokens, when), oldest first
        self.share = HANDSHAKE_SHARE_BURST  # seconds of handshake work that may be spent now
        self.share_counted = clock()

    def under_load(self, now):
        """Count one handshake message with a valid mac1; whether the daemon is under load."""
        if now - self.window_start >= 1:
            self.window_start, self.in_window = now, 0
        self.in_window += 1
        if self.in_window > HANDSHAKES_UNDER_LOAD:
            self.loaded_until = now + UNDER_LOAD_AFTER_TIME
        return now < self.loaded_until

    def source_allows(self, ip, now):
        """Take one handshake from the source's bucket; False when it has none left. O(1):
        a new source past the bound pushes out the one seen least recently."""
        source = _handshake_source(ip)
        sources = self.sources
        if source in sources:
            tokens, then = sources.pop(source)
            tokens = min(HANDSHAKE_BURST, tokens + (now - then) * HANDSHAKES_PER_SOURCE)
        else:
            tokens = HANDSHAKE_BURST
            if len(sources) >= MAX_HANDSHAKE_SOURCES:
                sources.popitem(last=False)
        allowed = tokens >= 1
        sources[source] = (tokens - allowed, now)  # the most recent last
        return allowed

    def share_left(self, now):
        """Whether handshake work may be done now without taking the data path's share."""
        self.share = min(HANDSHAKE_SHARE_BURST,
                         self.share + (now - self.share_counted) * HANDSHAKE_SHARE)
        self.share_counted = now
        return self.share > 0

    def spent(self, seconds):
        self.share -= seconds


class WireGuard:
    """The daemon's WireGuard: its key, its encrypted tunnels by the peer's key and by our
    session indexes, the handshakes on the data port, and the timers of every peer."""

    def __init__(self, private_key, sock, drops, clock=time.monotonic, cost_clock=time.perf_counter):
        need_cryptography()
        self.private_key = private_key_object(private_key)  # loaded once: it is in every DH
        self.local_public = public_key(self.private_key)
        self.sock = sock
        self.clock = clock
        # The last initiation's timestamp: the next is the wall time, or later if that was
        # set back, as a peer takes only a newer one.
        self.last_timestamp_ns = 0
        self.cost_clock = cost_clock  # what handshake work is timed with
        self.checker = CookieChecker(self.local_public)
        self.limits = HandshakeLimits(clock)
        self.by_key = {}  # the peer's public key -> tunnel
        self.by_index = {}  # our index -> tunnel (its handshake under way, or a keypair)
        self.endpoints = collections.Counter()  # the tunnels' endpoint addresses, served first
        self.routing = CryptokeyRouting()
        self.drops = drops  # the daemon's: messages no tunnel took, by reason
        self.quiet = QuietLog("errors in the WireGuard timers")
        # The timers: tunnels the data path told something since the last look, and the
        # others' next wakeups, earliest first (an entry later than its tunnel's is stale).
        self.touched = set()
        self.wakeups = []  # heap of (when, order, tunnel)
        self.order = itertools.count()

    def _new_index(self, tunnel):
        while True:
            index = int.from_bytes(os.urandom(4), "little")
            if index not in self.by_index:
                self.by_index[index] = tunnel
                return index

    def _forget_index(self, index):
        self.by_index.pop(index, None)

    def peer_for(self, spec):
        """The WireGuardPeer of a new encrypted tunnel, or ControlError when its key cannot
        be one: in use, ours, or of small order (no DH can be made with it)."""
        other = self.by_key.get(spec.peer_key)
        if other is not None:
            raise ControlError("publicKey already in use by tunnel %r" % other.name)
        if spec.peer_key == self.local_public:
            raise ControlError("publicKey is this daemon's own")
        try:
            static_static = DH(self.private_key, spec.peer_key)
        except WireGuardRefused as e:
            raise ControlError("invalid publicKey: %s" % e) from None
        return WireGuardPeer(spec, static_static, self.clock)

    def set_key(self, private_key):
        """This host's new key (SIGHUP, the key file changed): every peer's static-static made
        again and handshakes under way dropped (made with the old key; the timers try again).
        Sessions go on until their peers, given the new public key, shake hands anew."""
        self.private_key = private_key_object(private_key)
        self.local_public = public_key(self.private_key)
        self.checker = CookieChecker(self.local_public)
        for tunnel in self.by_key.values():
            tunnel.wg_peer.static_static = DH(self.private_key, tunnel.wg_peer.remote_public)
            self.drop_initiation(tunnel.wg_peer)
            self.touch(tunnel)

    def add(self, tunnel):
        tunnel.wg_peer.keypairs.retire = lambda keypair: self._forget_index(keypair.local_index)
        self.by_key[tunnel.spec.peer_key] = tunnel
        self.routing.add(tunnel)
        if tunnel.endpoint is not None:
            self.endpoints[tunnel.endpoint[0]] += 1
            tunnel.wg_peer.timers.on_tunnel_up()
        self.touch(tunnel)

    def remove(self, tunnel):
        self.by_key.pop(tunnel.spec.peer_key, None)
        self.routing.remove(tunnel)
        self.set_endpoint(tunnel, None)
        for index in [i for i, t in self.by_index.items() if t is tunnel]:
            del self.by_index[index]
        wg = tunnel.wg_peer
        wg.keypairs.clear()
        self.drop_initiation(wg)
        wg.static_static = wg.preshared_key = None  # what is left of its keys: let go of
        wg.wakeup = None  # its entries in the heap are stale now
        self.touched.discard(tunnel)

    def set_endpoint(self, tunnel, endpoint):
        """Where the tunnel's peer is now (None: nowhere known)."""
        for address, change in ((tunnel.endpoint, -1), (endpoint, 1)):
            if address is not None:
                self.endpoints[address[0]] += change
                if not self.endpoints[address[0]]:
                    del self.endpoints[address[0]]
        tunnel.endpoint = endpoint

    def touch(self, tunnel):
        """The data path told the tunnel's timers something: they get a look after this round."""
        self.touched.add(tunnel)

    # Messages from the data port.

    def receive(self, datagrams, stride, source):
        """Datagrams laid end to end stride apart, from source, all of one kind (one_kind
        or train_runs made them so): transport messages to one index, or handshake ones."""
        kind = datagrams[0]
        if kind == MESSAGE_TRANSPORT:
            tunnel = self.by_index.get(int.from_bytes(datagrams[4:8], "little"))
            if tunnel is None or not tunnel.codec.decode(datagrams, stride, source):
                self.drops["unknown_index"] += -(-len(datagrams) // stride)
            return
        for start in range(0, len(datagrams), stride):
            message = bytes(datagrams[start:start + stride])
            try:
                self.handshake_message(message, source)
            except WireGuardRefused as e:
                self.drops["refused_handshake"] += 1
                log.debug("WireGuard message from %s refused: %s", source[0], e)
            except Exception:
                self.drops["internal_error"] += 1
                DATA_PATH_BUGS.log(logging.ERROR, "internal error on a handshake message from"
                                   " %s", source[0], exc_info=True)

    def handshake_message(self, message, source):
        """One handshake message: refused as cheaply as can be (its size, mac1, under load
        mac2 and its source's bucket, the loop's share), and only then worked on."""
        kind, now = message_type(message), self.clock()
        if kind is None:
            self.drops["not_wireguard"] += 1
        elif kind == MESSAGE_COOKIE_REPLY:
            tunnel = self.by_index.get(receiver_index(message))
            if tunnel is None:
                raise WireGuardRefused("a cookie reply to no handshake of ours")
            tunnel.wg_peer.cookies.consume_reply(message, now)
        elif not self.checker.check_mac1(message):
            self.drops["bad_mac1"] += 1
        elif self.limits.under_load(now) and not self.checker.check_mac2(message, *source, now):
            self.drops["cookie_sent"] += 1
            self.send(self.checker.create_reply(message, *source, now), source)
        elif not self.limits.share_left(now) and source[0] not in self.endpoints:
            self.drops["handshake_share_spent"] += 1
        elif now < self.limits.loaded_until and not self.limits.source_allows(source[0], now):
            self.drops["handshake_rate_limited"] += 1
        else:
            started = self.cost_clock()
            try:
                if kind == MESSAGE_INITIATION:
                    self._take_initiation(message, source, now)
                else:
                    self._take_response(message, source)
            finally:
                self.limits.spent(self.cost_clock() - started)

    def _take_initiation(self, message, source, now):
        opened = open_initiation(self.private_key, message, self.local_public)
        tunnel = self.by_key.get(opened.remote_public)
        if tunnel is None:  # one DH spent, the least a responder can
            self.drops["unknown_peer"] += 1
            return
        wg = tunnel.wg_peer
        received = finish_initiation(opened, wg.static_static)
        if received.timestamp <= wg.last_timestamp:
            tunnel.counters.drops["replayed_initiation"] += 1
            return
        if now - wg.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
            tunnel.counters.drops["initiation_flood"] += 1
            return
        wg.last_timestamp, wg.last_initiation_consumed = received.timestamp, now
        wg.timers.on_initiation_received()
        keys, response = create_response(received, self._new_index(tunnel), wg.preshared_key)
        self.set_endpoint(tunnel, source)
        self.send(wg.cookies.add_macs(response, self.clock()), source, tunnel)
        self.begin_session(tunnel, keys)
        wg.timers.on_response_sent()
        self.touch(tunnel)

    def _take_response(self, message, source):
        tunnel = self.by_index.get(receiver_index(message))
        wg = tunnel.wg_peer if tunnel else None
        if wg is None or wg.initiation is None or \
                wg.initiation.local_index != receiver_index(message):
            self.drops["unknown_index"] += 1
            return
        keys = consume_response(wg.initiation, message, wg.preshared_key)
        self.drop_initiation(wg, keep_index=True)  # its index is the new keypair's now
        self.set_endpoint(tunnel, source)
        self.begin_session(tunnel, keys)
        wg.timers.on_response_received()
        self.touch(tunnel)

    def drop_initiation(self, wg, keep_index=False):
        """Let go of the handshake under way: its keys erased, its index free (unless a
        keypair took it)."""
        if wg.initiation is not None:
            if not keep_index:
                self._forget_index(wg.initiation.local_index)
            wg.initiation.erase()
            wg.initiation = None

    def begin_session(self, tunnel, keys):
        keypair = tunnel.wg_peer.keypairs.begin_session(keys.send_key, keys.receive_key,
                                                   keys.local_index, keys.remote_index,
                                                   keys.is_initiator)
        keypair.send_cipher = transport_cipher(keypair.send_key)
        keypair.receive_cipher = transport_cipher(keypair.receive_key)
        self.by_index[keys.local_index] = tunnel
        if keys.is_initiator:  # the responder's is complete once a message comes with it
            tunnel.wg_peer.latest_handshake = time.time()
        log.debug("tunnel %s: session %08x begun, as %s", tunnel.name, keys.local_index,
                  "initiator" if keys.is_initiator else "responder")

    def send(self, message, address, tunnel=None):
        """A handshake message or cookie reply out; a failure (no route, a firewall) is
        counted, as a data packet's, and the handshake goes on by its timers."""
        try:
            self.sock.sendto(message, address)
        except OSError as e:
            if tunnel is None:
                self.drops["send_error"] += 1
            else:
                tunnel.count_send_failed(e, 1)

    # The timers of every peer.

    def poll_timeout(self):
        """How long the loop may sleep before the timers want a look: not at all when the
        data path told them something, until the earliest wakeup else, -1 (for ever) when
        none is pending."""
        if self.touched:
            return 0
        while self.wakeups:
            when, _, tunnel = self.wakeups[0]
            if tunnel.wg_peer.wakeup == when and self.by_key.get(tunnel.spec.peer_key) is tunnel:
                return max(0.0, when - self.clock())
            heapq.heappop(self.wakeups)  # stale: moved later, or the tunnel gone
        return -1

    def tick(self):
        """After each round of the loop: the timers of the tunnels touched, and of those
        whose wakeup has come."""
        now = self.clock()
        due, self.touched = self.touched, set()
        while self.wakeups and self.wakeups[0][0] <= now:
            when, _, tunnel = heapq.heappop(self.wakeups)
            if tunnel.wg_peer.wakeup == when:
                tunnel.wg_peer.wakeup = None
                due.add(tunnel)
        for tunnel in due:
            if self.by_key.get(tunnel.spec.peer_key) is tunnel:
                self._run_timers_of(tunnel, now)

    def run_timers(self, now=None):
        """Every tunnel's timers, now."""
        now = self.clock() if now is None else now
        self.touched.clear()
        for tunnel in list(self.by_key.values()):
            self._run_timers_of(tunnel, now)

    def _run_timers_of(self, tunnel, now):
        """Do what the tunnel's timers want now, and wake again when they next want
        something; a bug in one tunnel's costs that tunnel's turn, not the others'."""
        wg = tunnel.wg_peer
        try:
            for action in wg.timers.due(now):
                self._act(tunnel, action)
        except Exception:
            tunnel.counters.drops["internal_error"] += 1
            self.quiet.log(logging.ERROR, "tunnel %s: error in its WireGuard timers",
                           tunnel.name, exc_info=True)
        wakeup = wg.timers.next_wakeup()
        if wakeup is not None and (wg.wakeup is None or wakeup < wg.wakeup):
            wg.wakeup = wakeup
            heapq.heappush(self.wakeups, (wakeup, next(self.order), tunnel))

    def timestamp(self):
        """TAI64N of now, for an initiation: newer than the last one, whatever the wall
        clock did meanwhile (TAI64N tells times TAI64N_WHITENER apart)."""
        self.last_timestamp_ns = max(time.time_ns(), self.last_timestamp_ns + TAI64N_WHITENER)
        return tai64n(self.last_timestamp_ns)

    def _act(self, tunnel, action):
        wg = tunnel.wg_peer
        if action == SEND_INITIATION:
            if tunnel.endpoint is None:
                return  # waiting for the peer: it knows where we are
            self.drop_initiation(wg)
            index = self._new_index(tunnel)
            try:
                wg.initiation, message = create_initiation(
                    self.private_key, wg.remote_public, index, self.timestamp(),
                    static_static=wg.static_static)
            except BaseException:
                self._forget_index(index)
                raise
            self.send(wg.cookies.add_macs(message, self.clock()), tunnel.endpoint, tunnel)
            wg.timers.on_initiation_sent()
        elif action == SEND_KEEPALIVE:
            if wg.staged:
                tunnel.codec.send_staged()
            else:
                tunnel.codec.send_keepalive()
        elif action == SEND_STAGED:
            tunnel.codec.send_staged()
        elif action == FLUSH_STAGED:
            tunnel.counters.drops["no_session"] += len(wg.staged)
            wg.staged.clear()
        elif action == DROP_KEYS:
            self.drop_initiation(wg)


# --- The tunnel: a device and a codec, composed -------------------------------


class Counters:
    """What crossed one tunnel, counted where it crosses: packets and bytes each way (as
    they were on the wire), when the last came and went (Unix time, for people), and what
    was dropped, by reason."""

    __slots__ = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "last_rx", "last_tx",
                 "drops")

    def __init__(self):
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.last_rx = self.last_tx = None
        self.drops = collections.Counter()

    def describe(self):
        return {"rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
                "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
                "drops": dict(self.drops), "last_rx": self.last_rx, "last_tx": self.last_tx}


class Tunnel:
    """One tunnel: what was asked for (spec), where its peer is (endpoint), its device and
    its codec, composed, and the counts of what crossed. The loop calls forward_from_device
    when the device has packets; the data port hands its codec what the peer sent. It sends
    what its codec makes on the data socket, several datagrams a send with UDP GSO."""

    def __init__(self, spec, endpoint, sock, offloads, clock):
        self.spec = spec
        self.endpoint = endpoint  # (address as the data socket names it, port), or None
        self.sock = sock
        self.offloads = offloads  # what the kernel offers, found at start-up
        self.clock = clock
        self.counters = Counters()
        self.device = self.codec = None  # made for it by the server (Server._make_tunnel)
        self.wg_peer = None  # an encrypted tunnel's WireGuardPeer, which its codec uses
        self.index = None  # the device's interface index, once netlink has used it
        self.gso_fits = True  # false once the underlay refuses GSO sends of this tunnel's size

    @property
    def name(self):
        return self.spec.name

    @property
    def fd(self):
        return self.device.fd

    def forward_from_device(self):
        """The loop's handler of the device's fd: what the kernel routed into it, encoded
        and sent."""
        self.device.read(self.codec)

    def send(self, datagrams, stride):
        """Send datagrams laid end to end, each stride bytes long but the last: with UDP GSO
        where the kernel and the path take it, else one by one."""
        if len(datagrams) <= stride or not (self.offloads.udp_gso and self.gso_fits):
            return self._send_each(datagrams, stride)
        segment = struct.pack("=H", stride)
        step = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // stride) * stride
        for start in range(0, len(datagrams), step):
            chunk = datagrams[start:start + step]
            try:
                self.sock.sendmsg([chunk], [(SOL_UDP, UDP_SEGMENT, segment)], 0, self.endpoint)
            except OSError as e:
                if self._gso_refused(e):
                    self._send_each(chunk, stride)  # nothing lost: the same datagrams one by one
                else:  # a passing error (no route, a firewall, a full buffer): this send is lost
                    self.count_send_failed(e, -(-len(chunk) // stride))
            else:
                self.count_sent(-(-len(chunk) // stride), len(chunk))

    def _send_each(self, datagrams, stride):
        packets = size = 0
        for start in range(0, len(datagrams), stride):
            datagram = datagrams[start:start + stride]
            try:
                self.sock.sendto(datagram, self.endpoint)
            except OSError as e:
                self.count_send_failed(e, 1)
            else:
                packets += 1
                size += len(datagram)
        self.count_sent(packets, size)

    def send_one(self, parts):
        """One datagram, gathered from parts by the kernel (no copy made here). Inlined in
        PlainCodec.encode_packet: keep the two alike."""
        try:
            size = self.sock.sendmsg(parts, (), 0, self.endpoint)
        except OSError as e:
            self.count_send_failed(e, 1)
        else:
            counters = self.counters
            counters.tx_packets += 1
            counters.tx_bytes += size
            counters.last_tx = time.time()

    def count_sent(self, packets, size):
        if packets:
            counters = self.counters
            counters.tx_packets += packets
            counters.tx_bytes += size
            counters.last_tx = time.time()

    def count_send_failed(self, error, packets):
        self.counters.drops["socket_full" if isinstance(error, BlockingIOError)
                            else "send_error"] += packets

    def _gso_refused(self, error):
        """Whether error says GSO cannot send these datagrams at all, as udp_send_skb() answers;
        if so, GSO is turned off where it cannot work, and that is logged once."""
        if error.errno == errno.EIO:
            # An IPsec route, or, before Linux 6.11, a device that cannot checksum; off for
            # every tunnel, as the tunnels of a host mostly share their underlay.
            self.offloads.turn_off("udp_gso", "the underlay refuses it (%s)" % error)
        elif error.errno in (errno.EMSGSIZE, errno.EINVAL):
            # Datagrams larger than the underlay MTU must be fragmented, which GSO cannot do
            # (EINVAL before Linux 6.14); EINVAL also for more segments than the kernel takes.
            self.gso_fits = False
            log.info("tunnel %s: sending datagrams one by one: %s", self.name, error)
        else:
            return False
        return True

    def describe(self):
        """The tunnel as list gives it: its entry, as it was asked for, its counters, and
        what its codec adds."""
        return dict(self.spec.entry(), **self.counters.describe(), **self.codec.describe())

    def close(self, delete=True):
        """Close the device: deleted, or (not delete) kept for the next start (open_tun)."""
        self.device.close(delete)


# --- The data port: what comes from peers, to the tunnel it is for ------------


def one_kind(buffer, size, stride):
    """Whether the datagrams of a GRO train, stride bytes apart in buffer[:size], are all
    of one kind, handled as one run: all 2015-format ones (the PI header's first byte is
    0), or all transport messages to one receiver index (the same first 8 bytes). Asked
    column by column, a slice a byte, not datagram by datagram."""
    count = -(-size // stride)
    heads = buffer[0:size:stride]
    if heads.count(0) == count:
        return True
    if heads[0] != MESSAGE_TRANSPORT or size - (count - 1) * stride < TRANSPORT_HEADER_SIZE:
        return False
    return all(buffer[at:size:stride].count(buffer[at]) == count for at in range(8))


def train_runs(train, stride):
    """The runs of a GRO train whose datagrams are of one kind, as (start, end, plain) in
    train: a 2015-format run (plain), a run of transport messages to one receiver index,
    or one handshake message or other datagram alone."""
    runs, run_start, run_key = [], 0, None
    for start in range(0, len(train), stride):
        datagram = train[start:start + stride]
        if not datagram[0] or not is_wireguard(datagram, len(datagram)):
            key = "plain"
        elif datagram[0] == MESSAGE_TRANSPORT:
            key = bytes(datagram[:8])
        else:
            key = start  # alone: each handshake message is handled on its own
        if key != run_key and start:
            runs.append((run_start, start, run_key == "plain"))
            run_start = start
        run_key = key
    runs.append((run_start, len(train), run_key == "plain"))
    return runs


class DataPort:
    """The data port, as the daemon receives on it: datagrams of both kinds from every
    peer, each to the tunnel it is for (a 2015-format one by its source, a WireGuard one
    by its receiver index, through the daemon's WireGuard), and the counts of those no
    tunnel took."""

    def __init__(self, sock, registry, offloads, drops):
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.registry = registry
        self.offloads = offloads  # what the kernel offers: UDP GRO or not
        self.wireguard = None  # the daemon's WireGuard, where it has a key
        self.drops = drops  # the daemon's: datagrams no tunnel took, by reason
        # UDP GRO hands over up to 64 segments of up to 64 KB in all; more is cut and counted.
        self.buffer = bytearray(2 * BUFFER_SIZE)
        self.view = memoryview(self.buffer)

    def receive(self):
        """The loop's handler of the data socket: a batch of what the peers sent, each
        datagram or GRO train to the tunnel it is for (or to the daemon's WireGuard, which
        finds it), a train of more than one kind cut into runs first. Inlined in
        _receive_one_by_one, for a kernel without UDP GRO: keep the two alike."""
        if not self.offloads.udp_gro:
            return self._receive_one_by_one()
        find_by_source = self.registry.find_by_source
        for _ in range(BATCH):
            try:
                size, ancdata, flags, (ip, port, *_) = self.sock.recvmsg_into(
                    [self.buffer], GRO_CMSG_SPACE)
            except BlockingIOError:
                return
            try:
                stride = gro_size(ancdata) or max(size, 1)
                if stride < size and not one_kind(self.buffer, size, stride):
                    self._receive_mixed(self.view[:size], stride, (ip, port), flags)
                    continue
                if is_wireguard(self.buffer, size):
                    self._receive_wireguard(self.view[:size], stride, (ip, port))
                    continue
                tunnel = find_by_source(ip, port)
                if tunnel is None:
                    self.drops["unknown_source"] += 1
                elif flags & MSG_TRUNC:
                    tunnel.counters.drops["truncated"] += 1
                else:
                    tunnel.codec.decode(self.view[:size], stride, (ip, port))
            except Exception:
                self._internal_error()

    def _internal_error(self):
        """A bug met while handling what came on the data port: it costs that datagram or
        train alone, counted, and is logged a few times a minute."""
        self.drops["internal_error"] += 1
        DATA_PATH_BUGS.log(logging.ERROR, "internal error on a datagram from the data port"
                           " (-o list counts them as internal_error)", exc_info=True)

    def _receive_mixed(self, train, stride, source, flags=0):
        """A GRO train whose datagrams are not all of one kind (plain ones and WireGuard
        messages of one peer daemon, two keypairs at a rekey, a datagram spoofed into the
        flow): cut into runs of one kind each, every run handled on its own."""
        for start, end, plain in train_runs(train, stride):
            run = train[start:end]
            if not plain:
                self._receive_wireguard(run, stride, source)
                continue
            tunnel = self.registry.find_by_source(*source)
            if tunnel is None:
                self.drops["unknown_source"] += -(-len(run) // stride)
            elif flags & MSG_TRUNC and end == len(train):
                tunnel.counters.drops["truncated"] += 1
            else:
                tunnel.codec.decode(run, stride, source)

    def _receive_one_by_one(self):
        """receive's work without UDP GRO: each datagram on its own, as it came, with the
        cheaper recvfrom_into and the registry's find_by_source inlined (a call less a
        datagram, on the --no-offload path): keep the two alike."""
        recvfrom_into, buffer, view, by_source = (self.sock.recvfrom_into, self.buffer,
                                                self.view, self.registry.by_source)
        for _ in range(BATCH):
            try:
                size, (ip, port, *_) = recvfrom_into(buffer)
            except BlockingIOError:
                return
            try:
                if buffer[0] and is_wireguard(buffer, size):  # a 2015-format one starts with 0
                    self._receive_wireguard(view[:size], max(size, 1), (ip, port))
                    continue
                tunnel = by_source.get((ip, port)) or by_source.get((ip, None))  # as find_by_source
                if tunnel is None:
                    self.drops["unknown_source"] += 1
                else:
                    tunnel.codec.decode(view[:size], max(size, 1), (ip, port))
            except Exception:
                self._internal_error()

    def _receive_wireguard(self, datagrams, stride, source):
        """One data port for both kinds: WireGuard messages go to the daemon's WireGuard."""
        if self.wireguard is None:
            self.drops["wireguard_without_key"] += 1
        else:
            self.wireguard.receive(datagrams, stride, source)


# --- The loop -----------------------------------------------------------------


class Loop:
    """The one readiness loop: a dict fd -> handler, each called when its fd is ready."""

    def __init__(self, clock=time.monotonic):
        self.poller = select.epoll()
        self.handlers = {}
        self.retired = set()  # fds closed during the current round of events
        self.running = True
        self.clock = clock
        self.jobs = []  # [when next, interval, job] of the jobs run every so often

    def every(self, interval, job):
        """Run job now and every interval seconds after, between rounds: from the loop, so
        that a loop stuck stops it too (the watchdog's ping)."""
        self.jobs.append([self.clock(), interval, job])

    def watch(self, fd, handler):
        self.poller.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def unwatch(self, fd):
        self.poller.unregister(fd)
        del self.handlers[fd]
        self.retired.add(fd)

    def run(self, timers=None):
        """Serve the fds until stopped; timers (WireGuard's), if any, sleep the loop no
        longer than they allow, and take a look after each round."""
        while self.running:
            self.retired.clear()
            for fd, _ in self.poller.poll(self._timeout(timers)):
                self.dispatch(fd)
            if timers:
                try:
                    timers.tick()
                except Exception:
                    log.exception("error while running the WireGuard timers")
            if self.jobs:
                self._run_jobs()

    def _timeout(self, timers):
        timeout = timers.poll_timeout() if timers else -1
        if self.jobs:
            until_job = max(0.0, min(job[0] for job in self.jobs) - self.clock())
            timeout = until_job if timeout < 0 else min(timeout, until_job)
        return timeout

    def _run_jobs(self):
        now = self.clock()
        for job in self.jobs:
            if job[0] <= now:
                job[0] = now + job[1]
                try:
                    job[2]()
                except Exception:
                    log.exception("error in %s", getattr(job[2], "__name__", job[2]))

    def dispatch(self, fd):
        handler = self.handlers.get(fd)
        if handler is None:
            if fd not in self.retired:
                log.error("bug: fd %d is ready but has no handler; no longer watched", fd)
                self.poller.unregister(fd)
            return
        try:
            handler()
        except Exception:
            log.exception("error while handling fd %d", fd)

    def stop(self):
        self.running = False

    def close(self):
        self.poller.close()


# --- Netlink: IPv6 addresses, routes, devices deleted together ----------------


# Closing a TUN fd unregisters its device alone, after an RCU grace period of its own
# (20-30 ms): 2,000 tunnels took 40 s to close. Devices removed together are put in an
# interface group and deleted with one RTM_DELLINK, as ip link delete group does: the
# kernel (rtnl_group_dellink) unregisters them all after one grace period. The group is
# drawn anew each time from these 2^31 - 2^24 numbers, far above those administrators name
# (/etc/iproute2/group), so no other device is in it. Not checked with a dump of the links:
# pyroute2 takes 0.3 ms to parse each, more at 2,000 devices than deleting a few one by one.
DELETE_GROUPS = (1 << 24, 1 << 31)
# linux/if_addr.h: an address we give a tunnel is ours at once, without duplicate detection.
IFA_F_NODAD = 0x02


# Routes the daemon adds say so (their protocol, as ip route shows it: proto 87): those a
# device kept across a restart has and its tunnel no longer wants are told from any added
# by hand. Not among iproute2's rt_protos.
ROUTE_PROTOCOL = 87
# rtnetlink: the main routing table, and the protocol of the routes the kernel adds itself.
RT_TABLE_MAIN, RTPROT_KERNEL = 254, 2


@dataclasses.dataclass
class Kept:
    """What a device taken up from before has (a restart's, or a tunnel changed in place):
    routes through it, network -> protocol, and addresses but link-local ones."""
    routes: dict = dataclasses.field(default_factory=dict)
    addresses: set = dataclasses.field(default_factory=set)

    @classmethod
    def of_spec(cls, spec):
        """What the daemon gave the device of spec."""
        return cls({route: ROUTE_PROTOCOL for route in spec.routes}, {spec.interface})


class Netlink:
    """What pytun cannot give a device, through netlink: an IPv6 address, and routes."""

    def __init__(self):
        self.ipr = None  # a pyroute2 IPRoute, made when first needed

    def _connect(self, what):
        """The netlink socket, opened when first needed: OSError where it cannot be."""
        if IPRoute is None:
            raise ControlError("%s need pyroute2 (pip install pyroute2)" % what)
        if self.ipr is None:
            self.ipr = IPRoute()

    def configure(self, tunnel, kept=None):
        """Give the tunnel's device its IPv6 address and routes. kept: what a device taken
        up from before has, made what the spec says with nothing taken away in between: what
        it lacks added first, then what the daemon gave it and spec has not deleted."""
        spec, kept = tunnel.spec, kept or Kept()
        stale_routes = [route for route, protocol in kept.routes.items()
                        if protocol == ROUTE_PROTOCOL and route not in spec.routes]
        # pytun set an IPv4 address in place of the one before.
        stale_addresses = [address for address in kept.addresses if address != spec.interface
                           and not address.version == spec.interface.version == 4]
        if not (spec.needs_netlink or stale_routes or stale_addresses):
            return
        try:
            self._connect("IPv6 tunnel addresses and routes")
            tunnel.index = socket.if_nametoindex(spec.name)
        except OSError as e:
            raise ControlError("cannot configure %s through netlink: %s" % (spec.name, e)) from None
        if spec.interface.version == 6 and spec.interface not in kept.addresses:
            try:
                self.ipr.addr("add", index=tunnel.index, address=str(spec.interface.ip),
                              prefixlen=spec.interface.network.prefixlen, flags=IFA_F_NODAD)
            except NetlinkError as e:
                raise ControlError("cannot give %s the address %s: %s"
                                   % (spec.name, spec.interface, e)) from None
        for route in spec.routes:
            if route in kept.routes:
                continue
            try:
                self.ipr.route("add", dst=str(route), oif=tunnel.index, proto=ROUTE_PROTOCOL)
            except NetlinkError as e:
                raise ControlError("cannot route %s through %s: %s" % (route, spec.name, e)) from None
        for route in stale_routes:
            self._delete_route(route, tunnel.index)
        for address in stale_addresses:
            with contextlib.suppress(NetlinkError):
                self.ipr.addr("del", index=tunnel.index, address=str(address.ip),
                              prefixlen=address.network.prefixlen)

    def _delete_route(self, route, index):
        with contextlib.suppress(NetlinkError):  # gone already: the device taken away from outside
            self.ipr.route("del", dst=str(route), oif=index)

    def unroute(self, tunnel):
        """Take the tunnel's routes away; what is gone already (the device deleted from
        outside took them) is no error."""
        for route in tunnel.spec.routes if tunnel.index else ():
            self._delete_route(route, tunnel.index)

    def kept(self, indexes):
        """What the devices of these interface indexes, kept from before, have: index ->
        Kept, from one dump of the main table's routes and one of the addresses."""
        found = {index: Kept() for index in indexes}
        if not found or IPRoute is None:
            return found  # without pyroute2 no tunnel had routes or an IPv6 address
        try:
            self._connect("devices kept from before")
        except OSError as e:
            log.error("cannot read what the devices kept from before have (netlink: %s):"
                      " their routes are made again", e)
            return found
        for family in (socket.AF_INET, socket.AF_INET6):
            for message in self.ipr.route("dump", family=family, table=RT_TABLE_MAIN):
                here = found.get(message.get_attr("RTA_OIF"))
                if here is None or message["proto"] == RTPROT_KERNEL:
                    continue
                destination = message.get_attr("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
                network = ipaddress.ip_network("%s/%d" % (destination, message["dst_len"]))
                here.routes[network] = message["proto"]
        for message in self.ipr.addr("dump"):
            here = found.get(message["index"])
            address = message.get_attr("IFA_ADDRESS")
            if here is not None and address is not None:
                interface = ipaddress.ip_interface("%s/%d" % (address, message["prefixlen"]))
                if not interface.is_link_local:
                    here.addresses.add(interface)
        return found

    def delete_together(self, indexes):
        """Delete the devices of these interface indexes with one RTM_DELLINK: put in a group
        of their own, the kernel unregisters them together, after one RCU grace period
        (DELETE_GROUPS). None when done, else why not."""
        if IPRoute is None:
            return "pyroute2 is not installed"
        group = random.randrange(*DELETE_GROUPS)
        try:
            if self.ipr is None:
                self.ipr = IPRoute()
            for index in indexes:
                self.ipr.link("set", index=index, group=group)
            self.ipr.link("del", group=group)
        except (NetlinkError, OSError) as e:
            return "netlink: %s" % e
        return None

    def close(self):
        if self.ipr is not None:
            self.ipr.close()


# --- The registry of tunnels --------------------------------------------------


# A list reply is cut into parts of about this many bytes of tunnels: a part,
# sealed (its JSON quoted again inside the envelope), still fits in a datagram.
LIST_PART_BYTES = 30000
# What a tunnel's counters add to its entry in a list at most (six 20-digit counters, two
# times, every drop reason): a list's parts are cut once per generation of the tunnels,
# by their entries and this room, so a part still fits in a datagram however the
# counters grow by the time it is asked for.
LIST_COUNTERS_ROOM = 512


class Registry:
    """The tunnels, by name and by peer; those of the state file that could not be made;
    and the generation of their changes, with the parts a list of them is cut into."""

    def __init__(self, family):
        self.family = family  # of the data socket, which names peers accordingly
        self.by_name = {}  # name -> Tunnel
        self.by_source = {}  # source_key(spec) -> Tunnel
        # name -> entry of a tunnel acknowledged once that could not be made again after a
        # restart or SIGHUP: kept in the state file, and tried again at the next one.
        self.unmade = {}
        # Counts the changes to the tunnels, so a list can tell them; from a random start, so
        # that a restarted daemon's generations are not its predecessor's.
        self.generation = int.from_bytes(os.urandom(4), "big")
        self.parts = (None, [])  # (generation, names in each part of the list)

    def source_key(self, spec):
        """How datagrams from the tunnel's peer are known: by the source address as the data
        socket gives it (an IPv4 one as ::ffff:a.b.c.d on a dual-stack socket), and by
        the source port too when the tunnel has remotePort."""
        if self.family == socket.AF_INET6 and spec.remote.version == 4:
            return "::ffff:%s" % spec.remote, spec.remote_port
        return str(spec.remote), spec.remote_port

    @staticmethod
    def by_address(spec):
        """Whether datagrams of the tunnel are known by their source: plain ones are;
        encrypted ones by their receiver index and key, never by address."""
        return not spec.encrypted

    def find_by_source(self, ip, port):
        """The plain tunnel a datagram from ip and port is for, or None. Inlined in
        DataPort._receive_one_by_one: keep the two alike."""
        return self.by_source.get((ip, port)) or self.by_source.get((ip, None))

    def check_free(self, spec):
        if spec.name in self.by_name:
            raise ControlError("tunnel name %r already in use" % spec.name)
        if spec.remote is not None and spec.remote.version == 6 and self.family != socket.AF_INET6:
            raise ControlError("remoteServer %s is IPv6, but the data socket is IPv4 (-b)"
                               % spec.remote)
        other = self.by_source.get(self.source_key(spec)) if self.by_address(spec) else None
        if other is not None:
            raise ControlError("remoteServer %s already in use by tunnel %r"
                               % (spec.remote, other.name))
        for other in self.by_name.values():
            if other.spec.interface.ip == spec.interface.ip:
                raise ControlError("tunnelIP %s already in use by tunnel %r"
                                   % (spec.interface.ip, other.name))

    def add(self, tunnel):
        self.by_name[tunnel.name] = tunnel
        if self.by_address(tunnel.spec):
            self.by_source[self.source_key(tunnel.spec)] = tunnel
        self.unmade.pop(tunnel.name, None)
        self.generation += 1

    def remove(self, tunnel):
        del self.by_name[tunnel.name]
        if self.by_address(tunnel.spec):
            del self.by_source[self.source_key(tunnel.spec)]
        self.generation += 1

    def entries(self):
        """What the state file keeps: every tunnel's entry, and those not made."""
        return [tunnel.spec.entry() for tunnel in self.by_name.values()] + list(self.unmade.values())

    def list_parts(self):
        """The names of the tunnels in each part of the list, for this generation."""
        generation, parts = self.parts
        if generation != self.generation:
            parts, size = [[]], 0
            for tunnel in self.by_name.values():
                length = len(json.dumps(tunnel.spec.entry())) + LIST_COUNTERS_ROOM
                if parts[-1] and size + length > LIST_PART_BYTES:
                    parts.append([])
                    size = 0
                parts[-1].append(tunnel.name)
                size += length
            self.parts = (self.generation, parts)
        return parts


# --- The control port: who may ask and what they get, the ops -----------------


# The largest UDP/IPv4 payload: a reply must fit in one datagram.
MAX_REPLY = 65535 - 20 - 8

# Control-port security. A request's time may differ from ours by this much, and
# its nonce is remembered as long, so the same request is not taken twice.
AUTH_WINDOW = 30
NONCE_HEX_LEN = 32
MAC_HEX_LEN = 64
# Authenticated requests remembered at most: 100,000 a minute is far beyond any mesh.
MAX_NONCES = 100000
# What HMAC-SHA256 signs is prefixed with its kind, so a reply cannot pass as a request.
REQUEST_MAC_PREFIX = b"udpProxyServer request\n"
REPLY_MAC_PREFIX = b"udpProxyServer reply\n"
# A shared secret of fewer bytes is too easy to guess.
MIN_SECRET_LEN = 16
# A secret file holds one secret a line: two while the fleet moves from one to the next.
MAX_SECRETS = 2
# Replies per source and second, and the burst allowed, to sources that have not shown they
# receive at their address: a mesh's set-up fits; a reflected flood does not.
REPLY_RATE, REPLY_BURST = 100, 200
# Address validation, as DNS cookies (RFC 7873) do it: a cookie is a MAC of the source's
# address and port and the time in periods of this many seconds, under a random key made
# for each period; one is valid in its period and the next, so it lives 2 to 4 minutes.
COOKIE_PERIOD = 120
COOKIE_KEY_BYTES = 32
# Sources whose reply budget is remembered; idle ones are forgotten past this.
MAX_SOURCES = 4096
ENVELOPE_FIELDS = ("auth", "payload")
AUTH_FIELDS = ("ts", "nonce", "mac")


def read_secret(path):
    """The shared secrets in path, one a line, one or two (the second while the fleet
    moves from one to the other), refused if others could read the file."""
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise StartupError("cannot read secret file %s: %s" % (path, e.strerror)) from None
    if mode & 0o077:
        raise StartupError("secret file %s is readable by group or others (mode %03o):"
                           " chmod 600 it" % (path, mode & 0o777))
    if not 1 <= len(lines) <= MAX_SECRETS:
        raise StartupError("secret file %s holds %d secrets; it holds one a line, one or two"
                           " (while they are rotated)" % (path, len(lines)))
    for number, secret in enumerate(lines, 1):
        if len(secret) < MIN_SECRET_LEN:
            raise StartupError("secret file %s: line %d holds %d bytes; a secret needs at"
                               " least %d" % (path, number, len(secret), MIN_SECRET_LEN))
    return tuple(lines)


def request_mac(secret, ts, nonce, payload):
    message = REQUEST_MAC_PREFIX + b"%d\n%s\n%s" % (ts, nonce.encode(), payload.encode())
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def reply_mac(secret, nonce, payload):
    message = REPLY_MAC_PREFIX + b"%s\n%s" % (nonce.encode(), payload.encode())
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class AllowList:
    """Who may use the control port at all (--allow, and loopback), and who is trusted with
    every reply whole without a cookie: loopback, which nobody can spoof (the kernel drops
    datagrams from the network that claim a loopback source), and allowed sources, as by 2.0."""

    def __init__(self, networks=()):
        self.networks = tuple(networks)

    def admits(self, ip):
        """Whether a datagram from ip is read at all; others are dropped without a reply."""
        return not self.networks or self.trusted(ip)

    def trusted(self, ip):
        address = plain_address(ip)
        return address.is_loopback or any(address in network for network in self.networks)


# A request authenticated: its nonce, and the secret it was signed with, which seals the reply.
Envelope = collections.namedtuple("Envelope", "nonce secret")


class Authenticator:
    """Requests authenticated with HMAC-SHA256 under a shared secret (--secret-file: one,
    or two while they are rotated, either taken), with a time window and nonces against
    replay, and their replies sealed with the secret the request was; without a secret,
    plain requests pass and envelopes are refused."""

    def __init__(self, *secrets, clock=time.time):
        self.secrets = secrets
        self.clock = clock
        self.nonces = {}  # nonce -> until when it is remembered

    def open(self, datagram):
        """The request a datagram holds and its Envelope (None when not authenticated)."""
        obj = decode(datagram)
        if "auth" not in obj:
            if self.secrets:
                raise ControlError("authentication required: this daemon has a secret;"
                                   " use udpProxyServerControl.py --secret-file")
            return obj, None
        if not self.secrets:
            raise ControlError("this daemon has no secret: send the plain request")
        check_fields(obj, ENVELOPE_FIELDS, "envelope")
        auth, payload = obj.get("auth"), obj.get("payload")
        if not isinstance(auth, dict) or not isinstance(payload, str):
            raise ControlError("an envelope holds an object 'auth' and a string 'payload'")
        check_fields(auth, AUTH_FIELDS, "auth")
        ts, nonce, mac = auth.get("ts"), auth.get("nonce"), auth.get("mac")
        if (not isinstance(ts, int) or isinstance(ts, bool) or not is_hex(nonce, NONCE_HEX_LEN)
                or not is_hex(mac, MAC_HEX_LEN)):
            raise ControlError("auth needs ts (whole seconds), nonce (%d hex digits) and mac"
                               " (%d hex digits)" % (NONCE_HEX_LEN, MAC_HEX_LEN))
        for secret in self.secrets:
            if hmac.compare_digest(request_mac(secret, ts, nonce, payload), mac):
                break
        else:
            raise ControlError("authentication failed", "auth_failed")
        self.check_fresh(ts, nonce)
        return decode(payload), Envelope(nonce, secret)

    def check_fresh(self, ts, nonce):
        now = self.clock()
        if abs(now - ts) > AUTH_WINDOW:
            raise ControlError("stale request: its time is %d s from ours (at most %d s)"
                               % (ts - now, AUTH_WINDOW), "stale")
        if len(self.nonces) >= MAX_NONCES:
            self.nonces = {n: until for n, until in self.nonces.items() if until >= now}
        if nonce in self.nonces:
            raise ControlError("replayed request: nonce %s was seen before" % nonce, "replayed")
        if len(self.nonces) >= MAX_NONCES:
            raise ControlError("too many authenticated requests in %d s" % AUTH_WINDOW)
        self.nonces[nonce] = ts + AUTH_WINDOW

    def seal(self, payload, envelope):
        """The reply datagram: sealed, for an authenticated request, under its secret."""
        if envelope is None:
            return payload.encode()
        auth = {"nonce": envelope.nonce, "mac": reply_mac(envelope.secret, envelope.nonce, payload)}
        return json.dumps({"auth": auth, "payload": payload}).encode()


class ControlCookies:
    """Address validation without state per client: a source that sends back the
    cookie it was given at its address and port has shown it receives there, so
    what is sent to it cannot be a flood reflected at someone else."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.keys = {}  # period -> its random key: this period's and the one before

    def key(self, period):
        if period not in self.keys:
            self.keys = {p: key for p, key in self.keys.items() if p == period - 1}
            self.keys[period] = os.urandom(COOKIE_KEY_BYTES)
        return self.keys[period]

    def period(self):
        return int(self.clock() // COOKIE_PERIOD)

    def make(self, sender):
        """The cookie for sender's address and port, valid for one to two periods."""
        period = self.period()
        return self.mac(self.key(period), sender, period)

    def valid(self, cookie, sender):
        now = self.period()
        self.key(now)  # forget the keys of periods long past
        return any(hmac.compare_digest(self.mac(self.keys[period], sender, period), cookie)
                   for period in (now, now - 1) if period in self.keys)

    @staticmethod
    def mac(key, sender, period):
        message = b"%s\n%d\n%d" % (sender[0].encode(), sender[1], period)
        return hmac.new(key, message, hashlib.sha256).hexdigest()[:COOKIE_HEX_LEN]


class ReplyBudget:
    """Replies to sources that have not proven their address, per source: REPLY_RATE a
    second and REPLY_BURST at once, so the port is no reflector of a spoofed flood."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self.budgets = {}  # source -> (replies it may still have, when counted)

    def take(self, ip):
        """Take one reply from ip's budget; False when it has none left."""
        now = self.clock()
        tokens, then = self.budgets.get(ip, (REPLY_BURST, now))
        tokens = min(REPLY_BURST, tokens + (now - then) * REPLY_RATE)
        if len(self.budgets) >= MAX_SOURCES and ip not in self.budgets:
            self.forget_idle(now)
        if tokens < 1:
            self.budgets[ip] = (tokens, now)
            return False
        self.budgets[ip] = (tokens - 1, now)
        return True

    def forget_idle(self, now):
        self.budgets = {ip: (tokens, then) for ip, (tokens, then) in self.budgets.items()
                        if tokens + (now - then) * REPLY_RATE < REPLY_BURST}


def fit_reply(reply, limit, extra, seal=str.encode):
    """The reply as a datagram of at most limit bytes once sealed, with extra's fields:
    whole if it fits, else cut down to its outcome (ok, op, and as much of the error as
    fits), or None."""
    whole = seal(json.dumps(dict(reply, **extra)))
    if len(whole) <= limit:
        return whole, True
    outcome = {key: reply[key] for key in ("ok", "op", "retry", "cookie") if key in reply}
    outcome.update(extra)
    error = reply.get("error", "")[:limit]
    while error:
        cut = seal(json.dumps(dict(outcome, error=error)))
        if len(cut) <= limit:
            return cut, False
        error = error[:len(error) - (len(cut) - limit)]  # each character is a byte or more
    cut = seal(json.dumps(outcome))
    return (cut if len(cut) <= limit else None), False


# The outcome of one control request: the reply, the Envelope to seal it with (None when
# not authenticated), whether the sender has proven its address, and the control port's
# counters it adds to.
Answer = collections.namedtuple("Answer", "reply envelope proven counted")


class ControlPort:
    """The control port: who may ask and what they get, the ops they ask for, and the
    counts of it all, kept here alone."""

    def __init__(self, server, sock, allow=None, auth=None, cookies=None, budget=None):
        self.server = server
        self.sock = sock
        self.allow = allow or AllowList()
        self.auth = auth or Authenticator()
        self.cookies = cookies or ControlCookies()
        self.budget = budget or ReplyBudget()
        self.counts = collections.Counter()
        self.quiet = QuietLog("refused control requests or unsent replies")
        self.ops = {"add": self.add, "del": self.delete, "set": self.set, "list": self.list,
                    "cookie": self.cookie}

    def handle(self):
        """The loop's handler: read, answer and reply to a batch of control datagrams."""
        for _ in range(BATCH):
            try:
                datagram, sender = self.sock.recvfrom(BUFFER_SIZE)
            except BlockingIOError:
                break
            self.counts["requests"] += 1
            if not self.allow.admits(sender[0]):
                self.counts["not_allowed"] += 1
                continue
            answer = self.handle_request(datagram, sender)
            self.counts.update(answer.counted)
            reply, counted = self.reply_datagram(answer, len(datagram), sender)
            self.counts.update(counted)
            if reply is None:
                continue
            try:
                self.sock.sendto(reply, sender)
            except OSError as e:
                self.quiet.warning("cannot reply to %s:%d: %s", sender[0], sender[1], e)
        self.quiet.flush()

    def reply_datagram(self, answer, limit, sender):
        """The datagram that goes back, or None, and the counters it adds to. A source that
        has not proven its address gets no more bytes than it sent (limit), so a spoofed
        flood is not amplified; within its budget, so the daemon is no reflector either
        (but for the cookie itself, which the budget must not keep from a manager a
        spoofer floods in its name); and, without a secret, a cookie to prove its address
        with, after which it gets every reply whole."""
        seal = functools.partial(self.auth.seal, envelope=answer.envelope)
        reply = answer.reply
        if answer.proven:
            sealed = seal(json.dumps(reply))
            if len(sealed) > MAX_REPLY:
                sealed = seal(json.dumps({"ok": False, "error": "the reply (%d bytes) does not"
                                          " fit in one datagram" % len(sealed)}))
            return sealed, ()
        extra = {} if self.auth.secrets else {"cookie": self.cookies.make(sender)}
        fitted, whole = fit_reply(reply, limit, extra, seal)
        if fitted is None:
            return None, ("withheld",)
        if not (reply.get("op") == "cookie" or reply.get("retry")) \
                and not self.budget.take(sender[0]):
            return None, ("rate_limited",)
        return fitted, () if whole else ("cut",)

    def handle_request(self, datagram, sender):
        """Check one control datagram and do what it asks; the Answer. Nothing in it can
        stop the daemon."""
        envelope, proven = None, self.allow.trusted(sender[0])
        try:
            obj, envelope = self.auth.open(datagram)
            request = parse_request(obj)
            proven = self._check_cookie(request, envelope, sender) or proven
            action = self.ops.get(request.op)
            if action is None:
                raise ControlError("unknown op %r (expected add, del, set, list or cookie)"
                                   % (request.op,))
        except ControlError as e:
            return self.refusal(e, sender, envelope, proven)
        log.debug("control from %s:%d: %s of %d tunnels", sender[0], sender[1], request.op,
                  len(request.entries))
        try:
            return Answer(action(request, sender), envelope, proven, ())
        except ControlError as e:
            return self.refusal(e, sender, envelope, proven, op=request.op)
        except Exception as e:  # a bug costs one request its success, never its answer
            log.exception("control from %s: %s failed", sender[0], request.op)
            return Answer({"ok": False, "op": request.op, "error": "internal error: %s" % e},
                          envelope, proven, ())

    def refusal(self, error, sender, envelope, proven, **fields):
        """The Answer to a request refused, or not acted on and to be sent again (Retry)."""
        if isinstance(error, Retry):
            reply = dict({"ok": False, "retry": True, "error": str(error)}, **fields)
            return Answer(dict(reply, **error.fields), envelope, proven, (error.reason,))
        self.quiet.warning("control from %s: %s", sender[0], error)
        counted = ("refused", error.reason) if error.reason else ("refused",)
        return Answer(dict({"ok": False, "error": str(error)}, **fields), envelope, proven, counted)

    def _check_cookie(self, request, envelope, sender):
        """Whether the request's cookie proves the sender's address; Retry for a cookie that
        does not, and ControlError for an authenticated request without one."""
        if envelope is not None and request.cookie is None and request.op != "cookie":
            # The cookie binds an authenticated request to this daemon, since it started,
            # and to its sender: captured, it is good nowhere else and never again.
            raise ControlError("an authenticated request must carry the cookie this daemon"
                               " gives ({\"op\": \"cookie\"}); udpProxyServerControl.py 2.1"
                               " sends it")
        if request.cookie is None:
            return False
        if not self.cookies.valid(request.cookie, sender):
            # Not acted on: the sender asks again with the new cookie it gets here.
            raise Retry("cookie expired or not for this address and this daemon: send again"
                        " with the new one", "bad_cookie", cookie=self.cookies.make(sender))
        return True

    # The ops.

    def cookie(self, request, sender):
        """The cookie that proves sender's address: the control script asks for it first."""
        return {"ok": True, "op": "cookie", "cookie": self.cookies.make(sender)}

    def add(self, request, sender):
        return self._apply_to_each(request.entries, sender, "add",
                                  functools.partial(self.add_tunnel, sender=sender))

    def add_tunnel(self, entry, sender):
        self._refuse_key_in_clear(entry, sender)
        self.server.add_tunnel(entry)

    def set(self, request, sender):
        return self._apply_to_each(request.entries, sender, "set",
                                  functools.partial(self.set_tunnel, sender=sender))

    def set_tunnel(self, entry, sender):
        self._refuse_key_in_clear(entry, sender)
        return self.server.set_tunnel(entry)

    @staticmethod
    def _refuse_key_in_clear(entry, sender):
        """A preshared key that came over the network in clear is refused, so that one sent
        so is never used: a request names a file on this host instead."""
        if entry.get("presharedKey") is not None and not plain_address(sender[0]).is_loopback:
            raise ControlError("presharedKey came over the network in clear: refused (take it"
                               " for exposed, and make another); put the key in a file on this"
                               " host (mode 600) and give presharedKeyFile (the control"
                               " script's --psk-file)")

    def delete(self, request, sender):
        with self.server.removing_together():
            return self._apply_to_each(request.entries, sender, "del", self.server.delete_tunnel)

    def _apply_to_each(self, entries, sender, op, act):
        """Apply act to every entry on its own: one bad tunnel does not stop the others;
        the state file is written once, when any was done."""
        if not entries:
            return {"ok": False, "op": op, "error": "no tunnel given", "results": []}
        results, errors = [], []
        for entry in entries:
            name = entry_name(entry)
            try:
                done = act(entry)
            except ControlError as e:
                self.quiet.warning("control from %s: %s %s refused: %s", sender[0], op, name, e)
                results.append({"name": name, "ok": False, "error": str(e)})
                errors.append("%s: %s" % (name, e))
            except Exception as e:  # a bug costs this tunnel its success, not the others theirs
                log.exception("control from %s: %s %s failed", sender[0], op, name)
                results.append({"name": name, "ok": False, "error": "internal error: %s" % e})
                errors.append("%s: internal error: %s" % (name, e))
            else:
                results.append(dict({"name": name, "ok": True}, **(done or {})))
        reply = {"ok": not errors, "op": op, "results": results}
        if errors:
            reply["error"] = "; ".join(errors)
        if len(errors) < len(entries):
            warning = self.server.keeper.save()
            if warning:
                reply["warning"] = warning
        return reply

    def list(self, request, sender):
        """Every tunnel with its counts, in parts that each fit in one datagram. The parts
        of one generation are the same tunnels whenever asked; a part asked for with an
        older generation is refused, so the asker starts again rather than see a tunnel
        twice or miss one."""
        server, registry = self.server, self.server.registry
        parts = registry.list_parts()
        if request.generation not in (None, registry.generation):
            raise Retry("the tunnels changed while they were listed (generation %d, now %d):"
                        " ask again from part 0" % (request.generation, registry.generation),
                        "list_changed")
        if request.part >= len(parts):
            raise ControlError("no part %d: the list has %d parts" % (request.part, len(parts)))
        return {
            "ok": True,
            "op": "list",
            "part": request.part,
            "parts": len(parts),
            "generation": registry.generation,
            "dataPort": server.data_port,
            "uptime": round(time.time() - server.started, 3),
            "drops": dict(server.drops),
            "control": dict(self.counts),
            "unmade": sorted(registry.unmade),
            "publicKey": server.public_key_b64,
            "tunnels": [registry.by_name[name].describe() for name in parts[request.part]],
        }


# --- The state: the tunnels kept across restarts ------------------------------


def private_file(path, exclusive=False):
    """An fd of path opened to be written from its start, mode 600 whatever it had: a file
    left from before (a temporary one a crash left, made under another umask) is made
    private before anything is written; exclusive: it must not exist yet. A symbolic
    link is not followed."""
    if not exclusive:  # made anew: a leftover, or a link to another file, is not written into
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StateFile:
    """The tunnels that were acknowledged, kept across restarts: written whole after
    every change (temporary file, fsync, rename), read back at start-up and on SIGHUP."""

    def __init__(self, path):
        self.path = path
        self.lock_fd = None

    def lock(self):
        """Hold the state file's lock (PATH.lock, which names the holder) while the daemon
        runs: one daemon a state file, and its kept devices removed only when none runs."""
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StartupError("cannot open %s: %s" % (lock_path, e.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError("state file %s is in use by another udpProxyServer (pid %s)"
                               % (self.path, holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.lock_fd = fd

    def load(self):
        """The tunnel entries in the file, or StateUnreadable saying why; a corrupt file
        is first copied aside, since the next save replaces it."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                self.make_private(f.fileno())
        except FileNotFoundError:
            raise StateUnreadable("%s does not exist" % self.path) from None
        except OSError as e:
            raise StateUnreadable("cannot read %s: %s" % (self.path, e.strerror)) from None
        try:
            state = decode(data, "state file")
            entries = state.get("tunnels")
            if not isinstance(entries, list):
                raise ControlError("it has no list 'tunnels'")
        except ControlError as e:
            raise StateUnreadable("%s is corrupt (%s); %s" % (self.path, e,
                                                              self.keep_aside(data))) from None
        return entries

    def make_private(self, fd):
        """A state file others could read (from before, or made by hand) is made 600 once
        read: it may hold preshared keys."""
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("state file %s was readable by group or others (mode %03o): made 600",
                        self.path, mode)

    def keep_aside(self, data):
        """A copy of the corrupt file's data, since the next save writes over it; readable
        by root alone, as the file was (it may hold preshared keys)."""
        kept = "%s.corrupt-%s" % (self.path, time.strftime("%Y%m%d-%H%M%S"))
        try:
            with open(private_file(kept, exclusive=True), "wb") as f:
                f.write(data)
        except OSError as e:
            return "cannot keep a copy as %s: %s" % (kept, e.strerror)
        return "kept as %s" % kept

    def save(self, entries):
        temporary = self.path + ".tmp"
        # Readable by root alone: the entries of encrypted tunnels hold preshared keys.
        with open(private_file(temporary), "w") as f:
            json.dump({"version": 1, "tunnels": entries}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash only once this is on disk
        finally:
            os.close(directory)


class StateKeeper:
    """What survives a restart: the server's tunnels written to the state file on every
    change, made again from it at start-up, and made what it says on SIGHUP."""

    def __init__(self, server, state=None):
        self.server = server
        self.state = state  # a StateFile, or None without --state-file

    def save(self):
        """Write the tunnels to the state file before the change is acknowledged; a
        warning for the reply when it cannot be written."""
        if self.state is None:
            return None
        try:
            self.state.save(self.server.registry.entries())
        except OSError as e:
            log.error("cannot write state file %s: %s", self.state.path, e)
            return "done, but not written to the state file: %s" % e
        return None

    def restore(self):
        """Recreate the tunnels of the state file, each on its own, on the devices kept
        from before where there are; then delete the kept devices whose tunnels the file
        no longer has. A file that cannot be read leaves every kept device as it is."""
        if self.state is None:
            return
        try:
            entries = self.state.load()
        except StateUnreadable as e:
            if os.path.exists(self.state.path):
                log.error("state file: %s; starting without its tunnels", e)
                return
            log.info("state file %s does not exist yet: starting without tunnels",
                     self.state.path)
            entries = []
        server = self.server
        names = kept_devices(server.alias)
        indexes = {}
        for name in names:
            with contextlib.suppress(OSError):  # gone meanwhile
                indexes[name] = socket.if_nametoindex(name)
        found = server.netlink.kept(indexes.values())
        server.kept = {name: found[index] for name, index in indexes.items()}
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise ControlError("not an object")
                server.add_tunnel(entry)
            except ControlError as e:
                self._not_made(entry, e)
        server.kept.clear()
        unwanted = [name for name in names
                    if name not in server.registry.by_name and name not in server.registry.unmade]
        for name in unwanted:
            try:
                delete_kept_device(name)
            except OSError as e:
                log.error("device %s, kept for a tunnel the state file no longer has:"
                          " cannot delete it: %s", name, e)
        taken_up = sum(name in server.registry.by_name for name in names)
        log.info("restored %d tunnels from %s%s%s", len(server.registry.by_name), self.state.path,
                 ", %d on devices kept from before" % taken_up if names else "",
                 ", %d kept devices deleted (not in the file)" % len(unwanted) if unwanted else "")

    def _not_made(self, entry, error):
        """A tunnel of the state file that cannot be made (now): said, and kept in the file
        when it has a name, so a restart or SIGHUP once the cause is gone makes it."""
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name not in self.server.registry.by_name:
            self.server.registry.unmade[name] = entry
            log.error("state file %s: tunnel %s not made: %s; kept in the file, tried again"
                      " at the next start or SIGHUP", self.state.path, name, error)
        else:
            log.error("state file %s: entry %s skipped: %s", self.state.path,
                      json.dumps(entry)[:200], error)

    def reload(self):
        """SIGHUP: make the tunnels what the state file says, touching only the difference.
        A file that cannot be read or parsed, or one with a bad entry, changes nothing."""
        if self.state is None:
            log.warning("SIGHUP: no state file to read (--state-file)")
            return
        try:
            wanted = self._wanted_specs(self.state.load())
        except StateUnreadable as e:
            log.error("SIGHUP: state file: %s; every tunnel kept as it is", e)
            return
        server = self.server
        removed = [t for t in server.registry.by_name.values() if t.name not in wanted]
        changed = [t for t in server.registry.by_name.values()
                   if t.name in wanted and wanted[t.name] != t.spec]
        unchanged = len(server.registry.by_name) - len(removed) - len(changed)
        with server.removing_together():  # their devices gone before any is made again
            for tunnel in removed:
                server.remove(tunnel)
        server.registry.unmade.clear()
        for tunnel in changed:
            try:
                server.change(tunnel, wanted[tunnel.name])
            except ControlError as e:
                self._not_made(wanted[tunnel.name].entry(), e)
        added = 0
        for name, spec in wanted.items():
            if name in server.registry.by_name or name in server.registry.unmade:
                continue
            try:
                server.add_spec(spec)
                added += 1
            except ControlError as e:
                self._not_made(spec.entry(), e)
        log.info("state file re-read: %d tunnels removed, %d changed, %d added, %d unchanged,"
                 " %d not made", len(removed), len(changed), added, unchanged,
                 len(server.registry.unmade))

    def _wanted_specs(self, entries):
        """name -> TunnelSpec of every entry, or StateUnreadable naming the first bad one."""
        wanted = {}
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict):
                    raise ControlError("not an object")
                spec = TunnelSpec.from_entry(entry)
            except ControlError as e:
                raise StateUnreadable("%s: tunnels[%d] %s: %s" % (
                    self.state.path, index, json.dumps(entry)[:200], e)) from None
            wanted[spec.name] = spec
        return wanted


# --- The metrics: the counters for Prometheus ----------------------------------


# node_exporter's textfile collector reads the file whenever it is scraped: written whole
# this often, it is never more than this old while the daemon runs.
METRICS_INTERVAL = 15
TUNNEL_STATES = ("up", "idle", "connecting", "down")
# name, type, help, and what it is of a tunnel's list entry (Tunnel.describe).
TUNNEL_METRICS = (
    ("receive_bytes_total", "counter", "Bytes received from the peer, as on the wire.",
     "rx_bytes"),
    ("receive_packets_total", "counter", "Datagrams received from the peer.", "rx_packets"),
    ("transmit_bytes_total", "counter", "Bytes sent to the peer, as on the wire.", "tx_bytes"),
    ("transmit_packets_total", "counter", "Datagrams sent to the peer.", "tx_packets"),
    ("last_receive_seconds", "gauge", "When the peer was last heard, in Unix time.",
     "last_rx"),
    ("last_transmit_seconds", "gauge", "When the peer was last sent to, in Unix time.",
     "last_tx"),
)


def metric_labels(**labels):
    """Prometheus label pairs, each value escaped as the text format wants."""
    return "{%s}" % ",".join('%s="%s"' % (name, str(value).replace("\\", "\\\\").replace(
        '"', '\\"').replace("\n", "\\n")) for name, value in labels.items())


def metrics_text(server, now=None):
    """The daemon's counters, per tunnel and daemon-wide, in the Prometheus text format."""
    now = time.time() if now is None else now
    lines = []

    def family(name, kind, help_text, samples):
        lines.append("# HELP udpproxy_%s %s" % (name, help_text))
        lines.append("# TYPE udpproxy_%s %s" % (name, kind))
        lines.extend("udpproxy_%s%s %s" % (name, labels, value) for labels, value in samples)

    described = [(tunnel, tunnel.describe()) for tunnel in server.registry.by_name.values()]
    ids = [(entry, dict(tunnel=tunnel.name, peer=tunnel_peer(tunnel)))
           for tunnel, entry in described]
    family("tunnel_info", "gauge", "A tunnel: its address, and whether it is encrypted.",
           [(metric_labels(tunnel=tunnel.name, peer=tunnel_peer(tunnel),
                           address=tunnel.spec.interface,
                           encrypted=str(tunnel.spec.encrypted).lower()), 1)
            for tunnel, _ in described])
    family("tunnel_state", "gauge", "A tunnel's state: 1 for the one it is in (up, idle,"
           " connecting, down).", [(metric_labels(**labels, state=state), int(
               entry["state"] == state)) for entry, labels in ids for state in TUNNEL_STATES])
    for name, kind, help_text, field in TUNNEL_METRICS:
        family("tunnel_" + name, kind, help_text, [
            (metric_labels(**labels), entry[field]) for entry, labels in ids
            if entry[field] is not None])
    family("tunnel_latest_handshake_seconds", "gauge", "When an encrypted tunnel's latest"
           " handshake completed, in Unix time; 0: never.", [
               (metric_labels(**labels), entry["latestHandshake"] or 0)
               for entry, labels in ids if "publicKey" in entry])
    family("tunnel_dropped_packets_total", "counter", "What a tunnel dropped, by reason.", [
        (metric_labels(**labels, reason=reason), count)
        for entry, labels in ids for reason, count in sorted(entry["drops"].items())])
    family("tunnels", "gauge", "Tunnels the daemon carries.", [("", len(described))])
    family("tunnels_not_made", "gauge", "Tunnels of the state file that could not be made.",
           [("", len(server.registry.unmade))])
    family("dropped_datagrams_total", "counter", "Datagrams on the data port that no tunnel"
           " took, by reason.", [(metric_labels(reason=reason), count)
                                 for reason, count in sorted(server.drops.items())])
    counts = server.control.counts
    family("control_requests_total", "counter", "Datagrams on the control port.",
           [("", counts["requests"])])
    family("control_outcomes_total", "counter", "What became of control requests not done"
           " as asked, by outcome.", [(metric_labels(outcome=outcome), count)
                                      for outcome, count in sorted(counts.items())
                                      if outcome != "requests"])
    family("start_time_seconds", "gauge", "When the daemon started, in Unix time.",
           [("", round(server.started, 3))])
    family("build_info", "gauge", "The daemon's version.",
           [(metric_labels(version=__version__), 1)])
    return "\n".join(lines) + "\n"


def tunnel_peer(tunnel):
    """The peer's address, as the metrics name it: as given, or where it last sent from."""
    if tunnel.spec.remote is not None:
        return str(tunnel.spec.remote)
    return str(plain_address(tunnel.endpoint[0])) if tunnel.endpoint else ""


class MetricsFile:
    """--metrics-file: metrics_text written whole every METRICS_INTERVAL (a temporary file
    renamed over it), readable by all, for node_exporter's textfile collector."""

    def __init__(self, path, server):
        self.path = path
        self.server = server
        self.quiet = QuietLog("metrics file writes that failed")

    def check(self):
        """At start-up: StartupError when the file cannot be written."""
        try:
            self.write()
        except OSError as e:
            raise StartupError("cannot write metrics file %s: %s" % (self.path, e.strerror)) from None

    def write(self):
        temporary = self.path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "w") as f:
            os.fchmod(fd, 0o644)
            f.write(metrics_text(self.server))
        os.replace(temporary, self.path)

    def __call__(self):
        """The loop's job."""
        try:
            self.write()
        except OSError as e:
            self.quiet.warning("cannot write metrics file %s: %s", self.path, e)
        self.quiet.flush()


# --- The server: the sockets, the loop and the parts together -----------------


# Socket buffers, set with SO_*BUFFORCE as root: a burst of 64 KB super-packets must not overflow them.
SOCKET_BUFFER = 4 << 20
# asm-generic/socket.h; Python's socket module does not name them.
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
# Room for UDP GRO's control message: the segment size, an int.
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


def bind_udp(port, what, address=BIND_ANY):
    """A UDP socket on address and port; on "::" it takes IPv4 and IPv6 alike."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as e:
        if address != BIND_ANY:
            raise StartupError("cannot open an IPv6 socket for %s: %s" % (address, e)) from None
        family, address = socket.AF_INET, "0.0.0.0"  # a kernel without IPv6
        sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        where = "" if address in (BIND_ANY, "0.0.0.0") else " on %s" % address
        raise StartupError("cannot bind %s port %d%s: %s" % (what, port, where, e.strerror)) from None
    sock.setblocking(False)
    return sock


def bind_sockets(data_port, control_port, address=BIND_ANY, control_address=None):
    """The data and control sockets, the data socket's buffers made room for bursts."""
    data_sock = bind_udp(data_port, "data", address)
    try:
        control_sock = bind_udp(control_port, "control", control_address or address)
    except StartupError:
        data_sock.close()
        raise
    data_sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
    data_sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
    return data_sock, control_sock


class Server:
    """The daemon: its sockets and the loop that serves them, and its tunnels: made,
    removed, and carried (the receiving side of the data path)."""

    def __init__(self, data_sock, control_sock, open_device=open_tun, offloads=None,
                 state=None, clock=time.monotonic, private_key=None, **policy):
        self.data_sock = data_sock
        self.data_port = data_sock.getsockname()[1]
        self.open_device = open_device
        self.offloads = offloads or Offloads()
        self.keeper = StateKeeper(self, state)
        # With a state file the devices are kept across restarts, marked as this file's.
        self.alias = device_alias(state.path) if state is not None else None
        self.kept = {}  # name -> Kept: the devices kept from before, until taken up
        self.private_key = private_key  # this host's WireGuard identity, from --key-file
        self.public_key_b64 = key_to_base64(public_key(private_key)) if private_key else None
        self.clock = clock  # when the data path's fallbacks end
        self.loop = Loop()
        self.registry = Registry(data_sock.family)
        self.netlink = Netlink()
        self.removed_together = None  # tunnels whose devices go at the end of removing_together
        self.buffers = SharedBuffers()
        self.drops = collections.Counter()  # datagrams no tunnel took
        self.wireguard = WireGuard(private_key, data_sock, self.drops, clock) \
            if private_key else None
        self.started = time.time()
        self.data = DataPort(data_sock, self.registry, self.offloads, self.drops)
        self.data.wireguard = self.wireguard
        self.control = ControlPort(self, control_sock, **policy)
        self.loop.watch(data_sock.fileno(), self.data.receive)
        self.loop.watch(control_sock.fileno(), self.control.handle)

    def set_private_key(self, private_key):
        """A new WireGuard key for this host, taken in place (WireGuard.set_key)."""
        self.private_key = private_key
        self.public_key_b64 = key_to_base64(public_key(private_key))
        self.wireguard.set_key(private_key)
        log.info("new key taken: public key %s", self.public_key_b64)

    def run(self):
        log.info("listening for control on UDP port %d, data on UDP port %d",
                 self.control.sock.getsockname()[1], self.data_port)
        self.loop.run(self.wireguard)

    def _forward(self, tunnel):
        try:
            tunnel.forward_from_device()
        except DeviceGone as e:
            log.error("tunnel %s: device failed (%s); tunnel removed", tunnel.name, e)
            self.remove(tunnel)
            self.keeper.save()

    # Tunnels made and removed.

    def add_tunnel(self, entry):
        self.add_spec(TunnelSpec.from_entry(entry))

    def add_spec(self, spec, kept=None):
        """Make the tunnel of spec, on a new device, or on the one of its name kept from
        before (kept: what it has; found when not given)."""
        wg = None
        if spec.encrypted:
            need_cryptography()
            if self.wireguard is None:
                raise ControlError("an encrypted tunnel (publicKey) needs this daemon's own key:"
                                   " start it with --key-file")
            wg = self.wireguard.peer_for(spec)
        self.registry.check_free(spec)
        kept = self._kept_device(spec.name) if kept is None else kept
        try:
            tun = self.open_device(spec, self.offloads.tun_flags, self.alias)
        except OSError as e:
            raise ControlError("cannot create device %r: %s" % (spec.name, e.strerror or e)) from None
        tunnel = self._make_tunnel(spec, tun, wg)
        try:
            self.netlink.configure(tunnel, kept)
            self.loop.watch(tunnel.fd, lambda: self._forward(tunnel))
        except BaseException:
            # Not left half-made: a new device and its routes go; one kept from before
            # stays, dropping what is routed into it, and its tunnel is tried again.
            tunnel.close(delete=kept is None)
            raise
        if spec.encrypted:
            self.wireguard.add(tunnel)
        self.registry.add(tunnel)
        log.info("tunnel %s added: %s -> %s, mtu %d%s", spec.name, spec.interface,
                 "%s:%d" % tunnel.endpoint if tunnel.endpoint else "the peer, when it shows where",
                 spec.mtu, ", encrypted" if spec.encrypted else "")

    def _kept_device(self, name):
        """What the device of that name has when it is one kept for this daemon's state
        file, to be taken up; None when there is no device of that name; ControlError when
        there is one, not ours."""
        owner = device_owner(name)
        if owner is None:
            return None
        if owner == self.alias and is_tun(name):
            kept = self.kept.pop(name, None)
            if kept is None:  # not found at start-up: made since, by a daemon of this state file
                index = socket.if_nametoindex(name)
                kept = self.netlink.kept([index])[index]
            return kept
        if owner.startswith(DEVICE_ALIAS):
            raise ControlError("device %r is kept for the tunnels of another state file (%s);"
                               " udpProxyServer.py --remove-all --state-file with that file"
                               " deletes them" % (name, owner[len(DEVICE_ALIAS):]))
        raise ControlError("a device named %r already exists" % name)

    def _make_tunnel(self, spec, tun, wg_peer=None):
        """The tunnel of spec on its TUN device: that device with offloads or without,
        composed with the 2015 wire format's codec, or WireGuard's with its peer wg_peer."""
        if spec.remote is None:
            endpoint = None
        else:
            host, _ = self.registry.source_key(spec)
            endpoint = (host, spec.remote_port or self.data_port)
        offloads = bool(self.offloads.tun_flags)
        tunnel = Tunnel(spec, endpoint, self.data_sock, self.offloads, self.clock)
        if offloads:
            tunnel.device = OffloadDevice(tun, spec.name, self.offloads, tunnel.counters,
                                          self.buffers, self.clock)
        else:
            tunnel.device = NoOffloadDevice(tun, spec.name, tunnel.counters, self.buffers)
        tunnel.wg_peer = wg_peer
        if wg_peer is None:
            tunnel.codec = PlainCodec(tunnel, offloads, self.clock, self.buffers)
        else:
            tunnel.codec = WireGuardCodec(tunnel, wg_peer, self.wireguard, offloads, self.buffers)
        return tunnel

    def delete_tunnel(self, entry):
        if "name" not in entry:
            raise ControlError("missing field 'name'")
        name = entry["name"]
        tunnel = self.registry.by_name.get(name) if isinstance(name, str) else None
        if tunnel is None and isinstance(name, str) and name in self.registry.unmade:
            del self.registry.unmade[name]  # no longer wanted: out of the state file
            log.info("tunnel %s (not made) deleted", name)
            return
        if tunnel is None:
            raise ControlError("no tunnel named %r" % (name,))
        self.remove(tunnel)
        log.info("tunnel %s deleted", name)

    def set_tunnel(self, entry):
        """The set op: change a tunnel as the entry says (TunnelSpec.changed); how it was
        changed, for the reply."""
        name = entry.get("name")
        tunnel = self.registry.by_name.get(name) if isinstance(name, str) else None
        if tunnel is None:
            raise ControlError("no tunnel named %r" % (name,))
        return {"changed": self.change(tunnel, tunnel.spec.changed(entry))}

    def change(self, tunnel, spec):
        """Make the tunnel what spec says: in place when what differs can be changed so
        (IN_PLACE: its device, its routes but those changed, and its sessions kept); else
        remade, on its device kept (with a state file) so that its routes never go, or on
        a new one (without, as in 2015). "in place", "remade" or "nothing"."""
        old = tunnel.spec
        if old == spec:
            return "nothing"
        if not old.differs_in_place(spec):
            keep = self.alias is not None
            self.remove(tunnel, keep)
            self.add_spec(spec, Kept.of_spec(old) if keep else None)
            log.info("tunnel %s remade%s", spec.name, " on its device" if keep else "")
            return "remade"
        if spec.routes != old.routes:
            tunnel.spec = spec
            try:
                self.netlink.configure(tunnel, Kept.of_spec(old))
            except ControlError:
                tunnel.spec = old
                raise
        if spec.mtu != old.mtu:
            try:
                tunnel.device.set_mtu(spec.mtu)
            except OSError as e:
                raise ControlError("cannot set the mtu of %s to %d: %s"
                                   % (spec.name, spec.mtu, e.strerror or e)) from None
            if tunnel.wg_peer is not None:
                tunnel.codec.mtu = spec.mtu  # the padding's bound
        if spec.keepalive != old.keepalive:
            tunnel.wg_peer.timers.set_persistent_keepalive(spec.keepalive or 0)
            self.wireguard.touch(tunnel)
        tunnel.spec = spec
        self.registry.generation += 1
        log.info("tunnel %s changed in place: %s", spec.name, ", ".join(
            "%s %s" % (field, json.dumps(spec.entry().get(field)))
            for field in IN_PLACE if spec.entry().get(field) != old.entry().get(field)))
        return "in place"

    def remove(self, tunnel, keep=False):
        """Forget the tunnel and delete its device: now, or within removing_together() at
        its end, with the others; keep: its device stays as it is, routes and all (a
        shutdown with a state file, a tunnel remade on its device)."""
        self.registry.remove(tunnel)
        if tunnel.spec.encrypted:
            self.wireguard.remove(tunnel)
        try:
            self.loop.unwatch(tunnel.fd)
            if not keep:
                self.netlink.unroute(tunnel)
        finally:
            if keep or self.removed_together is None:
                tunnel.close(delete=not keep)
            else:
                self.removed_together.append(tunnel)

    @contextlib.contextmanager
    def removing_together(self):
        """Tunnels removed within are forgotten at once, as one by one, and their devices
        deleted together at its end (DELETE_GROUPS)."""
        if self.removed_together is not None:  # within another: its end deletes them all
            yield
            return
        self.removed_together = []
        try:
            yield
        finally:
            tunnels, self.removed_together = self.removed_together, None
            self._close_devices(tunnels)

    def _close_devices(self, tunnels):
        """Close the tunnels' fds, their devices deleted together first where netlink can;
        where it cannot, one line says so and each closing fd deletes its device on its own."""
        try:
            indexes = {held_device_index(tunnel.fd) for tunnel in tunnels} - {None}
            if len(indexes) > 1:
                reason = self.netlink.delete_together(indexes)
                if reason:
                    log.warning("%d devices not deleted together (%s): closing them one by one",
                                len(indexes), reason)
                else:
                    log.info("%d devices deleted together", len(indexes))
        finally:
            for tunnel in tunnels:
                tunnel.close()

    def close(self):
        """Close every tunnel, then the sockets. With a state file their devices are kept
        for the next start, routes and all, dropping what is routed into them meanwhile;
        without, they go (together), as in 2015."""
        count = len(self.registry.by_name)
        keep = self.alias is not None
        with self.removing_together():
            for tunnel in list(self.registry.by_name.values()):
                self.remove(tunnel, keep)
        self.control.quiet.flush(force=True)
        for sock in (self.data_sock, self.control.sock):
            self.loop.unwatch(sock.fileno())
            sock.close()
        self.netlink.close()
        self.loop.close()
        log.info("closed %d tunnels%s", count, "; their devices are kept for the next start"
                 " (--state-file)" if keep and count else "")


# --- Start-up -----------------------------------------------------------------


# CAP_NET_ADMIN, from linux/capability.h: needed to create TUN devices.
CAP_NET_ADMIN = 12


def check_can_create_tun():
    """Fail with one clear line where TUN devices cannot be made."""
    if pytun is None:
        raise StartupError("python-pytun is not installed (pip install python-pytun)")
    with open("/proc/self/status") as status:
        caps = next(line for line in status if line.startswith("CapEff:"))
    if not int(caps.split()[1], 16) & (1 << CAP_NET_ADMIN):
        raise StartupError("must run as root: creating TUN devices needs CAP_NET_ADMIN")
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        raise StartupError("cannot open /dev/net/tun: %s (is the tun module loaded?)"
                           % e.strerror) from None


def read_key_file(path, generate=False):
    """The Curve25519 private key in path, as wg genkey writes it (base64), refused if
    others could read it; with generate, a missing file is made first (mode 600)."""
    need_cryptography("--key-file")
    if generate and not os.path.exists(path):
        try:
            with open(private_file(path, exclusive=True), "w") as f:
                f.write(key_to_base64(generate_private_key()) + "\n")
        except OSError as e:
            raise StartupError("cannot create key file %s: %s" % (path, e.strerror)) from None
        log.info("key file %s made", path)
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError as e:
        raise StartupError("cannot read key file %s: %s%s" % (
            path, e.strerror, " (--generate-key makes one)" if not os.path.exists(path) else "")
        ) from None
    if mode & 0o077:
        raise StartupError("key file %s is readable by group or others (mode %03o):"
                           " chmod 600 it" % (path, mode & 0o777))
    try:
        return key_from_base64(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise StartupError("key file %s does not hold a base64 Curve25519 private key"
                           " (as wg genkey writes)" % path) from None


def notify_systemd(state):
    """Tell systemd how the service is (sd_notify), where it asks: Type=notify sets
    NOTIFY_SOCKET. No dependency: it is one datagram on a Unix socket."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), path)
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", state, e)


class JournalFormatter(logging.Formatter):
    """Under systemd: the level as a syslog priority prefix, which the journal reads,
    and no time stamp, which the journal adds."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def format(self, record):
        return "<%d>%s" % (self.PRIORITIES.get(record.levelno, 6), super().format(record))


def setup_logging(verbose):
    handler = logging.StreamHandler()
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def raise_fd_limit():
    """Every tunnel holds a file descriptor: take all the kernel allows (the usual
    soft limit of 1024 would stop the daemon near a thousand tunnels)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def watchdog_interval():
    """How often to tell systemd the loop runs: half the WatchdogSec it asks for
    (WATCHDOG_USEC, for this process); None when it asks for none."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: no watchdog", usec)
        return None


def ping_watchdog():
    notify_systemd("WATCHDOG=1")


def reload_files(server, args):
    """SIGHUP: the secret file and the key file read again, then the state file; a file
    that cannot be read keeps what was in use, and says so."""
    if args.secret_file:
        try:
            server.control.auth.secrets = read_secret(args.secret_file)
            log.info("secret file %s re-read: %d secrets", args.secret_file,
                     len(server.control.auth.secrets))
        except StartupError as e:
            log.error("SIGHUP: %s; the secrets in use are kept", e)
    if args.key_file:
        try:
            key = read_key_file(args.key_file)
        except StartupError as e:
            log.error("SIGHUP: %s; the key in use is kept", e)
        else:
            if key != server.private_key:
                server.set_private_key(key)
    server.keeper.reload()


def watch_signals(server, on_reload):
    """Turn SIGTERM, SIGINT and SIGHUP into a readable fd in the loop, so shutting down
    and re-reading the files are events like any other."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def on_signal():
        for signum in reader.recv(BATCH):
            if signum == signal.SIGHUP:
                log.info("SIGHUP received, re-reading the files")
                notify_systemd("RELOADING=1")
                on_reload()
                notify_systemd("READY=1")
            else:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                server.loop.stop()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    server.loop.watch(reader.fileno(), on_signal)
    return reader, writer


def port(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("port %r out of range (1-65535)" % text)
    return value


def seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError("%r is not a number of seconds from 0.1 to 86400" % text)
    return value


def address(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError("invalid address %r" % text) from None


def network(text):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid network %r" % text) from None


EXAMPLES = """\
examples:
  sudo %(prog)s &
  sudo %(prog)s -dp 5000 -cp 5001 --state-file /var/lib/udpProxyServer/tunnels.json
  sudo %(prog)s --secret-file /etc/udpProxyServer/secret --allow 172.100.0.0/16
  sudo %(prog)s -b 2001:db8::1 --no-offload -v
  sudo %(prog)s --key-file /etc/udpProxyServer/private.key --generate-key
  %(prog)s --public-key --key-file /etc/udpProxyServer/private.key

Tunnels are added with udpProxyServerControl.py. SIGTERM and SIGINT close them all
and exit (with a state file, their devices and routes stay for the next start);
SIGHUP re-reads the secret file, the key file and the state file.
"""


def build_parser():
    """The command line, as --help and the man page give it."""
    parser = argparse.ArgumentParser(
        description="UDP tunnel proxy server: carries TUN device packets to peers over UDP.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-dp", "--dataPort", type=port, default=DATA_PORT,
                        help="UDP port for tunnel data (default %(default)s)")
    parser.add_argument("-cp", "--controlPort", type=port, default=CONTROL_PORT,
                        help="UDP port for control messages (default %(default)s)")
    parser.add_argument("--secret-file", metavar="PATH",
                        help="accept only control requests authenticated with the shared secret"
                             " in PATH (mode 600)")
    parser.add_argument("-b", "--bind", type=address, default=BIND_ANY, metavar="ADDR",
                        help="address both ports listen on (default %(default)s, which takes"
                             " every address, IPv4 and IPv6)")
    parser.add_argument("--control-bind", type=address, metavar="ADDR",
                        help="address of the control port (default: that of --bind)")
    parser.add_argument("--allow", type=network, action="append", default=[], metavar="CIDR",
                        help="take control requests only from CIDR (and loopback); give the"
                             " flag once for each network")
    parser.add_argument("--state-file", metavar="PATH",
                        help="keep the tunnels in PATH: recreated at start-up, re-read on SIGHUP;"
                             " their devices and routes outlive the daemon, dropping what is"
                             " routed into them until it is back")
    parser.add_argument("--remove-all", action="store_true",
                        help="with --state-file: delete the devices kept for its tunnels, empty"
                             " it, and exit (refused while a daemon runs with it)")
    parser.add_argument("--metrics-file", metavar="PATH",
                        help="write the counters to PATH, in the Prometheus text format (for"
                             " node_exporter's textfile collector)")
    parser.add_argument("--metrics-interval", type=seconds, default=METRICS_INTERVAL,
                        metavar="SECONDS", help="with --metrics-file: how often (default"
                        " %(default)s)")
    parser.add_argument("--key-file", metavar="PATH",
                        help="this host's WireGuard private key (base64, as wg genkey writes it;"
                             " mode 600), for encrypted tunnels")
    parser.add_argument("--generate-key", action="store_true",
                        help="with --key-file: make the key file when it does not exist")
    parser.add_argument("--public-key", action="store_true",
                        help="with --key-file: print the public key (as wg pubkey) and exit")
    parser.add_argument("--no-offload", dest="offload", action="store_false",
                        help="plain reads and writes: no TUN, GSO or GRO offloads")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.generate_key or args.public_key) and not args.key_file:
        parser.error("--generate-key and --public-key go with --key-file")
    if args.remove_all and not args.state_file:
        parser.error("--remove-all goes with --state-file")
    return args


def print_public_key(args):
    """--public-key: the public key of --key-file, as wg pubkey prints it."""
    try:
        print(key_to_base64(public_key(read_key_file(args.key_file, args.generate_key))))
    except StartupError as e:
        print("udpProxyServer: %s" % e, file=sys.stderr)
        return 1
    return 0


def remove_all(path):
    """--remove-all: the devices kept for the tunnels of the state file in path deleted, and
    the file emptied; refused while a daemon runs with it (its lock)."""
    state = StateFile(path)
    try:
        check_can_create_tun()
        state.lock()
    except StartupError as e:
        print("udpProxyServer: %s" % e, file=sys.stderr)
        return 1
    names = kept_devices(device_alias(path))
    failed = []
    for name in names:
        try:
            delete_kept_device(name)
        except OSError as e:
            failed.append("%s (%s)" % (name, e))
    try:
        tunnels = len(state.load())
    except StateUnreadable:
        tunnels = 0
    if os.path.exists(path):
        state.save([])
    print("udpProxyServer: %d kept devices deleted, %d tunnels taken out of %s"
          % (len(names) - len(failed), tunnels, path))
    if failed:
        print("udpProxyServer: cannot delete %s" % ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.dataPort == args.controlPort:
        print("udpProxyServer: data and control port are both %d" % args.dataPort, file=sys.stderr)
        return 1
    if args.public_key:
        return print_public_key(args)
    if args.remove_all:
        return remove_all(args.state_file)
    try:
        private_key = read_key_file(args.key_file, args.generate_key) if args.key_file else None
        secrets = read_secret(args.secret_file) if args.secret_file else ()
        check_can_create_tun()
        log.debug("open file limit: %d", raise_fd_limit())
        state = StateFile(args.state_file) if args.state_file else None
        if state is not None:
            state.lock()
        data_sock, control_sock = bind_sockets(args.dataPort, args.controlPort, args.bind,
                                               args.control_bind)
        offloads = probe_offloads(data_sock) if args.offload else Offloads()
        log.info("offloads: %s", offloads.describe() if args.offload else "off (--no-offload)")
        server = Server(data_sock, control_sock, offloads=offloads, state=state,
                        private_key=private_key, allow=AllowList(args.allow),
                        auth=Authenticator(*secrets))
        if args.metrics_file:
            metrics = MetricsFile(args.metrics_file, server)
            metrics.check()
            server.loop.every(args.metrics_interval, metrics)
    except StartupError as e:
        print("udpProxyServer: %s" % e, file=sys.stderr)
        return 1
    if not secrets:
        host, port = server.control.sock.getsockname()[:2]
        log.warning("no --secret-file: the control port %s takes requests from anyone who"
                    " can reach it%s", "[%s]:%d" % (host, port) if ":" in host else
                    "%s:%d" % (host, port), "" if args.allow else " (see also --allow and --control-bind)")
    if private_key is not None:
        log.info("public key: %s", key_to_base64(public_key(private_key)))
    signal_fds = watch_signals(server, functools.partial(reload_files, server, args))
    server.keeper.restore()
    interval = watchdog_interval()
    if interval:
        server.loop.every(interval, ping_watchdog)
    notify_systemd("READY=1\nSTATUS=%d tunnels" % len(server.registry.by_name))
    try:
        server.run()
    finally:
        notify_systemd("STOPPING=1")
        server.close()
        for sock in signal_fds:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
