"""Encrypted tunnels for real: two of our daemons, and ours with Debian's wireguard-go, in
network namespaces; TCP checked by SHA-256 both ways, and what an attacker on the path
may try."""

import base64
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from conftest import cannot_run
from lab import HELPERS, key_file, meanwhile, transfer, wait_until

MEGABYTES = 16 << 20
# What fits a 1500-byte underlay with WireGuard's 60 bytes (IPv4, UDP, its header and tag).
MTU = 1420
WG_PORT = 51820


def encrypted_pair(lab, *flags):
    """Hosts a and b, each running a daemon with a key, joined by an encrypted tunnel:
    a (10.0.1.1, wg2) <-> b (10.0.1.2, wg1)."""
    a, b = lab.host("a", 1), lab.host("b", 2)
    keys = {}
    for host in (a, b):
        path, keys[host.name] = key_file(lab, host)
        host.start_daemon("--key-file", path, *flags)
    a.control("127.0.0.1", "-o", "add", "-n", "wg2", "-t", "10.0.1.1", "-m", str(MTU),
              "-r", b.address, "--peer-key", keys["b"])
    b.control("127.0.0.1", "-o", "add", "-n", "wg1", "-t", "10.0.1.2", "-m", str(MTU),
              "-r", a.address, "--peer-key", keys["a"])
    return a, b, keys


@pytest.mark.parametrize("flags", [(), ("--no-offload",)], ids=["offload", "no-offload"])
def test_two_daemons_carry_tcp_encrypted_beside_a_plain_tunnel(lab, flags):
    a, b, keys = encrypted_pair(lab, *flags)
    c = lab.host("c", 3)  # a plain tunnel on the same data port, as a 2015 host has
    c.start_daemon()
    a.add_tunnel("udp3", "10.0.3.1", c)
    c.add_tunnel("udp1", "10.0.3.2", a)
    assert a.ping("10.0.1.2", size=MTU - 28) and b.ping("10.0.1.1", size=MTU - 28)
    assert a.ping("10.0.3.2")
    for sender, receiver, address in ((a, b, "10.0.1.2"), (b, a, "10.0.1.1")):
        sent, received = transfer(sender, receiver, address, MEGABYTES)
        assert received == sent
    listed = json.loads(a.control("127.0.0.1", "-o", "list", "--json").stdout)
    wg2 = next(t for t in listed["tunnels"] if t["name"] == "wg2")
    assert wg2["publicKey"] == keys["b"] and wg2["endpoint"] == "%s:5000" % b.address
    assert wg2["latestHandshake"] and wg2["rx_bytes"] > MEGABYTES
    assert not {"not_authentic", "replayed"} & set(wg2["drops"])


