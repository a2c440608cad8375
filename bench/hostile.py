"""Encrypted tunnels under attack, and at rest: what a handshake flood leaves of a TCP stream,
and what 1,000 tunnels to dead peers cost once their handshakes have been given up.

The flood: an encrypted tunnel of ours on a Pair, one TCP stream a -> b through it for a
set time while host a floods b's daemon with 8,000 initiations a second (tests/flood.py)
from one address or a hundred of its own: with a valid mac1 and the mac2 of the cookies b
sends it, or with a wrong mac1. The attacker's own cost is the same both ways, so the ratio
of the two streams is what the valid MACs cost the tunnel.

At rest: one daemon with a key takes 1,000 encrypted tunnels whose peers (198.19.0.0/16)
are routed nowhere; one packet into each starts a handshake that is sent again every 5 s
and given up after 90 s (REKEY_ATTEMPT_TIME); its CPU is counted over those first 90 s and
over the time after.
"""

import json
import os
import signal
import sys
import time

import measure
import tunnels
from measure import cpu_seconds
from pair import Pair, lablib

FLOOD_RATE = 8000
FLOOD_HELPER = os.path.join(lablib.HELPERS, "flood.py")
# The attacker's addresses, on host a's link, far from the hosts' own.
ATTACKER_ADDRESSES = ["198.18.0.%d" % (100 + i) for i in range(100)]
# Long enough for the daemon to be under load and the attacker to hold its cookies.
FLOOD_WARM_UP = 2
DEAD_PEERS = 1000
FIRST_DEAD_PEER = "198.19.0.1"
DEAD_TUNNEL_SPACE = "10.64.0.0/16"
# wireguard-go's and the paper's REKEY_ATTEMPT_TIME, and some slack past the last retry.
GIVE_UP_SECONDS = 95
ADD_TIMEOUT = 60


def flood_tcp(seconds):
    """TCP through an encrypted tunnel with no flood, then under each flood; the figures."""
    rows = {"none": None, "bad_mac1_1": ("bad", 1), "valid_1": ("valid", 1),
            "bad_mac1_100": ("bad", 100), "valid_100": ("valid", 100)}
    figures = {}
    for label, attack in rows.items():
        figures[label] = tcp_under(attack, seconds)
    for sources in (1, 100):
        valid, bad = figures["valid_%d" % sources], figures["bad_mac1_%d" % sources]
        figures["ratio_%d" % sources] = (valid["mbit_s"] / bad["mbit_s"]
                                         if "mbit_s" in valid and bad.get("mbit_s") else None)
    return figures


def tcp_under(attack, seconds):
    with lablib.Lab(show_logs=False) as lab:
        pair = Pair(lab)
        processes = tunnels.start_udpproxy_encrypted(pair)
        lablib.wait_until(lambda: pair.a.ping(pair.b.tunnel_address, count=1), "ping through")
        flooder = None
        if attack is not None:
            kind, sources = attack
            addresses = ATTACKER_ADDRESSES[:sources]
            for address in addresses:
                pair.a.ip("addr", "add", address + "/24", "dev", "eth0")
            flooder = lab.spawn(pair.a.ns, [
                sys.executable, FLOOD_HELPER, lab.workdir, pair.b.public_key, pair.b.address,
                str(tunnels.DATA_PORT), str(FLOOD_RATE), str(seconds + 60), *addresses,
                *(["--bad-mac1"] if kind == "bad" else [])], "flood.log")
            time.sleep(FLOOD_WARM_UP)
        try:
            figures = measure.tcp_throughput(pair, processes, seconds)
        except Exception as e:
            figures = {"error": tunnels.last_line(e)}
        if flooder is not None:
            flooder.send_signal(signal.SIGTERM)
            flooder.wait(lablib.PATIENCE)
            with open(flooder.log_path) as f:
                figures["flood"] = json.loads(f.read().splitlines()[-1])
            listed = pair.b.control("127.0.0.1", "-o", "list", "--json", check=False).stdout
            figures["drops"] = json.loads(listed)["drops"] if listed.strip() else None
        return figures


