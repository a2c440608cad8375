"""Interop with a real WireGuard host: Debian's wireguard-go in one namespace, and in another a
peer built only from udpProxyServer's WireGuard functions and a UDP socket (wgpeer.py). Each
side in turn makes the handshake, and a ping crosses in transport messages both ways."""

import json
import os
import shutil
import sys

import pytest

from conftest import cannot_run
from lab import HELPERS, PATIENCE, wait_until

PORT = 51820
# wgpeer.py speaks for 10.9.0.1; wireguard-go's device has 10.9.0.2.
OURS, THEIRS = "10.9.0.1", "10.9.0.2"
PINGS = 3


def wg(host, *args, input=None):
    """What wg prints, run on host."""
    return host.run("wg", *args, input=input).stdout.strip()


@pytest.fixture(params=["psk", "no-psk"])
def wireguard_go(lab, request):
    """Host a, for wgpeer.py, and host b running wireguard-go, whose one peer is a's key,
    with a preshared key or none; returns a, b, b's device name and a's keys for wgpeer.py."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            cannot_run("needs %r (make test installs it)" % tool)
    a, b = lab.host("a", 1), lab.host("b", 2)
    # The UAPI socket is /var/run/wireguard/<device>.sock in every namespace: a name of this lab's.
    device = "wg" + lab.prefix[3:][-13:]
    ours, theirs = wg(a, "genkey"), wg(b, "genkey")
    psk = wg(b, "genpsk") if request.param == "psk" else None
    our_public, their_public = wg(a, "pubkey", input=ours), wg(b, "pubkey", input=theirs)
    files = {}
    for name, text in (("b-private", theirs), ("psk", psk)):
        if text:
            files[name] = os.path.join(lab.workdir, name)
            with open(os.open(files[name], os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(text + "\n")
    lab.spawn(b.ns, ["wireguard-go", "-f", device], "b-wireguard-go.log",
              env={"LOG_LEVEL": "verbose"})
    wait_until(lambda: b.run("wg", "show", device, check=False).returncode == 0,
               "wireguard-go's device answers wg")
    b.run("wg", "set", device, "private-key", files["b-private"], "listen-port", str(PORT),
          "peer", our_public, *(("preshared-key", files["psk"]) if psk else ()),
          "allowed-ips", OURS + "/32", "endpoint", "%s:%d" % (a.address, PORT))
    b.ip("addr", "add", THEIRS + "/24", "dev", device)
    b.ip("link", "set", device, "up")
    keys = os.path.join(lab.workdir, "a-keys.json")
    with open(os.open(keys, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        json.dump({"private": ours, "peer": their_public, "psk": psk}, f)
    return a, b, device, keys


def wgpeer(lab, host, *args):
    return lab.spawn(host.ns, [sys.executable, os.path.join(HELPERS, "wgpeer.py"), args[0],
                               lab.workdir, *args[1:]], "%s-wgpeer-%s.log" % (host.name, args[0]))


def log_of(proc):
    with open(proc.log_path) as f:
        return f.read()


def test_we_initiate_and_wireguard_go_answers_our_ping(lab, wireguard_go):
    a, b, device, keys = wireguard_go
    peer = wgpeer(lab, a, "initiate", keys, b.address, str(PORT))
    assert peer.wait(PATIENCE) == 0, log_of(peer)
    assert "echo reply" in log_of(peer)
    # wireguard-go took our initiation, and our sealed ping, as a WireGuard peer's.
    assert wg(b, "show", device, "latest-handshakes").split()[1] != "0"
    assert int(wg(b, "show", device, "transfer").split()[1]) > 0


def test_wireguard_go_initiates_and_we_answer_its_pings(lab, wireguard_go):
    a, b, device, keys = wireguard_go
    peer = wgpeer(lab, a, "respond", keys, str(PORT), str(PINGS))
    wait_until(lambda: "listening" in log_of(peer), "wgpeer.py listens")
    # Its ping makes wireguard-go start the handshake; every request is answered once ours.
    assert b.ping(OURS, count=PINGS), log_of(peer)
    assert peer.wait(PATIENCE) == 0, log_of(peer)
    assert "handshake answered" in log_of(peer)
