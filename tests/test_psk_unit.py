"""A preshared key never crosses the network in clear: a request names a file on the
daemon's host (presharedKeyFile), the control script sends only that path, the state file
keeps only the path, and a key that came over the network anyway is refused."""

import json
import os
import signal

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
    peer = WirePeer(daemon.wireguard.local_public)
    assert add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=psk_file(tmp_path)))["ok"]
    assert daemon.registry.by_name["wgp"].wg_peer.preshared_key == PSK
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
    peer = WirePeer(daemon.wireguard.local_public)
    assert add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=path))["ok"]
    saved = (tmp_path / "tunnels.json").read_text()
    assert ups.key_to_base64(PSK) not in saved
    assert json.loads(saved)["tunnels"][0]["presharedKeyFile"] == path
    listed = answer(daemon, b'{"op": "list"}', ("127.0.0.1", 9))[0]
    assert listed["tunnels"][0]["presharedKeyFile"] == path
    assert ups.key_to_base64(PSK) not in json.dumps(listed)


@pytest.mark.parametrize("value", ["psk", 7, "", "relative/psk", ["/etc/psk"]])
def test_a_preshared_key_file_not_given_by_its_absolute_path_is_refused(daemon, value):
    peer = WirePeer(daemon.wireguard.local_public)
    reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=value))
    assert not reply["ok"] and "an absolute path on the daemon's host" in reply["error"]


def unusable_files(tmp_path):
    """Paths a request may name that must not be read as a key, each with why, as the log
    gives it: a missing file, a FIFO (opening one blocks), a directory, a device, a link
    (even to a good key file), a file others can read, one of another user, one that holds
    no key, a path with a NUL or a lone surrogate."""
    good = psk_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    os.symlink(good, tmp_path / "link")
    loose = psk_file(tmp_path, mode=0o644, name="loose")
    junk = tmp_path / "junk"
    junk.write_text("not a key at all")
    os.chmod(junk, 0o600)
    files = {str(tmp_path / "missing"): "No such file", str(fifo): "not a regular file",
             str(tmp_path): "not a regular file", "/dev/zero": "not a regular file",
             str(tmp_path / "link"): "Too many levels of symbolic links",
             loose: "mode 644", str(junk): "no key", str(tmp_path) + "/\0x": "null",
             "/\ud800": "surrogate"}
    if os.geteuid() == 0:  # a file of another user can be made here
        other = psk_file(tmp_path, name="other")
        os.chown(other, 65534, 65534)
        files[other] = "owner 65534"
    return files


def test_no_unusable_file_is_read_nor_told_apart(daemon, tmp_path, caplog):
    """Each is refused alike (a request learns nothing of the host's files), at once (a
    FIFO would block the loop), and the log says why."""
    def blocked(*_):
        raise TimeoutError("a key file's read blocked the daemon")

    signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)  # a read that blocks fails the test instead of hanging it
    try:
        peer = WirePeer(daemon.wireguard.local_public)
        errors = set()
        for path, why in unusable_files(tmp_path).items():
            caplog.clear()
            reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=path))
            assert not reply["ok"] and "wgp" not in daemon.registry.by_name, path
            errors.add(reply["error"].replace(repr(path), "PATH"))
            assert why in caplog.text, (path, caplog.text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert len(errors) == 1 and "no key file this daemon can use" in errors.pop()


def test_an_inline_key_from_the_network_is_refused_and_from_this_host_taken(daemon, tmp_path):
    peer = WirePeer(daemon.wireguard.local_public)
    entry = peer.entry("wgp", "10.0.1.1", presharedKey=ups.key_to_base64(PSK))
    request = json.dumps({"op": "add", "tunnel": [entry]}).encode()
    reply = answer(daemon, request, ("198.18.0.9", 40000))[0]
    assert not reply["ok"] and "came over the network in clear" in reply["error"]
    assert "wgp" not in daemon.registry.by_name
    reply = answer(daemon, request, ("::1", 40000))[0]
    assert reply["ok"] and daemon.registry.by_name["wgp"].wg_peer.preshared_key == PSK


def test_both_forms_at_once_are_refused(daemon, tmp_path):
    peer = WirePeer(daemon.wireguard.local_public)
    reply = add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=psk_file(tmp_path),
                                   presharedKey=ups.key_to_base64(PSK)))
    assert "not both" in reply["error"]


def test_a_reload_reads_the_file_again_so_a_new_key_takes_effect(daemon, tmp_path):
    path = psk_file(tmp_path)
    peer = WirePeer(daemon.wireguard.local_public)
    assert add(daemon, peer.entry("wgp", "10.0.1.1", presharedKeyFile=path))["ok"]
    psk_file(tmp_path, key=bytes(32))
    daemon.keeper.reload()
    assert daemon.registry.by_name["wgp"].wg_peer.preshared_key == bytes(32)


def test_the_control_script_sends_the_path_and_never_reads_the_key(tmp_path):
    path = psk_file(tmp_path)
    args = ctl.parse_args(["h", "-n", "wg2", "-t", "10.0.1.1", "-r", "198.18.0.2",
                           "--peer-key", ups.key_to_base64(bytes(32)), "--psk-file", path])
    tunnel, = ctl.build_message(args)["tunnel"]
    assert tunnel["presharedKeyFile"] == path and "presharedKey" not in tunnel
    os.unlink(path)  # not on this host at all: the daemon's host reads it, not this one
    tunnel, = ctl.build_message(ctl.parse_args(["h", "-n", "wg2", "-t", "10.0.1.1", "-r",
                                                "198.18.0.2", "--peer-key",
                                                ups.key_to_base64(bytes(32)),
                                                "--psk-file", path]))["tunnel"]
    assert tunnel["presharedKeyFile"] == path


def test_the_control_script_wants_an_absolute_path(capsys):
    with pytest.raises(SystemExit):
        ctl.parse_args(["h", "-n", "wg2", "-t", "10.0.1.1", "-r", "198.18.0.2",
                        "--peer-key", ups.key_to_base64(bytes(32)), "--psk-file", "psk"])
    assert "absolute path on the daemon's host" in capsys.readouterr().err
