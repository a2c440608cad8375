"""The control port of a real daemon: what it does, and what it refuses without harm."""

import signal

import pytest

from lab import wait_until

GOOD = {"name": "udp9", "tunnelIP": "10.0.9.1", "netmask": "255.255.255.252",
        "mtu": 1500, "remoteServer": "198.18.0.9"}


def add(**changes):
    entry = dict(GOOD, **changes)
    return {"op": "add", "tunnel": [{k: v for k, v in entry.items() if v is not None}]}


BAD_REQUESTS = [
    (b"hello", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    ({"tunnel": []}, "missing field 'op'"),
    ({"op": 5}, "invalid op 5"),
    ({"op": "frobnicate", "tunnel": []}, "unknown op 'frobnicate'"),
    ({"op": "add"}, "no tunnel given"),
    ({"op": "add", "tunnel": "udp9"}, "'tunnel' must be a list"),
    ({"op": "add", "tunnel": [42]}, "42"),
    ({"op": "add", "tunnel": [GOOD], "colour": "red"}, "unknown field 'colour'"),
    (add(colour="red"), "unknown field 'colour'"),
    (add(remoteServer=None), "missing field 'remoteServer'"),
    (add(tunnelIP="10.0.9.300"), "invalid tunnelIP '10.0.9.300'"),
    (add(tunnelIP="10.0.9.0"), "'10.0.9.0'"),
    (add(tunnelIP=["10.0.9.1"]), "invalid tunnelIP ['10.0.9.1']"),
    (add(netmask="255.0.255.0"), "invalid netmask '255.0.255.0'"),
    (add(netmask="0.0.0.3"), "invalid netmask '0.0.0.3'"),
    (add(mtu=70000), "mtu 70000 out of range"),
    (add(mtu=12), "mtu 12 out of range"),
    (add(mtu="big"), "invalid mtu 'big'"),
    (add(mtu=1500.5), "invalid mtu 1500.5"),
    (add(name="averyveryverylongname"), "'averyveryverylongname' is 21 bytes"),
    (add(name="a/b"), "invalid tunnel name 'a/b'"),
    (add(name=""), "invalid tunnel name ''"),
    (add(name="udp2"), "tunnel name 'udp2' already in use"),
    (add(remoteServer="198.18.0.2"), "remoteServer 198.18.0.2 already in use by tunnel 'udp2'"),
    (add(tunnelIP="10.0.1.1"), "tunnelIP 10.0.1.1 already in use by tunnel 'udp2'"),
    (add(name="eth0"), "a device named 'eth0' already exists"),
    (add(remoteServer="minion-2"), "invalid remoteServer 'minion-2'"),
    (add(remoteServer="224.0.0.1"), "invalid remoteServer '224.0.0.1'"),
    (add(remotePort=0), "invalid remotePort 0"),
    ({"op": "del", "tunnel": [{"name": "udp9"}]}, "no tunnel named 'udp9'"),
    ({"op": "del", "tunnel": [{"tunnelIP": "10.0.1.1"}]}, "missing field 'name'"),
]


def test_every_bad_request_is_refused_by_name_and_harms_nothing(pair):
    a, b = pair
    before = {name: (t["tunnelIP"], t["remoteServer"], t["mtu"]) for name, t in a.tunnels().items()}
    for message, expected in BAD_REQUESTS:
        reply = a.request(message)
        assert reply["ok"] is False, message
        assert expected in reply["error"], (message, reply)
        assert a.daemon.poll() is None, "daemon died on %r" % (message,)
    after = {name: (t["tunnelIP"], t["remoteServer"], t["mtu"]) for name, t in a.tunnels().items()}
    assert after == before
    assert not a.link_exists("udp9")
    assert a.ping("10.0.1.2")


def test_control_script_reports_refusal_and_exit_status(pair):
    a, _ = pair
    result = a.control("127.0.0.1", "-o", "add", "-n", "udp7", "-t", "10.0.7.1",
                       "-tm", "255.0.255.0", "-r", "198.18.0.7", check=False)
    assert result.returncode == 1
    assert "udp7: error: invalid netmask '255.0.255.0'" in result.stdout
    result = a.control("127.0.0.1", "-p", "5999", "-o", "list", "--timeout", "0.5", check=False)
    assert result.returncode == 3
    assert "no reply" in result.stderr


def test_one_bad_tunnel_does_not_stop_the_others_in_its_message(pair):
    a, _ = pair
    good = dict(GOOD, name="udp8", tunnelIP="10.0.8.1", remoteServer="198.18.0.8")
    bad = dict(GOOD, mtu=99999)
    reply = a.request({"op": "add", "tunnel": [good, bad]})
    assert reply["ok"] is False
    assert [r["ok"] for r in reply["results"]] == [True, False]
    assert "udp8" in a.tunnels() and "udp9" not in a.tunnels()
    assert a.link_exists("udp8")


def test_messages_of_the_2015_control_script_are_understood(pair):
    a, _ = pair
    # The old script sent every field for del too; other senders put the MTU in a string.
    entry = dict(GOOD, mtu="1400")
    assert a.request({"op": "add", "tunnel": [entry]})["ok"]
    assert a.tunnels()["udp9"]["mtu"] == 1400
    assert a.request({"op": "del", "tunnel": [entry]})["ok"]
    assert "udp9" not in a.tunnels()


def test_del_removes_the_device_and_frees_name_and_remote(pair):
    a, b = pair
    result = a.control("127.0.0.1", "-o", "del", "-n", "udp2")
    assert "udp2: del done" in result.stdout
    assert not a.link_exists("udp2")
    assert "udp2" not in a.tunnels()
    assert not a.ping("10.0.1.2", count=1)
    a.add_tunnel("udp2", "10.0.1.1", b)
    assert a.ping("10.0.1.2")


def test_tunnel_whose_device_is_deleted_from_outside_is_dropped(pair):
    a, b = pair
    a.run("ip", "link", "del", "udp2")
    wait_until(lambda: "udp2" not in a.tunnels(), "the daemon drops the tunnel")
    assert a.daemon.poll() is None
    a.add_tunnel("udp2", "10.0.1.1", b)
    assert a.ping("10.0.1.2")


def test_unknown_sources_and_garbage_are_counted_not_fatal(lab, pair):
    a, b = pair
    stranger = lab.host("c", 3)
    stranger.send_udp(a.address, 5000, [b"\x00\x00\x08\x00" + bytes(40)] * 5)
    wait_until(lambda: a.request({"op": "list"})["drops"].get("unknown_source") == 5,
               "five datagrams from an unknown source counted")
    # From the known peer: too short for a packet, then a header and garbage the kernel may refuse.
    b.send_udp(a.address, 5000, [b"", b"\x00\x00", b"\x00\x00\x08\x00" + b"\xff" * 60,
                                 b"\xff" * 2000])
    wait_until(lambda: a.tunnels()["udp2"]["drops"].get("short") == 2, "short datagrams counted")
    assert a.daemon.poll() is None
    assert a.ping("10.0.1.2")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_every_tunnel_and_exits_zero(pair, signum):
    a, _ = pair
    assert a.link_exists("udp2")
    assert a.stop_daemon(signum) == 0
    assert not a.link_exists("udp2")
