"""The files the daemon writes hold secrets (preshared keys, its private key): each is mode
600 on every path that writes one, whatever umask and whatever file was there before."""

import json
import os
import stat

import pytest

import udpProxyServer as ups


@pytest.fixture
def open_umask():
    """The loosest umask a service could run under."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


ENTRY = {"name": "wg2", "tunnelIP": "10.0.1.1", "remoteServer": "198.18.0.2",
         "publicKey": ups.key_to_base64(bytes(range(32))),
         "presharedKey": ups.key_to_base64(bytes(range(32, 64)))}


def test_a_state_file_is_written_600_over_a_leftover_temporary_file(tmp_path, open_umask):
    path = tmp_path / "tunnels.json"
    leftover = tmp_path / "tunnels.json.tmp"
    leftover.write_text("half-written by a crash")
    os.chmod(leftover, 0o644)
    ups.StateFile(str(path)).save([ENTRY])
    assert mode(path) == 0o600
    assert json.loads(path.read_text())["tunnels"] == [ENTRY]


def test_a_state_file_that_was_readable_by_others_is_600_once_saved(tmp_path, open_umask):
    path = tmp_path / "tunnels.json"
    path.write_text('{"version": 1, "tunnels": []}')
    os.chmod(path, 0o644)
    ups.StateFile(str(path)).save([ENTRY])
    assert mode(path) == 0o600


def test_a_state_file_others_could_read_is_made_600_when_read(tmp_path):
    path = tmp_path / "tunnels.json"
    path.write_text(json.dumps({"version": 1, "tunnels": [ENTRY]}))
    os.chmod(path, 0o644)
    assert ups.StateFile(str(path)).load() == [ENTRY]
    assert mode(path) == 0o600


def test_a_corrupt_state_file_is_kept_aside_600(tmp_path, open_umask):
    path = tmp_path / "tunnels.json"
    path.write_text('{"tunnels": [%s' % json.dumps(ENTRY))
    os.chmod(path, 0o600)
    with pytest.raises(ups.StateUnreadable, match="kept as"):
        ups.StateFile(str(path)).load()
    kept, = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert mode(kept) == 0o600 and kept.read_text() == path.read_text()


def test_a_generated_key_file_is_600(tmp_path, open_umask):
    path = tmp_path / "private.key"
    key = ups.read_key_file(str(path), generate=True)
    assert mode(path) == 0o600 and ups.key_from_base64(path.read_text()) == key


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symbolic", "hard"])
def test_a_temporary_file_linked_elsewhere_is_not_written_through(tmp_path, link):
    target = tmp_path / "elsewhere"
    target.write_text("not ours to write")
    link(target, tmp_path / "tunnels.json.tmp")
    ups.StateFile(str(tmp_path / "tunnels.json")).save([ENTRY])
    assert target.read_text() == "not ours to write"
    assert json.loads((tmp_path / "tunnels.json").read_text())["tunnels"] == [ENTRY]
