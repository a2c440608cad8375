#!/usr/bin/env python3
"""udpProxyServer: carry the packets of TUN devices to peer hosts over UDP.

One daemon runs on every host of a mesh. Each point-to-point tunnel is a TUN
device; what the kernel routes into it is sent to the tunnel's remote server as
one UDP datagram per packet, and datagrams from that server are written back
into the device. Tunnels are added, deleted and listed at run time with JSON
messages on the control port (see udpProxyServerControl.py).

Needs the standard library and python-pytun only, so it runs when copied alone
to a host.
"""

import argparse
import collections
import dataclasses
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import sys
import time

try:
    import pytun
except ImportError:  # reported by main(); the parser and tests work without it
    pytun = None

__version__ = "2.0.0"

DATA_PORT = 5000
CONTROL_PORT = 5001
DEFAULT_NETMASK = "255.255.255.252"
DEFAULT_MTU = 1500

# struct tun_pi (flags, EtherType) heads every packet of a TUN opened without
# IFF_NO_PI; the 2015 version put it on the wire, so we keep it for interop.
PI_HEADER_LEN = 4
# Linux interface names are at most IFNAMSIZ - 1 bytes.
IFNAMSIZ = 16
# RFC 791: every IPv4 host must take 68-byte packets; the kernel refuses less.
MIN_MTU = 68
# The largest packet whose datagram (PI header + packet) fits in one UDP/IPv4 datagram.
MAX_MTU = 65535 - 20 - 8 - PI_HEADER_LEN
# Room for any datagram, and for any packet a TUN device hands us.
BUFFER_SIZE = 65536 + PI_HEADER_LEN
# Packets or requests a handler takes per wake-up, so one busy fd cannot starve the rest.
BATCH = 64
# CAP_NET_ADMIN, from linux/capability.h: needed to create TUN devices.
CAP_NET_ADMIN = 12

TUNNEL_FIELDS = ("name", "tunnelIP", "netmask", "mtu", "remoteServer", "remotePort")
REQUEST_FIELDS = ("op", "tunnel")

log = logging.getLogger("udpProxyServer")


# --- Control messages: parse, validate, then act -----------------------------


class ControlError(ValueError):
    """A control request the daemon refuses; the text goes back to the sender."""


def parse_request(datagram):
    """Return (op, entries) from a control datagram, or raise ControlError."""
    try:
        request = json.loads(datagram)
    except (UnicodeDecodeError, ValueError) as e:
        raise ControlError("request is not JSON: %s" % e) from None
    if not isinstance(request, dict):
        raise ControlError("request must be a JSON object, got %s" % type(request).__name__)
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
    return op, entries


def check_fields(obj, known, where):
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ControlError("unknown field %r in %s (expected %s)"
                           % (unknown[0], where, ", ".join(known)))


def parse_name(value):
    """A name the kernel takes as an interface name, exactly as given."""
    if not isinstance(value, str):
        raise ControlError("invalid tunnel name %r: must be a string" % (value,))
    size = len(value.encode())
    if size >= IFNAMSIZ:
        raise ControlError("tunnel name %r is %d bytes, the limit is %d"
                           % (value, size, IFNAMSIZ - 1))
    # The kernel refuses '/', ':' and blanks; '%' would make it pick the name itself.
    if (not value or value in (".", "..") or not value.isascii() or not value.isprintable()
            or any(c in value for c in "/:% ")):
        raise ControlError("invalid tunnel name %r" % (value,))
    return value


def parse_address(value, field):
    if not isinstance(value, str):
        raise ControlError("invalid %s %r: must be a string" % (field, value))
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ControlError("invalid %s %r: not an IPv4 address" % (field, value)) from None


def parse_interface(address, netmask):
    """The tunnel's own address and prefix, from tunnelIP and a dotted netmask or a prefix length."""
    ip = parse_address(address, "tunnelIP")
    if isinstance(netmask, int) and not isinstance(netmask, bool):
        netmask = str(netmask)
    if not isinstance(netmask, str):
        raise ControlError("invalid netmask %r: must be a string" % (netmask,))
    try:
        interface = ipaddress.IPv4Interface("%s/%s" % (ip, netmask))
    except ValueError:
        raise ControlError("invalid netmask %r" % (netmask,)) from None
    # ipaddress also reads host masks such as 0.0.0.3; a netmask must be one.
    if not netmask.isdigit() and str(interface.netmask) != netmask:
        raise ControlError("invalid netmask %r" % (netmask,))
    if interface.network.prefixlen == 0:
        raise ControlError("invalid netmask %r: the tunnel would take every address" % (netmask,))
    if interface.network.prefixlen <= 30 and ip in (interface.network.network_address,
                                                     interface.network.broadcast_address):
        raise ControlError("invalid tunnelIP %r: it is not a host address of %s"
                           % (address, interface.network))
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
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
    if remote.is_unspecified or remote.is_multicast or remote == ipaddress.IPv4Address("255.255.255.255"):
        raise ControlError("invalid remoteServer %r: not a host address" % (value,))
    return remote


