"""The tunnels compared: each builds the same point-to-point link on a Pair.

A starter gets a Pair, makes 10.0.1.1/30 on a reach 10.0.1.2/30 on b through
its tunnel at MTU 1400 (1420 for the encrypted ones, as WireGuard has it), and
returns the processes that carry the packets, whose CPU time the bench counts
(none for the kernel's VXLAN). An encrypted kind also has a renewer: it makes
the tunnel fresh on both hosts, so the next packet waits for a handshake.
"""

import collections
import os
import re
import shutil
import subprocess
import sys

from pair import TUNNEL_PREFIX, lablib

TUNNEL_MTU = 1400
# What fits a 1500-byte underlay with WireGuard's 80 bytes over IPv6: wg-quick's and
# wireguard-go's default, so both encrypted tunnels run as users run them.
ENCRYPTED_MTU = 1420
# The daemon's data port, which socat reuses so both speak on the same port.
DATA_PORT = 5000
FASTD_PORT = 10000
# WireGuard's customary port, for wireguard-go.
WG_PORT = 51820
VXLAN_ID = 42
# IANA's VXLAN port.
VXLAN_PORT = 4789
# Where the command stands in a Lab process's argv, after "ip netns exec NS".
COMMAND = 4
FASTD_KEY = re.compile(r"^(Secret|Public): ([0-9a-f]{64})$", re.M)


class Skipped(Exception):
    """This tunnel cannot be measured here; the text says why."""


def start_daemon(pair, *flags):
    """Our daemon on both hosts, each tunnel added with the control script, as a user would."""
    for host in pair.hosts():
        try:
            host.start_daemon(*flags)
        except AssertionError as e:
            if flags:
                raise Skipped("the daemon refused %s: %s" % (" ".join(flags), last_line(e))) from None
            raise
    for host in pair.hosts():
        host.add_tunnel("udp0", host.tunnel_address, pair.peer(host), "-m", str(TUNNEL_MTU))
    return [host.daemon for host in pair.hosts()]


def start_udpproxy(pair):
    return start_daemon(pair)


def start_udpproxy_no_offload(pair):
    return start_daemon(pair, "--no-offload")


def start_udpproxy_encrypted(pair):
    """Our daemon with a WireGuard key on both hosts, one encrypted tunnel each way."""
    for host in pair.hosts():
        path = os.path.join(pair.lab.workdir, "%s.key" % host.name)
        made = host.run(sys.executable, "-I", pair.lab.script("udpProxyServer.py"), "--public-key",
                        "--key-file", path, "--generate-key", check=False)
        if made.returncode != 0:
            raise Skipped("the daemon made no key: %s" % last_line(made.stdout + made.stderr))
        host.public_key = made.stdout.strip()
        host.start_daemon("--key-file", path)
    for host in pair.hosts():
        add_encrypted_tunnel(host, pair.peer(host))
    return [host.daemon for host in pair.hosts()]


def add_encrypted_tunnel(host, peer):
    host.add_tunnel("wg0", host.tunnel_address, peer, "-m", str(ENCRYPTED_MTU),
                    "--peer-key", peer.public_key)


def renew_udpproxy_encrypted(pair):
    """Delete and add the tunnel on both hosts: no session left on either side."""
    for host in pair.hosts():
        host.control("127.0.0.1", "-o", "del", "-n", "wg0")
    for host in pair.hosts():
        add_encrypted_tunnel(host, pair.peer(host))


