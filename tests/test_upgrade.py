"""Upgrading from the 2015 scripts one host at a time, as docs/upgrading-from-2015.md
does it: each cell of its table (a 2015 or new daemon, managed by the 2015 or the new
control script, with a secret or without) and its steps, run for real. The 2015 daemon
is its stand-in, tests/daemon2015.py; the 2015 control script's request is one
datagram, sent once, never waiting (Host.control_2015)."""

import json
import os
import time

import pytest

from lab import (MESH_HOSTS, PATIENCE, Pinger, build_mesh, mesh_file, request_2015, wait_until,
                 write_secret)

NO_REPLY = 3  # the control script's exit status when no reply came


@pytest.fixture
def hosts(lab):
    """Two hosts of the mesh, no daemon started yet, and a management host of its own."""
    one, two = (lab.host(name, index) for name, index in MESH_HOSTS[:2])
    return one, two, lab.host("manager", 9)


def control_counts(host, secret):
    listed = host.control("127.0.0.1", "--secret-file", secret, "-o", "list", "--json")
    return json.loads(listed.stdout)["control"]


def lans_reach_each_other(one, two):
    return one.ping(two.lan, source=one.lan) and two.ping(one.lan, source=two.lan)


# --- The table's cells ----------------------------------------------------------


def test_2015_daemon_2015_control_script(hosts):
    """The stand-in acts on the 2015 request and never replies; its tunnels carry pings."""
    one, two, manager = hosts
    one.start_2015_daemon()
    two.start_2015_daemon()
    assert manager.request(request_2015("add", "udp2", "10.0.1.1", two.address),
                           to=one.address, wait=1) is None
    manager.control_2015(two.address, "add", "udp1", "10.0.1.2", one.address)
    wait_until(lambda: one.link_exists("udp2") and two.link_exists("udp1"), "both tunnels made")
    assert one.ping("10.0.1.2") and two.ping("10.0.1.1")


def test_2015_daemon_new_control_script(lab, hosts):
    """add is done, and no reply comes (exit 3, or 0 with --timeout 0); list gets nothing;
    --mesh names the host and changes nothing on it; del stops the 2015 daemon, every
    tunnel of it gone."""
    old, two, manager = hosts
    old.start_2015_daemon()
    waited = manager.control("-s", old.address, "-o", "add", "-n", "udp2", "-t", "10.0.1.1",
                             "-r", "198.18.0.2", "--timeout", "0.5", check=False)
    assert waited.returncode == NO_REPLY and "a 2015 daemon never replies" in waited.stderr
    assert old.link_exists("udp2")
    sent = manager.control("-s", old.address, "-o", "add", "-n", "udp3", "-t", "10.0.3.1",
                           "-r", "198.18.0.3", "--timeout", "0")
    assert "not waiting" in sent.stdout
    wait_until(lambda: old.link_exists("udp3"), "the tunnel added without waiting")
    listed = manager.control("-s", old.address, "-o", "list", "--timeout", "0.5", check=False)
    assert listed.returncode == NO_REPLY
    mesh = manager.control("--mesh", mesh_file(lab, [old, two]), "--timeout", "0.5", check=False)
    assert mesh.returncode == 1 and "minion-1 (198.18.0.1): FAILED: no reply" in mesh.stdout
    assert not old.link_exists("m-minion-2")
    # Each add was done once: a second one of a name would have ended the 2015 daemon.
    assert old.daemon.poll() is None

    manager.control("-s", old.address, "-o", "del", "-n", "udp3", "--timeout", "0")
    assert old.daemon.wait(PATIENCE) != 0
    assert not old.link_exists("udp2") and not old.link_exists("udp3")


def test_2015_daemon_new_control_script_with_a_secret(lab, hosts):
    """Signed requests mean nothing to a 2015 daemon: nothing is done, no reply comes."""
    old, _, manager = hosts
    old.start_2015_daemon()
    result = manager.control("-s", old.address, "--secret-file", write_secret(lab), "-o", "add",
                             "-n", "udp2", "-t", "10.0.1.1", "-r", "198.18.0.2",
                             "--timeout", "0.5", check=False)
    assert result.returncode == NO_REPLY
    manager.control_2015(old.address, "add", "udp9", "10.0.9.1", "198.18.0.9")
    wait_until(lambda: old.link_exists("udp9"), "a request sent after it done")
    assert not old.link_exists("udp2") and old.daemon.poll() is None