def parse_port(value):
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ControlError("invalid remotePort %r: must be a number from 1 to 65535" % (value,))
    return value


@dataclasses.dataclass(frozen=True)
class TunnelSpec:
    """One tunnel as asked for, every field checked."""

    name: str
    interface: ipaddress.IPv4Interface
    mtu: int
    remote: ipaddress.IPv4Address
    remote_port: int = None  # None: the peer's data port is ours

    @classmethod
    def from_entry(cls, entry):
        for field in ("name", "tunnelIP", "remoteServer"):
            if field not in entry:
                raise ControlError("missing field %r" % field)
        port = entry.get("remotePort")
        return cls(
            name=parse_name(entry["name"]),
            interface=parse_interface(entry["tunnelIP"], entry.get("netmask", DEFAULT_NETMASK)),
            mtu=parse_mtu(entry.get("mtu", DEFAULT_MTU)),
            remote=parse_remote(entry["remoteServer"]),
            remote_port=None if port is None else parse_port(port),
        )

    @property
    def remote_key(self):
        """How incoming datagrams find this tunnel: by source IP, and port if one is set."""
        return (str(self.remote), self.remote_port)


def entry_name(entry):
    """The name to report a result under, whatever its validity."""
    name = entry.get("name")
    return name if isinstance(name, str) else repr(name)


# --- The tunnel ---------------------------------------------------------------


def open_tun(spec):
    """Create and configure the TUN device for spec; it vanishes when closed."""
    device = pytun.TunTapDevice(name=spec.name, flags=pytun.IFF_TUN)
    try:
        device.addr = str(spec.interface.ip)
        device.netmask = str(spec.interface.netmask)
        device.mtu = spec.mtu
        device.up()
        os.set_blocking(device.fileno(), False)
    except BaseException:
        device.close()
        raise
    return device


class TunnelGone(Exception):
    """The tunnel's device failed for good, e.g. deleted from outside."""


class Tunnel:
    """A TUN device, the peer it is joined to, and the counts of what crossed."""

    def __init__(self, spec, device, sock, data_port):
        self.spec = spec
        self.device = device
        self.fd = device.fileno()
        self.sock = sock
        self.peer = (str(spec.remote), spec.remote_port or data_port)
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.rx_packets = self.rx_bytes = self.tx_packets = self.tx_bytes = 0
        self.last_rx = self.last_tx = None
        self.drops = collections.Counter()

    @property
    def name(self):
        return self.spec.name

    def forward_from_tun(self):
        """Send what the kernel routed into the device to the peer, a datagram a packet."""
        for _ in range(BATCH):
            try:
                size = os.readv(self.fd, [self.buffer])
            except BlockingIOError:
                return
            except OSError as e:
                raise TunnelGone(e) from None
            try:
                self.sock.sendto(self.view[:size], self.peer)
            except BlockingIOError:
                self.drops["socket_full"] += 1
            except OSError:
                self.drops["send_error"] += 1
            else:
                self.tx_packets += 1
                self.tx_bytes += size
                self.last_tx = time.time()

    def deliver(self, datagram):
        """Write a datagram from the peer into the device."""
        if len(datagram) <= PI_HEADER_LEN:
            self.drops["short"] += 1
            return
        try:
            os.write(self.fd, datagram)
        except BlockingIOError:
            self.drops["tun_full"] += 1
        except OSError:
            self.drops["tun_refused"] += 1
        else:
            self.rx_packets += 1
            self.rx_bytes += len(datagram)
            self.last_rx = time.time()

    def describe(self):
        spec = self.spec
        return {
            "name": spec.name,
            "tunnelIP": str(spec.interface.ip),
            "netmask": str(spec.interface.netmask),
            "mtu": spec.mtu,
            "remoteServer": self.peer[0],
            "remotePort": self.peer[1],
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "drops": dict(self.drops),
            "last_rx": self.last_rx,
            "last_tx": self.last_tx,
        }

    def close(self):
        self.device.close()