@pytest.fixture
def wireguard_go(lab):
    """Host a runs our daemon, host b Debian's wireguard-go: each the other's peer."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            cannot_run("needs %r (make test installs it)" % tool)
    a, b = lab.host("a", 1), lab.host("b", 2)
    path, ours = key_file(lab, a)
    a.start_daemon("--key-file", path)
    device = "wg" + lab.prefix[3:][-13:]  # its UAPI socket's name is shared by namespaces
    private = b.run("wg", "genkey").stdout.strip()
    theirs = b.run("wg", "pubkey", input=private).stdout.strip()
    theirs_file = os.path.join(lab.workdir, "b.key")
    with open(os.open(theirs_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(private + "\n")
    lab.spawn(b.ns, ["wireguard-go", "-f", device], "b-wireguard-go.log")
    wait_until(lambda: b.run("wg", "show", device, check=False).returncode == 0,
               "wireguard-go's device answers wg")
    b.run("wg", "set", device, "private-key", theirs_file, "listen-port", str(WG_PORT),
          "peer", ours, "allowed-ips", "10.0.1.1/32", "endpoint", "%s:5000" % a.address)
    b.ip("addr", "add", "10.0.1.2/30", "dev", device)
    b.ip("link", "set", device, "mtu", str(MTU), "up")
    a.control("127.0.0.1", "-o", "add", "-n", "wg2", "-t", "10.0.1.1", "-m", str(MTU),
              "-r", b.address, "--remote-port", str(WG_PORT), "--peer-key", theirs)
    return a, b, device


@pytest.mark.parametrize("first", ["ours", "wireguard-go"])
def test_wireguard_go_is_a_peer_either_side_first(wireguard_go, first):
    a, b, device = wireguard_go
    # Whoever sends first makes the handshake.
    pings = [(a, "10.0.1.2"), (b, "10.0.1.1")]
    for host, address in pings if first == "ours" else pings[::-1]:
        assert host.ping(address, size=MTU - 28)
    for sender, receiver, address in ((a, b, "10.0.1.2"), (b, a, "10.0.1.1")):
        sent, received = transfer(sender, receiver, address, MEGABYTES)
        assert received == sent
    shown = b.run("wg", "show", device, "transfer").stdout.split()
    assert int(shown[1]) > MEGABYTES and int(shown[2]) > MEGABYTES


def capture(lab, host, to, first_byte, count, port=5000):
    """Start capturing on host's eth0 what it sends to host to's port (the data port unless
    given) starting with first_byte; returns the process, whose lines are the payloads in
    hex."""
    proc = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable,
                             os.path.join(HELPERS, "capture.py"), "eth0", to.address, str(port),
                             str(first_byte), str(count), "20"],
                            stdout=subprocess.PIPE, text=True)
    lab.processes.append(proc)
    proc.log_path = os.devnull
    assert proc.stdout.readline().strip() == "capturing"
    return proc


def test_replayed_forged_and_plain_datagrams_are_dropped_and_counted(lab):
    a, b, keys = encrypted_pair(lab)
    assert a.ping("10.0.1.2")
    sniffer = capture(lab, b, a, 4, 3)  # transport messages b sends a
    assert b.ping("10.0.1.1", count=3)
    captured = [bytes.fromhex(line) for line in sniffer.stdout.read().split()]
    assert len(captured) == 3
    flipped = bytearray(captured[0])
    flipped[-1] ^= 1
    attacks = captured + [bytes(flipped)]
    # From the peer's own address: a 2015-format packet, which no encrypted tunnel takes.
    attacks.append(b"\x00\x00\x08\x00" + bytes.fromhex("4500001c00004000400100000a0001020a000101"))
    # And random datagrams, some shaped as WireGuard messages of each type.
    rnd = random.Random(11)
    for _ in range(2000):
        kind = rnd.choice([b"", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00", b"\x03\x00\x00\x00",
                           b"\x04\x00\x00\x00"])
        attacks.append(kind + rnd.randbytes(rnd.choice([0, 12, 28, 60, 88, 144, 400])))
    b.send_udp(a.address, 5000, attacks)
    assert a.ping("10.0.1.2")  # still carried

    def wg2():
        listed = json.loads(a.control("127.0.0.1", "-o", "list", "--json").stdout)
        return listed, next(t for t in listed["tunnels"] if t["name"] == "wg2")

    wait_until(lambda: wg2()[1]["drops"].get("replayed", 0) >= 3, "the replays counted")
    listed, tunnel = wg2()
    assert tunnel["drops"]["not_authentic"] >= 1
    assert listed["drops"]["unknown_source"] >= 1  # the plain datagram
    assert a.daemon.poll() is None


def wg_tunnel(host, name="wg2"):
    listed = json.loads(host.control("127.0.0.1", "-o", "list", "--json").stdout)
    return next(t for t in listed["tunnels"] if t["name"] == name)


def test_an_inner_source_outside_the_tunnel_is_dropped_unless_it_is_routed(lab):
    a, b, keys = encrypted_pair(lab)
    # From b's LAN address, which a's tunnel neither holds nor routes: cryptokey routing.
    assert not b.ping("10.0.1.1", source=b.lan, count=2)
    wait_until(lambda: wg_tunnel(a)["drops"].get("not_allowed_source", 0) >= 2,
               "packets from outside the tunnel's addresses counted")
    a.control("127.0.0.1", "-o", "del", "-n", "wg2")
    a.control("127.0.0.1", "-o", "add", "-n", "wg2", "-t", "10.0.1.1", "-m", str(MTU),
              "-r", b.address, "--peer-key", keys["b"], "--route", "192.168.2.0/24")
    assert b.ping("10.0.1.1", source=b.lan)


def test_the_peer_roams_and_traffic_follows(lab):
    a, b, keys = encrypted_pair(lab)
    assert a.ping("10.0.1.2") and b.ping("10.0.1.1")
    # b moves to a new underlay address: what it sends comes from there, authenticated.
    b.run("sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")  # outlives the old one
    b.ip("addr", "add", "198.18.0.12/24", "dev", "eth0")
    b.ip("route", "replace", "198.18.0.0/24", "dev", "eth0", "src", "198.18.0.12")
    assert b.ping("10.0.1.1")
    b.ip("addr", "del", "%s/24" % b.address, "dev", "eth0")
    assert a.ping("10.0.1.2")  # a sends where b now is
    assert wg_tunnel(a)["endpoint"] == "198.18.0.12:5000"
    sent, received = transfer(a, b, "10.0.1.2", MEGABYTES)
    assert received == sent


def test_a_peer_behind_nat_is_reached_through_its_keepalives(lab):
    """Host n sits behind router r, which masquerades it (nftables): a knows n by its key
    alone (no remoteServer) and reaches it once n's keepalives have shown where it is."""
    if shutil.which("nft") is None:
        cannot_run("needs nft (make test installs nftables)")
    a = lab.host("a", 1)
    r = lab.host("r", 3)
    n = lab.host("n", 4)
    # n's only link is to r: a private one, behind r's masquerade.
    n.ip("link", "del", "eth0")
    r.ip("link", "add", "inside", "type", "veth", "peer", "name", "eth0", "netns", n.ns)
    r.ip("addr", "add", "192.168.77.1/24", "dev", "inside")
    r.ip("link", "set", "inside", "up")
    n.ip("addr", "add", "192.168.77.2/24", "dev", "eth0")
    n.ip("link", "set", "eth0", "up")
    n.ip("route", "add", "default", "via", "192.168.77.1")
    r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    r.run("nft", "-f", "-", input="table ip nat {\n chain post {\n  type nat hook postrouting"
          " priority 100;\n  oifname \"eth0\" masquerade\n }\n}\n")
    paths = {}
    for host in (a, n):
        paths[host.name], public = key_file(lab, host)
        host.start_daemon("--key-file", paths[host.name])
        paths[host.name + "-public"] = public
    a.control("127.0.0.1", "-o", "add", "-n", "wgn", "-t", "10.0.1.1", "-m", str(MTU),
              "--peer-key", paths["n-public"])  # no -r: n is found by its key
    n.control("127.0.0.1", "-o", "add", "-n", "wga", "-t", "10.0.1.2", "-m", str(MTU),
              "-r", a.address, "--peer-key", paths["a-public"], "--keepalive", "1")
    wait_until(lambda: wg_tunnel(a, "wgn")["endpoint"] is not None, "n's keepalive reaches a")
    assert wg_tunnel(a, "wgn")["endpoint"].startswith(r.address + ":")  # n, as r shows it
    assert a.ping("10.0.1.2") and n.ping("10.0.1.1")
    sent, received = transfer(a, n, "10.0.1.2", MEGABYTES)
    assert received == sent


