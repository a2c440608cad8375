"""The control port of real daemons when it is locked: secrets, allow lists, no amplification."""

import json
import os
import sys
import time

import pytest

from lab import wait_until

import udpProxyServerControl as ctl

SECRET = b"a shared secret of the mesh, 32+ bytes long"


@pytest.fixture
def secret_file(lab):
    path = os.path.join(lab.workdir, "secret")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(SECRET + b"\n")
    return path


@pytest.fixture
def locked(lab, secret_file):
    """Host a's daemon takes only authenticated requests; b and c are other hosts."""
    a, b, c = lab.host("a", 1), lab.host("b", 2), lab.host("c", 3)
    a.start_daemon("--secret-file", secret_file)
    return a, b, c


def test_authenticated_requests_work_from_another_host(locked, secret_file):
    a, b, _ = locked
    done = b.control("-s", a.address, "--secret-file", secret_file, "-o", "add", "-n", "udp2",
                     "-t", "10.0.1.1", "-r", b.address)
    assert "udp2: add done" in done.stdout
    listed = b.control("-s", a.address, "--secret-file", secret_file, "-o", "list").stdout
    assert "udp2" in listed


def test_a_plain_request_is_refused_when_the_daemon_has_a_secret(locked):
    a, _, _ = locked
    result = a.control("127.0.0.1", "-o", "add", "-n", "udp2", "-t", "10.0.1.1", "-r",
                       "198.18.0.2", check=False)
    assert result.returncode == 1 and "authentication required" in result.stdout
    assert not a.link_exists("udp2")


MANAGER_PORT = 40000  # a cookie is good for the address and port it was given to


def sealed_with_cookie(sender, daemon, message, at=None):
    """An authenticated request, as the control script makes it, for daemon from sender."""
    clock = (lambda: at) if at else time.time
    cookie = sender.request(ctl.Session(SECRET).seal({"op": "cookie"}).ljust(ctl.PADDED_REQUEST),
                            to=daemon.address, sport=MANAGER_PORT)
    cookie = json.loads(cookie["payload"])["cookie"]
    return ctl.Session(SECRET, clock=clock).seal(dict(message, cookie=cookie)).ljust(
        ctl.PADDED_REQUEST)


def opened(reply):
    return json.loads(reply["payload"]) if "payload" in reply else reply


ADD_UDP9 = {"op": "add", "tunnel": [{"name": "udp9", "tunnelIP": "10.0.9.1",
                                     "remoteServer": "198.18.0.9"}]}


