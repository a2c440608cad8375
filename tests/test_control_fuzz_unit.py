"""The control port fuzzed the way a stranger would: every field of an add, a del and a
list set to null, to each wrong type and to edge values, one at a time and all at once;
each request gets a reply, never an internal error, and the daemon logs no traceback."""

import json
import logging
import os
import signal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import udpProxyServer as ups
from fakes import fake_server, internal_errors

PEER_KEY = ups.key_to_base64(ups.public_key(ups.generate_private_key()))
PSK = ups.key_to_base64(bytes(range(32)))
PLAIN = {"name": "fz0", "tunnelIP": "10.0.1.1", "netmask": "255.255.255.252", "mtu": 1400,
         "remoteServer": "198.18.0.2", "remotePort": 5000, "routes": ["192.168.2.0/24"]}
ENCRYPTED = dict(PLAIN, name="fz1", tunnelIP="10.0.2.1", publicKey=PEER_KEY,
                 presharedKey=PSK, persistentKeepalive=25)
EDGES = [None, True, False, 0, -1, 1, 1.5, 2 ** 64, -2 ** 63, float("inf"), float("nan"), "",
         " ", "x" * 5000, "\x00", "é", "..", "a/b", [], {}, [None], [[]], {"a": 1},
         "10.0.1.1/33", "::", "0.0.0.0", "255.255.255.255", "fe80::1", "::ffff:1.2.3.4",
         "10.0.1.0/24", 65535, 65536, "65535", "1e3", "0x10", "AAAA", PEER_KEY + "=",
         "/" * 16, "fz0", "\ud800", "fz\udfff0", ["192.168.2.0/24", 7], ["::/0"], ["0.0.0.0/0"] * 1001]
FIELDS = ups.TUNNEL_FIELDS


@pytest.fixture(autouse=True, scope="module")
def blocked_is_an_error():
    def blocked(*_):
        raise TimeoutError("the daemon blocked on a request")
    signal.signal(signal.SIGALRM, blocked)
    yield
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Edge values for a field that names a file: a FIFO (whose open would block), a
    directory, a device, a link, a path with a lone surrogate."""
    folder = tmp_path_factory.mktemp("edges")
    os.mkfifo(folder / "fifo", 0o600)
    os.symlink("/dev/zero", folder / "link")
    return [str(folder / "fifo"), str(folder), "/dev/zero", str(folder / "link"), "/\ud800",
            "/" + "x" * 5000]


@pytest.fixture(scope="module")
def daemon():
    with fake_server(offloads=True, private_key=ups.generate_private_key()) as (server, _):
        yield server


def ask(server, request, sender="127.0.0.1"):
    """The reply to one request, as the control port makes it from sender (loopback unless
    given); the daemon left as it was (a request that added a tunnel has it deleted again)."""
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    reply = server.control.handle_request(raw, (sender, 40000)).reply
    for name in list(server.registry.by_name):
        server.delete_tunnel({"name": name})
    server.registry.unmade.clear()
    return reply


def check(server, request, caplog, sender="127.0.0.1"):
    caplog.clear()
    reply = ask(server, request, sender)
    assert isinstance(reply, dict) and ("ok" in reply), reply
    assert not internal_errors(reply), (request, reply)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], request


@pytest.mark.parametrize("sender", ["127.0.0.1", "198.18.0.9"], ids=["loopback", "network"])
@pytest.mark.parametrize("base", [PLAIN, ENCRYPTED], ids=["plain", "encrypted"])
@pytest.mark.parametrize("field", FIELDS)
def test_every_tunnel_field_at_every_edge(daemon, paths, base, field, sender, caplog):
    signal.alarm(60)  # a request that blocks the daemon fails the test instead of hanging it
    try:
        for value in EDGES + paths:
            for op in ("add", "del"):
                check(daemon, {"op": op, "tunnel": [dict(base, **{field: value})]}, caplog,
                      sender)
            without = {k: v for k, v in base.items() if k != field}
            check(daemon, {"op": "add", "tunnel": [without]}, caplog, sender)
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("field", ups.REQUEST_FIELDS)
def test_every_request_field_at_every_edge(daemon, field, caplog):
    for value in EDGES:
        for op in ("add", "del", "list"):
            request = {"op": op, "tunnel": [PLAIN]}
            request[field] = value
            check(daemon, request, caplog)


def test_a_plain_tunnel_with_a_null_remote_says_what_is_missing(daemon):
    reply = ask(daemon, {"op": "add", "tunnel": [dict(PLAIN, remoteServer=None)]})
    assert reply["results"][0]["error"] == "missing field 'remoteServer'"
    reply = ask(daemon, {"op": "add", "tunnel": [dict(ENCRYPTED, publicKey=None,
                                                     presharedKey=None,
                                                     persistentKeepalive=None,
                                                     remoteServer=None)]})
    assert reply["results"][0]["error"] == "missing field 'remoteServer'"


# Text of any code point, lone surrogates too: JSON's \ud800 escapes carry them.
TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=20)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["add", "del", "list", "cookie", "x"]),
       fields=st.dictionaries(st.sampled_from(FIELDS), JSON | st.sampled_from(EDGES), max_size=10),
       base=st.sampled_from([PLAIN, ENCRYPTED, {}]))
def test_any_mix_of_fields_and_values_gets_an_answer(daemon, op, fields, base, caplog):
    check(daemon, {"op": op, "tunnel": [dict(base, **fields)]}, caplog)
