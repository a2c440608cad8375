import os
import shutil

import pytest

import lab as lablib
from fakes import fake_offload_server

# CI sets it: there the integration tests must run, and one that cannot fails instead of
# skipping, so a run that tested nothing real cannot pass.
REQUIRE_INTEGRATION = os.environ.get("UPS_REQUIRE_INTEGRATION") == "1"


def cannot_run(reason):
    (pytest.fail if REQUIRE_INTEGRATION else pytest.skip)(reason)


def pytest_collection_modifyitems(items):
    """A test that builds test hosts (the lab fixture, itself or through another) is an
    integration test: pytest -m "not integration" is the fast loop, without root."""
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def lab():
    """A fresh lab of network namespaces, torn down even when the test fails."""
    if not lablib.is_root():
        cannot_run("needs root: creates network namespaces and TUN devices")
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            cannot_run("needs %r (make test installs it)" % tool)
    with lablib.Lab() as fresh:
        yield fresh


@pytest.fixture
def pair(lab):
    """Two hosts, each with a daemon, joined by one tunnel: a (10.0.1.1, udp2) <-> b (10.0.1.2, udp1)."""
    return lablib.tunnel_pair(lab)


FIGURES = []


@pytest.fixture
def figures(request):
    """Record a line of figures a fault test measured; the run prints them at its end."""
    return lambda line: FIGURES.append("%s: %s" % (request.node.name, line))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures the fault tests measured")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def offload_server():
    """A daemon with fake devices speaking virtio headers (fakes.fake_offload_server)."""
    with fake_offload_server() as made:
        yield made
