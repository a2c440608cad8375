"""The control script without root, against a stand-in daemon on loopback."""

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import threading

import pytest

import udpProxyServerControl as ctl


def args(*argv):
    return ctl.parse_args(list(argv))


def test_add_builds_the_documented_message():
    message = ctl.build_message(args("-s", "h", "-n", "udp2", "-t", "10.0.1.1", "-r", "198.18.0.2"))
    assert message == {"op": "add", "tunnel": [{
        "name": "udp2", "tunnelIP": "10.0.1.1", "netmask": "255.255.255.252",
        "mtu": 1500, "remoteServer": "198.18.0.2"}]}


def test_server_as_first_positional_argument_as_in_the_2015_readme():
    parsed = args("172.100.1.1", "-o", "add", "-n", "udp0", "-t", "10.0.0.1",
                  "-r", "172.100.1.2", "-p", "5001")
    assert (parsed.server, parsed.port) == ("172.100.1.1", 5001)


def test_del_needs_only_server_and_name():
    assert ctl.build_message(args("-s", "h", "-o", "del", "-n", "udp2")) == \
        {"op": "del", "tunnel": [{"name": "udp2"}]}


def test_route_and_its_repeats_are_sent_in_order():
    message = ctl.build_message(args("h", "-n", "u", "-t", "10.0.0.1", "-r", "198.18.0.2",
                                     "--route", "192.168.2.0/24", "--route", "fd00:2::/64"))
    assert message["tunnel"][0]["routes"] == ["192.168.2.0/24", "fd00:2::/64"]


def test_remote_port_is_sent_when_given():
    message = ctl.build_message(args("h", "-n", "u", "-t", "10.0.0.1", "-r", "198.18.0.2",
                                     "--remote-port", "6000"))
    assert message["tunnel"][0]["remotePort"] == 6000


