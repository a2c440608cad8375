"""This host's WireGuard identity: the key file, as wg genkey and wg pubkey see it."""

import json
import os
import shutil
import sys

from conftest import cannot_run


def daemon_argv(lab, *args):
    return (sys.executable, "-I", lab.script("udpProxyServer.py"), *args)


def test_the_public_key_is_wgs_and_the_daemon_says_it(lab):
    if shutil.which("wg") is None:
        cannot_run("needs wg (make test installs wireguard-tools)")
    a = lab.host("a", 1)
    key_file = os.path.join(lab.workdir, "private.key")
    made = a.run(*daemon_argv(lab, "--public-key", "--key-file", key_file, "--generate-key"))
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    with open(key_file) as f:
        theirs = a.run("wg", "pubkey", input=f.read()).stdout.strip()
    assert made.stdout.strip() == theirs  # the same key made, read and derived as wg does
    assert a.run(*daemon_argv(lab, "--public-key", "--key-file", key_file)).stdout.strip() == theirs

    a.start_daemon("--key-file", key_file)
    with open(a.daemon.log_path) as log:
        assert "public key: %s" % theirs in log.read()
    listed = json.loads(a.control("127.0.0.1", "-o", "list", "--json").stdout)
    assert listed["publicKey"] == theirs


def test_a_key_file_others_can_read_stops_the_daemon_with_one_line(lab):
    a = lab.host("a", 1)
    key_file = os.path.join(lab.workdir, "private.key")
    a.run(*daemon_argv(lab, "--public-key", "--key-file", key_file, "--generate-key"))
    os.chmod(key_file, 0o644)
    result = a.run(*daemon_argv(lab, "--key-file", key_file), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "udpProxyServer: key file %s is readable by group or others (mode 644): chmod 600 it"
        % key_file]
