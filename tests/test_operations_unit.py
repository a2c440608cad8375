"""What operators do to a running daemon, without root: tunnels changed in place (the set
op, SIGHUP), devices kept across a shutdown with a state file, a new key or secret taken
on SIGHUP, the metrics file, each tunnel's state, the loop's jobs (the watchdog)."""

import json
import os
import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

import udpProxyServer as ups
from fakes import Clock, WirePeer, add, answer, fake_server, ipv4_packet, receive, udp

ENTRY = {"name": "udp2", "tunnelIP": "10.0.1.1", "remoteServer": "198.18.0.2",
         "routes": ["192.168.2.0/24"]}


def request(server, op, *entries):
    return answer(server, json.dumps({"op": op, "tunnel": list(entries)}).encode(),
                  ("127.0.0.1", 9))[0]


@pytest.fixture
def kept(tmp_path):
    """A daemon with a state file: its devices are kept across a shutdown."""
    with fake_server(state=ups.StateFile(str(tmp_path / "state.json"))) as made:
        yield made


# --- Changed in place --------------------------------------------------------------


def test_set_changes_mtu_routes_and_keepalive_in_place(kept):
    server, devices = kept
    peer = WirePeer(b"\x09" * 32)
    server.wireguard = None
    with fake_server(private_key=ups.generate_private_key(),
                     state=server.keeper.state) as (wg_server, wg_devices):
        assert add(wg_server, ENTRY, peer.entry("wg2", "10.0.2.1"))["ok"]
        tunnel, wg_tunnel = (wg_server.registry.by_name[name] for name in ("udp2", "wg2"))
        fd, counters = tunnel.fd, tunnel.counters
        reply = request(wg_server, "set", {"name": "udp2", "mtu": 1400,
                                           "routes": ["192.168.3.0/24", "192.168.2.0/24"]},
                        {"name": "wg2", "persistentKeepalive": 25, "mtu": 1380})
        assert reply["ok"], reply
        assert wg_server.registry.by_name["udp2"] is tunnel and tunnel.fd == fd
        assert tunnel.counters is counters
        assert wg_devices.mtu["udp2"] == 1400 and wg_devices.mtu["wg2"] == 1380
        assert wg_server.netlink.routes["udp2"] == (ups.ipaddress.ip_network("192.168.3.0/24"),
                                                   ups.ipaddress.ip_network("192.168.2.0/24"))
        assert wg_tunnel.wg_peer.timers.persistent_keepalive_interval == 25
        assert wg_tunnel.codec.mtu == 1380  # what the padding is bounded by
        saved = {e["name"]: e for e in wg_server.keeper.state.load()}
        assert saved["udp2"]["mtu"] == 1400 and saved["wg2"]["persistentKeepalive"] == 25
        listed = {t["name"]: t for t in request(wg_server, "list")["tunnels"]}
        assert listed["udp2"]["routes"] == ["192.168.3.0/24", "192.168.2.0/24"]


@pytest.mark.parametrize("change, complaint", [
    ({"persistentKeepalive": 25}, "presharedKey, presharedKeyFile and persistentKeepalive go"
                                  " with publicKey"),
    ({"mtu": 20}, "mtu"),
    ({"routes": ["nonsense"]}, "invalid route"),
    ({"tunnelIP": "10.0.1.1/40"}, "netmask"),
    ({"remoteServer": None}, "missing field 'remoteServer'"),
    ({}, "nothing to change: give the fields to change beside the name"),
])
def test_set_refuses_a_tunnel_that_would_not_be_valid_and_changes_nothing(kept, change,
                                                                          complaint):
    server, devices = kept
    assert add(server, ENTRY)["ok"]
    tunnel = server.registry.by_name["udp2"]
    reply = request(server, "set", dict(change, name="udp2"))
    assert not reply["ok"] and complaint in reply["error"], reply
    assert server.registry.by_name["udp2"] is tunnel
    assert tunnel.spec == ups.TunnelSpec.from_entry(ENTRY) and devices.mtu["udp2"] == 1500
    reply = request(server, "set", {"name": "udp9", "mtu": 1400})
    assert reply["error"] == "udp9: no tunnel named 'udp9'"