@pytest.mark.parametrize("argv, complaint", [
    (("-o", "list"), "server is required"),
    (("a", "-s", "b", "-o", "list"), "two servers"),
    (("h", "-n", "udp2", "-t", "10.0.1.1"), "needs --remote"),
    (("h", "-o", "del"), "needs --name"),
    (("h", "-o", "move"), "invalid choice: 'move'"),
    (("h", "-o", "list", "-p", "70000"), "70000"),
    (("h", "-o", "list", "--down"), "--down goes with --mesh"),
    (("h", "-o", "list", "--status"), "--status goes with --mesh"),
    (("--mesh", "m.json", "--status", "--down"), "--status changes nothing: not with --down"),
    (("--mesh", "m.json", "--status", "--dry-run"), "--status changes nothing: not with --dry-run"),
    # Applying a mesh reads every daemon's tunnels first: not waiting is refused, not replaced.
    (("--mesh", "m.json", "--timeout", "0"), "--timeout 0: --mesh needs every daemon's reply"),
    (("--mesh", "m.json", "--status", "--timeout", "0"), "--timeout 0: --mesh needs"),
    (("--mesh", "m.json", "--json"), "--json goes with --status when given --mesh"),
    # --route is given once a network; a second network after it is no server.
    (("-s", "h", "-n", "u", "-t", "10.0.1.1", "-r", "198.18.0.2", "--route", "192.168.2.0/24",
      "192.168.3.0/24"), "'192.168.3.0/24' is not a server: give --route once for each network"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, complaint, capsys):
    with pytest.raises(SystemExit) as exit:
        ctl.parse_args(list(argv))
    assert exit.value.code == 2
    assert complaint in capsys.readouterr().err


COOKIE = "c0" * 16


@pytest.fixture
def daemon():
    """A stand-in daemon on loopback that gives a cookie to whoever asks, and answers
    each other request with the next canned reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    replies, requests = [], []

    def serve():
        for reply in replies:
            data, sender = sock.recvfrom(65535)
            while json.loads(data) == ctl.COOKIE_REQUEST:
                sock.sendto(json.dumps({"ok": True, "op": "cookie", "cookie": COOKIE}).encode(),
                            sender)
                data, sender = sock.recvfrom(65535)
            requests.append(json.loads(data))
            sock.sendto(b"not json", sender)  # ignored: the script waits for a JSON object
            sock.sendto(json.dumps(reply).encode(), sender)

    def start(*canned):
        replies.extend(canned)
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        return str(sock.getsockname()[1]), requests

    yield start
    sock.close()


def test_done_exits_0(daemon, capsys):
    port, requests = daemon({"ok": True, "op": "del", "results": [{"name": "udp2", "ok": True}]})
    assert ctl.main(["127.0.0.1", "-p", port, "-o", "del", "-n", "udp2"]) == 0
    assert capsys.readouterr().out == "udp2: del done\n"
    assert requests == [{"op": "del", "tunnel": [{"name": "udp2"}], "cookie": COOKIE}]


def test_refused_exits_1_and_says_why(daemon, capsys):
    port, _ = daemon({"ok": False, "op": "add", "error": "udp2: invalid netmask '1.2.3.4'",
                      "results": [{"name": "udp2", "ok": False,
                                   "error": "invalid netmask '1.2.3.4'"}]})
    assert ctl.main(["127.0.0.1", "-p", port, "-n", "udp2", "-t", "10.0.1.1",
                     "-tm", "1.2.3.4", "-r", "198.18.0.2"]) == 1
    assert capsys.readouterr().out == "udp2: error: invalid netmask '1.2.3.4'\n"


def test_whole_request_refused_prints_the_error(daemon, capsys):
    port, _ = daemon({"ok": False, "error": "request is not JSON"})
    assert ctl.main(["127.0.0.1", "-p", port, "-o", "list"]) == 1
    assert "error: request is not JSON" in capsys.readouterr().out


def test_no_reply_exits_3(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = str(silent.getsockname()[1])
        assert ctl.main(["127.0.0.1", "-p", port, "-o", "list", "--timeout", "0.3"]) == 3
    assert "no reply within 0.3 s" in capsys.readouterr().err


def test_timeout_0_sends_without_waiting_for_old_daemons(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as old:
        old.bind(("127.0.0.1", 0))
        port = str(old.getsockname()[1])
        assert ctl.main(["127.0.0.1", "-p", port, "-o", "del", "-n", "u", "--timeout", "0"]) == 0
        assert json.loads(old.recv(65535)) == {"op": "del", "tunnel": [{"name": "u"}]}


LIST_REPLY = {"ok": True, "op": "list", "dataPort": 5000, "drops": {"unknown_source": 4},
              "tunnels": [{"name": "udp2", "tunnelIP": "10.0.1.1", "netmask": "255.255.255.252",
                           "mtu": 1500, "remoteServer": "198.18.0.2", "remotePort": 5000,
                           "rx_packets": 3, "rx_bytes": 264, "tx_packets": 4, "tx_bytes": 352,
                           "drops": {"short": 2}, "last_rx": 995.0, "last_tx": 996.0}]}


def test_list_prints_a_table():
    lines = ctl.format_table(LIST_REPLY, now=1000.0).splitlines()
    assert lines[0].split()[:3] == ["NAME", "TUNNEL", "REMOTE"]
    assert lines[1].split() == ["udp2", "10.0.1.1/30", "198.18.0.2:5000", "1500", "3", "264",
                                "4", "352", "short=2", "5s", "ago", "plain", "-", "-"]
    assert lines[2] == "dropped by the daemon: unknown_source=4"
    waiting = dict(LIST_REPLY["tunnels"][0], publicKey="k" * 44, latestHandshake=None)
    del waiting["remoteServer"]
    row = ctl.format_table(dict(LIST_REPLY, tunnels=[waiting]), now=1000.0).splitlines()[1]
    assert row.split()[2] == "(waiting)" and row.split()[-3] == "never"
    unmade = ctl.format_table(dict(LIST_REPLY, unmade=["udp3"]), now=1000.0).splitlines()
    assert unmade[-1] == "in the state file but not made (see the daemon's log): udp3"


@pytest.mark.parametrize("checksums, peer, shown", [
    ("partial", True, "partial"), ("full", False, "full (old peer)"),
    ("full", None, "full (peer not heard)"), ("full", True, "full (no offloads here)")])
def test_list_says_which_checksums_a_plain_tunnel_sends_and_why(checksums, peer, shown):
    tunnel = dict(LIST_REPLY["tunnels"][0], checksums=checksums, peerOffload=peer)
    row = ctl.format_table(dict(LIST_REPLY, tunnels=[tunnel]), now=1000.0).splitlines()[1]
    assert ("  %s  " % shown) in row


def test_list_json_prints_the_reply(daemon, capsys):
    port, _ = daemon(LIST_REPLY)
    assert ctl.main(["127.0.0.1", "-p", port, "-o", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == LIST_REPLY


def test_ipv6_tunnels_and_routes_are_sent_as_given():
    message = ctl.build_message(args("h", "-n", "udp6", "-t", "fd00:1::1/64", "-r", "2001:2::2",
                                     "--route", "192.168.2.0/24", "--route", "fd00:2::/64"))
    assert message["tunnel"][0] == {"name": "udp6", "tunnelIP": "fd00:1::1/64", "mtu": 1500,
                                    "remoteServer": "2001:2::2",
                                    "routes": ["192.168.2.0/24", "fd00:2::/64"]}


def key(n):
    """A public key as wg pubkey writes one: 32 bytes in base64."""
    return base64.b64encode(bytes([n]) * 32).decode()


def write_mesh(tmp_path, **changes):
    mesh = {"controlPort": 5001, "mtu": 1400, "tunnelNet": "10.0.0.0/24", "hosts": [
        {"name": "minion-1", "address": "172.100.1.1", "lan": ["192.168.1.0/24"]},
        {"name": "minion-2", "address": "172.100.1.2", "lan": ["192.168.2.0/24"]},
        {"name": "minion-3", "address": "172.100.2.3", "lan": ["192.168.3.0/24"]}]}
    mesh.update(changes)
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(mesh))
    return str(path)


def test_the_mesh_plan_gives_every_pair_a_subnet_and_every_host_routes(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    plan = ctl.mesh_plan(mesh, {})
    assert sorted(plan["minion-1"]) == ["m-minion-2", "m-minion-3"]
    assert plan["minion-1"]["m-minion-2"] == {
        "name": "m-minion-2", "tunnelIP": "10.0.0.1/30", "mtu": 1400,
        "remoteServer": "172.100.1.2", "routes": ["192.168.2.0/24"]}
    assert plan["minion-2"]["m-minion-1"]["tunnelIP"] == "10.0.0.2/30"
    assert plan["minion-3"]["m-minion-2"]["tunnelIP"] == "10.0.0.10/30"


def test_adding_a_host_moves_no_existing_pair(tmp_path):
    three = ctl.mesh_plan(ctl.load_mesh(write_mesh(tmp_path)), {})
    hosts = json.loads(open(write_mesh(tmp_path)).read())["hosts"]
    hosts.append({"name": "minion-4", "address": "172.100.2.4", "lan": []})
    four = ctl.mesh_plan(ctl.load_mesh(write_mesh(tmp_path, hosts=hosts)), {})
    for host, tunnels in three.items():
        for name, entry in tunnels.items():
            assert four[host][name] == entry


def test_a_pair_keeps_the_subnet_its_tunnels_have(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    listed = {"tunnelIP": "10.0.0.201", "prefixlen": 30}
    current = {"minion-1": {"m-minion-3": dict(listed)},
               "minion-3": {"m-minion-1": dict(listed, tunnelIP="10.0.0.202")}}
    plan = ctl.mesh_plan(mesh, current)
    assert plan["minion-1"]["m-minion-3"]["tunnelIP"] == "10.0.0.201/30"
    assert plan["minion-1"]["m-minion-2"]["tunnelIP"] == "10.0.0.1/30"


def listed(ip, remote, routes):
    """A mesh tunnel as a daemon lists it."""
    return {"tunnelIP": ip, "prefixlen": 30, "mtu": 1400, "remoteServer": remote,
            "remotePort": 5000, "routes": routes}


class StandIn:
    """A daemon as the mesh code speaks to it: it lists its tunnels (name -> listed) and
    its own public key (None: started without --key-file), and takes every request,
    recording it; one whose tunnels are None does not answer."""

    def __init__(self, tunnels, key=None):
        self.tunnels, self.key, self.requests = tunnels, key, []

    def fetch_list(self):
        if self.tunnels is None:
            raise ctl.NoReply("no reply within 2 s")
        return {"ok": True, "op": "list", "dataPort": 5000, "publicKey": self.key,
                "tunnels": [dict(tunnel, name=name) for name, tunnel in self.tunnels.items()]}

    def request(self, message):
        self.requests.append(message)
        return {"ok": True, "op": message["op"],
                "results": [{"name": t["name"], "ok": True} for t in message["tunnel"]]}


def test_a_host_that_does_not_answer_keeps_its_pairs_as_the_answering_ends_have_them(tmp_path):
    hosts = json.loads(open(write_mesh(tmp_path)).read())["hosts"]
    hosts.append({"name": "minion-4", "address": "172.100.2.4", "lan": []})
    mesh = ctl.load_mesh(write_mesh(tmp_path, hosts=hosts))
    # minion-1's tunnel to the silent minion-2 even routes a LAN the file no longer has.
    current = {"minion-1": {"m-minion-2": listed("10.0.0.1", "172.100.1.2", ["192.168.200.0/24"])},
               "minion-3": {"m-minion-2": listed("10.0.0.6", "172.100.1.2", ["192.168.2.0/24"])},
               "minion-4": {}}
    plans = ctl.host_plans(mesh, current, dict.fromkeys(current, 5000), {"minion-2"})
    assert "minion-2" not in plans
    for host in ("minion-1", "minion-3"):
        assert plans[host].held == {"m-minion-2": "minion-2"}
        assert plans[host].stale == []
    # Nothing towards minion-2 is added, not even where no tunnel leads to it yet; the
    # subnets its pairs hold now go to no other pair.
    for host, plan in plans.items():
        assert "m-minion-2" not in [entry["name"] for entry in plan.new]
        for entry in plan.new:
            assert ipaddress.ip_interface(entry["tunnelIP"]).network not in (
                ipaddress.ip_network("10.0.0.0/30"), ipaddress.ip_network("10.0.0.4/30"))
    assert [(e["name"], e["tunnelIP"]) for e in plans["minion-1"].new] == [
        ("m-minion-3", "10.0.0.9/30"), ("m-minion-4", "10.0.0.13/30")]
    assert [(e["name"], e["tunnelIP"]) for e in plans["minion-4"].new] == [
        ("m-minion-1", "10.0.0.14/30"), ("m-minion-3", "10.0.0.18/30")]


def test_held_tunnels_that_cover_the_whole_tunnel_net_leave_no_subnet_and_say_so(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    by_hand = dict(listed("10.0.0.1", "172.100.1.2", []), prefixlen=24)
    with pytest.raises(ctl.MeshError) as error:
        ctl.host_plans(mesh, {"minion-1": {"m-minion-2": by_hand}, "minion-3": {}},
                       {"minion-1": 5000, "minion-3": 5000}, {"minion-2"})
    assert "tunnelNet 10.0.0.0/24 has no /30 left for minion-1 and minion-3" in str(error.value)


def test_applying_sends_nothing_about_the_pairs_of_a_host_that_does_not_answer(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    daemons = {
        "minion-1": StandIn({"m-minion-2": listed("10.0.0.201", "172.100.1.2", ["192.168.2.0/24"]),
                             "m-minion-3": listed("10.0.0.5", "172.100.2.3", ["192.168.3.0/24"])}),
        "minion-2": StandIn(None),
        "minion-3": StandIn({"m-minion-1": listed("10.0.0.6", "172.100.1.1", ["192.168.1.0/24"]),
                             "m-minion-2": listed("10.0.0.202", "172.100.1.2", ["192.168.2.0/24"])}),
    }
    lines = []
    failed = ctl.apply_to_daemons(mesh, daemons, False, lines.append)
    assert list(failed) == ["minion-2"]
    assert "minion-2 (172.100.1.2): FAILED: no reply within 2 s" in lines
    assert daemons["minion-1"].requests == [] and daemons["minion-3"].requests == []
    assert "minion-1 (172.100.1.1): 0 added, 0 deleted, 1 unchanged," \
           " 1 left as is (no answer from minion-2)" in lines

    lines.clear()
    assert list(ctl.apply_to_daemons(mesh, daemons, True, lines.append)) == ["minion-2"]
    assert "minion-3 (172.100.2.3): would leave m-minion-2 as is (no answer from minion-2)" in lines
    assert daemons["minion-1"].requests == [] and daemons["minion-3"].requests == []


def test_down_deletes_the_mesh_tunnels_the_file_names_on_every_host_that_answers(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    daemons = {
        "minion-1": StandIn({"m-minion-2": listed("10.0.0.1", "172.100.1.2", ["192.168.2.0/24"]),
                             "m-minion-3": listed("10.0.0.5", "172.100.2.3", ["192.168.3.0/24"]),
                             "m-minion-9": listed("10.0.0.99", "172.100.9.9", []),
                             "udp9": listed("10.9.0.1", "172.100.9.9", [])}),
        "minion-2": StandIn(None),
        "minion-3": StandIn({"m-minion-1": listed("10.0.0.6", "172.100.1.1", ["192.168.1.0/24"])}),
    }
    lines = []
    assert list(ctl.apply_to_daemons(mesh, daemons, True, lines.append, down=True)) == ["minion-2"]
    assert "minion-1 (172.100.1.1): would delete m-minion-3" in lines
    assert daemons["minion-1"].requests == []

    failed = ctl.apply_to_daemons(mesh, daemons, False, lines.append, down=True)
    assert list(failed) == ["minion-2"]
    assert "minion-2 (172.100.1.2): FAILED: no reply within 2 s" in lines
    # Only what the file names: m-minion-9 leads to no host of it, udp9 is not the mesh's.
    assert daemons["minion-1"].requests == [
        {"op": "del", "tunnel": [{"name": "m-minion-2"}, {"name": "m-minion-3"}]}]
    assert daemons["minion-3"].requests == [{"op": "del", "tunnel": [{"name": "m-minion-1"}]}]
    assert "minion-1 (172.100.1.1): 0 added, 2 deleted, 0 unchanged" in lines


KEYS = {"minion-%d" % n: key(n) for n in (1, 2, 3)}


def encrypted_mesh(tmp_path, keys_in_file=()):
    """The three hosts' mesh, encrypted; the hosts named in keys_in_file have their key there."""
    hosts = json.loads(open(write_mesh(tmp_path)).read())["hosts"]
    for host in hosts:
        if host["name"] in keys_in_file:
            host["publicKey"] = KEYS[host["name"]]
    return ctl.load_mesh(write_mesh(tmp_path, encrypt=True, hosts=hosts))


def test_an_encrypted_plan_gives_each_tunnel_its_peers_key_and_remakes_just_a_new_keys_pairs(
        tmp_path):
    mesh = encrypted_mesh(tmp_path)
    plan = ctl.mesh_plan(mesh, {}, keys=KEYS)
    assert plan["minion-1"]["m-minion-2"] == {
        "name": "m-minion-2", "tunnelIP": "10.0.0.1/30", "mtu": 1400,
        "remoteServer": "172.100.1.2", "routes": ["192.168.2.0/24"], "publicKey": key(2)}
    assert plan["minion-3"]["m-minion-1"]["publicKey"] == key(1)

    # The daemons list what was added (and counters): planned again, nothing changes.
    current = {host: {name: dict(entry, remotePort=5000, rx_packets=5, latestHandshake=None)
                      for name, entry in tunnels.items()} for host, tunnels in plan.items()}
    ports = dict.fromkeys(current, 5000)
    for again in ctl.host_plans(mesh, current, ports, keys=KEYS).values():
        assert (again.stale, again.new, again.unchanged) == ([], [], 2)

    # minion-2's key replaced: the other hosts' tunnels to it are set to the new key (the
    # daemon remakes them, on their devices), in the subnet they had; nothing else changes.
    plans = ctl.host_plans(mesh, current, ports, keys=dict(KEYS, **{"minion-2": key(9)}))
    for host in ("minion-1", "minion-3"):
        assert (plans[host].stale, plans[host].new) == ([], [])
        assert plans[host].changed == [{"name": "m-minion-2", "publicKey": key(9)}]
        assert plans[host].changed_whole == [dict(plan[host]["m-minion-2"], publicKey=key(9))]
        assert plans[host].unchanged == 1
    assert (plans["minion-2"].stale, plans["minion-2"].new, plans["minion-2"].changed) == \
        ([], [], [])

    # A plain mesh's tunnels are not what an encrypted one wants, nor the other way round.
    plain = ctl.mesh_plan(ctl.load_mesh(write_mesh(tmp_path)), {})
    for host, entries in plain.items():
        for name, entry in entries.items():
            assert not ctl.same_tunnel(plan[host][name], dict(entry, remotePort=5000), 5000)
            assert not ctl.same_tunnel(entry, dict(plan[host][name], remotePort=5000), 5000)


def test_each_hosts_key_is_its_daemons_checked_against_the_files_and_a_host_without_one_is_named(
        tmp_path):
    mesh = encrypted_mesh(tmp_path, keys_in_file=["minion-1"])
    keys, keyless = ctl.mesh_keys(mesh, {"minion-1": key(1), "minion-2": key(2), "minion-3": None})
    assert keys == {"minion-1": key(1), "minion-2": key(2)}
    assert keyless == {"minion-3": "its daemon has no key (start it with --key-file)"}
    # A file's key pins the host's: a daemon that gives another is not believed.
    keys, keyless = ctl.mesh_keys(mesh, dict(KEYS, **{"minion-1": key(7)}))
    assert keyless == {"minion-1": "its daemon's publicKey %s is not the file's %s"
                                   % (key(7), key(1))}
    assert keys == {"minion-2": key(2), "minion-3": key(3)}
    # A host that did not answer (not in daemon_keys) is not named here: its pairs are held.
    assert ctl.mesh_keys(mesh, {"minion-1": key(1), "minion-2": key(2)}) == (
        {"minion-1": key(1), "minion-2": key(2)}, {})
    # Two daemons with one key (a key file copied): neither is believed.
    keys, keyless = ctl.mesh_keys(mesh, dict(KEYS, **{"minion-2": key(3)}))
    assert keyless == {"minion-2": "publicKey %s is also that of minion-3" % key(3),
                       "minion-3": "publicKey %s is also that of minion-2" % key(3)}
    assert ctl.mesh_keys(mesh, {"minion-1": key(1), "minion-2": "c2hvcnQ="})[1] == {
        "minion-2": "its daemon gives publicKey 'c2hvcnQ=', which is not a key"}


def test_applying_an_encrypted_mesh_leaves_the_pairs_of_a_host_without_a_key_alone(tmp_path):
    mesh = encrypted_mesh(tmp_path)
    daemons = {
        "minion-1": StandIn({"m-minion-2": dict(listed("10.0.0.1", "172.100.1.2",
                                                       ["192.168.2.0/24"]), publicKey=key(2))},
                            key(1)),
        "minion-2": StandIn({"m-minion-1": listed("10.0.0.2", "172.100.1.1", ["192.168.1.0/24"])}),
        "minion-3": StandIn({}, key(3)),
    }
    lines = []
    failed = ctl.apply_to_daemons(mesh, daemons, False, lines.append)
    assert failed == {"minion-2": "its daemon has no key (start it with --key-file)"}
    assert "minion-2 (172.100.1.2): FAILED: its daemon has no key" \
           " (start it with --key-file)" in lines
    assert daemons["minion-2"].requests == []
    added = {name: [t for m in d.requests for t in m["tunnel"]] for name, d in daemons.items()}
    assert [(t["name"], t["publicKey"]) for t in added["minion-1"]] == [("m-minion-3", key(3))]
    assert [(t["name"], t["publicKey"]) for t in added["minion-3"]] == [("m-minion-1", key(1))]
    assert "minion-1 (172.100.1.1): 1 added, 0 deleted, 0 unchanged, 1 left as is" \
           " (no usable key from minion-2)" in lines

    # Taken down, it needs no key.
    daemons = {"minion-1": StandIn({"m-minion-3": {}}), "minion-2": StandIn({"m-minion-1": {}}),
               "minion-3": StandIn({"m-minion-1": {}})}
    assert ctl.apply_to_daemons(mesh, daemons, False, lines.append, down=True) == {}
    assert all(d.requests for d in daemons.values())


NOW = 1_800_000_000


def test_status_gives_each_hosts_end_of_each_pair_as_its_daemon_lists_it(tmp_path):
    mesh = encrypted_mesh(tmp_path)
    plan = ctl.mesh_plan(mesh, {}, keys=KEYS)

    def end(host, peer, **listed):
        entry = plan[host]["m-" + peer]
        return dict(dict(entry, remotePort=5000, rx_packets=0, last_rx=None,
                         latestHandshake=None), **listed)
    listings = ctl.Listings(
        tunnels={"minion-1": {"m-minion-2": end("minion-1", "minion-2", latestHandshake=NOW - 5),
                              "m-minion-3": end("minion-1", "minion-3", last_rx=NOW - 1,
                                                latestHandshake=NOW - 181)},
                 "minion-3": {"m-minion-1": end("minion-3", "minion-1", publicKey=key(7),
                                                latestHandshake=NOW - 1)}},
        data_ports={"minion-1": 5000, "minion-3": 5000},
        keys={"minion-1": key(1), "minion-3": key(3)},
        unanswered={"minion-2": "no reply within 2 s"})
    states, failed = ctl.pair_states(mesh, listings, NOW)
    assert states == {
        # Its end towards the silent minion-2 goes by its handshake alone.
        "minion-1": {"minion-2": ("up", 5), "minion-3": ("down", 181)},
        "minion-2": {"minion-1": ("no answer", None), "minion-3": ("no answer", None)},
        "minion-3": {"minion-1": ("differs", None), "minion-2": ("missing", None)},
    }
    assert failed == {"minion-2": "no reply within 2 s"}

    lines = ctl.format_status(mesh, states, failed)
    assert lines[1].split() == ["from", "\\", "to", "minion-1", "minion-2", "minion-3"]
    assert lines[2].split() == ["minion-1", "(172.100.1.1)", "-", "up", "5s", "down", "3m"]
    assert lines[3].split() == ["minion-2", "(172.100.1.2)", "no", "answer", "-", "no", "answer"]
    assert lines[4].split() == ["minion-3", "(172.100.2.3)", "differs", "missing", "-"]
    assert "minion-2 (172.100.1.2): no answer: no reply within 2 s" in lines
    assert lines[-1] == "mesh: 3 hosts, 1 of 6 tunnel ends up, 1 down, 2 no answer, 1 missing, 1 differs"
    assert not ctl.healthy(states, failed)
    assert ctl.status_json(mesh, states, failed) == {
        "ok": False, "hosts": ["minion-1", "minion-2", "minion-3"],
        "pairs": {host: {peer: {"state": state, "age": age} for peer, (state, age) in row.items()}
                  for host, row in states.items()},
        "failed": failed}


def test_status_of_a_plain_mesh_goes_by_the_last_packet_received(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    plan = ctl.mesh_plan(mesh, {})
    ages = {"minion-1": 0, "minion-2": 179, "minion-3": 180}
    listings = ctl.Listings(
        tunnels={host: {name: dict(entry, remotePort=5000, last_rx=NOW - ages[host])
                        for name, entry in tunnels.items()} for host, tunnels in plan.items()},
        data_ports=dict.fromkeys(plan, 5000), keys=dict.fromkeys(plan), unanswered={})
    states, failed = ctl.pair_states(mesh, listings, NOW + 0.4)
    assert states["minion-3"] == {"minion-1": ("up", 180), "minion-2": ("up", 180)}
    assert failed == {} and ctl.healthy(states, failed)
    assert ctl.format_status(mesh, states, failed)[-1] == "mesh: 3 hosts, 6 of 6 tunnel ends up, 0 down"
    listings.tunnels["minion-2"]["m-minion-1"]["last_rx"] = None
    states, _ = ctl.pair_states(mesh, listings, NOW)
    assert states["minion-2"]["minion-1"] == ("down", None)
    assert not ctl.healthy(states, {})


def test_status_takes_each_end_s_state_from_its_daemon_idle_apart_from_down(tmp_path):
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    plan = ctl.mesh_plan(mesh, {})
    said = {"minion-1": "up", "minion-2": "idle", "minion-3": "connecting"}
    listings = ctl.Listings(
        tunnels={host: {name: dict(entry, remotePort=5000, last_rx=NOW - 600, state=said[host])
                        for name, entry in tunnels.items()} for host, tunnels in plan.items()},
        data_ports=dict.fromkeys(plan, 5000), keys=dict.fromkeys(plan), unanswered={})
    states, failed = ctl.pair_states(mesh, listings, NOW)
    assert states["minion-1"]["minion-2"] == ("up", 600)
    assert states["minion-2"]["minion-3"] == ("idle", 600)
    assert states["minion-3"]["minion-1"] == ("connecting", 600)
    assert ctl.format_status(mesh, states, failed)[-1] == (
        "mesh: 3 hosts, 2 of 6 tunnel ends up, 0 down, 2 connecting, 2 idle")
    assert not ctl.healthy(states, failed)  # connecting is not yet up
    listings.tunnels["minion-3"] = {name: dict(entry, state="idle")
                                    for name, entry in listings.tunnels["minion-3"].items()}
    assert ctl.healthy(*ctl.pair_states(mesh, listings, NOW))  # idle pairs are well


def test_status_wider_than_the_terminal_lists_only_the_ends_not_up(tmp_path):
    hosts = [{"name": "host-%02d" % i, "address": "198.18.1.%d" % i} for i in range(1, 31)]
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps({"tunnelNet": "10.0.0.0/16", "hosts": hosts}))
    mesh = ctl.load_mesh(str(path))
    plan = ctl.mesh_plan(mesh, {})
    listings = ctl.Listings(
        tunnels={host: {name: dict(entry, remotePort=5000, state="up")
                        for name, entry in tunnels.items()} for host, tunnels in plan.items()},
        data_ports=dict.fromkeys(plan, 5000), keys=dict.fromkeys(plan), unanswered={})
    listings.tunnels["host-07"]["m-host-30"]["state"] = "down"
    listings.tunnels["host-30"]["m-host-07"]["state"] = "idle"
    del listings.tunnels["host-12"]["m-host-01"]
    states, failed = ctl.pair_states(mesh, listings, NOW)
    wide = ctl.format_status(mesh, states, failed)
    assert max(len(line) for line in wide) > 250  # the whole matrix
    lines = ctl.format_status(mesh, states, failed, width=120)
    assert max(len(line) for line in lines) <= 120
    assert lines[1:-1] == ["  host-12 -> host-01: missing", "  host-07 -> host-30: down",
                           "  host-30 -> host-07: idle"]
    assert lines[-1] == "mesh: 30 hosts, 867 of 870 tunnel ends up, 1 down, 1 missing, 1 idle"
    assert ctl.format_status(mesh, states, failed, width=400)[1:-1] == wide[1:-1]


@pytest.mark.parametrize("changes, complaint", [
    ({"tunnelNet": "10.0.0.0/29"}, "tunnelNet 10.0.0.0/29 holds 2 /30 subnets; 3 hosts need 3"),
    ({"tunnelNet": "10.0.0.1/24"}, "tunnelNet '10.0.0.1/24': not a network"),
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1"}]}, "at least two hosts"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1"}, {"name": "a", "address": "172.100.1.2"}]},
     "hosts[1] (a): name a is also that of hosts[0]"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1"}, {"name": "b", "address": "172.100.1.1"}]},
     "hosts[1] (b): address 172.100.1.1 is also that of hosts[0]"),
    ({"hosts": [{"name": "a", "address": "172.100.1.300"}, {"name": "b", "address": "::1"}]},
     "hosts[0] (a): address '172.100.1.300' is not an IP address"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1", "lan": ["192.168.1.0/24"]},
                {"name": "b", "address": "172.100.1.2", "lan": ["192.168.1.128/25"]}]},
     "hosts[1] (b) lan[0] 192.168.1.128/25 overlaps hosts[0] (a) lan[0] 192.168.1.0/24"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1", "lan": ["10.0.0.0/16"]},
                {"name": "b", "address": "172.100.1.2"}]},
     "hosts[0] (a) lan[0] 10.0.0.0/16 overlaps tunnelNet 10.0.0.0/24"),
    ({"hosts": [{"name": "minion-1", "address": "172.100.1.1", "lan": ["198.18.0.0/16"]},
                {"name": "minion-2", "address": "198.18.0.2"}]},
     "hosts[0] (minion-1) lan[0] 198.18.0.0/16 covers the address 198.18.0.2 of hosts[1] (minion-2)"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1"},
                {"name": "b", "address": "198.18.0.2", "lan": ["198.18.0.0/24"]}]},
     "hosts[1] (b) lan[0] 198.18.0.0/24 covers the address 198.18.0.2 of hosts[1] (b)"),
    ({"hosts": [{"name": "a", "address": "2001:db8::1", "lan": ["fd00:1::/64", "2001:db8::/32"]},
                {"name": "b", "address": "2001:db8::2"}]},
     "hosts[0] (a) lan[1] 2001:db8::/32 covers the address 2001:db8::1 of hosts[0] (a)"),
    ({"tunnelNet": "172.100.0.0/16", "hosts": [{"name": "a", "address": "172.100.1.1"},
                                               {"name": "b", "address": "172.101.1.2"}]},
     "tunnelNet 172.100.0.0/16 covers the address 172.100.1.1 of hosts[0] (a)"),
    ({"encrypt": "yes"}, "encrypt 'yes': must be true or false"),
    ({"encrypt": True, "hosts": [{"name": "a", "address": "172.100.1.1", "publicKey": "c2hvcnQ="},
                                 {"name": "b", "address": "172.100.1.2"}]},
     "hosts[0] (a): publicKey 'c2hvcnQ=' is not a key: 32 bytes in base64, as wg pubkey writes"),
    ({"hosts": [{"name": "a", "address": "172.100.1.1", "publicKey": key(1)},
                {"name": "b", "address": "172.100.1.2"}]},
     "hosts[0] (a): publicKey given, but the mesh is not encrypted (add \"encrypt\": true)"),
    ({"encrypt": True, "hosts": [{"name": "a", "address": "172.100.1.1", "publicKey": key(1)},
                                 {"name": "b", "address": "172.100.1.2", "publicKey": key(1)}]},
     "hosts[1] (b): publicKey %s is also that of hosts[0]" % key(1)),
])
def test_a_bad_mesh_file_is_refused_pointing_at_the_entry(tmp_path, changes, complaint):
    with pytest.raises(ctl.MeshError) as error:
        ctl.load_mesh(write_mesh(tmp_path, **changes))
    assert complaint in str(error.value)