def idle_dead_peers(count=DEAD_PEERS, after=30):
    """One daemon, count encrypted tunnels to peers that never answer: its CPU while their
    handshakes are tried, and for after seconds once they are given up."""
    import ipaddress
    space = ipaddress.ip_network(DEAD_TUNNEL_SPACE)
    first = ipaddress.ip_address(FIRST_DEAD_PEER)
    with lablib.Lab(show_logs=False) as lab:
        host = lablib.Host(lab, "idle", lab.namespace("idle"), None)
        key = os.path.join(lab.workdir, "idle.key")
        host.run(sys.executable, "-I", lab.script("udpProxyServer.py"), "--public-key",
                 "--key-file", key, "--generate-key")
        daemon = host.start_daemon("--key-file", key)
        # A key of its own for each peer: a daemon takes a peer's key for one tunnel only.
        requests = [{"op": "add", "tunnel": [
            {"name": "t%d" % i, "tunnelIP": str(space.network_address + 4 * i + 1),
             "netmask": "255.255.255.252", "mtu": 1420, "remoteServer": str(first + i),
             "publicKey": fresh_key()} for i in range(start, min(start + 50, count))]}
            for start in range(0, count, 50)]
        answers = json.loads(host.run(sys.executable, "-I", os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "send_batches.py"), "5001",
            str(ADD_TIMEOUT), input=json.dumps(requests), timeout=ADD_TIMEOUT * len(requests)).stdout)
        added = sum(1 for answer in answers for result in (answer["reply"] or {}).get("results", [])
                    if result["ok"])
        # A packet into each tunnel: each starts its handshake towards a peer that never answers.
        poke = ("import socket, ipaddress\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "net = ipaddress.ip_network(%r)\n"
                "for i in range(%d):\n"
                "    s.sendto(b'x', (str(net.network_address + 4 * i + 2), 9))\n"
                % (DEAD_TUNNEL_SPACE, count))
        before = cpu_seconds([daemon])
        started = time.monotonic()
        host.run(sys.executable, "-c", poke)
        time.sleep(GIVE_UP_SECONDS)
        trying = cpu_seconds([daemon]) - before
        trying_seconds = time.monotonic() - started
        before = cpu_seconds([daemon])
        time.sleep(after)
        idle = cpu_seconds([daemon]) - before
        listed = json.loads(host.control("127.0.0.1", "-o", "list", "--json").stdout)
        flushed = sum(t["drops"].get("no_session", 0) for t in listed["tunnels"])
        return {"tunnels": added, "trying_seconds": trying_seconds,
                "trying_cpu_pct": 100 * trying / trying_seconds,
                "idle_seconds": after, "idle_cpu_pct": 100 * idle / after,
                "packets_given_up": flushed}


def fresh_key():
    """A public key for a peer that does not exist: any X25519 key will do."""
    import base64
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    return base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()


def print_hostile(figures, say):
    if "flood" in figures:
        flood = figures["flood"]
        say("Encrypted TCP a -> b while a floods b's daemon with %d initiations a second"
            % FLOOD_RATE)
        for label, text in (("none", "no flood"), ("bad_mac1_1", "wrong mac1, 1 source"),
                            ("valid_1", "valid mac1 and mac2, 1 source"),
                            ("bad_mac1_100", "wrong mac1, 100 sources"),
                            ("valid_100", "valid mac1 and mac2, 100 sources")):
            row = flood.get(label) or {}
            if "mbit_s" in row:
                sent = row.get("flood", {})
                say("  %-34s %6.0f Mbit/s%s" % (text, row["mbit_s"], "" if not sent else
                    "  (%d sent, %d with mac2)" % (sent.get("sent", 0), sent.get("with_mac2", 0))))
            else:
                say("  %-34s failed: %s" % (text, row.get("error")))
        for sources in (1, 100):
            share = flood.get("ratio_%d" % sources)
            say("  valid over wrong mac1, %3d sources: %s  (goal: at least 0.7x) %s" % (
                sources, "-" if share is None else "%.2fx" % share,
                "" if share is None else "met" if share >= 0.7 else "not met"))
    if "idle" in figures:
        idle = figures["idle"]
        if "error" in idle:
            say("Idle: failed: %s" % idle["error"])
            return
        say("%d encrypted tunnels to dead peers: %.2f %% of a core while their handshakes were"
            " tried (%.0f s), %.2f %% in the %d s after (goal: under 2 %%) %s" % (
                idle["tunnels"], idle["trying_cpu_pct"], idle["trying_seconds"],
                idle["idle_cpu_pct"], idle["idle_seconds"],
                "met" if idle["idle_cpu_pct"] < 2 else "not met"))