@pytest.mark.parametrize("keeps", [True, False], ids=["state file", "none"])
def test_set_remakes_a_tunnel_for_what_cannot_change_in_place_on_its_device_when_kept(
        tmp_path, keeps):
    state = ups.StateFile(str(tmp_path / "state.json")) if keeps else None
    with fake_server(state=state) as (server, devices):
        assert add(server, ENTRY)["ok"]
        tunnel = server.registry.by_name["udp2"]
        reply = request(server, "set", {"name": "udp2", "remoteServer": "198.18.0.3",
                                        "tunnelIP": "10.0.1.5/30"})
        assert reply["results"] == [{"name": "udp2", "ok": True, "changed": "remade"}]
        remade = server.registry.by_name["udp2"]
        assert remade is not tunnel and str(remade.spec.interface) == "10.0.1.5/30"
        assert str(remade.spec.remote) == "198.18.0.3" and remade.spec.routes == tunnel.spec.routes
        # With a state file its device was never deleted, so its routes never went.
        assert ("udp2" in devices.persistent) is keeps
        assert request(server, "set", {"name": "udp2", "mtu": 1500})["results"][0][
            "changed"] == "nothing"


def test_sighup_changes_in_place_what_it_can_and_remakes_the_rest_on_their_devices(kept):
    server, devices = kept
    assert add(server, ENTRY, dict(ENTRY, name="udp3", tunnelIP="10.0.1.5",
                                   remoteServer="198.18.0.3", routes=[]))["ok"]
    udp2, udp3 = (server.registry.by_name[name] for name in ("udp2", "udp3"))
    entries = {e["name"]: e for e in server.keeper.state.load()}
    entries["udp2"]["mtu"] = 1400  # in place
    entries["udp3"]["remoteServer"] = "198.18.0.4"  # remade
    server.keeper.state.save(list(entries.values()))
    server.keeper.reload()
    assert server.registry.by_name["udp2"] is udp2 and devices.mtu["udp2"] == 1400
    remade = server.registry.by_name["udp3"]
    assert remade is not udp3 and str(remade.spec.remote) == "198.18.0.4"
    # Its device was kept while it was remade: never deleted, so its routes never went.
    assert udp3.device.tun.fileno() == -1 and "udp3" in devices.persistent


# --- Devices kept across a shutdown ----------------------------------------------------


def test_with_a_state_file_devices_outlive_the_daemon_and_del_deletes_them(tmp_path):
    with fake_server(state=ups.StateFile(str(tmp_path / "state.json"))) as (server, devices):
        assert add(server, ENTRY, dict(ENTRY, name="udp3", tunnelIP="10.0.1.5",
                                       remoteServer="198.18.0.3"))["ok"]
        assert devices.persistent == {"udp2", "udp3"}
        assert request(server, "del", {"name": "udp3"})["ok"]
        assert devices.persistent == {"udp2"}  # deleted for good
        tunnel = server.registry.by_name["udp2"]
    # Shut down: its fd closed, its device kept, routes and all (not unrouted).
    assert tunnel.device.tun.fileno() == -1 and devices.persistent == {"udp2"}
    assert server.netlink.routes == {"udp2": tunnel.spec.routes}


def test_without_a_state_file_devices_go_with_the_daemon_as_in_2015():
    with fake_server() as (server, devices):
        assert add(server, ENTRY)["ok"]
        assert devices.persistent == set()
    assert server.netlink.routes == {}


def test_a_device_of_the_same_name_not_kept_for_this_state_file_is_refused(kept, monkeypatch):
    server, devices = kept
    owners = {"udp2": "", "udp3": ups.DEVICE_ALIAS + "/var/lib/other/tunnels.json"}
    monkeypatch.setattr(ups, "device_owner", owners.get)
    reply = add(server, ENTRY, dict(ENTRY, name="udp3", tunnelIP="10.0.1.5",
                                    remoteServer="198.18.0.3"))
    assert [r["error"] for r in reply["results"]] == [
        "a device named 'udp2' already exists",
        "device 'udp3' is kept for the tunnels of another state file (/var/lib/other/"
        "tunnels.json); udpProxyServer.py --remove-all --state-file with that file deletes them"]
    assert devices.outer == {}  # neither was opened