def test_new_daemon_2015_control_script(hosts):
    new, _, manager = hosts
    new.start_daemon()
    manager.control_2015(new.address, "add", "udp5", "10.0.5.1", "198.18.0.5")
    wait_until(lambda: new.link_exists("udp5"), "the 2015 request's tunnel made")
    assert new.tunnels()["udp5"]["mtu"] == 1500
    manager.control_2015(new.address, "del", "udp5", "10.0.5.1", "198.18.0.5")
    wait_until(lambda: not new.link_exists("udp5"), "the 2015 request's tunnel deleted")


def test_new_daemon_with_a_secret_2015_control_script(lab, hosts):
    """Refused, and the 2015 script cannot know: it never reads the reply."""
    new, _, manager = hosts
    secret = write_secret(lab)
    new.start_daemon("--secret-file", secret)
    refused = control_counts(new, secret).get("refused", 0)
    manager.control_2015(new.address, "add", "udp5", "10.0.5.1", "198.18.0.5")
    wait_until(lambda: control_counts(new, secret).get("refused", 0) > refused,
               "the 2015 request refused")
    assert not new.link_exists("udp5")
    with open(new.daemon.log_path) as log:
        assert "authentication required" in log.read()


# The new daemon with the new control script, with and without a secret, is what the
# other tests do: test_manage.py and test_security.py from a host of its own.


# --- The steps ----------------------------------------------------------------


def test_one_host_at_a_time_from_2015(lab, hosts):
    one, two, manager = hosts
    for host in (one, two):
        host.start_2015_daemon()
    manager.control_2015(one.address, "add", "udp2", "10.0.1.1", two.address)
    manager.control_2015(two.address, "add", "udp1", "10.0.1.2", one.address)
    wait_until(lambda: one.link_exists("udp2") and two.link_exists("udp1"), "the 2015 tunnels")
    one.ip("route", "add", "192.168.2.0/24", "dev", "udp2")
    two.ip("route", "add", "192.168.1.0/24", "dev", "udp1")
    assert lans_reach_each_other(one, two)

    secret = write_secret(lab)
    state = {host.name: os.path.join(lab.workdir, host.name + ".json") for host in (one, two)}
    ping = Pinger(lab, one, two.lan, "SWAPPING", source=one.lan)
    for host, tunnel, address, peer in ((one, "udp2", "10.0.1.1", two),
                                        (two, "udp1", "10.0.1.2", one)):
        # Before the swap: its tunnels, as its scripts add them, and the routes added by
        # hand, written into the new daemon's state file; nothing is sent.
        written = host.control("--write-state", state[host.name], "-n", tunnel, "-t", address,
                               "-r", peer.address, "--route", peer.lan.rsplit(".", 1)[0] + ".0/24")
        assert "holds 1 tunnels" in written.stdout
        host.stop_daemon()  # its tunnel and the route added by hand go with it
        stopped = time.time()
        host.start_daemon("--secret-file", secret, "--state-file", state[host.name])
        assert host.link_exists(tunnel)
        wait_until(lambda: one.ping(two.lan, source=one.lan, count=1), "the LANs joined again")
        back = min(t for t in ping.replies() if t > stopped)
        print("%s swapped: %.3f s without traffic" % (host.name, back - stopped))
        assert lans_reach_each_other(one, two)  # ours with the 2015 one, then with ours
    ping.stop()

    one.stop_daemon()  # the state file brings back its tunnel and its route
    one.start_daemon("--secret-file", secret, "--state-file", state[one.name])
    assert lans_reach_each_other(one, two)
    manager.control_2015(one.address, "add", "udp5", "10.0.5.1", "198.18.0.5")
    plain = manager.control("-s", one.address, "-o", "list", check=False)
    assert plain.returncode == 1 and "authentication required" in plain.stdout
    assert not one.link_exists("udp5")


def test_hand_made_tunnels_make_way_for_the_mesh(lab):
    secret = write_secret(lab)
    hosts = build_mesh(lab, secret_file=secret)  # udpN tunnels and routes by hand
    manager = lab.host("manager", 9)
    path = mesh_file(lab, hosts)
    refused = manager.control("--mesh", path, "--secret-file", secret, check=False)
    assert refused.returncode == 1
    assert "already in use by tunnel 'udp2'" in refused.stdout
    assert all(a.ping(b.lan, source=a.lan) for a in hosts for b in hosts if a is not b)

    for host in hosts:  # the routes added by hand go with their devices
        for name in host.tunnels(secret=secret):
            manager.control("-s", host.address, "--secret-file", secret, "-o", "del", "-n", name)
        assert " dev udp" not in host.routes()
    applied = manager.control("--mesh", path, "--secret-file", secret).stdout
    assert "mesh: all 3 hosts done" in applied
    assert all(a.ping(b.lan, source=a.lan) for a in hosts for b in hosts if a is not b)
    assert "192.168.2.0/24 dev m-minion-2" in hosts[0].routes()
