"""Encrypted tunnels on a hostile network, for real: two of our daemons with an encrypted
tunnel, and a third host that floods one of them with handshake initiations (valid mac1,
and mac2 from the cookies it is sent), from one address and from a hundred; a malicious
peer that completes real handshakes and then sends broken inner packets; plain and
encrypted tunnels between the same two daemons at once. Each time, the legitimate side is
held to working during the attack, not only the daemon to surviving it."""

import json
import os
import signal
import sys

import pytest

from lab import HELPERS, meanwhile, transfer, wait_until
from test_encrypted import MTU, encrypted_pair, wg_tunnel

MEGABYTES = 16 << 20
# A plain mesh's MTU: its datagrams are as long as an encrypted mesh's.
PLAIN_MTU = 1448
FLOOD_RATE = 8000
# Longer than the test needs: it is stopped once the legitimate side has been checked.
FLOOD_SECONDS = 60


def flood(lab, attacker, target, public, sources, *flags):
    """Start flood.py on the attacker host; the process, whose output is its summary."""
    return lab.spawn(attacker.ns, [sys.executable, os.path.join(HELPERS, "flood.py"), lab.workdir,
                                   public, target.address, "5000", str(FLOOD_RATE),
                                   str(FLOOD_SECONDS), *sources, *flags], "flood.log")


def listed(host):
    return json.loads(host.control("127.0.0.1", "-o", "list", "--json").stdout)


@pytest.mark.parametrize("sources", [1, 100])
def test_a_handshake_flood_with_valid_macs_leaves_the_tunnel_and_a_new_handshake_working(
        lab, sources, figures):
    a, b, keys = encrypted_pair(lab)
    c = lab.host("c", 3)
    addresses = ["198.18.0.%d" % (100 + i) for i in range(sources)] if sources > 1 else [c.address]
    for address in addresses[1:] if sources == 1 else addresses:
        c.ip("addr", "add", address + "/24", "dev", "eth0")
    assert a.ping("10.0.1.2")
    attacker = flood(lab, c, a, keys["a"], addresses)
    wait_until(lambda: listed(a)["drops"].get("cookie_sent", 0) > 0, "the daemon under load")
    # A new handshake during the flood: b forgets its session and must make a new one,
    # through the cookie a daemon under load asks for.
    before = wg_tunnel(a)["latestHandshake"]
    b.control("127.0.0.1", "-o", "del", "-n", "wg1")
    b.control("127.0.0.1", "-o", "add", "-n", "wg1", "-t", "10.0.1.2", "-m", str(MTU),
              "-r", a.address, "--peer-key", keys["a"])
    wait_until(lambda: b.ping("10.0.1.1", count=1), "b's new handshake during the flood")
    assert wg_tunnel(a)["latestHandshake"] != before
    sent, received = transfer(b, a, "10.0.1.1", MEGABYTES)  # and TCP, still during the flood
    assert received == sent
    assert attacker.poll() is None, "the flood ended before the test did: make it longer"
    attacker.send_signal(signal.SIGTERM)
    assert attacker.wait(60) == 0
    summary = json.loads(open(attacker.log_path).read().splitlines()[-1])
    assert summary["with_mac2"] > 0  # it got cookies, and used them as an attacker would
    drops = listed(a)["drops"]
    figures("%d initiations in %s s from %d sources, %d with mac2 from %d cookies; the daemon"
            " counted %s" % (summary["sent"], summary["seconds"], sources, summary["with_mac2"],
                             summary["cookies"], dict(sorted(drops.items()))))
    assert drops["handshake_rate_limited"] > 0 and drops["unknown_peer"] > 0
    assert a.daemon.poll() is None and "Traceback" not in open(a.daemon.log_path).read()


def watch(lab, host, device, *markers):
    """Start devwatch.py on one of host's devices; stop() ends it and gives its counts."""
    proc = lab.spawn(host.ns, [sys.executable, os.path.join(HELPERS, "devwatch.py"), device,
                               "120", *markers], "watch-%s.log" % device)
    wait_until(lambda: "watching" in open(proc.log_path).read(), "watching %s" % device)
    return proc