def test_a_device_kept_for_this_state_file_is_taken_up(kept, monkeypatch):
    server, devices = kept
    monkeypatch.setattr(ups, "device_owner", lambda name: server.alias)
    monkeypatch.setattr(ups, "is_tun", lambda name: True)
    server.kept["udp2"] = ups.Kept({ups.ipaddress.ip_network("192.168.2.0/24"): 87}, set())
    configured = []
    server.netlink.configure = lambda tunnel, kept=None: configured.append(kept)
    assert add(server, ENTRY)["ok"]
    assert configured == [ups.Kept({ups.ipaddress.ip_network("192.168.2.0/24"): 87}, set())]
    assert server.kept == {}


def test_the_alias_names_the_state_file():
    assert ups.device_alias("/var/lib/udpProxyServer/tunnels.json") == \
        "udpProxyServer /var/lib/udpProxyServer/tunnels.json"
    long = ups.device_alias("/" + "x" * 300)
    assert long.startswith("udpProxyServer sha256:") and len(long) <= ups.MAX_ALIAS


class RecordingIPRoute:
    """Stands in for pyroute2's IPRoute: what it was asked, in order."""

    def __init__(self):
        self.calls = []

    def addr(self, command, **fields):
        self.calls.append(("addr", command, fields.get("address")))

    def route(self, command, **fields):
        self.calls.append(("route", command, fields["dst"], fields.get("proto")))


def test_a_kept_device_gets_what_it_lacks_first_then_loses_what_is_ours_and_unwanted(
        monkeypatch):
    netlink = ups.Netlink()
    netlink.ipr = RecordingIPRoute()
    monkeypatch.setattr(ups.socket, "if_nametoindex", lambda name: 7)
    net = ups.ipaddress.ip_network
    spec = ups.TunnelSpec.from_entry(dict(ENTRY, tunnelIP="fd00::1/64",
                                          routes=["192.168.2.0/24", "192.168.4.0/24"]))
    tunnel = ups.Tunnel(spec, None, None, ups.Offloads(), Clock())
    kept = ups.Kept({net("192.168.2.0/24"): ups.ROUTE_PROTOCOL,  # wanted: stays
                     net("192.168.3.0/24"): ups.ROUTE_PROTOCOL,  # ours, unwanted: goes
                     net("192.168.9.0/24"): 3},  # added by hand: stays
                    {ups.ipaddress.ip_interface("fd00::9/64")})
    netlink.configure(tunnel, kept)
    assert netlink.ipr.calls == [
        ("addr", "add", "fd00::1"),
        ("route", "add", "192.168.4.0/24", ups.ROUTE_PROTOCOL),
        ("route", "del", "192.168.3.0/24", None),
        ("addr", "del", "fd00::9"),
    ]


# --- SIGHUP: a new secret, a new key ----------------------------------------------------


def test_a_new_key_is_taken_in_place_and_peers_with_the_new_public_key_shake_hands():
    old, new = ups.generate_private_key(), ups.generate_private_key()
    clock = Clock()
    with fake_server(private_key=old, clock=clock) as (server, devices):
        peer = WirePeer(ups.public_key(old))
        assert add(server, peer.entry("wg2", "10.0.2.1"))["ok"]
        data_port = server.data_sock.getsockname()[1]
        peer.handshake(server, data_port)
        server.set_private_key(new)
        assert request(server, "list")["publicKey"] == ups.key_to_base64(ups.public_key(new))
        # The session made with the old key goes on until the peer shakes hands anew.
        peer.send([ipv4_packet("10.0.2.2", "10.0.2.1")], data_port)
        receive(server)
        tunnel = server.registry.by_name["wg2"]
        assert tunnel.counters.rx_packets == 1
        # A peer that still has the old public key is refused at the first check, mac1.
        sent, message = peer.initiation()
        peer.sock.sendto(message, ("127.0.0.1", data_port))
        receive(server)
        assert server.drops["bad_mac1"] == 1
        peer.server_public, peer.cookies = ups.public_key(new), ups.CookieGenerator(
            ups.public_key(new))
        clock.advance(1)  # a peer's initiations are taken 20 ms apart at most
        peer.handshake(server, data_port)
        assert tunnel.wg_peer.keypairs.current.created is not None
        assert server.drops["bad_mac1"] == 1 and not tunnel.counters.drops