def test_a_mesh_defaults_to_an_mtu_that_fits_its_tunnels_in_1500_bytes(tmp_path):
    def mtu(**changes):
        mesh = json.loads(open(write_mesh(tmp_path)).read())
        del mesh["mtu"]
        mesh.update(changes)
        return ctl.parse_mesh(mesh).mtu
    assert mtu(encrypt=True) == 1420  # as wg-quick
    assert mtu() == mtu(encrypt=False) == 1500 - 40 - 8 - 4  # IPv6, UDP, packet information
    assert (mtu(encrypt=True, mtu=1400), mtu(mtu=1500)) == (1400, 1500)  # the file's wins
    # A single tunnel keeps the 2015 control script's default.
    assert ctl.build_message(args("h", "-n", "u", "-t", "10.0.0.1", "-r", "198.18.0.2"))[
        "tunnel"][0]["mtu"] == 1500


def test_a_mesh_built_at_1500_without_an_mtu_is_changed_in_place_to_the_default_and_kept_with_one(
        tmp_path):
    hosts = json.loads(open(write_mesh(tmp_path)).read())["hosts"][:2]
    current = {"minion-1": {"m-minion-2": dict(listed("10.0.0.1", "172.100.1.2",
                                                      ["192.168.2.0/24"]), mtu=1500)},
               "minion-2": {"m-minion-1": dict(listed("10.0.0.2", "172.100.1.1",
                                                      ["192.168.1.0/24"]), mtu=1500)}}
    ports = dict.fromkeys(current, 5000)
    mesh = json.loads(open(write_mesh(tmp_path, hosts=hosts)).read())
    del mesh["mtu"]
    plans = ctl.host_plans(ctl.parse_mesh(mesh), current, ports)
    assert [(p.stale, p.new, p.changed) for p in plans.values()] == \
        [([], [], [{"name": "m-minion-2", "mtu": 1448}]),
         ([], [], [{"name": "m-minion-1", "mtu": 1448}])]
    assert [[e["mtu"] for e in p.changed_whole] for p in plans.values()] == [[1448], [1448]]
    kept = ctl.host_plans(ctl.parse_mesh(dict(mesh, mtu=1500)), current, ports)
    assert [(p.stale, p.new, p.unchanged) for p in kept.values()] == [([], [], 1)] * 2


