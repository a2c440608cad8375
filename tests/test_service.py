"""The daemon as a service: systemd readiness, the journal, packaging, --version."""

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import udpProxyServer as ups
from lab import HELPERS, REPO, Systemd


def test_the_daemon_tells_systemd_it_is_ready_reloading_and_stopping(lab):
    a = lab.host("a", 1)
    path = os.path.join(lab.workdir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(20)
        a.start_daemon("--state-file", os.path.join(lab.workdir, "state.json"),
                       env={"NOTIFY_SOCKET": path})
        assert systemd.recv(4096) == b"READY=1\nSTATUS=0 tunnels"
        a.daemon.send_signal(signal.SIGHUP)
        assert [systemd.recv(4096) for _ in range(2)] == [b"RELOADING=1", b"READY=1"]
        assert a.stop_daemon() == 0
        assert systemd.recv(4096) == b"STOPPING=1"


def test_a_hung_loop_stops_the_watchdog_pings_and_the_restart_keeps_the_tunnels(lab):
    """The daemon as systemd runs it with WatchdogSec= (here 2 s): WATCHDOG=1 comes from
    the loop; a loop made to hang (tests/hang.py) stops it, and systemd, as it would,
    aborts the daemon and starts it again, its tunnels and devices there all along."""
    a, b = lab.host("a", 1), lab.host("b", 2)
    systemd = Systemd(lab)
    state = os.path.join(lab.workdir, "state.json")
    argv = [sys.executable, os.path.join(HELPERS, "hang.py"), lab.script("udpProxyServer.py"),
            "--state-file", state]
    daemon = lab.spawn(a.ns, argv, "a-daemon-hanging.log", env=systemd.env(watchdog_sec=2))
    systemd.wait_for("READY=1")
    b.start_daemon()
    a.add_tunnel("udp2", "10.0.1.1", b)
    b.add_tunnel("udp1", "10.0.1.2", a)
    for _ in range(3):
        systemd.wait_for("WATCHDOG=1", within=2)
    daemon.send_signal(signal.SIGUSR1)  # the loop hangs
    with pytest.raises(AssertionError, match="did not say WATCHDOG=1 within 3"):
        while True:  # a ping may have been on its way
            systemd.wait_for("WATCHDOG=1", within=3)
    assert daemon.poll() is None  # alive, and stuck
    daemon.send_signal(signal.SIGABRT)  # WatchdogSec passed: what systemd does
    daemon.wait(20)
    assert a.link_exists("udp2")  # kept, dropping what is routed into it
    lab.spawn(a.ns, argv, "a-daemon-again.log", env=systemd.env(watchdog_sec=2))
    systemd.wait_for("READY=1")
    systemd.wait_for("WATCHDOG=1", within=2)
    assert set(a.tunnels()) == {"udp2"} and a.ping("10.0.1.2")


def test_under_systemd_log_lines_carry_their_priority_for_the_journal():
    formatter = ups.JournalFormatter("%(message)s")
    record = logging.LogRecord("udpProxyServer", logging.WARNING, __file__, 1, "open port", (), None)
    assert formatter.format(record) == "<4>open port"


@pytest.mark.parametrize("script", ["udpProxyServer.py", "udpProxyServerControl.py"])
def test_version(script):
    result = subprocess.run([sys.executable, os.path.join(REPO, script), "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout == "%s %s\n" % (script, ups.__version__)


def readme_install_commands():
    """The README's install lines, as a root shell runs them."""
    with open(os.path.join(REPO, "README.md")) as f:
        block = f.read().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    return [line.strip()[len("sudo "):] for line in block.splitlines()
            if line.startswith("    sudo ")]


def test_the_readme_install_puts_every_command_and_man_page_in_reach(tmp_path):
    """The README's install, into a venv and a /usr/local of the test's own: the two
    commands and the two scripts under their 2015 names run from the PATH, and man finds
    both pages; pip shows the requirements and the license."""
    commands = readme_install_commands()
    venv, local = commands[1].split()[-1], "/usr/local"
    assert commands[0].startswith("apt install") and commands[2] == "%s/bin/pip install ." % venv
    build = tmp_path / "build"  # a copy, so the checkout gets no build files
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", ".hypothesis", ".pytest_cache", "bench"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    (tmp_path / "local" / "bin").mkdir(parents=True)
    for command in commands[2:]:
        command = command.replace(venv, str(tmp_path / "venv")).replace(local, str(tmp_path / "local"))
        if "pip install" in command:
            command += " --quiet --no-deps"
        subprocess.run(command, shell=True, cwd=build, check=True, capture_output=True)
    path = str(tmp_path / "local" / "bin")
    for command in ("udpProxyServer", "udpProxyServerControl", "udpProxyServer.py",
                    "udpProxyServerControl.py"):
        found = shutil.which(command, path=path)
        assert found, command
        result = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
        assert result.stdout.endswith(" %s\n" % ups.__version__)
    for page in ("udpProxyServer", "udpProxyServerControl"):
        shown = subprocess.run(["man", "-M", str(tmp_path / "local" / "share" / "man"), "-P",
                                "cat", page], capture_output=True, text=True, check=True,
                               env=dict(os.environ, MANWIDTH="80"))
        assert "%s(8)" % page.upper() in shown.stdout and "--secret-file" in shown.stdout
    shown = subprocess.run([str(tmp_path / "venv" / "bin" / "pip"), "show", "udpProxyServer"],
                           capture_output=True, text=True, check=True).stdout
    assert "Requires: cryptography, pyroute2, python-pytun" in shown
    assert "License: MIT" in shown


def test_the_systemd_unit_runs_the_installed_command_as_a_notify_service():
    with open(os.path.join(REPO, "udpProxyServer.service")) as f:
        unit = f.read()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # A loop stuck this long is restarted (the daemon pings at half of it).
    assert re.search(r"^WatchdogSec=\d+$", unit, re.M) and "Restart=on-failure" in unit
    # The venv the README installs into, as Debian 12 allows it.
    with open(os.path.join(REPO, "README.md")) as f:
        venv = re.search(r"sudo python3 -m venv (\S+)", f.read()).group(1)
    assert "ExecStart=%s/bin/udpProxyServer --secret-file" % venv in unit