def test_sighup_reads_the_secret_file_and_the_key_file_again_and_keeps_them_when_bad(
        tmp_path, caplog):
    secret, key = tmp_path / "secret", tmp_path / "key"
    secret.write_bytes(b"the first secret of the fleet\n")
    key.write_text(ups.key_to_base64(ups.generate_private_key()) + "\n")
    for path in (secret, key):
        path.chmod(0o600)
    args = ups.parse_args(["--secret-file", str(secret), "--key-file", str(key)])
    with fake_server(private_key=ups.read_key_file(str(key)),
                     auth=ups.Authenticator(*ups.read_secret(str(secret)))) as (server, _):
        secret.write_bytes(b"the next secret of the fleet\nthe first secret of the fleet\n")
        new = ups.generate_private_key()
        key.write_text(ups.key_to_base64(new) + "\n")
        ups.reload_files(server, args)
        assert server.control.auth.secrets == (b"the next secret of the fleet",
                                               b"the first secret of the fleet")
        assert server.private_key == new and server.wireguard.local_public == ups.public_key(new)
        secret.chmod(0o644)
        key.write_text("not a key\n")
        ups.reload_files(server, args)
        assert len(server.control.auth.secrets) == 2 and server.private_key == new
        assert "the secrets in use are kept" in caplog.text
        assert "the key in use is kept" in caplog.text


# --- Each tunnel's state ----------------------------------------------------------------


def test_a_plain_tunnel_is_up_when_heard_down_when_only_sending_idle_else():
    with fake_server() as (server, _):
        assert add(server, ENTRY)["ok"]
        tunnel = server.registry.by_name["udp2"]
        now = 2e9
        assert tunnel.codec.state(now) == "idle"
        tunnel.counters.last_tx = now - 10
        assert tunnel.codec.state(now) == "down"
        tunnel.counters.last_rx = now - 170
        assert tunnel.codec.state(now) == "up"
        assert tunnel.codec.state(now + 11) == "down"
        assert tunnel.codec.state(now + 200) == "idle"


def test_an_encrypted_tunnel_is_connecting_then_down_until_its_peer_answers():
    clock = Clock()
    with fake_server(private_key=ups.generate_private_key(), clock=clock) as (server, _):
        peer = WirePeer(server.wireguard.local_public)
        entry = peer.entry("wg2", "10.0.2.1")
        del entry["remoteServer"], entry["remotePort"]  # it waits for its peer
        assert add(server, entry)["ok"]
        tunnel = server.registry.by_name["wg2"]
        timers = tunnel.wg_peer.timers
        assert tunnel.describe()["state"] == "idle"
        timers.on_initiation_sent()
        assert tunnel.describe()["state"] == "connecting"
        clock.advance(ups.CONNECTING_TIME)
        timers.on_initiation_sent()  # a retry: still since the first
        assert tunnel.describe()["state"] == "down"
        peer.handshake(server, server.data_sock.getsockname()[1])
        assert tunnel.describe()["state"] == "up"
        clock.advance(ups.REJECT_AFTER_TIME)
        assert tunnel.describe()["state"] == "idle"


# --- Metrics ---------------------------------------------------------------------------