def test_a_wrong_secret_a_stale_time_and_a_replay_are_refused(locked, lab):
    a, b, _ = locked
    wrong = os.path.join(lab.workdir, "wrong")
    with open(os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(b"not the secret of this mesh at all")
    result = a.control("127.0.0.1", "--secret-file", wrong, "-o", "del", "-n", "udp2",
                       check=False)
    assert result.returncode == 1 and "authentication failed" in result.stdout

    stale = sealed_with_cookie(b, a, {"op": "list"}, at=time.time() - 120)
    assert "stale request" in b.request(stale, to=a.address, sport=MANAGER_PORT)["error"]

    fresh = sealed_with_cookie(b, a, ADD_UDP9)
    assert opened(b.request(fresh, to=a.address, sport=MANAGER_PORT))["ok"]
    assert a.link_exists("udp9")
    assert "replayed request" in b.request(fresh, to=a.address, sport=MANAGER_PORT)["error"]
    assert a.daemon.poll() is None


def test_a_captured_request_is_good_for_no_other_daemon_and_not_after_a_restart(locked,
                                                                               secret_file):
    a, b, c = locked
    c.start_daemon("--secret-file", secret_file)  # another daemon of the mesh, same secret
    captured = sealed_with_cookie(b, a, ADD_UDP9)
    # Replayed to another daemon, from the very address and port it came from: not done.
    reply = b.request(captured, to=c.address, sport=MANAGER_PORT)
    assert len(json.dumps(reply)) <= len(captured)  # the source is unproven: no amplification
    refused = opened(reply)
    assert refused["ok"] is False and refused["retry"] and "cookie" in refused["error"]
    assert not c.link_exists("udp9")
    # Replayed to its own daemon after a restart (same secret, within the time window).
    a.stop_daemon()
    a.start_daemon("--secret-file", secret_file)
    refused = opened(b.request(captured, to=a.address, sport=MANAGER_PORT))
    assert refused["ok"] is False and refused["retry"]
    assert not a.link_exists("udp9")
    # The control script, told to retry, does it once with the new cookie.
    done = b.control("-s", a.address, "--secret-file", secret_file, "-o", "add", "-n", "udp9",
                     "-t", "10.0.9.1", "-r", "198.18.0.9")
    assert done.stdout == "udp9: add done\n"


def test_an_authenticated_request_without_the_cookie_is_refused(locked):
    a, b, _ = locked
    reply = b.request(ctl.Session(SECRET).seal(ADD_UDP9), to=a.address)
    assert "must carry the cookie" in opened(reply)["error"]
    assert not a.link_exists("udp9")


# Plain requests in b's name, about 2,000 a second for at most 10 s: far past the reply
# budget of an unauthenticated source (100 a second), well within what the daemon reads.
FLOOD = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(20000):
    s.sendto(b'{"op": "list"}', (%r, 5001))
    time.sleep(0.0005)
"""


def test_a_flood_in_the_managers_name_does_not_starve_its_authenticated_requests(
        lab, locked, secret_file):
    a, b, _ = locked
    lab.spawn(b.ns, [sys.executable, "-c", FLOOD % a.address], "flood.log")

    def limited():
        listed = a.control("127.0.0.1", "--secret-file", secret_file, "-o", "list", "--json")
        return json.loads(listed.stdout)["control"].get("rate_limited", 0) > 100

    wait_until(limited, "the flood exhausts b's reply budget")
    for _ in range(3):
        listed = b.control("-s", a.address, "--secret-file", secret_file, "-o", "list", "--json")
        assert json.loads(listed.stdout)["ok"]
    assert limited()  # the flood went on meanwhile


def test_a_secret_file_others_can_read_stops_both_scripts(lab, secret_file):
    a = lab.host("a", 1)
    os.chmod(secret_file, 0o644)
    result = a.run(sys.executable, "-I", lab.script("udpProxyServer.py"),
                   "--secret-file", secret_file, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "udpProxyServer: secret file %s is readable by group or others (mode 644): chmod 600 it"
        % secret_file]
    result = a.control("127.0.0.1", "--secret-file", secret_file, "-o", "list", check=False)
    assert result.returncode == 2 and "readable by group or others" in result.stderr


def test_without_a_secret_the_daemon_warns_that_its_port_is_open(lab):
    a = lab.host("a", 1)
    a.start_daemon()
    with open(a.daemon.log_path) as log:
        assert "no --secret-file: the control port [::]:5001 takes requests from anyone" \
            in log.read()


def test_only_allowed_sources_and_loopback_are_answered(lab):
    a, b, c = lab.host("a", 1), lab.host("b", 2), lab.host("c", 3)
    a.start_daemon("--allow", "198.18.0.2/32")
    assert b.control("-s", a.address, "-o", "list").returncode == 0
    assert a.control("127.0.0.1", "-o", "list").returncode == 0
    refused = c.control("-s", a.address, "-o", "list", "--timeout", "1", check=False)
    assert refused.returncode == 3  # dropped without a reply
    assert a.tunnels() == {}
    # The cookie request, then the request once without a cookie: both dropped unread.
    assert a.request({"op": "list"})["control"]["not_allowed"] == 2


def test_a_long_list_comes_in_parts_and_whole(lab, secret_file):
    a = lab.host("a", 1)
    a.start_daemon("--secret-file", secret_file)
    tunnels = [{"name": "t%d" % i, "tunnelIP": "10.64.%d.%d" % (i // 64, i % 64 * 4 + 1),
                "remoteServer": "198.19.%d.%d" % (i // 250, i % 250 + 1)} for i in range(400)]
    for start in range(0, 400, 50):
        datagram = sealed_with_cookie(a, a, {"op": "add", "tunnel": tunnels[start:start + 50]})
        assert opened(a.request(datagram, to=a.address, sport=MANAGER_PORT))["ok"]
    listed = a.control("127.0.0.1", "--secret-file", secret_file, "-o", "list", "--json").stdout
    names = [t["name"] for t in json.loads(listed)["tunnels"]]
    assert sorted(names) == sorted(t["name"] for t in tunnels)
    table = a.control("127.0.0.1", "--secret-file", secret_file, "-o", "list").stdout
    assert len(table.splitlines()) >= 401


def test_control_bind_keeps_the_port_off_the_network(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon("--control-bind", "127.0.0.1")
    assert a.control("127.0.0.1", "-o", "list").returncode == 0
    assert b.control("-s", a.address, "-o", "list", "--timeout", "1", check=False).returncode == 3