# --- The server and its loop --------------------------------------------------


class StartupError(Exception):
    """The daemon cannot start; the text is the one line the user sees."""


def bind_udp(port, what):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError as e:
        sock.close()
        raise StartupError("cannot bind %s port %d: %s" % (what, port, e.strerror)) from None
    sock.setblocking(False)
    return sock


class Server:
    """The sockets, the tunnels and the one readiness loop that serves them all."""

    def __init__(self, data_sock, control_sock, open_device=open_tun):
        self.data_sock = data_sock
        self.control_sock = control_sock
        self.data_port = data_sock.getsockname()[1]
        self.open_device = open_device
        self.poller = select.epoll()
        self.handlers = {}
        self.retired = set()  # fds closed during the current round of events
        self.tunnels = {}  # name -> Tunnel
        self.by_remote = {}  # TunnelSpec.remote_key -> Tunnel
        self.drops = collections.Counter()  # datagrams no tunnel took
        self.started = time.time()
        self.running = True
        self.ops = {"add": self.add, "del": self.delete, "list": self.list}
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.watch(data_sock.fileno(), self.receive_from_peers)
        self.watch(control_sock.fileno(), self.handle_control)

    @classmethod
    def bind(cls, data_port, control_port):
        data_sock = bind_udp(data_port, "data")
        try:
            control_sock = bind_udp(control_port, "control")
        except StartupError:
            data_sock.close()
            raise
        return cls(data_sock, control_sock)

    def watch(self, fd, handler):
        self.poller.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def unwatch(self, fd):
        self.poller.unregister(fd)
        del self.handlers[fd]
        self.retired.add(fd)

    def run(self):
        log.info("listening for control on UDP port %d, data on UDP port %d",
                 self.control_sock.getsockname()[1], self.data_port)
        while self.running:
            self.retired.clear()
            for fd, _ in self.poller.poll():
                self.dispatch(fd)

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

    # The data path.

    def receive_from_peers(self):
        for _ in range(BATCH):
            try:
                size, (ip, port, *_) = self.data_sock.recvfrom_into(self.buffer)
            except BlockingIOError:
                return
            tunnel = self.by_remote.get((ip, port)) or self.by_remote.get((ip, None))
            if tunnel is None:
                self.drops["unknown_source"] += 1
                continue
            tunnel.deliver(self.view[:size])

    def forward(self, tunnel):
        try:
            tunnel.forward_from_tun()
        except TunnelGone as e:
            log.error("tunnel %s: device failed (%s); tunnel removed", tunnel.name, e)
            self.remove(tunnel)

    # The control path.

    def handle_control(self):
        for _ in range(BATCH):
            try:
                datagram, sender = self.control_sock.recvfrom(BUFFER_SIZE)
            except BlockingIOError:
                return
            reply = self.answer(datagram, sender)
            try:
                self.control_sock.sendto(json.dumps(reply).encode(), sender)
            except OSError as e:
                log.error("cannot reply to %s:%d: %s", sender[0], sender[1], e)

    def answer(self, datagram, sender):
        """The reply to one control datagram; nothing in it can stop the daemon."""
        try:
            op, entries = parse_request(datagram)
            action = self.ops.get(op)
            if action is None:
                raise ControlError("unknown op %r (expected add, del or list)" % (op,))
        except ControlError as e:
            log.warning("control from %s: %s", sender[0], e)
            return {"ok": False, "error": str(e)}
        log.debug("control from %s:%d: %s of %d tunnels", sender[0], sender[1], op, len(entries))
        try:
            return action(entries, sender)
        except Exception as e:  # a bug costs one request its success, never its answer
            log.exception("control from %s: %s failed", sender[0], op)
            return {"ok": False, "op": op, "error": "internal error: %s" % e}

    def add(self, entries, sender):
        return self.each(entries, sender, "add", self.add_tunnel)

    def delete(self, entries, sender):
        return self.each(entries, sender, "del", self.delete_tunnel)

    def each(self, entries, sender, op, act):
        """Apply act to every entry on its own: one bad tunnel does not stop the others."""
        if not entries:
            return {"ok": False, "op": op, "error": "no tunnel given", "results": []}
        results, errors = [], []
        for entry in entries:
            name = entry_name(entry)
            try:
                act(entry)
            except ControlError as e:
                log.warning("control from %s: %s %s refused: %s", sender[0], op, name, e)
                results.append({"name": name, "ok": False, "error": str(e)})
                errors.append("%s: %s" % (name, e))
            else:
                results.append({"name": name, "ok": True})
        reply = {"ok": not errors, "op": op, "results": results}
        if errors:
            reply["error"] = "; ".join(errors)
        return reply

    def add_tunnel(self, entry):
        spec = TunnelSpec.from_entry(entry)
        self.check_free(spec)
        try:
            device = self.open_device(spec)
        except OSError as e:
            raise ControlError("cannot create device %r: %s" % (spec.name, e.strerror or e)) from None
        tunnel = Tunnel(spec, device, self.data_sock, self.data_port)
        self.tunnels[spec.name] = tunnel
        self.by_remote[spec.remote_key] = tunnel
        self.watch(tunnel.fd, lambda: self.forward(tunnel))
        log.info("tunnel %s added: %s -> %s:%d, mtu %d",
                 spec.name, spec.interface, tunnel.peer[0], tunnel.peer[1], spec.mtu)

    def check_free(self, spec):
        if spec.name in self.tunnels:
            raise ControlError("tunnel name %r already in use" % spec.name)
        other = self.by_remote.get(spec.remote_key)
        if other is not None:
            raise ControlError("remoteServer %s already in use by tunnel %r"
                               % (spec.remote, other.name))
        for other in self.tunnels.values():
            if other.spec.interface.ip == spec.interface.ip:
                raise ControlError("tunnelIP %s already in use by tunnel %r"
                                   % (spec.interface.ip, other.name))
        try:
            socket.if_nametoindex(spec.name)
        except OSError:
            return
        raise ControlError("a device named %r already exists" % spec.name)

    def delete_tunnel(self, entry):
        if "name" not in entry:
            raise ControlError("missing field 'name'")
        name = entry["name"]
        tunnel = self.tunnels.get(name) if isinstance(name, str) else None
        if tunnel is None:
            raise ControlError("no tunnel named %r" % (name,))
        self.remove(tunnel)
        log.info("tunnel %s deleted", name)

    def remove(self, tunnel):
        del self.tunnels[tunnel.name]
        del self.by_remote[tunnel.spec.remote_key]
        try:
            self.unwatch(tunnel.fd)
        finally:
            tunnel.close()

    def list(self, entries, sender):
        return {
            "ok": True,
            "op": "list",
            "dataPort": self.data_port,
            "uptime": round(time.time() - self.started, 3),
            "drops": dict(self.drops),
            "tunnels": [tunnel.describe() for tunnel in self.tunnels.values()],
        }

    def close(self):
        """Close every tunnel (their devices go with them), then the sockets."""
        count = len(self.tunnels)
        for tunnel in list(self.tunnels.values()):
            self.remove(tunnel)
        for sock in (self.data_sock, self.control_sock):
            self.unwatch(sock.fileno())
            sock.close()
        self.poller.close()
        log.info("closed %d tunnels", count)


# --- Start-up -----------------------------------------------------------------


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


def watch_signals(server):
    """Turn SIGTERM and SIGINT into a readable fd in the loop, so shutdown is one more event."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def on_signal():
        for signum in reader.recv(BATCH):
            log.info("%s received, shutting down", signal.Signals(signum).name)
            server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    server.watch(reader.fileno(), on_signal)
    return reader, writer


def port(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("port %r out of range (1-65535)" % text)
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="UDP tunnel proxy server: carries TUN device packets to peers over UDP.")
    parser.add_argument("-dp", "--dataPort", type=port, default=DATA_PORT,
                        help="UDP port for tunnel data (default %(default)s)")
    parser.add_argument("-cp", "--controlPort", type=port, default=CONTROL_PORT,
                        help="UDP port for control messages (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.dataPort == args.controlPort:
        print("udpProxyServer: data and control port are both %d" % args.dataPort, file=sys.stderr)
        return 1
    try:
        check_can_create_tun()
        server = Server.bind(args.dataPort, args.controlPort)
    except StartupError as e:
        print("udpProxyServer: %s" % e, file=sys.stderr)
        return 1
    signal_fds = watch_signals(server)
    try:
        server.run()
    finally:
        server.close()
        for sock in signal_fds:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
