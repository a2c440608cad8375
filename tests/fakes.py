"""Stand-ins for the unit tests, which need no root: TUN devices as socketpair ends, a
daemon (Server) on loopback sockets, a clock the test sets, and a WireGuard peer made of the
daemon's own protocol functions that a test drives message by message, honest or not."""

import contextlib
import errno
import json
import os
import socket
import struct
import time

import udpProxyServer as ups

# The offloads a kernel of today offers; the fake devices speak virtio headers with them.
OFFLOADS = dict(tun_flags=ups.TUN_F_CSUM | ups.TUN_F_TSO4, udp_gso=True, udp_gro=True,
                join=True)


class FakeTun(socket.socket):
    """A fake device's end the daemon holds: a datagram socket, with what pytun's device
    has beside its fd (persist, mtu)."""

    def __init__(self, sock, devices, name):
        super().__init__(sock.family, sock.type, sock.proto, sock.detach())
        self.devices, self.name = devices, name

    def persist(self, flag):
        (self.devices.persistent.add if flag else self.devices.persistent.discard)(self.name)

    @property
    def mtu(self):
        return self.devices.mtu[self.name]

    @mtu.setter
    def mtu(self, value):
        self.devices.mtu[self.name] = value


class FakeDevices:
    """Stands in for TUN devices: each is one end of a datagram socketpair."""

    def __init__(self):
        self.outer = {}  # name -> the end the test plays the kernel on
        self.fail_with = None
        self.persistent = set()  # the names of the devices a close would keep
        self.mtu = {}

    def __call__(self, spec, offload_flags=0, alias=None):
        if self.fail_with:
            raise OSError(self.fail_with, os.strerror(self.fail_with))
        inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inner = FakeTun(inner, self, spec.name)
        inner.setblocking(False)
        outer.settimeout(5)
        self.outer[spec.name] = outer
        self.mtu[spec.name] = spec.mtu
        if alias is not None:
            inner.persist(True)
        return inner

    def written(self, name):
        """Every write the daemon made into the device so far, as bytes."""
        outer, writes = self.outer[name], []
        outer.setblocking(False)
        try:
            while True:
                writes.append(outer.recv(1 << 17))
        except BlockingIOError:
            return writes
        finally:
            outer.settimeout(5)


class FakeNetlink:
    """Stands in for the daemon's netlink: fake devices are no interfaces the kernel knows;
    what it would have been asked is kept."""

    def __init__(self):
        self.routes = {}  # tunnel name -> its routes, while configured

    def configure(self, tunnel, kept=None):
        self.routes[tunnel.name] = tunnel.spec.routes

    def kept(self, indexes):
        return {index: ups.Kept() for index in indexes}

    def unroute(self, tunnel):
        self.routes.pop(tunnel.name, None)

    def delete_together(self, indexes):
        return "fake devices are deleted one by one"

    def close(self):
        pass


class Clock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def udp(port=0, gro=False, address="127.0.0.1"):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    sock.settimeout(5)
    if gro:  # a GSO send to it arrives as one train, as from a peer through a NIC with GRO
        sock.setsockopt(ups.SOL_UDP, ups.UDP_GRO, 1)
    return sock


@contextlib.contextmanager
def fake_server(offloads=None, private_key=None, clock=None, state=None, netlink=None, **policy):
    """A daemon on loopback sockets with fake devices; with offloads (an Offloads, a dict of
    its fields, or True for OFFLOADS) its devices speak virtio headers and its data socket
    takes UDP GRO trains; netlink: the daemon's own (True), or FakeNetlink (for routes and
    IPv6 addresses on devices the kernel does not know); policy: the control port's."""
    devices = FakeDevices()
    if offloads is True:
        offloads = OFFLOADS
    if isinstance(offloads, dict):
        offloads = ups.Offloads(**offloads)
    # The data socket as the daemon's own, on every address of both families (it names
    # an IPv4 peer ::ffff:a.b.c.d), at a port of its own.
    data = ups.bind_udp(0, "data")
    if offloads and offloads.udp_gro:
        data.setsockopt(ups.SOL_UDP, ups.UDP_GRO, 1)
    control = udp()
    control.setblocking(False)
    extra = {"clock": clock} if clock else {}
    server = ups.Server(data, control, open_device=devices, offloads=offloads,
                        private_key=private_key, state=state, **extra, **policy)
    if not netlink:
        server.netlink = FakeNetlink()
    try:
        yield server, devices
    finally:
        server.close()