def start_wireguard_go(pair):
    """Debian's wireguard-go on both hosts, set up with wg and ip as a user would."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            raise Skipped("needs %s (make bench-tools installs it)" % tool)
    processes = []
    for host in pair.hosts():
        # Its UAPI socket, /var/run/wireguard/NAME.sock, is not per namespace: one name per host and lab.
        host.wg_device = "wg%s%s" % (host.name, pair.lab.prefix[3:][-12:])
        host.wg_key_file = os.path.join(pair.lab.workdir, "%s.wgkey" % host.name)
        private = host.run("wg", "genkey").stdout.strip()
        with open(os.open(host.wg_key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(private + "\n")
        host.public_key = host.run("wg", "pubkey", input=private).stdout.strip()
        processes.append(pair.lab.spawn(host.ns, ["wireguard-go", "-f", host.wg_device],
                                        "%s-wireguard-go.log" % host.name))
    for host in pair.hosts():
        wait_for_device(host, host.wg_device, processes)
        host.run("wg", "set", host.wg_device, "private-key", host.wg_key_file,
                 "listen-port", str(WG_PORT))
        set_wireguard_peer(host, pair.peer(host))
        host.ip("addr", "add", "%s/%d" % (host.tunnel_address, TUNNEL_PREFIX), "dev", host.wg_device)
        host.ip("link", "set", host.wg_device, "mtu", str(ENCRYPTED_MTU), "up")
    return processes


def set_wireguard_peer(host, peer):
    host.run("wg", "set", host.wg_device, "peer", peer.public_key,
             "allowed-ips", "%s/32" % peer.tunnel_address,
             "endpoint", "%s:%d" % (peer.address, WG_PORT))


def renew_wireguard_go(pair):
    """Remove the peer and set it again on both hosts: its sessions go with it."""
    for host in pair.hosts():
        host.run("wg", "set", host.wg_device, "peer", pair.peer(host).public_key, "remove")
    for host in pair.hosts():
        set_wireguard_peer(host, pair.peer(host))


def start_fastd(pair):
    """fastd with its null method: no cipher, so only the forwarding is compared."""
    keys = {host.name: generate_fastd_key() for host in pair.hosts()}
    processes = []
    for host in pair.hosts():
        peer = pair.peer(host)
        config = os.path.join(pair.lab.workdir, "fastd-%s.conf" % host.name)
        with open(config, "w") as f:
            f.write(fastd_config(host, peer, keys[host.name][0], keys[peer.name][1]))
        processes.append(pair.lab.spawn(host.ns, ["fastd", "--config", config],
                                        "%s-fastd.log" % host.name))
    for host in pair.hosts():
        wait_for_device(host, "fastd0", processes)
    pair.address_tunnel("fastd0")
    return processes


def generate_fastd_key():
    """(secret, public) from fastd --generate-key."""
    out = subprocess.run(["fastd", "--generate-key"], capture_output=True, text=True,
                         check=True, timeout=lablib.PATIENCE).stdout
    found = dict(FASTD_KEY.findall(out))
    return found["Secret"], found["Public"]


def fastd_config(host, peer, secret, peer_public):
    # No "user" line: fastd stays root, as every other tunnel of the bench does.
    return "\n".join((
        'log level warn;',
        'mode tun;',
        'interface "fastd0";',
        'mtu %d;' % TUNNEL_MTU,
        'method "null";',
        'secret "%s";' % secret,
        'bind %s:%d;' % (host.address, FASTD_PORT),
        'peer "%s" {' % peer.name,
        '  key "%s";' % peer_public,
        '  remote %s port %d;' % (peer.address, FASTD_PORT),
        '}',
        '',
    ))


def start_socat(pair):
    """socat's TUN mode: one read, one write per packet, the simplest userspace tunnel."""
    processes = []
    for host in pair.hosts():
        argv = ["socat", "-b", "65536",
                "UDP:%s:%d,sourceport=%d" % (pair.peer(host).address, DATA_PORT, DATA_PORT),
                "TUN:%s/30,tun-name=tun0,tun-type=tun,iff-up" % host.tunnel_address]
        processes.append(pair.lab.spawn(host.ns, argv, "%s-socat.log" % host.name))
    for host in pair.hosts():
        wait_for_device(host, "tun0", processes)
        host.ip("link", "set", "tun0", "mtu", str(TUNNEL_MTU))
    return processes


def start_vxlan(pair):
    """The kernel's VXLAN: no process at all, the bound on what a tunnel can do here."""
    for host in pair.hosts():
        host.ip("link", "add", "vx0", "mtu", str(TUNNEL_MTU), "type", "vxlan", "id", str(VXLAN_ID),
                "local", host.address, "remote", pair.peer(host).address,
                "dstport", str(VXLAN_PORT), "dev", "eth0")
    pair.address_tunnel("vx0")
    return []


def wait_for_device(host, device, processes):
    def ready():
        for proc in processes:
            if proc.poll() is not None:
                with open(proc.log_path, errors="replace") as log:
                    raise AssertionError("%s exited %d: %s"
                                         % (proc.args[COMMAND], proc.returncode, log.read()[-2000:]))
        return host.link_exists(device)
    lablib.wait_until(ready, "%s on %s" % (device, host.name))


def last_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else str(error)


# A row of the table: its label, its starter, the tunnel's MTU, and for an encrypted
# tunnel what makes it fresh (None: no handshake to time).
Kind = collections.namedtuple("Kind", "label start mtu renew", defaults=(TUNNEL_MTU, None))
OURS = "udpProxyServer"
OURS_ENCRYPTED = "udpProxyServer encrypted"
WIREGUARD_GO = "wireguard-go"
FASTD = "fastd (null)"
# In the order of the table.
KINDS = (
    Kind(OURS, start_udpproxy),
    Kind("udpProxyServer --no-offload", start_udpproxy_no_offload),
    Kind(OURS_ENCRYPTED, start_udpproxy_encrypted, ENCRYPTED_MTU, renew_udpproxy_encrypted),
    Kind(WIREGUARD_GO, start_wireguard_go, ENCRYPTED_MTU, renew_wireguard_go),
    Kind(FASTD, start_fastd),
    Kind("socat TUN", start_socat),
    Kind("VXLAN (kernel)", start_vxlan),
)
