"""Control-port policy and the state file, without root: authentication, cookies, the
reply budget, the amplification rule."""

import json
import os

import pytest
from hypothesis import given, settings, strategies as st

import udpProxyServer as ups
import udpProxyServerControl as ctl
from udpProxyServer import AllowList, Authenticator, ControlError, ReplyBudget, StateFile

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1795000000.0


def sealed(message, secret=SECRET, at=NOW):
    session = ctl.Session(secret, clock=lambda: at)
    return session.seal(message), session


def test_an_authenticated_request_is_opened_and_its_reply_sealed_for_the_sender():
    auth = Authenticator(SECRET, clock=lambda: NOW)
    datagram, session = sealed({"op": "list"})
    request, envelope = auth.open(datagram)
    assert request == {"op": "list"} and envelope == (session.nonce, SECRET)
    reply = json.loads(auth.seal(json.dumps({"ok": True, "op": "list"}), envelope))
    assert session.open(reply) == ({"ok": True, "op": "list"}, True)


@pytest.mark.parametrize("datagram, complaint", [
    (sealed({"op": "list"}, secret=b"another secret, 32 bytes long!!!")[0], "authentication failed"),
    (sealed({"op": "list"}, at=NOW - 31)[0], "stale request: its time is -31 s from ours"),
    (sealed({"op": "list"}, at=NOW + 31)[0], "stale request"),
    (b'{"op": "list"}', "authentication required"),
    (b'{"auth": {"ts": 1, "nonce": "x", "mac": "y"}, "payload": "{}"}', "auth needs ts"),
    (b'{"auth": {}, "payload": 5}', "an envelope holds"),
    (b'{"auth": {}, "payload": "{}", "extra": 1}', "unknown field 'extra' in envelope"),
])
def test_requests_that_are_not_authentic_are_refused(datagram, complaint):
    with pytest.raises(ControlError, match=complaint):
        Authenticator(SECRET, clock=lambda: NOW).open(datagram)


def test_a_replayed_request_is_refused():
    auth = Authenticator(SECRET, clock=lambda: NOW)
    datagram, _ = sealed({"op": "list"})
    auth.open(datagram)
    with pytest.raises(ControlError, match="replayed request"):
        auth.open(datagram)


def test_nonces_are_forgotten_once_their_window_is_past():
    clock = [NOW]
    auth = Authenticator(SECRET, clock=lambda: clock[0])
    for _ in range(5):
        auth.open(sealed({"op": "list"}, at=clock[0])[0])
    clock[0] += 2 * ups.AUTH_WINDOW
    auth.check_fresh(int(clock[0]), "f" * 32)
    assert len(auth.nonces) == 6
    ups.MAX_NONCES, saved = 3, ups.MAX_NONCES
    try:
        auth.check_fresh(int(clock[0]), "e" * 32)
    finally:
        ups.MAX_NONCES = saved
    assert set(auth.nonces) == {"f" * 32, "e" * 32}


def test_without_a_secret_plain_requests_pass_and_envelopes_are_refused():
    auth = Authenticator()
    assert auth.open(b'{"op": "list"}') == ({"op": "list"}, None)
    with pytest.raises(ControlError, match="no secret"):
        auth.open(sealed({"op": "list"})[0])


def test_the_control_script_believes_an_unsigned_reply_only_when_it_reports_failure():
    session = ctl.Session(SECRET)
    session.seal({"op": "list"})
    assert session.open({"ok": False, "error": "authentication failed"}) == \
        ({"ok": False, "error": "authentication failed"}, False)  # believed, as not authentic
    assert session.open({"ok": True, "op": "list", "tunnels": []}) is None
    forged = {"auth": {"nonce": session.nonce, "mac": "0" * 64}, "payload": '{"ok": true}'}
    assert session.open(forged) is None


def test_replies_are_limited_per_source():
    clock = [NOW]
    budget = ReplyBudget(clock=lambda: clock[0])
    granted = sum(budget.take("198.18.0.3") for _ in range(ups.REPLY_BURST + 50))
    assert granted == ups.REPLY_BURST
    assert budget.take("198.18.0.4")  # another source has its own budget
    clock[0] += 1
    assert sum(budget.take("198.18.0.3") for _ in range(ups.REPLY_RATE + 50)) == ups.REPLY_RATE