def fake_offload_server():
    """fake_server with the offloads of a kernel that has them all but USO, and the
    daemon's own netlink."""
    return fake_server(netlink=True, offloads=ups.Offloads(
        tun_flags=ups.TUN_F_CSUM | ups.TUN_F_TSO4, udp_gso=True, udp_gro=True, join=True))


def answer(server, datagram, sender):
    """What the control port makes of one datagram: its reply, the envelope to seal it with
    and whether the sender is proven; counted as the port counts it."""
    reply, envelope, proven, counted = server.control.handle_request(datagram, sender)
    server.control.counts.update(counted)
    return reply, envelope, proven


def add(server, *entries):
    """Add tunnels through the control port, from loopback; the reply."""
    request = json.dumps({"op": "add", "tunnel": list(entries)}).encode()
    return answer(server, request, ("127.0.0.1", 9))[0]


def internal_errors(reply):
    """The daemon's own word for a bug in a control reply, where it puts it: in a tunnel's
    result, or as the reply's error when it has none. (Not anywhere in the reply: a tunnel
    may be named "internal error", and its name comes back.)"""
    said = ([result.get("error", "") for result in reply["results"]] if "results" in reply
            else [reply.get("error", "")])
    return [error for error in said if str(error).startswith("internal error")]


def drain(sock):
    """Every datagram waiting on sock."""
    sock.setblocking(False)
    datagrams = []
    try:
        while True:
            datagrams.append(sock.recv(65535))
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(5)


def receive(server):
    """Let the daemon take what waits on its data port, and run its timers."""
    server.loop.dispatch(server.data_sock.fileno())
    if server.wireguard:
        server.wireguard.run_timers()


# --- A WireGuard peer for the tests, honest or not -------------------------------


def ipv4_packet(source, destination, payload=b"", proto=17, total=None, ihl=5):
    """An IPv4 packet; total and ihl, when given, are written as they are, true or not."""
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 0, 0, 0x4000, 64, proto, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    length = 20 + len(payload)
    header = header[:2] + struct.pack("!H", length if total is None else total) + header[4:]
    return header + payload


class WirePeer:
    """A WireGuard peer on a loopback socket, for one tunnel of a daemon: handshakes as
    initiator, then seals whatever packets the test gives it, one message a datagram or
    many in one UDP GSO train."""

    def __init__(self, server_public, port=0, address="127.0.0.1"):
        self.private = ups.generate_private_key()
        self.public = ups.public_key(self.private)
        self.server_public = server_public
        self.sock = udp(port, address=address)
        self.cookies = ups.CookieGenerator(server_public)
        self.keys = self.cipher = None
        self.counter = 0
        self.last_ns = 0

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def entry(self, name, address, **more):
        """The control entry of the daemon's tunnel to this peer."""
        return dict({"name": name, "tunnelIP": address,
                     "remoteServer": self.sock.getsockname()[0], "remotePort": self.port,
                     "publicKey": ups.key_to_base64(self.public)}, **more)

    def initiation(self, index=0x1234, timestamp=None):
        """A fresh initiation with its MACs (timestamp: its TAI64N, now if not given), and
        the state to read its response."""
        # Each newer than the last, as a responder takes no other: TAI64N rounds to 17 ms.
        self.last_ns = max(time.time_ns(), self.last_ns + ups.TAI64N_WHITENER)
        sent, message = ups.create_initiation(self.private, self.server_public, index,
                                              timestamp or ups.tai64n(self.last_ns))
        return sent, self.cookies.add_macs(message, 0)

    def handshake(self, server, data_port):
        """A whole handshake with the daemon, then a keepalive that confirms it."""
        sent, message = self.initiation()
        self.sock.sendto(message, ("127.0.0.1", data_port))
        receive(server)
        response = self.receive(ups.MESSAGE_RESPONSE)
        self.keys = ups.consume_response(sent, response)
        self.cipher = ups.transport_cipher(self.keys.send_key)
        self.counter = 0
        self.send([b""], data_port)
        receive(server)

    def receive(self, kind):
        while True:
            datagram = self.sock.recv(65535)
            if ups.message_type(datagram) == kind:
                return datagram

    def seal(self, packet, size=None):
        """A transport message carrying packet, padded to size (a multiple of 16) if given."""
        if size is not None:
            packet = bytes(packet) + bytes(size - len(packet))
        message = ups.seal_transport(self.cipher, self.keys.remote_index, self.counter, packet)
        self.counter += 1
        return message

    def send(self, packets, data_port, train=False):
        """Each packet sealed in its message; with train, all in one GSO send, so they
        arrive as one GRO train (packets of one padded size, but the last)."""
        messages = [self.seal(packet) for packet in packets]
        self.send_messages(messages, data_port, train)

    def send_messages(self, messages, data_port, train=False):
        address = ("127.0.0.1", data_port)
        if not train:
            for message in messages:
                self.sock.sendto(message, address)
            return
        size = struct.pack("=H", len(messages[0]))
        self.sock.sendmsg([b"".join(messages)], [(ups.SOL_UDP, ups.UDP_SEGMENT, size)], 0,
                          address)