def counts(proc):
    """What a watcher counted, once stopped."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return json.loads(open(proc.log_path).read().splitlines()[-1])


def test_a_malicious_peer_with_real_keys_reaches_no_other_tunnel(lab, figures):
    """Host m holds the keys of two of a's tunnels: after real handshakes it sends 100,000
    transport messages, half of them broken inner packets, in GSO trains, on both at once,
    while b uses its own tunnel to a."""
    a, b, keys = encrypted_pair(lab)  # a's wg2 <-> b's wg1: the victim
    m = lab.host("m", 4)
    identities = []
    for index, (tunnel, ours, theirs, marker) in enumerate(
            (("wgm1", "10.0.2.2", "10.0.2.1", "EVIL-ONE"), ("wgm2", "10.0.3.2", "10.0.3.1",
                                                           "EVIL-TWO"))):
        private = m.run("wg", "genkey").stdout.strip()
        public = m.run("wg", "pubkey", input=private).stdout.strip()
        port = 6001 + index
        a.control("127.0.0.1", "-o", "add", "-n", tunnel, "-t", theirs, "-m", str(MTU),
                  "-r", m.address, "--remote-port", str(port), "--peer-key", public)
        identities.append({"private": private, "bind": [m.address, port], "inner": ours,
                           "theirs": theirs, "marker": marker, "victim": "10.0.1.2"})
    config = os.path.join(lab.workdir, "evil.json")
    with open(config, "w") as f:
        json.dump({"target": [a.address, 5000], "target_public": keys["a"],
                   "messages": 100000, "identities": identities}, f)
    assert a.ping("10.0.1.2")
    watchers = {device: watch(lab, a, device, "EVIL-ONE", "EVIL-TWO")
                for device in ("wg2", "wgm1", "wgm2")}
    with meanwhile(lambda: b.run("ping", "-n", "-q", "-c", "200", "-i", "0.02", "10.0.1.1",
                                 check=False).stdout) as pinging:
        evil = m.run(sys.executable, os.path.join(HELPERS, "evilpeer.py"), lab.workdir, config,
                     timeout=300)
    assert pinging, "the pings in the background failed (see above)"
    pings = pinging[0]
    seen = {device: counts(proc) for device, proc in watchers.items()}
    sent = json.loads(evil.stdout)
    tunnels = {t["name"]: t for t in listed(a)["tunnels"]}
    figures("sent %s; a's devices got %s; a counted wgm1 %s, wgm2 %s; b's pings: %s" % (
        sent, seen, tunnels["wgm1"]["drops"], tunnels["wgm2"]["drops"],
        pings.strip().splitlines()[-2]))
    # Nothing of m reached b's tunnel, and nothing of one of m's tunnels the other.
    assert seen["wg2"]["EVIL-ONE"] == seen["wg2"]["EVIL-TWO"] == 0
    assert seen["wgm1"]["EVIL-TWO"] == 0 and seen["wgm2"]["EVIL-ONE"] == 0
    assert seen["wgm1"]["EVIL-ONE"] > 0 and seen["wgm2"]["EVIL-TWO"] > 0  # the valid ones
    # Every broken packet counted by its reason, both of m's tunnels still carry its pings,
    # b's tunnel carried its own the whole time, and the daemon logged no traceback.
    for tunnel in ("wgm1", "wgm2"):
        drops = tunnels[tunnel]["drops"]
        assert drops.get("malformed", 0) > 0 and drops.get("not_allowed_source", 0) > 0
        assert drops.get("bad_chunk", 0) > 0  # and broken super-packet chunks
        assert "internal_error" not in drops
    assert all(identity["answered"] > identity["sent"]["valid"] // 2 for identity in sent)
    assert " 0% packet loss" in pings or " 0.0% packet loss" in pings
    assert a.ping("10.0.1.2") and "Traceback" not in open(a.daemon.log_path).read()


def test_plain_and_encrypted_tunnels_to_one_peer_daemon_carry_tcp_at_once(lab, figures):
    """Both tunnels' datagrams go from b's data port to a's, of one size at their meshes'
    MTUs (1448 + 4 = 1420 + 32), as a NIC's GRO would join them into trains of both kinds.
    (A veth here joins no datagrams of separate sends: test_hostile_unit.py sends such
    trains through real UDP GSO and GRO on loopback.)"""
    a, b, keys = encrypted_pair(lab)
    a.add_tunnel("udp2", "10.0.2.1", b, "-m", str(PLAIN_MTU))
    b.add_tunnel("udp1", "10.0.2.2", a, "-m", str(PLAIN_MTU))
    assert a.ping("10.0.1.2") and a.ping("10.0.2.2")
    with meanwhile(lambda: transfer(b, a, "10.0.2.1", MEGABYTES, port=7001)) as plain:
        with meanwhile(lambda: transfer(b, a, "10.0.1.1", MEGABYTES, port=7002)) as sealed:
            pass
    assert plain and sealed, "a transfer in the background failed (see above)"
    for sent, received in (plain[0], sealed[0]):
        assert received == sent
    listing = listed(a)
    tunnels = {t["name"]: t for t in listing["tunnels"]}
    figures("a counted wg2 %s, udp2 %s, the daemon %s" % (
        tunnels["wg2"]["drops"], tunnels["udp2"]["drops"], listing["drops"]))
    assert tunnels["wg2"]["rx_bytes"] > MEGABYTES and tunnels["udp2"]["rx_bytes"] > MEGABYTES
    for name in ("wg2", "udp2"):  # nothing taken for what it is not
        assert not {"not_authentic", "short", "bad_partial", "tun_refused", "malformed",
                    "not_allowed_source"} & set(tunnels[name]["drops"])
    assert not {"unknown_index", "not_wireguard", "unknown_source"} & set(listing["drops"])