def test_a_flood_of_initiations_gets_cookies_and_the_tunnel_keeps_working(lab):
    a, b, keys = encrypted_pair(lab)
    c = lab.host("c", 3)
    for i in range(10, 20):  # many sources
        c.ip("addr", "add", "198.18.0.%d/24" % (100 + i), "dev", "eth0")
    flood = ("import sys, os, socket, time\n"
             "sys.path.insert(0, %r)\n"
             "import udpProxyServer as ups\n"
             "target = ups.key_from_base64(%r)\n"
             "socks = []\n"
             "for i in range(10, 20):\n"
             "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "    s.bind(('198.18.0.%%d' %% (100 + i), 0))\n"
             "    socks.append(s)\n"
             "for n in range(1500):\n"
             "    _, message = ups.create_initiation(ups.generate_private_key(), target, n,\n"
             "                                       ups.tai64n(time.time_ns()))\n"
             "    socks[n %% 10].sendto(ups.add_macs(message, target), (%r, 5000))\n"
             % (lab.workdir, keys["a"], a.address))
    with meanwhile(lambda: transfer(b, a, "10.0.1.1", MEGABYTES)) as mover:
        c.run(sys.executable, "-c", flood, timeout=120)
    (sent, received), = [mover[0]]
    assert received == sent
    listed = json.loads(a.control("127.0.0.1", "-o", "list", "--json").stdout)
    assert listed["drops"].get("cookie_sent", 0) > 0  # under load: a cookie, no DH
    assert listed["drops"].get("unknown_peer", 0) > 0  # the rest: keys of no tunnel
    assert a.ping("10.0.1.2")