def test_the_allow_list_admits_its_networks_and_loopback_only():
    allow = AllowList([ups.ipaddress.IPv4Network("198.18.0.0/30")])
    assert allow.admits("198.18.0.2") and allow.admits("127.0.0.1")
    assert not allow.admits("198.18.0.5")
    assert AllowList().admits("198.18.0.5") and not AllowList().trusted("198.18.0.5")


@pytest.mark.parametrize("read", [ups.read_secret, ctl.read_secret])
def test_a_secret_file_others_can_read_is_refused(tmp_path, read):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o644)
    with pytest.raises(Exception, match="readable by group or others \\(mode 644\\): chmod 600"):
        read(str(path))
    path.chmod(0o600)
    assert read(str(path)) in (SECRET, (SECRET,))
    path.write_bytes(b"short")
    with pytest.raises(Exception, match="line 1 holds 5 bytes; a secret needs at least 16"):
        read(str(path))


def test_a_secret_file_holds_one_or_two_secrets_and_the_control_script_signs_with_the_first(
        tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"the next secret, first\n\n" + SECRET + b"\n")
    path.chmod(0o600)
    assert ups.read_secret(str(path)) == (b"the next secret, first", SECRET)
    assert ctl.read_secret(str(path)) == b"the next secret, first"
    for text, error in ((b"\n\n", "holds 0 secrets"), (SECRET + b"\nshort\n", "line 2 holds 5 bytes"),
                        (b"\n".join([SECRET] * 3), "holds 3 secrets; it holds one a line")):
        path.write_bytes(text)
        for read in (ups.read_secret, ctl.read_secret):
            with pytest.raises(Exception, match=error):
                read(str(path))


def test_a_daemon_with_two_secrets_takes_requests_signed_with_either_and_seals_with_the_same():
    old, new = SECRET, b"the next secret of the fleet"
    auth = Authenticator(new, old, clock=lambda: NOW)
    for secret in (old, new):
        session = ctl.Session(secret, clock=lambda: NOW)
        request, envelope = auth.open(session.seal({"op": "list"}))
        assert request == {"op": "list"} and envelope.secret == secret
        reply = json.loads(auth.seal(json.dumps({"ok": True}), envelope))
        assert session.open(reply) == ({"ok": True}, True)
    stranger = ctl.Session(b"a secret of no one here", clock=lambda: NOW)
    with pytest.raises(ControlError, match="authentication failed"):
        auth.open(stranger.seal({"op": "list"}))


ENTRY = {"name": "udp2", "tunnelIP": "10.0.1.1", "netmask": "255.255.255.252", "mtu": 1400,
         "remoteServer": "198.18.0.2"}


def test_the_state_file_keeps_what_was_saved(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    with pytest.raises(ups.StateUnreadable, match="does not exist"):
        state.load()
    state.save([ENTRY])
    assert state.load() == [ENTRY]
    assert not os.path.exists(state.path + ".tmp")


def test_a_corrupt_state_file_is_said_and_kept(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "tunnels": [{"name": "ud')
    with pytest.raises(ups.StateUnreadable, match="is corrupt .* kept as"):
        StateFile(str(path)).load()
    kept, = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert kept.read_text() == path.read_text()


def test_a_state_file_gives_its_entries_as_they_are(tmp_path):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "tunnels": [ENTRY, 42]}))
    assert StateFile(str(path)).load() == [ENTRY, 42]  # the daemon judges each


def test_spec_entry_round_trips():
    spec = ups.TunnelSpec.from_entry(dict(ENTRY, remotePort=6000, mtu="1400"))
    assert ups.TunnelSpec.from_entry(spec.entry()) == spec


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3), max_leaves=8)


@given(st.dictionaries(st.sampled_from(["ts", "nonce", "mac", "x"]), json_values, max_size=4),
       json_values)
