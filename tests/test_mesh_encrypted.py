"""An encrypted mesh in one command: daemons with their own keys (--key-file, default flags
otherwise), built and watched by --mesh from a management host without a secret."""

import json
import os
import re

import pytest

from lab import MESH_HOSTS, key_file, wait_until

# What an encrypted mesh's tunnels get when the file gives no mtu.
ENCRYPTED_MTU = 1420


@pytest.fixture
def keyed(lab):
    """The three hosts, each running the daemon with a key of its own, and a management
    host; the mesh file (encrypted, no keys in it) and the hosts' public keys."""
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS]
    keys = {}
    for host in hosts:
        path, keys[host.name] = key_file(lab, host)
        host.start_daemon("--key-file", path)
    path = os.path.join(lab.workdir, "mesh.json")
    with open(path, "w") as f:
        json.dump({"encrypt": True, "tunnelNet": "10.0.0.0/24", "hosts": [
            {"name": h.name, "address": h.address, "lan": [h.lan.rsplit(".", 1)[0] + ".0/24"]}
            for h in hosts]}, f)
    return hosts, lab.host("manager", 9), path, keys


def every_lan_reaches_every_other(hosts):
    return all(a.ping(b.lan, source=a.lan) for a in hosts for b in hosts if a is not b)


def line(host, text):
    return "%s (%s): %s" % (host.name, host.address, text)


def test_a_manager_builds_an_encrypted_mesh_keeps_it_and_a_new_key_remakes_just_its_pairs(
        lab, keyed):
    hosts, manager, path, keys = keyed
    one, two, three = hosts
    first = manager.control("--mesh", path).stdout
    for host in hosts:
        assert line(host, "2 added, 0 deleted, 0 unchanged") in first
        for peer in hosts:
            if peer is not host:
                tunnel = host.tunnels()["m-" + peer.name]
                assert (tunnel["publicKey"], tunnel["mtu"]) == (keys[peer.name], ENCRYPTED_MTU)
    assert every_lan_reaches_every_other(hosts)
    assert one.ping(three.lan, size=ENCRYPTED_MTU - 28, source=one.lan)  # a full-size packet
    assert one.tunnels()["m-minion-3"]["latestHandshake"]

    again = manager.control("--mesh", path).stdout
    for host in hosts:
        assert line(host, "0 added, 0 deleted, 2 unchanged") in again

    # minion-3 goes behind a NAT: a keepalive for its ends, set in place, the sessions and
    # counters going on.
    with open(path) as f:
        mesh = json.load(f)
    mesh["hosts"][2]["persistentKeepalive"] = 25
    with open(path, "w") as f:
        json.dump(mesh, f)
    before = three.tunnels()["m-minion-1"]
    kept = manager.control("--mesh", path).stdout
    assert line(three, "0 added, 0 deleted, 2 changed, 0 unchanged") in kept
    for host in (one, two):
        assert line(host, "0 added, 0 deleted, 2 unchanged") in kept
    after = three.tunnels()["m-minion-1"]
    assert after["persistentKeepalive"] == 25 and "persistentKeepalive" not in \
        one.tunnels()["m-minion-3"]
    assert after["latestHandshake"] == before["latestHandshake"]
    assert after["tx_packets"] >= before["tx_packets"] > 0

    # minion-2 started again without a key: named, and every pair it is part of left alone.
    two.stop_daemon()
    two.start_daemon()
    keyless = manager.control("--mesh", path, check=False)
    assert keyless.returncode == 1
    assert line(two, "FAILED: its daemon has no key (start it with --key-file)") in keyless.stdout
    for host in (one, three):
        assert line(host, "0 added, 0 deleted, 1 unchanged, 1 left as is"
                          " (no usable key from minion-2)") in keyless.stdout
    assert two.tunnels() == {}

    # And with a new key: its pairs are remade, both ends; the pair without it goes on.
    two.stop_daemon()
    two_key, keys["minion-2"] = key_file(lab, two, "minion-2.new.key")
    two.start_daemon("--key-file", two_key)
    before = one.tunnels()["m-minion-3"]
    rekeyed = manager.control("--mesh", path).stdout
    assert line(two, "2 added, 0 deleted, 0 unchanged") in rekeyed
    for host in (one, three):  # remade on the device it had
        assert line(host, "0 added, 0 deleted, 1 changed, 1 unchanged") in rekeyed
        assert host.tunnels()["m-minion-2"]["publicKey"] == keys["minion-2"]
    after = one.tunnels()["m-minion-3"]
    assert after["tunnelIP"] == before["tunnelIP"]
    assert after["tx_packets"] >= before["tx_packets"] > 0
    assert every_lan_reaches_every_other(hosts)
    assert line(one, "0 added, 0 deleted, 2 unchanged") in manager.control("--mesh", path).stdout

    down = manager.control("--mesh", path, "--down").stdout
    for host in hosts:
        assert line(host, "0 added, 2 deleted, 0 unchanged") in down
        assert host.tunnels() == {} and " dev m-" not in host.routes()


