"""The control port of real daemons when it is locked: secrets, allow lists, no amplification."""

import json
import os
import sys
import time

import pytest

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


def test_a_wrong_secret_a_stale_time_and_a_replay_are_refused(locked, lab):
    a, _, _ = locked
    wrong = os.path.join(lab.workdir, "wrong")
    with open(os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(b"not the secret of this mesh at all")
    result = a.control("127.0.0.1", "--secret-file", wrong, "-o", "del", "-n", "udp2",
                       check=False)
    assert result.returncode == 1 and "authentication failed" in result.stdout

    stale = ctl.Session(SECRET, clock=lambda: time.time() - 120).seal({"op": "list"})
    assert "stale request" in a.request(stale)["error"]

    fresh = ctl.Session(SECRET).seal({"op": "add", "tunnel": [{
        "name": "udp9", "tunnelIP": "10.0.9.1", "remoteServer": "198.18.0.9"}]})
    assert "auth" in a.request(fresh)  # sealed: accepted
    assert a.link_exists("udp9")
    assert "replayed request" in a.request(fresh)["error"]
    assert a.daemon.poll() is None


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
    assert a.request({"op": "list"})["control"]["not_allowed"] == 1


def test_a_long_list_comes_in_parts_and_whole(lab, secret_file):
    a = lab.host("a", 1)
    a.start_daemon("--secret-file", secret_file)
    tunnels = [{"name": "t%d" % i, "tunnelIP": "10.64.%d.%d" % (i // 64, i % 64 * 4 + 1),
                "remoteServer": "198.19.%d.%d" % (i // 250, i % 250 + 1)} for i in range(400)]
    for start in range(0, 400, 50):
        assert a.request(ctl.Session(SECRET).seal({"op": "add", "tunnel": tunnels[start:start + 50]}))
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