@settings(max_examples=300, deadline=None)
def test_any_envelope_is_opened_or_refused_with_control_error(auth, payload):
    datagram = json.dumps({"auth": auth, "payload": payload}).encode()
    for auth in (Authenticator(SECRET, clock=lambda: NOW), Authenticator()):
        with pytest.raises(ControlError):
            auth.open(datagram)


def test_a_cookie_proves_one_address_and_port_for_one_to_two_periods():
    clock = [NOW]
    cookies = ups.ControlCookies(clock=lambda: clock[0])
    manager = ("198.18.0.9", 40000)
    cookie = cookies.make(manager)
    assert len(cookie) == ups.COOKIE_HEX_LEN and cookies.valid(cookie, manager)
    assert not cookies.valid(cookie, ("198.18.0.9", 40001))
    assert not cookies.valid(cookie, ("198.18.0.8", 40000))
    clock[0] += ups.COOKIE_PERIOD  # the next period: still valid, and a new key makes new ones
    assert cookies.valid(cookie, manager) and cookies.make(manager) != cookie
    clock[0] += ups.COOKIE_PERIOD  # two periods on: expired, its key forgotten
    assert not cookies.valid(cookie, manager)
    assert int(NOW // ups.COOKIE_PERIOD) not in cookies.keys


def test_another_daemon_gives_other_cookies():
    manager = ("198.18.0.9", 40000)
    assert ups.ControlCookies(clock=lambda: NOW).make(manager) != ups.ControlCookies(clock=lambda: NOW).make(manager)


error_texts = st.text(max_size=400)


@given(st.booleans(), st.sampled_from([None, "add", "list", "cookie"]), error_texts,
       st.integers(min_value=0, max_value=600), st.booleans())
@settings(max_examples=400, deadline=None)
def test_a_fitted_reply_never_exceeds_its_limit_and_keeps_its_outcome(ok, op, error, limit, cookie):
    reply = {"ok": ok, "error": error, "results": [{"name": "udp%d" % i, "ok": ok}
                                                    for i in range(20)]}
    if op:
        reply["op"] = op
    extra = {"cookie": "ab" * 16} if cookie else {}
    fitted, whole = ups.fit_reply(reply, limit, extra)
    if fitted is None:
        assert len(json.dumps(dict({"ok": ok}, **extra)).encode()) > limit or op
        return
    assert len(fitted) <= limit
    got = json.loads(fitted)
    assert got["ok"] is ok and got.get("op") == op and error.startswith(got.get("error", ""))
    assert whole == ("results" in got) and (not cookie or got["cookie"] == "ab" * 16)


WG_PRIVATE = "cGFzc3dvcmQgaXMgbm90IGEga2V5IGJ1dCBpdCBpcyA="  # 32 bytes in base64


def test_keys_are_32_bytes_of_base64_as_wg_writes_them():
    assert len(ups.parse_key(WG_PRIVATE, "publicKey")) == 32
    for bad in ("", "abc", WG_PRIVATE[:-4], WG_PRIVATE + "AAAA", "!" * 44, 42, None):
        with pytest.raises(ControlError, match="invalid publicKey"):
            ups.parse_key(bad, "publicKey")


def test_a_key_file_is_made_read_and_refused_like_a_secret(tmp_path):
    path = str(tmp_path / "private.key")
    with pytest.raises(ups.StartupError, match="--generate-key makes one"):
        ups.read_key_file(path)
    key = ups.read_key_file(path, generate=True)
    assert os.stat(path).st_mode & 0o777 == 0o600 and ups.read_key_file(path) == key
    assert len(ups.public_key(key)) == 32
    os.chmod(path, 0o640)
    with pytest.raises(ups.StartupError, match="readable by group or others .mode 640.: chmod 600"):
        ups.read_key_file(path)
    with open(os.open(str(tmp_path / "bad.key"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("not a key\n")
    with pytest.raises(ups.StartupError, match="does not hold a base64 Curve25519 private key"):
        ups.read_key_file(str(tmp_path / "bad.key"))


def test_the_state_file_is_readable_by_its_owner_alone(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    state.save([ENTRY])
    assert os.stat(state.path).st_mode & 0o777 == 0o600