def status(manager, path, *extra):
    """--status's exit status and its matrix: host -> the cells of its row, split on two
    spaces or more."""
    result = manager.control("--mesh", path, "--status", *extra, check=False)
    rows = {}
    for text in result.stdout.splitlines():
        cells = re.split(r"\s{2,}", text.strip())
        if re.fullmatch(r"minion-\d \([\d.]+\)", cells[0]):
            rows[cells[0].split()[0]] = cells[1:]
    return result.returncode, rows, result.stdout


def states(cells):
    """The states of a row's cells, without their ages."""
    return [cell.split()[0] if cell[0].isalpha() else cell for cell in cells]


def test_status_shows_each_end_missing_down_up_and_a_stopped_host(keyed):
    hosts, manager, path, _ = keyed
    code, rows, _ = status(manager, path)
    assert code == 1
    assert rows == {"minion-1": ["-", "missing", "missing"],
                    "minion-2": ["missing", "-", "missing"],
                    "minion-3": ["missing", "missing", "-"]}
    assert all(host.tunnels() == {} for host in hosts)  # it changes nothing

    # Each tunnel shakes hands as soon as it is made; minion-3's data port is shut for now,
    # so its handshakes go unanswered: connecting, then down, while the other pair comes up.
    hosts[2].run("nft", "-f", "-", input="table inet shut {\n chain input {\n  type filter"
                 " hook input priority 0;\n  udp dport 5000 drop\n }\n}\n")
    manager.control("--mesh", path)
    wait_until(lambda: status(manager, path)[1]["minion-1"][1].startswith("up"),
               "minion-1's end to minion-2 up with nothing sent through it")
    assert states(status(manager, path)[1]["minion-3"]) == ["connecting", "connecting", "-"]
    wait_until(lambda: states(status(manager, path)[1]["minion-3"]) == ["down", "down", "-"],
               "minion-3's ends down once their handshakes went unanswered for 15 s")
    code, rows, out = status(manager, path)
    assert code == 1 and "mesh: 3 hosts, 2 of 6 tunnel ends up, 2 down, 2 idle" in out
    assert states(rows["minion-1"])[2] == states(rows["minion-2"])[2] == "idle"  # they answered
    hosts[2].run("nft", "delete", "table", "inet", "shut")
    wait_until(lambda: status(manager, path)[0] == 0, "every end up once the port is open")

    assert every_lan_reaches_every_other(hosts)
    code, rows, out = status(manager, path)
    assert code == 0 and "mesh: 3 hosts, 6 of 6 tunnel ends up, 0 down" in out
    for name, cells in rows.items():
        assert [cell.split()[0] for cell in cells if cell != "-"] == ["up", "up"], name
    listed = json.loads(manager.control("--mesh", path, "--status", "--json").stdout)
    assert listed["ok"] and listed["failed"] == {}
    assert listed["pairs"]["minion-2"]["minion-3"]["state"] == "up"
    assert 0 <= listed["pairs"]["minion-2"]["minion-3"]["age"] < 60

    hosts[2].stop_daemon()
    code, rows, out = status(manager, path, "--timeout", "1")
    assert code == 1
    assert rows["minion-3"] == ["no answer", "no answer", "-"]
    assert "minion-3 (198.18.0.3): no answer: no reply within 1 s" in out
    assert rows["minion-1"][2].startswith("up ")  # its handshake with minion-3 is recent
    result = manager.control("--mesh", path, "--status", "--json", "--timeout", "1", check=False)
    listed = json.loads(result.stdout)
    assert result.returncode == 1 and not listed["ok"]
    assert list(listed["failed"]) == ["minion-3"]
    assert listed["pairs"]["minion-3"]["minion-1"] == {"state": "no answer", "age": None}
