"""Managing daemons from another host, as the README does it: daemons started with
the default flags (no secret), the control script on a management host of its own.
Every request is answered in full once the manager's address is validated, and the
control port still sends no more bytes to an unvalidated source than it received."""

import json
import os
import secrets
import sys

import pytest

from lab import HELPERS, MESH_HOSTS, mesh_file, request_2015, wait_until, write_secret

PROBE = os.path.join(HELPERS, "probe.py")
PADDED = 256  # as the control script pads its plain requests


@pytest.fixture
def fleet(lab):
    """Three hosts running the daemon as the README starts it, and a management host."""
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS]
    for host in hosts:
        host.start_daemon()
    return hosts, lab.host("manager", 9)


def test_a_manager_adds_lists_and_deletes_on_other_hosts(fleet):
    (one, two, _), manager = fleet
    done = manager.control("-s", one.address, "-o", "add", "-n", "udp2", "-t", "10.0.1.1",
                           "-r", two.address)
    assert done.stdout == "udp2: add done\n"
    manager.control("-s", two.address, "-o", "add", "-n", "udp1", "-t", "10.0.1.2",
                    "-r", one.address)
    assert one.ping("10.0.1.2")

    table = manager.control("-s", one.address, "-o", "list").stdout
    assert "udp2" in table and "10.0.1.1/30" in table and two.address + ":5000" in table
    listed = json.loads(manager.control("-s", one.address, "-o", "list", "--json").stdout)
    assert listed["ok"] and [t["name"] for t in listed["tunnels"]] == ["udp2"]
    assert listed["tunnels"][0]["tx_packets"] >= 3

    gone = manager.control("-s", one.address, "-o", "del", "-n", "udp2")
    assert gone.stdout == "udp2: del done\n"
    assert not one.link_exists("udp2")
    assert manager.control("-s", one.address, "-o", "list", "--json").stdout.count('"name"') == 0


def test_a_manager_sees_every_refusal_with_its_reason(fleet):
    (one, two, _), manager = fleet
    manager.control("-s", one.address, "-o", "add", "-n", "udp2", "-t", "10.0.1.1",
                    "-r", two.address)
    refusals = [
        (("-n", "udp7", "-t", "10.0.7.1", "-r", "198.18.0.7", "-m", "70000"),
         "udp7: error: mtu 70000 out of range (68-65503)"),
        (("-n", "udp7", "-t", "10.0.7.1", "-tm", "255.0.255.0", "-r", "198.18.0.7"),
         "udp7: error: invalid netmask '255.0.255.0'"),
        (("-n", "udp2", "-t", "10.0.8.1", "-r", "198.18.0.8"),
         "udp2: error: tunnel name 'udp2' already in use"),
        (("-n", "udp8", "-t", "10.0.8.1", "-r", two.address),
         "udp8: error: remoteServer %s already in use by tunnel 'udp2'" % two.address),
        (("-o", "del", "-n", "udp9"), "udp9: error: no tunnel named 'udp9'"),
    ]
    for args, reason in refusals:
        result = manager.control("-s", one.address, *args, check=False)
        assert (result.returncode, result.stdout.strip()) == (1, reason), args
    assert list(one.tunnels()) == ["udp2"]


