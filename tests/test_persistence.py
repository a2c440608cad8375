"""--state-file: tunnels that survive SIGKILL, corrupt files, SIGHUP, a restarted peer."""

import json
import os
import random
import signal
import threading
import time

from lab import wait_until


def state_path(lab, host):
    return os.path.join(lab.workdir, "%s-state.json" % host.name)


def add(host, name, index):
    """Add a tunnel; None when no reply came (the daemon was killed meanwhile)."""
    return host.request({"op": "add", "tunnel": [{
        "name": name, "tunnelIP": "10.64.%d.%d" % (index // 64, index % 64 * 4 + 1),
        "remoteServer": "198.19.%d.%d" % (index // 250, index % 250 + 1)}]}, wait=2)


def kill(host):
    host.daemon.send_signal(signal.SIGKILL)
    host.daemon.wait()


def test_after_sigkill_the_daemon_comes_back_with_its_tunnels(lab, pair):
    a, b = pair
    # The pair's daemons have no state file: start a's anew with one.
    a.stop_daemon()
    state = state_path(lab, a)
    a.start_daemon("--state-file", state)
    a.add_tunnel("udp2", "10.0.1.1", b, "-m", "1400")
    a.add_tunnel("udp3", "10.0.3.1", "198.18.0.3")
    a.add_tunnel("udp4", "10.0.4.1", "198.18.0.4")
    a.control("127.0.0.1", "-o", "del", "-n", "udp4")
    before = {n: (t["tunnelIP"], t["remoteServer"], t["mtu"]) for n, t in a.tunnels().items()}
    kill(a)
    assert a.link_exists("udp2") and not a.link_exists("udp4")  # kept for the next daemon
    a.start_daemon("--state-file", state)
    after = {n: (t["tunnelIP"], t["remoteServer"], t["mtu"]) for n, t in a.tunnels().items()}
    assert after == before == {"udp2": ("10.0.1.1", b.address, 1400),
                               "udp3": ("10.0.3.1", "198.18.0.3", 1500)}
    assert a.ping("10.0.1.2")


def test_killed_at_any_moment_it_keeps_every_acknowledged_tunnel(lab, figures):
    a = lab.host("a", 1)
    state = state_path(lab, a)
    acknowledged, rounds = set(), random.Random(7)
    for round_ in range(4):
        a.start_daemon("--state-file", state)
        stop = threading.Event()

        def keep_adding():
            index = 0
            while not stop.is_set():
                name = "r%dt%d" % (round_, index)
                reply = add(a, name, round_ * 100 + index)
                if reply and reply["ok"]:
                    acknowledged.add(name)
                index += 1

        before = len(acknowledged)
        adder = threading.Thread(target=keep_adding)
        adder.start()
        time.sleep(rounds.uniform(0.2, 0.8))
        kill(a)
        stop.set()
        adder.join()
        assert len(acknowledged) > before, "round %d acknowledged no tunnel" % round_
        a.start_daemon("--state-file", state)
        restored = set(a.tunnels())
        assert acknowledged <= restored
        assert len(restored - acknowledged) <= 1  # at most the one in flight when killed
        acknowledged |= restored
        kill(a)
    figures("4 kills while adding: %d acknowledged tunnels, all restored" % len(acknowledged))


def test_a_corrupt_state_file_is_said_in_one_line_and_the_daemon_starts(lab):
    a = lab.host("a", 1)
    state = state_path(lab, a)
    with open(state, "w") as f:
        f.write('{"version": 1, "tunnels": [{"name": "ud')
    a.start_daemon("--state-file", state)
    assert a.tunnels() == {}
    with open(a.daemon.log_path) as log:
        errors = [line for line in log if " ERROR " in line]
    assert len(errors) == 1 and "is corrupt" in errors[0] and "kept as" in errors[0]
    assert any(".corrupt-" in name for name in os.listdir(lab.workdir))


def test_the_daemon_starts_with_what_it_can_read(lab):
    a = lab.host("a", 1)
    state = state_path(lab, a)
    good = {"name": "udp2", "tunnelIP": "10.0.1.1", "remoteServer": "198.18.0.2"}
    bad = {"name": "udp3", "tunnelIP": "10.0.3.1", "netmask": "255.0.255.0",
           "remoteServer": "198.18.0.3"}
    with open(state, "w") as f:
        json.dump({"version": 1, "tunnels": [good, bad]}, f)
    a.start_daemon("--state-file", state)
    assert set(a.tunnels()) == {"udp2"}
    with open(a.daemon.log_path) as log:
        assert "tunnel udp3 not made: invalid netmask '255.0.255.0'" in log.read()
    assert a.request({"op": "list"})["unmade"] == ["udp3"]  # kept in the file, and said


def test_sighup_applies_only_the_difference(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    state = state_path(lab, a)
    b.start_daemon()
    b.add_tunnel("udp1", "10.0.1.2", a)
    a.start_daemon("--state-file", state)
    a.add_tunnel("udp2", "10.0.1.1", b)
    a.add_tunnel("udp3", "10.0.3.1", "198.18.0.3")
    assert a.ping("10.0.1.2")
    counted = a.tunnels()["udp2"]["rx_packets"]
    with open(state) as f:
        tunnels = json.load(f)["tunnels"]
    tunnels = [t for t in tunnels if t["name"] != "udp3"]
    tunnels.append({"name": "udp4", "tunnelIP": "10.0.4.1", "remoteServer": "198.18.0.4"})
    with open(state, "w") as f:
        json.dump({"version": 1, "tunnels": tunnels}, f)
    a.daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: set(a.tunnels()) == {"udp2", "udp4"}, "udp3 gone and udp4 added")
    assert a.tunnels()["udp2"]["rx_packets"] >= counted > 0  # kept, not made anew
    assert not a.link_exists("udp3")
    assert a.ping("10.0.1.2")


def restart_with_state_file(lab, pair):
    """The pair, with a's daemon keeping its tunnel udp2 in a state file."""
    a, b = pair
    state = state_path(lab, a)
    a.stop_daemon()
    a.start_daemon("--state-file", state)
    a.add_tunnel("udp2", "10.0.1.1", b)
    return a, state


def test_sighup_with_a_missing_or_corrupt_state_file_changes_nothing(lab, pair):
    a, state = restart_with_state_file(lab, pair)
    os.remove(state)
    for damage in ("missing", "corrupt"):
        if damage == "corrupt":
            with open(state, "w") as f:
                f.write('{"version": 1, "tunnels": [{"na')
        a.daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: "every tunnel kept as it is" in open(a.daemon.log_path).read()
                   .split("SIGHUP received")[-1], "the reload refused, %s" % damage)
        assert list(a.tunnels()) == ["udp2"] and a.ping("10.0.1.2")


def test_a_tunnel_whose_device_is_deleted_leaves_the_state_file(lab, pair):
    a, state = restart_with_state_file(lab, pair)
    a.add_tunnel("udp3", "10.0.3.1", "198.18.0.3")
    a.run("ip", "link", "del", "udp2")
    a.ping("10.0.1.2", count=1)  # the device's queue wakes the daemon, which finds it gone
    wait_until(lambda: "udp2" not in a.tunnels(), "the daemon drops the tunnel")
    with open(state) as f:
        assert [t["name"] for t in json.load(f)["tunnels"]] == ["udp3"]
    a.stop_daemon()
    a.start_daemon("--state-file", state)
    assert list(a.tunnels()) == ["udp3"]


def test_a_restarted_peer_with_its_state_file_carries_traffic_again(lab):
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b)
    state = state_path(lab, b)
    b.start_daemon("--state-file", state)
    b.add_tunnel("udp1", "10.0.1.2", a)
    assert a.ping("10.0.1.2")
    kill(b)
    assert not a.ping("10.0.1.2", count=1)
    b.start_daemon("--state-file", state)
    assert a.ping("10.0.1.2")
