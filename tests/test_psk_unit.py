"""A preshared key never crosses the network in clear: a request names a file on the
daemon's host (presharedKeyFile), the control script sends only that path, the state file
keeps only the path, and a key that came over the network anyway is refused."""

import json
import os

import pytest

import udpProxyServer as ups
import udpProxyServerControl as ctl
from fakes import Clock, WirePeer, add, answer, fake_server, receive

PSK = bytes(range(100, 132))


@pytest.fixture
def daemon(tmp_path):
    with fake_server(offloads=True, private_key=ups.generate_private_key(), clock=Clock(),
                     state=ups.StateFile(str(tmp_path / "tunnels.json"))) as (server, devices):
        yield server


def psk_file(tmp_path, key=PSK, mode=0o600, name="psk"):
    path = tmp_path / name
    path.write_text(ups.key_to_base64(key) + "\n")
    os.chmod(path, mode)
    return str(path)


def test_a_preshared_key_from_a_file_on_the_daemons_host_is_used(daemon, tmp_path):
    peer = WirePeer(daemon.wireguard.public_key)
    assert add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=psk_file(tmp_path)))["ok"]
    assert daemon.tunnels["wgp"].wg.preshared_key == PSK
    # A handshake with the key goes through; the peer's response needs it.
    sent, message = peer.initiation()
    peer.sock.sendto(message, ("127.0.0.1", daemon.data_port))
    receive(daemon)
    response = peer.receive(ups.MESSAGE_RESPONSE)
    with pytest.raises(ups.WireGuardRefused):
        ups.consume_response(sent, response)  # without the key: refused
    ups.consume_response(sent, response, PSK)


def test_the_state_file_and_the_list_keep_the_path_never_the_key(daemon, tmp_path):
    path = psk_file(tmp_path)
    peer = WirePeer(daemon.wireguard.public_key)
    assert add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=path))["ok"]
    saved = (tmp_path / "tunnels.json").read_text()
    assert ups.key_to_base64(PSK) not in saved
    assert json.loads(saved)["tunnels"][0]["presharedKeyFile"] == path
    listed = answer(daemon, b'{"op": "list"}', ("127.0.0.1", 9))[0]
    assert listed["tunnels"][0]["presharedKeyFile"] == path
    assert ups.key_to_base64(PSK) not in json.dumps(listed)


@pytest.mark.parametrize("value, error", [
    ("psk", "an absolute path on the daemon's host"),
    ("/nonexistent/psk", "cannot read presharedKeyFile /nonexistent/psk"),
    ("/tmp/\0x", "an absolute path"),
    (7, "an absolute path"),
])
def test_a_preshared_key_file_that_cannot_be_used_is_refused_naming_it(daemon, value, error):
    peer = WirePeer(daemon.wireguard.public_key)
    reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=value))
    assert not reply["ok"] and error in reply["error"] and "wgp" not in daemon.tunnels


def test_a_preshared_key_file_others_can_read_or_not_holding_a_key_is_refused(daemon, tmp_path):
    peer = WirePeer(daemon.wireguard.public_key)
    loose = psk_file(tmp_path, mode=0o644)
    reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=loose))
    assert "readable by group or others (mode 644)" in reply["error"]
    junk = tmp_path / "junk"
    junk.write_text("not a key at all")
    os.chmod(junk, 0o600)
    reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=str(junk)))
    assert "does not hold a key" in reply["error"] and "not a key at all" not in reply["error"]


def test_an_inline_key_from_the_network_is_refused_and_from_this_host_taken(daemon, tmp_path):
    peer = WirePeer(daemon.wireguard.public_key)
    entry = peer.entry("wgp", "10.0.1.1", presharedKey=ups.key_to_base64(PSK))
    request = json.dumps({"op": "add", "tunnel": [entry]}).encode()
    reply = answer(daemon, request, ("198.18.0.9", 40000))[0]
    assert not reply["ok"] and "came over the network in clear" in reply["error"]
    assert "wgp" not in daemon.tunnels
    reply = answer(daemon, request, ("::1", 40000))[0]
    assert reply["ok"] and daemon.tunnels["wgp"].wg.preshared_key == PSK


def test_both_forms_at_once_are_refused(daemon, tmp_path):
    peer = WirePeer(daemon.wireguard.public_key)
    reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=psk_file(tmp_path),
                                   presharedKey=ups.key_to_base64(PSK)))
    assert "not both" in reply["error"]


def test_a_reload_reads_the_file_again_so_a_new_key_takes_effect(daemon, tmp_path):
    path = psk_file(tmp_path)
    peer = WirePeer(daemon.wireguard.public_key)
    assert add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=path))["ok"]
    psk_file(tmp_path, key=bytes(32))
    daemon.keeper.reload()
    assert daemon.tunnels["wgp"].wg.preshared_key == bytes(32)


def test_the_control_script_sends_the_path_and_never_reads_the_key(tmp_path):
    path = psk_file(tmp_path)
    args = ctl.parse_args(["h", "-n", "wg2", "-t", "10.0.1.1", "-r", "198.18.0.2",
                           "--peer-key", ups.key_to_base64(bytes(32)), "--psk-file", path])
    tunnel, = ctl.build_message(args)["tunnel"]
    assert tunnel["presharedKeyFile"] == path and "presharedKey" not in tunnel
    os.chmod(path, 0)  # unreadable here: the daemon's host reads it, not this one
    assert ctl.build_message(ctl.parse_args(["h", "-n", "wg2", "-t", "10.0.1.1", "-r", "198.18.0.2",
                                             "--peer-key", ups.key_to_base64(bytes(32)),
                                             "--psk-file", path]))


def test_the_control_script_wants_an_absolute_path(capsys):
    with pytest.raises(SystemExit):
        ctl.parse_args(["h", "-n", "wg2", "-t", "10.0.1.1", "-r", "198.18.0.2",
                        "--peer-key", ups.key_to_base64(bytes(32)), "--psk-file", "psk"])
    assert "absolute path on the daemon's host" in capsys.readouterr().err