def test_the_metrics_are_prometheus_text_per_tunnel_and_daemon_wide(tmp_path):
    with fake_server(private_key=ups.generate_private_key()) as (server, _):
        peer = WirePeer(server.wireguard.local_public)
        weird = dict(ENTRY, name='u"2\\')  # a quote and a backslash, escaped
        assert add(server, weird, peer.entry("wg2", "10.0.2.1"))["ok"]
        data_port = server.data_sock.getsockname()[1]
        peer.handshake(server, data_port)
        peer.send([ipv4_packet("10.0.2.2", "10.0.2.1")], data_port)
        receive(server)
        server.drops["unknown_source"] += 3
        server.registry.unmade["udp9"] = {"name": "udp9"}
        text = ups.metrics_text(server)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in families.values() for s in f.samples}
    wg = frozenset({("peer", "127.0.0.1"), ("tunnel", "wg2")})
    plain = frozenset({("peer", "198.18.0.2"), ("tunnel", 'u"2\\')})
    assert families["udpproxy_tunnel_receive_bytes"].type == "counter"
    assert samples["udpproxy_tunnel_receive_bytes_total", wg] == 32 + 32  # one packet, sealed
    assert samples["udpproxy_tunnel_receive_packets_total", plain] == 0
    assert samples["udpproxy_tunnel_latest_handshake_seconds", wg] > 1.7e9
    assert ("udpproxy_tunnel_latest_handshake_seconds", plain) not in samples
    assert samples["udpproxy_tunnel_state", wg | {("state", "up")}] == 1
    assert samples["udpproxy_tunnel_state", wg | {("state", "down")}] == 0
    assert samples["udpproxy_tunnel_state", plain | {("state", "idle")}] == 1
    assert samples["udpproxy_tunnel_info", plain | {("address", "10.0.1.1/30"),
                                                    ("encrypted", "false")}] == 1
    assert samples["udpproxy_dropped_datagrams_total", frozenset({("reason", "unknown_source")})] == 3
    assert samples["udpproxy_tunnels", frozenset()] == 2
    assert samples["udpproxy_tunnels_not_made", frozenset()] == 1
    assert samples["udpproxy_control_requests_total", frozenset()] == 0
    assert samples["udpproxy_build_info", frozenset({("version", ups.__version__)})] == 1


def test_the_metrics_file_is_written_whole_readable_by_all_and_its_failures_said(tmp_path):
    with fake_server() as (server, _):
        assert add(server, ENTRY)["ok"]
        path = tmp_path / "udpproxy.prom"
        metrics = ups.MetricsFile(str(path), server)
        metrics.check()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        assert 'udpproxy_tunnels 1' in path.read_text().splitlines()
        (tmp_path / "udpproxy.prom.tmp").symlink_to(tmp_path / "elsewhere")
        assert add(server, dict(ENTRY, name="udp3", tunnelIP="10.0.1.5",
                                remoteServer="198.18.0.3"))["ok"]
        metrics()  # a leftover temporary file, a link even, is made anew
        assert 'udpproxy_tunnels 2' in path.read_text().splitlines()
        assert not (tmp_path / "elsewhere").exists()
        missing = ups.MetricsFile(str(tmp_path / "no" / "such.prom"), server)
        with pytest.raises(ups.StartupError, match="cannot write metrics file .*such.prom: No"
                                                   " such file or directory"):
            missing.check()


# --- The loop's jobs, the watchdog, the state file's lock ---------------------------------


def test_jobs_run_from_the_loop_so_a_loop_stuck_stops_them():
    clock = Clock()
    loop = ups.Loop(clock)
    runs = []
    loop.every(5, lambda: runs.append(clock()))
    with udp() as sock:
        loop.watch(sock.fileno(), lambda: (sock.recv(10), loop.stop()))
        assert loop._timeout(None) == 0  # due at once
        loop._run_jobs()
        assert runs == [1000.0] and loop._timeout(None) == 5
        clock.advance(4)
        loop._run_jobs()
        assert runs == [1000.0] and loop._timeout(None) == 1
        clock.advance(1)
        sock.sendto(b"x", sock.getsockname())
        loop.run()  # one round: the datagram, then the jobs due
        assert runs == [1000.0, 1005.0]
    loop.close()


def test_the_watchdog_pings_at_half_its_interval_for_this_process_only(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert ups.watchdog_interval() == 10
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert ups.watchdog_interval() == 10
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's
    assert ups.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert ups.watchdog_interval() is None


def test_one_daemon_a_state_file(tmp_path):
    first, second = (ups.StateFile(str(tmp_path / "state.json")) for _ in range(2))
    first.lock()
    with pytest.raises(ups.StartupError, match="state file .*state.json is in use by another"
                                               " udpProxyServer \\(pid %d\\)" % os.getpid()):
        second.lock()
    os.close(first.lock_fd)
    second.lock()
    os.close(second.lock_fd)