def test_a_barrage_of_wireguard_shaped_noise_is_counted_and_harms_nothing(lab, figures):
    a, b, keys = encrypted_pair(lab)
    c = lab.host("c", 3)
    out = c.run(sys.executable, os.path.join(HELPERS, "barrage.py"), "wireguard", a.address,
                "5000", "100000", "5", timeout=300).stdout.split()
    assert a.daemon.poll() is None and a.ping("10.0.1.2")
    listed = json.loads(a.control("127.0.0.1", "-o", "list", "--json").stdout)
    figures("%s WireGuard-shaped datagrams in %s s: the daemon counted %s; the tunnel pings"
            % (out[0], out[1], listed["drops"]))
    assert sum(listed["drops"].values()) > 0


def test_wireguard_go_restarted_mid_transfer(lab, wireguard_go):
    a, b, device = wireguard_go
    assert a.ping("10.0.1.2")
    config = b.run("wg", "showconf", device).stdout
    with meanwhile(lambda: transfer(a, b, "10.0.1.2", MEGABYTES)) as mover:
        wait_until(lambda: wg_tunnel(a)["tx_bytes"] > 1 << 20, "the transfer is under way")
        for proc in lab.processes:
            if proc.args[3:4] == ["wireguard-go"]:
                proc.terminate()
                proc.wait()
        lab.spawn(b.ns, ["wireguard-go", "-f", device], "b-wireguard-go-2.log")
        wait_until(lambda: b.run("wg", "show", device, check=False).returncode == 0,
                   "wireguard-go's device answers wg again")
        conf = os.path.join(lab.workdir, "wg.conf")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(config)
        b.run("wg", "setconf", device, conf)
        b.ip("addr", "replace", "10.0.1.2/30", "dev", device)
        b.ip("link", "set", device, "mtu", str(MTU), "up")
    (sent, received), = [mover[0]]
    assert received == sent
    # wireguard-go never says it takes sealed chunks: one message a segment throughout.
    assert wg_tunnel(a)["superPackets"] == "segments"


def test_a_replayed_initiation_is_ignored(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    keys = {}
    for host in (a, b):
        path, keys[host.name] = key_file(lab, host)
        host.start_daemon("--key-file", path)
    sniffer = capture(lab, b, a, 1, 1)  # b's initiation to a
    a.control("127.0.0.1", "-o", "add", "-n", "wg2", "-t", "10.0.1.1", "-m", str(MTU),
              "-r", b.address, "--peer-key", keys["b"])
    b.control("127.0.0.1", "-o", "add", "-n", "wg1", "-t", "10.0.1.2", "-m", str(MTU),
              "-r", a.address, "--peer-key", keys["a"])
    assert b.ping("10.0.1.1")
    initiation = bytes.fromhex(sniffer.stdout.readline().strip())
    handshake = wg_tunnel(a)["latestHandshake"]
    b.send_udp(a.address, 5000, [initiation])  # its timestamp is not newer: no new session
    wait_until(lambda: wg_tunnel(a)["drops"].get("replayed_initiation") == 1,
               "the replayed initiation counted")
    assert wg_tunnel(a)["latestHandshake"] == handshake and a.ping("10.0.1.2")


def test_a_preshared_key_set_from_a_management_host_never_crosses_the_network(lab):
    """The README's way: the key in a file on each daemon's host, the tunnels added from a
    management host with --psk-file naming it; what goes on the wire names only the file."""
    a, b, m = lab.host("a", 1), lab.host("b", 2), lab.host("m", 3)
    keys = {}
    for host in (a, b):
        path, keys[host.name] = key_file(lab, host)
        host.start_daemon("--key-file", path)
    psk = base64.b64encode(os.urandom(32)).decode()
    psk_path = os.path.join(lab.workdir, "psk")  # every test host sees this folder
    with open(os.open(psk_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(psk + "\n")
    sniffers = [capture(lab, m, host, ord("{"), 2, port=5001) for host in (a, b)]
    for host, peer, address, name in ((a, b, "10.0.1.1", "wg2"), (b, a, "10.0.1.2", "wg1")):
        m.control("-s", host.address, "-o", "add", "-n", name, "-t", address, "-m", str(MTU),
                  "-r", peer.address, "--peer-key", keys[peer.name], "--psk-file", psk_path)
    requests = [line for sniffer in sniffers for line in sniffer.stdout.read().split()]
    assert len(requests) == 4  # to each daemon: its cookie asked for, then the add
    sent = b"".join(bytes.fromhex(line) for line in requests)
    assert psk_path.encode() in sent and psk.encode() not in sent
    assert base64.b64decode(psk) not in sent
    assert a.ping("10.0.1.2") and b.ping("10.0.1.1")
    assert wg_tunnel(a)["presharedKeyFile"] == psk_path