# --- Plain tunnels, their devices speaking virtio headers or not ----------------------


def add_loopback_tunnel(server, peer, name="udp2", address="10.0.1.1"):
    """A plain tunnel to a peer socket on loopback, told apart by its port."""
    reply, _, _ = answer(server, json.dumps({"op": "add", "tunnel": [{
        "name": name, "tunnelIP": address, "remoteServer": "127.0.0.1",
        "remotePort": peer.getsockname()[1]}]}).encode(), ("127.0.0.1", 9))
    assert reply == {"ok": True, "op": "add", "results": [{"name": name, "ok": True}]}
    return server.registry.by_name[name]


def deliver(tunnel, datagrams, stride):
    """Hand the tunnel's codec datagrams as the data port would, from its peer."""
    tunnel.codec.decode(memoryview(datagrams), stride, tunnel.endpoint)


def vnet(gso_type=ups.GSO_NONE, gso_size=0, start=0, offset=0, flags=0):
    return ups.VNET_HDR.pack(flags, gso_type, 0, gso_size, start, offset)


def told_partial(tunnel, partial):
    """As if the peer's datagram had just said whether it takes partial checksums."""
    tunnel.codec.peer_flags = ups.PI_ACCEPTS_PARTIAL if partial else 0
    tunnel.codec.peer_heard_at = tunnel.clock()


def refuse_joined_writes(monkeypatch, device):
    """From now on the device refuses joined writes with EINVAL, as some kernels do; the
    list returned counts the refusals."""
    real_writev, refusals = os.writev, []

    def writev(fd, buffers):
        if fd == device.fd and len(buffers) > 2:
            refusals.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_writev(fd, buffers)

    monkeypatch.setattr(ups.os, "writev", writev)
    return refusals


class Wire:
    """Stands in for the data socket: keeps every datagram sent, a GSO send cut as the
    kernel cuts it; GSO sends fail first with the errnos in gso_errors, one a send."""

    def __init__(self, gso_errors=()):
        self.datagrams = []
        self.gso_sends = 0
        self.gso_errors = list(gso_errors)

    def sendmsg(self, buffers, ancdata, flags, address):
        data = b"".join(bytes(b) for b in buffers)
        if not ancdata:  # one datagram, gathered from its parts
            self.datagrams.append(data)
            return len(data)
        if self.gso_errors:
            code = self.gso_errors.pop(0)
            raise OSError(code, os.strerror(code))
        (level, kind, segment), = ancdata
        assert (level, kind) == (ups.SOL_UDP, ups.UDP_SEGMENT)
        size, = struct.unpack("=H", segment)
        self.datagrams += [data[at:at + size] for at in range(0, len(data), size)]
        self.gso_sends += 1
        return len(data)

    def sendto(self, data, address):
        self.datagrams.append(bytes(data))
        return len(data)