def test_tunnel_names_fit_and_stay_unique():
    assert ctl.tunnel_name("minion-2") == "m-minion-2"
    long_names = [ctl.tunnel_name("datacenter-east-%d" % i) for i in range(20)]
    assert len(set(long_names)) == 20 and all(len(n) <= 15 for n in long_names)


def test_a_request_whose_cookie_expired_is_sent_once_more_with_the_new_one(daemon, capsys):
    port, requests = daemon({"ok": False, "op": "del", "retry": True, "cookie": "d1" * 16,
                             "error": "cookie expired"},
                            {"ok": True, "op": "del", "results": [{"name": "udp2", "ok": True}]})
    assert ctl.main(["127.0.0.1", "-p", port, "-o", "del", "-n", "udp2"]) == 0
    assert [r["cookie"] for r in requests] == [COOKIE, "d1" * 16]


def test_a_daemon_that_knows_no_cookies_is_sent_the_plain_request(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as older:
        older.bind(("127.0.0.1", 0))
        older.settimeout(5)
        replies = iter([{"ok": False, "error": "unknown op 'cookie' (expected add, del or list)"},
                        {"ok": True, "op": "del", "results": [{"name": "u", "ok": True}]}])
        got = []

        def serve():
            for reply in replies:
                data, sender = older.recvfrom(65535)
                got.append(json.loads(data))
                older.sendto(json.dumps(reply).encode(), sender)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = str(older.getsockname()[1])
        assert ctl.main(["127.0.0.1", "-p", port, "-o", "del", "-n", "u"]) == 0
        thread.join(5)
    assert got == [ctl.COOKIE_REQUEST, {"op": "del", "tunnel": [{"name": "u"}]}]


def test_plain_requests_are_padded_so_a_cookie_or_a_refusal_fits_in_the_reply():
    with ctl.Daemon("127.0.0.1", 9, 1) as daemon, socket.socket(socket.AF_INET,
                                                                 socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        daemon.address = sink.getsockname()
        daemon.send({"op": "cookie"})
        assert len(sink.recv(65535)) == ctl.PADDED_REQUEST


def test_a_list_whose_tunnels_changed_meanwhile_is_fetched_again_from_the_start(daemon, capsys):
    def part(number, generation, names):
        return {"ok": True, "op": "list", "part": number, "parts": 2, "generation": generation,
                "tunnels": [dict(LIST_REPLY["tunnels"][0], name=name) for name in names]}

    port, requests = daemon(part(0, 1, ["a"]),
                            {"ok": False, "op": "list", "retry": True, "error": "changed"},
                            part(0, 2, ["a", "b"]), part(1, 2, ["c"]))
    assert ctl.main(["127.0.0.1", "-p", port, "-o", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed["tunnels"]] == ["a", "b", "c"]
    assert [(r.get("part"), r.get("generation")) for r in requests] == \
        [(None, None), (1, 1), (None, None), (1, 2)]


def test_a_2015_daemon_that_never_answers_gets_the_command_once(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as old:
        old.bind(("127.0.0.1", 0))
        port = str(old.getsockname()[1])
        assert ctl.main(["127.0.0.1", "-p", port, "-o", "del", "-n", "u", "--timeout", "0.3"]) == 3
        old.settimeout(1)
        got = [json.loads(old.recv(65535)) for _ in range(2)]
    assert got == [ctl.COOKIE_REQUEST, {"op": "del", "tunnel": [{"name": "u"}]}]
    assert "sent once without a cookie" in capsys.readouterr().err


def test_with_a_secret_an_unsigned_retry_is_not_followed(tmp_path, capsys):
    """Someone on the path who read the cookie forges an unsigned retry: the command must
    not be sent twice, and the forged reply is believed only as the failure it reports."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123456789abcdef")
    secret.chmod(0o600)
    got = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.settimeout(5)

        def serve():
            data, sender = daemon.recvfrom(65535)
            nonce = json.loads(data)["auth"]["nonce"]
            payload = json.dumps({"ok": True, "op": "cookie", "cookie": COOKIE})
            mac = hmac.new(secret.read_bytes(), ctl.REPLY_MAC_PREFIX + b"%s\n%s" % (
                nonce.encode(), payload.encode()), hashlib.sha256).hexdigest()
            daemon.sendto(json.dumps({"auth": {"nonce": nonce, "mac": mac},
                                      "payload": payload}).encode(), sender)
            data, sender = daemon.recvfrom(65535)
            got.append(json.loads(json.loads(data)["payload"]))
            daemon.sendto(json.dumps({"ok": False, "retry": True, "cookie": "d1" * 16,
                                      "error": "forged"}).encode(), sender)
            daemon.settimeout(1.5)
            try:
                got.append(daemon.recv(65535))
            except socket.timeout:
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = str(daemon.getsockname()[1])
        assert ctl.main(["127.0.0.1", "-p", port, "--secret-file", str(secret), "-o", "del",
                         "-n", "u", "--timeout", "1"]) == 1
        thread.join(10)
    assert got == [{"op": "del", "tunnel": [{"name": "u"}], "cookie": COOKIE}]


def test_a_mesh_plan_has_a_plan_or_a_failure_for_every_host_and_what_each_should_have(tmp_path):
    """plan_mesh: one pure function of the file and the lists, which --dry-run prints,
    applying runs and --status holds the hosts to."""
    mesh = ctl.load_mesh(write_mesh(tmp_path))
    listings = ctl.Listings({"minion-1": {}, "minion-3": {}}, {"minion-1": 5000, "minion-3": 5000},
                            {}, {"minion-2": "no reply within 2 s"})
    plan = ctl.plan_mesh(mesh, listings)
    assert sorted(plan.hosts) == ["minion-1", "minion-3"] and plan.failed == {
        "minion-2": "no reply within 2 s"}
    assert [e["name"] for e in plan.hosts["minion-1"].new] == ["m-minion-3"]  # not to minion-2
    assert plan.wanted["minion-1"]["m-minion-3"]["remoteServer"] == "172.100.2.3"
    down = ctl.plan_mesh(mesh, listings, down=True)
    assert down.failed == plan.failed and down.wanted == {}
