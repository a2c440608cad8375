"""Start-up errors: one clear line on stderr and a non-zero exit, for real."""

import sys

import pytest

import lab as lablib


@pytest.fixture
def host(lab):
    return lab.host("a", 1)


def start(host, *argv, wrapper=()):
    """Run the daemon's lone copy to its end; it must fail at once."""
    return host.run(*wrapper, sys.executable, "-I", host.lab.script("udpProxyServer.py"), *argv,
                    check=False, timeout=lablib.PATIENCE)


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    return lines[0]


def test_data_port_taken(host):
    host.start_daemon()
    assert one_line(start(host)) == \
        "udpProxyServer: cannot bind data port 5000: Address already in use"


def test_control_port_taken(host):
    host.start_daemon()
    assert one_line(start(host, "-dp", "6000")) == \
        "udpProxyServer: cannot bind control port 5001: Address already in use"


def test_same_port_for_data_and_control(host):
    assert "both 5000" in one_line(start(host, "-cp", "5000"))


def test_not_root(host):
    drop = ("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin")
    assert "must run as root" in one_line(start(host, wrapper=drop))


def test_no_dev_net_tun(host):
    # A private mount namespace where /dev/net is empty.
    hide = ("unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev/net && exec "$@"', "sh")
    assert "cannot open /dev/net/tun: No such file or directory" in one_line(start(host, wrapper=hide))


def test_no_pytun(host):
    result = host.run(sys.executable, "-I", "-S", host.lab.script("udpProxyServer.py"), check=False)
    assert "python-pytun is not installed" in one_line(result)


def test_no_cryptography_for_a_key_file(host):
    # Without site-packages: neither pytun nor cryptography; the key file is read first.
    result = host.run(sys.executable, "-I", "-S", host.lab.script("udpProxyServer.py"),
                      "--key-file", "/nonexistent", check=False)
    assert result.returncode == 1
    assert "--key-file: the cryptography package is needed (pip install cryptography)" \
        in one_line(result)


def test_bad_port_argument(host):
    result = start(host, "-dp", "70000")
    assert result.returncode == 2 and "70000" in result.stderr