def test_a_manager_builds_reapplies_and_edits_a_mesh_without_a_secret(lab, fleet):
    hosts, manager = fleet
    path = mesh_file(lab, hosts)
    first = manager.control("--mesh", path).stdout
    assert "mesh: all 3 hosts done" in first
    for host in hosts:
        assert "%s (%s): 2 added, 0 deleted, 0 unchanged" % (host.name, host.address) in first
    # Nothing sent yet: every pair idle, which is well.
    idle = manager.control("--mesh", path, "--status")
    assert "mesh: 3 hosts, 0 of 6 tunnel ends up, 0 down, 6 idle" in idle.stdout
    assert idle.returncode == 0
    assert all(a.ping(b.lan, source=a.lan) for a in hosts for b in hosts if a is not b)
    assert "mesh: 3 hosts, 6 of 6 tunnel ends up, 0 down" in manager.control(
        "--mesh", path, "--status").stdout

    again = manager.control("--mesh", path).stdout
    for host in hosts:
        assert "%s (%s): 0 added, 0 deleted, 2 unchanged" % (host.name, host.address) in again

    one, two, three = hosts
    before = one.tunnels()["m-minion-3"]
    index = one.run("cat", "/sys/class/net/m-minion-3/ifindex").stdout
    edited = manager.control("--mesh", mesh_file(lab, hosts, extra_lan="192.168.33.0/24")).stdout
    for host in (one, two):  # their tunnel to minion-3 now routes its new LAN too, in place
        assert "%s (%s): 0 added, 0 deleted, 1 changed, 1 unchanged" % (
            host.name, host.address) in edited
    assert one.run("cat", "/sys/class/net/m-minion-3/ifindex").stdout == index
    assert one.tunnels()["m-minion-3"]["tx_packets"] >= before["tx_packets"] > 0
    assert "%s (%s): 0 added, 0 deleted, 2 unchanged" % (three.name, three.address) in edited
    assert "192.168.33.0/24 dev m-minion-3" in one.routes()
    assert all(a.ping(b.lan, source=a.lan) for a in hosts for b in hosts if a is not b)


def request_loop(host, target, count, validated):
    """Send count requests back to back from host, each awaiting its answer; the number
    answered. validated: through the control script's Daemon (cookie first); else plain
    datagrams as any tool sends them."""
    code = """
import json, socket, sys
sys.path.insert(0, %(dir)r)
import udpProxyServerControl as ctl
messages = [{"op": "list"}, {"op": "del", "tunnel": [{"name": "nope"}]}, {"op": "frobnicate"}]
answered = 0
if %(validated)r:
    with ctl.Daemon(%(target)r, 5001, 2) as daemon:
        for i in range(%(count)d):
            reply = daemon.request(messages[i %% 3])
            answered += "ok" in reply and "cookie" not in reply
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2)
    for i in range(%(count)d):
        sock.sendto(json.dumps(messages[i %% 3]).encode(), (%(target)r, 5001))
        try:
            answered += "ok" in json.loads(sock.recv(65535))
        except socket.timeout:
            pass
print(answered)
""" % {"dir": host.lab.workdir, "validated": validated, "target": target, "count": count}
    return int(host.run(sys.executable, "-I", "-c", code, timeout=300).stdout)


def test_back_to_back_requests_all_get_their_answer(fleet):
    (one, _, _), manager = fleet
    # From loopback, plain: 5,000 requests, far past the reply budget of unvalidated sources.
    assert request_loop(one, "127.0.0.1", 5000, validated=False) == 5000
    # From the management host, validated by its cookie: every answer whole.
    assert request_loop(manager, one.address, 1000, validated=True) == 1000
    assert "rate_limited" not in one.request({"op": "list"})["control"]


def padded(message):
    return json.dumps(message).encode().ljust(PADDED)


def probe(host, target, datagrams, burst=False):
    argv = [sys.executable, PROBE, target, "5001", "0.3"] + (["burst"] if burst else [])
    out = host.run(*argv, input=json.dumps([d.hex() for d in datagrams]), timeout=120).stdout
    return json.loads(out)


def probe_datagrams(manager_cookie):
    forged = secrets.token_hex(16)
    return [
        b"x", b"\xff" * 300, b"[" * 3000, b'{"op": "list"}', padded({"op": "list"}),
        b'{"op": "cookie"}', padded({"op": "cookie"}), b'{"op": "nope"}', padded({"op": "nope"}),
        # Acted on without a secret: the 2015 script sends just this.
        request_2015("add", "udp5", "10.0.5.1", "198.18.0.5"),
        json.dumps({"op": "list", "cookie": forged}).encode(),
        padded({"op": "list", "cookie": forged}),
        padded({"op": "list", "cookie": manager_cookie}),  # valid, but for another address
        padded({"op": "list", "cookie": "not hex"}),
        padded({"auth": {"ts": 1, "nonce": "0" * 32, "mac": "0" * 64}, "payload": "{}"}),
    ]


