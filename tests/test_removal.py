"""Many tunnels removed at once (one del, a SIGHUP, SIGTERM): their devices deleted together,
exactly those and nothing else of the namespace; and without pyroute2, one by one all the same."""

import json
import os
import signal

from lab import wait_until

# Tunnels each test starts with, added fifty to a message, as bench/scale.py adds them.
COUNT = 100
PER_MESSAGE = 50
# A device of the namespace that is not the daemon's, and of the same kind as its own.
STRANGER = "keep0"


def entry(index):
    return {"name": "t%d" % index, "tunnelIP": "10.64.%d.%d" % (index // 64, index % 64 * 4 + 1),
            "remoteServer": "198.19.%d.%d" % (index // 250, index % 250 + 1)}


def names(indexes):
    return {"t%d" % index for index in indexes}


def devices(host):
    """The names of every device in the host's namespace, as ip shows them."""
    out = host.run("ip", "-o", "link", "show").stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def daemon_log(proc):
    with open(proc.log_path) as log:
        return log.read()


def host_with_tunnels(lab, *args, without=()):
    """Host a with a TUN device of its own (persistent, no daemon's) and a daemon holding
    COUNT tunnels, t0 to t<COUNT - 1>."""
    a = lab.host("a", 1)
    a.run("ip", "tuntap", "add", "name", STRANGER, "mode", "tun")
    a.start_daemon(*args, without=without)
    for start in range(0, COUNT, PER_MESSAGE):
        reply = a.request({"op": "add", "tunnel": [entry(i) for i in range(start, start + PER_MESSAGE)]})
        assert reply["ok"], reply
    assert names(range(COUNT)) | {STRANGER, "eth0", "lan0"} <= devices(a)
    return a


def saved_names(path):
    with open(path) as f:
        return {tunnel["name"] for tunnel in json.load(f)["tunnels"]}


def test_one_del_of_fifty_tunnels_deletes_their_devices_and_no_other(lab):
    state = os.path.join(lab.workdir, "state.json")
    a = host_with_tunnels(lab, "--state-file", state)
    before = devices(a)
    deleted, kept = range(0, COUNT, 2), range(1, COUNT, 2)
    reply = a.request({"op": "del", "tunnel": [{"name": "t%d" % i} for i in deleted]})
    assert reply["ok"] and len(reply["results"]) == len(deleted), reply
    assert set(a.tunnels()) == names(kept) == saved_names(state)
    assert devices(a) == before - names(deleted)
    assert "%d devices deleted together" % len(deleted) in daemon_log(a.daemon)
    assert a.request({"op": "add", "tunnel": [entry(0)]})["ok"]  # its name is free again


def test_sigterm_deletes_every_device_of_the_daemon_and_no_other_and_exits_zero(lab):
    a = host_with_tunnels(lab)
    before, daemon = devices(a), a.daemon
    assert a.stop_daemon() == 0
    assert devices(a) == before - names(range(COUNT))
    assert "%d devices deleted together" % COUNT in daemon_log(daemon)


def test_sighup_with_a_state_file_of_fewer_tunnels_deletes_just_their_devices(lab):
    state = os.path.join(lab.workdir, "state.json")
    a = host_with_tunnels(lab, "--state-file", state)
    before = devices(a)
    kept = range(0, COUNT, 5)
    wanted = [entry(i) for i in kept]
    wanted[0]["mtu"] = 1400  # t0 changed in place: its device stays
    with open(state, "w") as f:
        json.dump({"version": 1, "tunnels": wanted}, f)
    a.daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: "state file re-read" in daemon_log(a.daemon), "the state file re-read")
    assert set(a.tunnels()) == names(kept) and a.tunnels()["t0"]["mtu"] == 1400
    assert devices(a) == before - (names(range(COUNT)) - names(kept))
    removed = COUNT - len(kept)
    assert "state file re-read: %d tunnels removed, 1 changed, 0 added" % removed \
        in daemon_log(a.daemon)
    assert "%d devices deleted together" % removed in daemon_log(a.daemon)


def test_without_pyroute2_the_devices_go_one_by_one_and_all_the_same(lab):
    a = host_with_tunnels(lab, without=["pyroute2"])
    before, daemon = devices(a), a.daemon
    deleted, kept = range(0, COUNT, 2), range(1, COUNT, 2)
    reply = a.request({"op": "del", "tunnel": [{"name": "t%d" % i} for i in deleted]})
    assert reply["ok"], reply
    assert set(a.tunnels()) == names(kept)
    assert devices(a) == before - names(deleted)
    assert a.stop_daemon() == 0
    assert devices(a) == before - names(range(COUNT))
    said = [line for line in daemon_log(daemon).splitlines() if "not deleted together" in line]
    assert len(said) == 2 and all("(pyroute2 is not installed): closing them one by one" in line
                                  for line in said), said