@pytest.mark.parametrize("locked", ["no secret", "--allow", "--secret-file"])
def test_an_unvalidated_source_never_gets_more_bytes_than_it_sent(lab, locked):
    a, manager, prober = lab.host("a", 1), lab.host("manager", 9), lab.host("prober", 7)
    flags = {"no secret": (), "--allow": ("--allow", manager.address + "/32"),
             "--secret-file": ("--secret-file", write_secret(lab))}[locked]
    a.start_daemon(*flags)
    secret = locked == "--secret-file"
    reply = probe(manager, a.address, [padded({"op": "cookie"})])["pairs"][0][1]
    manager_cookie = json.loads(reply).get("cookie") or secrets.token_hex(16)

    answered = probe(prober, a.address, probe_datagrams(manager_cookie))
    for size, reply in answered["pairs"]:
        assert reply is None or len(reply.encode()) <= size, (size, reply)
    assert answered["received"] <= answered["sent"]
    replies = [json.loads(reply) for _, reply in answered["pairs"] if reply]
    if locked == "--secret-file":
        # Refused, saying why, within the request's size; nothing was done.
        assert replies and all(r["ok"] is False for r in replies)
        assert any("authentication required" in r.get("error", "") for r in replies)
        assert not a.link_exists("udp5")
    elif locked == "--allow":
        assert replies == [] and not a.link_exists("udp5")  # not allowed: dropped unread
    else:
        # Padded requests learn the cookie; the 2015 add was done though its answer was cut.
        assert any(r.get("op") == "cookie" and r.get("cookie") for r in replies)
        assert any(r.get("retry") for r in replies)  # the forged and the misused cookie
        assert a.link_exists("udp5")

    flood = probe(prober, a.address, [padded({"op": "list"})] * 1000, burst=True)
    assert flood["received"] <= flood["sent"]
    listed = a.control("127.0.0.1", *flags[:2] if secret else (), "-o", "list", "--json")
    counts = json.loads(listed.stdout)["control"]
    if locked == "--allow":
        assert counts["not_allowed"] >= 1000 and flood["received"] == 0
        # The allowed manager is answered whole without a cookie, as by 2.0.
        whole = manager.request({"op": "list"}, to=a.address)
        assert whole["ok"] and "tunnels" in whole and "cookie" not in whole
    else:
        assert flood["received"] > 0 and counts["rate_limited"] > 0


# Padded plain requests in a manager's name, about 2,000 a second for at most 10 s: each
# gets a cut reply, so they exhaust its reply budget (100 a second) many times over.
FLOOD = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(20000):
    s.sendto(b'{"op": "list"}'.ljust(512), (%r, 5001))
    time.sleep(0.0005)
"""


def test_a_flood_in_the_managers_name_does_not_keep_it_from_managing(lab, fleet):
    (one, _, _), manager = fleet
    lab.spawn(manager.ns, [sys.executable, "-c", FLOOD % one.address], "flood.log")

    def limited():
        counts = one.request({"op": "list"})["control"]
        return counts.get("rate_limited", 0) > 100

    wait_until(limited, "the flood exhausts the manager's reply budget")
    for _ in range(3):  # the cookie comes through, and with it every answer whole
        listed = manager.control("-s", one.address, "-o", "list", "--json")
        assert "tunnels" in json.loads(listed.stdout)
    assert limited()


def test_no_reply_names_the_likely_causes(fleet):
    (one, _, _), manager = fleet
    silent = manager.control("-s", one.address, "-p", "5999", "-o", "list", "--timeout", "0.5",
                             check=False)
    assert silent.returncode == 3
    for cause in ("nothing listens at %s port 5999" % one.address, "firewall", "--allow",
                  "--secret-file", "2015 daemon never replies", "--timeout 0"):
        assert cause in silent.stderr, cause


def test_a_daemon_with_a_secret_tells_a_manager_without_it_why(lab):
    a, manager = lab.host("a", 1), lab.host("manager", 9)
    secret = write_secret(lab)
    a.start_daemon("--secret-file", secret)
    for args in (("-o", "list"), ("-o", "del", "-n", "udp2")):
        result = manager.control("-s", a.address, *args, check=False)
        assert result.returncode == 1, args
        assert "authentication required" in result.stdout and "--secret-file" in result.stdout
    listed = manager.control("-s", a.address, "--secret-file", secret, "-o", "list", "--json")
    assert json.loads(listed.stdout)["tunnels"] == []
