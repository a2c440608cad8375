"""The WireGuard protocol core without root: the handshake between two of our own state
machines, a pinned transcript, refusals, the cookie machinery, XChaCha20-Poly1305 against
the draft's vectors, and transport messages. test_wireguard_interop.py holds the same
functions against wireguard-go."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import udpProxyServer as ups
from conftest import cannot_run
from udpProxyServer import WireGuardRefused


def fixed_key(seed):
    """A private key as wg genkey makes one, from fixed bytes instead of random ones."""
    return ups.generate_private_key(lambda n: bytes([seed]) * n)


INITIATOR, RESPONDER = fixed_key(0x11), fixed_key(0x22)
INITIATOR_EPHEMERAL, RESPONDER_EPHEMERAL = fixed_key(0x33), fixed_key(0x44)
INITIATOR_PUBLIC, RESPONDER_PUBLIC = ups.public_key(INITIATOR), ups.public_key(RESPONDER)
PSK = bytes([0x55]) * 32
TIMESTAMP = ups.tai64n(1_700_000_000_123_456_789)
INITIATOR_INDEX, RESPONDER_INDEX = 0x01020304, 0x0A0B0C0D

# The transcript of the handshake above, pinned: any change to the derivation changes these
# bytes (test_wireguard_interop.py holds the derivation against wireguard-go's).
PINNED_INITIATION = bytes.fromhex(
    "01000000040302017b0d47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b1481e498"
    "317da959fba46669572516a5e6c021bfa620bb6c56ca0082e1feae14988c2c64d024c617734a263f76a008"
    "df04d0f94bad8ee75ec8e6c2695569183cc7dc1e27ce0c1b8436de667e27" + "00" * 32)
PINNED_RESPONSE = bytes.fromhex(
    "020000000d0c0b0a04030201ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e"
    "6bf3c8d3f436c557547df21dab91e91043" + "00" * 32)
PINNED_INITIATOR_SEND = "a007faf842d83f5bd3be20a14e0ffcec34c84867b78b051980602713205922de"
PINNED_INITIATOR_RECEIVE = "d982d5cd10d34a7802b6c19fa441cd9164d70e4f4d62007ab416879ee8bd1b99"


def initiation():
    return ups.create_initiation(INITIATOR, RESPONDER_PUBLIC, INITIATOR_INDEX, TIMESTAMP,
                                 INITIATOR_EPHEMERAL)


def handshake(initiator_psk=PSK, responder_psk=PSK):
    """The whole fixed handshake: both sides' transport keys and the two messages."""
    sent, first = initiation()
    received = ups.consume_initiation(RESPONDER, first)
    responder_keys, second = ups.create_response(received, RESPONDER_INDEX, responder_psk,
                                                 RESPONDER_EPHEMERAL)
    initiator_keys = ups.consume_response(sent, second, initiator_psk)
    return initiator_keys, responder_keys, first, second


def flipped(message, bit):
    changed = bytearray(message)
    changed[bit // 8] ^= 1 << bit % 8
    return bytes(changed)


def bits(start, end):
    return range(start * 8, end * 8)


# --- Keys and the handshake ---------------------------------------------------------------


@pytest.mark.parametrize("psk", [PSK, None])
def test_a_handshake_gives_both_sides_the_same_keys_crossed(psk):
    initiator, responder, _, _ = handshake(psk, psk)
    assert initiator.send_key == responder.receive_key
    assert initiator.receive_key == responder.send_key
    assert initiator.send_key != initiator.receive_key
    assert (initiator.local_index, initiator.remote_index) == (INITIATOR_INDEX, RESPONDER_INDEX)
    assert (responder.local_index, responder.remote_index) == (RESPONDER_INDEX, INITIATOR_INDEX)
    assert initiator.is_initiator and not responder.is_initiator


def test_the_transcript_of_fixed_inputs_is_pinned():
    initiator, _, first, second = handshake()
    assert first == PINNED_INITIATION
    assert second == PINNED_RESPONSE
    assert (initiator.send_key.hex(), initiator.receive_key.hex()) == \
        (PINNED_INITIATOR_SEND, PINNED_INITIATOR_RECEIVE)


def test_the_responder_learns_who_initiated_and_when():
    _, first = initiation()
    received = ups.consume_initiation(RESPONDER, first, RESPONDER_PUBLIC)
    assert received.remote_public == INITIATOR_PUBLIC
    assert received.timestamp == TIMESTAMP
    assert received.remote_index == INITIATOR_INDEX


def test_no_key_shows_in_the_states_repr():
    sent, first = initiation()
    received = ups.consume_initiation(RESPONDER, first)
    keys, _ = ups.create_response(received, RESPONDER_INDEX, PSK)
    for state in (sent, received, keys):
        text = repr(state)
        for secret in ("local_private", "ephemeral_private", "chaining_key", "hash",
                       "send_key", "receive_key"):
            if hasattr(state, secret):
                assert repr(getattr(state, secret)) not in text


def test_a_changed_bit_in_the_sealed_part_of_an_initiation_is_refused():
    """Even with a mac1 made right again (anyone who knows our public key can make one):
    the ephemeral key, the static key and the timestamp are all bound by the AEADs."""
    _, first = initiation()
    for bit in bits(8, 116):
        with pytest.raises(WireGuardRefused):
            ups.consume_initiation(RESPONDER, flipped(first, bit))


def test_a_changed_bit_in_the_sealed_part_of_a_response_is_refused():
    """The ephemeral key, the empty AEAD and the receiver index; the sender index is not
    bound by the Noise transcript (wireguard-go takes it too): mac1 covers it."""
    sent, first = initiation()
    received = ups.consume_initiation(RESPONDER, first)
    _, second = ups.create_response(received, RESPONDER_INDEX, PSK, RESPONDER_EPHEMERAL)
    for bit in [*bits(0, 4), *bits(8, 60)]:
        with pytest.raises(WireGuardRefused):
            ups.consume_response(sent, flipped(second, bit), PSK)


@pytest.mark.parametrize("initiator_psk, responder_psk", [
    (PSK, None), (None, PSK), (PSK, bytes(31) + b"\x01")])
def test_a_preshared_key_that_differs_is_refused(initiator_psk, responder_psk):
    with pytest.raises(WireGuardRefused, match="the response does not authenticate"):
        handshake(initiator_psk, responder_psk)


def test_an_initiation_to_another_key_is_refused():
    _, first = initiation()
    with pytest.raises(WireGuardRefused, match="static key does not authenticate"):
        ups.consume_initiation(fixed_key(0x66), first)


def test_a_message_of_another_type_or_size_is_refused():
    sent, first = initiation()
    for message in (first[:-1], first + b"\0", b"\x02" + first[1:], b""):
        with pytest.raises(WireGuardRefused, match="not a handshake message"):
            ups.consume_initiation(RESPONDER, message)
    with pytest.raises(WireGuardRefused, match="not a handshake message"):
        ups.consume_response(sent, first, PSK)


def test_a_public_key_of_small_order_is_refused():
    _, first = initiation()
    with pytest.raises(WireGuardRefused, match="small order"):
        ups.consume_initiation(RESPONDER, first[:8] + bytes(32) + first[40:])
    with pytest.raises(WireGuardRefused, match="small order"):
        ups.create_initiation(INITIATOR, bytes(32), 1, TIMESTAMP)


def test_tai64n_labels_1970_and_orders_as_bytes_as_times_do():
    assert ups.tai64n(0).hex() == "400000000000000a00000000"
    times = [0, 1, 2 ** 24 - 1, 2 ** 24, 999_999_999, 10 ** 9, 10 ** 9 + 2 ** 24,
             1_700_000_000 * 10 ** 9, 1_700_000_000 * 10 ** 9 + 5 * 10 ** 8, 2 ** 62]
    stamps = [ups.tai64n(t) for t in times]
    assert all(a <= b for a, b in zip(stamps, stamps[1:]))
    assert sorted(stamps) == stamps


def test_tai64n_rounds_nanoseconds_down_so_initiations_within_17_ms_are_not_newer():
    """A replayed or flooded initiation is one whose timestamp is not newer than the last."""
    start = 1_700_000_000 * 10 ** 9
    assert ups.tai64n(start + 2 ** 24 - 1) == ups.tai64n(start)
    assert ups.tai64n(start + 2 ** 24) > ups.tai64n(start)
    assert ups.tai64n(start + 10 ** 9 - 1) < ups.tai64n(start + 10 ** 9)


def test_keys_go_to_and_from_base64_as_wg_writes_them():
    text = ups.key_to_base64(INITIATOR)
    assert len(text) == 44
    assert ups.key_from_base64(text + "\n") == INITIATOR
    for bad in (text[:-4], text + "AAAA", "not base64 at all!" + text[18:], ""):
        with pytest.raises(ValueError) as refused:
            ups.key_from_base64(bad)
        assert text not in str(refused.value)


def test_a_generated_private_key_is_clamped_as_wg_genkey_clamps():
    key = ups.generate_private_key(lambda n: b"\xff" * n)
    assert key[0] == 0xF8 and key[31] == 0x7F
    key = ups.generate_private_key(lambda n: bytes(n))
    assert key[0] == 0 and key[31] == 0x40


def test_public_keys_agree_with_wg_pubkey():
    if shutil.which("wg") is None:
        cannot_run("needs 'wg' (make test installs it)")
    for private in (INITIATOR, ups.generate_private_key()):
        out = subprocess.run(["wg", "pubkey"], input=ups.key_to_base64(private),
                             capture_output=True, text=True, check=True).stdout
        assert ups.key_from_base64(out) == ups.public_key(private)


def test_hmac_is_rfc_2104_over_blake2s_with_64_byte_blocks():
    for key in (b"", b"k" * 32, b"k" * 64, b"k" * 65):
        padded = (hashlib.blake2s(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        inner = hashlib.blake2s(bytes(b ^ 0x36 for b in padded) + b"data").digest()
        outer = hashlib.blake2s(bytes(b ^ 0x5C for b in padded) + inner).digest()
        assert ups.HMAC(key, b"data") == outer


def test_kdf_outputs_chain_as_hkdf_does():
    first, second, third = ups.KDF3(b"c" * 32, b"input")
    secret = ups.HMAC(b"c" * 32, b"input")
    assert first == ups.HMAC(secret, b"\x01") == ups.KDF1(b"c" * 32, b"input")
    assert second == ups.HMAC(secret, first + b"\x02")
    assert third == ups.HMAC(secret, second + b"\x03")
    assert ups.KDF2(b"c" * 32, b"input") == (first, second)


def test_without_cryptography_plain_tunnels_load_and_encrypted_ones_say_what_is_missing():
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "import udpProxyServer as ups\n"
            "ups.parse_request({'op': 'list'})\n"
            "try: ups.create_initiation(bytes(32), bytes(32), 1, bytes(12))\n"
            "except ups.CryptographyMissing as e: print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(ups.__file__))).stdout
    assert out == "encrypted tunnels: the cryptography package is needed (pip install cryptography)\n"


# --- ControlCookies under load -------------------------------------------------------------------

# draft-irtf-cfrg-xchacha-03, section 2.2.1: HChaCha20.
HCHACHA_KEY = bytes(range(32))
HCHACHA_NONCE = bytes.fromhex("000000090000004a0000000031415927")
HCHACHA_SUBKEY = bytes.fromhex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
# The same draft, appendix A.3.1: AEAD_XChaCha20_Poly1305.
XCHACHA_KEY = bytes(range(0x80, 0xA0))
XCHACHA_NONCE = bytes(range(0x40, 0x58))
XCHACHA_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
XCHACHA_PLAINTEXT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one"
                     b" tip for the future, sunscreen would be it.")
XCHACHA_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49")  # the tag
# mac1 of the pinned initiation, and mac1 and mac2 (under the cookie 0x66...) of the response.
PINNED_INITIATION_MAC1 = "93bcc82f5db3b8466ea6d8fb567bf96b"
PINNED_RESPONSE_MACS = "a0c1e8d7649bfee7d31931b4c794c309e623a359653c09d92ed67b23495507a1"
SOURCE, OTHER_SOURCE = ("198.18.0.1", 51820), ("198.18.0.3", 51820)


def counting_random(n):
    """Random bytes that differ from call to call, the same from run to run."""
    counting_random.calls += 1
    return bytes([counting_random.calls % 256]) * n


counting_random.calls = 0


def test_hchacha20_matches_the_drafts_vector():
    assert ups.hchacha20(HCHACHA_KEY, HCHACHA_NONCE) == HCHACHA_SUBKEY


def test_xchacha20_poly1305_matches_the_drafts_vector():
    assert ups.XAEAD(XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_PLAINTEXT, XCHACHA_AAD) == XCHACHA_SEALED
    assert ups.XAEAD_OPEN(XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_SEALED, XCHACHA_AAD,
                          "the vector") == XCHACHA_PLAINTEXT


def test_xchacha20_poly1305_refuses_any_change():
    for key, nonce, sealed, aad in (
            (XCHACHA_KEY, XCHACHA_NONCE, flipped(XCHACHA_SEALED, 0), XCHACHA_AAD),
            (XCHACHA_KEY, XCHACHA_NONCE, flipped(XCHACHA_SEALED, len(XCHACHA_SEALED) * 8 - 1),
             XCHACHA_AAD),
            (XCHACHA_KEY, flipped(XCHACHA_NONCE, 0), XCHACHA_SEALED, XCHACHA_AAD),
            (XCHACHA_KEY, flipped(XCHACHA_NONCE, 190), XCHACHA_SEALED, XCHACHA_AAD),
            (flipped(XCHACHA_KEY, 0), XCHACHA_NONCE, XCHACHA_SEALED, XCHACHA_AAD),
            (XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_SEALED, flipped(XCHACHA_AAD, 0))):
        with pytest.raises(WireGuardRefused):
            ups.XAEAD_OPEN(key, nonce, sealed, aad, "the vector")


def test_macs_of_the_pinned_messages_are_pinned():
    assert ups.add_macs(PINNED_INITIATION, RESPONDER_PUBLIC)[-32:].hex() == \
        PINNED_INITIATION_MAC1 + "00" * 16
    assert ups.add_macs(PINNED_RESPONSE, INITIATOR_PUBLIC, b"\x66" * 16)[-32:].hex() == \
        PINNED_RESPONSE_MACS


def test_mac1_made_for_another_key_or_missing_is_refused():
    _, first = initiation()
    checker = ups.CookieChecker(RESPONDER_PUBLIC)
    assert checker.check_mac1(ups.add_macs(first, RESPONDER_PUBLIC))
    assert not checker.check_mac1(first)
    assert not checker.check_mac1(ups.add_macs(first, INITIATOR_PUBLIC))


def responder_takes(message, checker, under_load, take):
    """The receiving side's order, as wireguard-go's: mac1, then under load mac2, then the
    handshake itself; False when any of them refuses."""
    if not checker.check_mac1(message):
        return False
    if under_load and not checker.check_mac2(message, *SOURCE, now=0):
        return False
    try:
        take(message)
    except WireGuardRefused:
        return False
    return True


def test_a_bit_changed_anywhere_in_an_initiation_is_refused():
    """With a cookie, so its mac2 is checked (under load) like the rest."""
    checker = ups.CookieChecker(RESPONDER_PUBLIC, counting_random)
    cookies = ups.CookieGenerator(RESPONDER_PUBLIC)
    _, first = initiation()
    without_cookie = cookies.add_macs(first, now=0)
    cookies.consume_reply(checker.create_reply(without_cookie, *SOURCE, now=0), now=0)
    message = cookies.add_macs(first, now=0)
    take = lambda m: ups.consume_initiation(RESPONDER, m)  # noqa: E731
    assert responder_takes(message, checker, True, take)
    for bit in bits(0, len(message)):
        assert not responder_takes(flipped(message, bit), checker, True, take), bit


def test_a_bit_changed_anywhere_in_a_response_is_refused():
    checker = ups.CookieChecker(INITIATOR_PUBLIC, counting_random)
    sent, first = initiation()
    received = ups.consume_initiation(RESPONDER, first)
    _, second = ups.create_response(received, RESPONDER_INDEX, PSK, RESPONDER_EPHEMERAL)
    message = ups.add_macs(second, INITIATOR_PUBLIC, checker.cookie(*SOURCE, now=0))
    take = lambda m: ups.consume_response(sent, m, PSK)  # noqa: E731
    assert responder_takes(message, checker, True, take)
    for bit in bits(0, len(message)):
        assert not responder_takes(flipped(message, bit), checker, True, take), bit


def test_under_load_a_cookie_reply_gives_the_initiator_a_cookie_for_its_address_only():
    checker = ups.CookieChecker(RESPONDER_PUBLIC, counting_random)
    cookies = ups.CookieGenerator(RESPONDER_PUBLIC)
    _, first = initiation()
    message = cookies.add_macs(first, now=1000)
    assert message[-16:] == bytes(16)  # no cookie yet: no mac2
    assert checker.check_mac1(message) and not checker.check_mac2(message, *SOURCE, now=1000)
    reply = checker.create_reply(message, *SOURCE, now=1000)
    assert len(reply) == ups.COOKIE_REPLY_SIZE and reply[4:8] == first[4:8]  # to its sender
    cookies.consume_reply(reply, now=1001)
    again = cookies.add_macs(first, now=1002)
    assert checker.check_mac1(again)
    assert checker.check_mac2(again, *SOURCE, now=1002)
    assert not checker.check_mac2(again, SOURCE[0], SOURCE[1] + 1, now=1002)
    assert not checker.check_mac2(again, *OTHER_SOURCE, now=1002)


def test_cookies_last_two_minutes_on_both_sides():
    checker = ups.CookieChecker(RESPONDER_PUBLIC, counting_random)
    cookies = ups.CookieGenerator(RESPONDER_PUBLIC)
    _, first = initiation()
    cookies.consume_reply(checker.create_reply(cookies.add_macs(first, now=0), *SOURCE, now=0),
                          now=0)
    assert checker.check_mac2(cookies.add_macs(first, now=119), *SOURCE, now=119)
    # The responder's secret is new after two minutes: the old cookie no longer does.
    assert not checker.check_mac2(cookies.add_macs(first, now=119), *SOURCE, now=120)
    # And the initiator stops sending a cookie two minutes old.
    assert cookies.add_macs(first, now=120)[-16:] == bytes(16)


def test_a_cookie_reply_to_anything_but_our_last_message_is_refused():
    checker = ups.CookieChecker(RESPONDER_PUBLIC, counting_random)
    cookies = ups.CookieGenerator(RESPONDER_PUBLIC)
    _, first = initiation()
    with pytest.raises(WireGuardRefused, match="no message of ours"):
        cookies.consume_reply(checker.create_reply(ups.add_macs(first, RESPONDER_PUBLIC),
                                                   *SOURCE, now=0), now=0)
    older = cookies.add_macs(first, now=0)
    _, newer = ups.create_initiation(INITIATOR, RESPONDER_PUBLIC, 9, TIMESTAMP)
    cookies.add_macs(newer, now=0)
    with pytest.raises(WireGuardRefused, match="cookie reply does not authenticate"):
        cookies.consume_reply(checker.create_reply(older, *SOURCE, now=0), now=0)
    reply = checker.create_reply(cookies.add_macs(newer, now=0), *SOURCE, now=0)
    for bit in bits(8, len(reply)):
        with pytest.raises(WireGuardRefused):
            cookies.consume_reply(flipped(reply, bit), now=0)
    other = ups.CookieChecker(INITIATOR_PUBLIC, counting_random)  # another responder's key
    with pytest.raises(WireGuardRefused):
        cookies.consume_reply(other.create_reply(cookies.add_macs(newer, now=0), *SOURCE, now=0),
                              now=0)
    assert cookies.cookie is None


def test_a_cookie_is_a_mac_of_the_address_and_port():
    secret = b"s" * 32
    assert ups.make_cookie(secret, "198.18.0.1", 51820) == \
        ups.MAC(secret, bytes([198, 18, 0, 1]) + (51820).to_bytes(2, "big"))
    assert len({ups.make_cookie(secret, *source) for source in (
        ("198.18.0.1", 1), ("198.18.0.1", 2), ("198.18.0.2", 1), ("::ffff:198.18.0.1", 1))}) == 4


# --- Transport messages -------------------------------------------------------------------


def transport_pair():
    """The initiator's sealing cipher, the responder's opening one, and the responder's index."""
    initiator, responder, _, _ = handshake()
    return (ups.transport_cipher(initiator.send_key), ups.transport_cipher(responder.receive_key),
            responder.local_index)


@pytest.mark.parametrize("size", [*range(0, 50), 1399, 1400, 1420])
def test_a_packet_crosses_padded_with_zeros_to_a_multiple_of_16(size):
    send, receive, index = transport_pair()
    packet = bytes(range(256)) * 6
    packet = packet[:size]
    message = ups.seal_transport(send, index, 7, packet)
    padded = -(-size // 16) * 16
    assert len(message) == ups.TRANSPORT_HEADER_SIZE + padded + ups.TAG_LEN
    assert ups.message_type(message) == ups.MESSAGE_TRANSPORT
    assert ups.receiver_index(message) == index
    assert ups.open_transport(receive, memoryview(message)) == \
        (7, packet + bytes(padded - size))


def test_padding_stops_at_the_mtu():
    send, receive, index = transport_pair()
    assert len(ups.seal_transport(send, index, 0, bytes(1419), mtu=1420)) == 16 + 1420 + 16
    assert len(ups.seal_transport(send, index, 0, bytes(1420), mtu=1420)) == 16 + 1420 + 16
    assert len(ups.seal_transport(send, index, 0, bytes(1401), mtu=1420)) == 16 + 1408 + 16


def test_a_keepalive_is_the_sealed_empty_packet():
    send, receive, index = transport_pair()
    message = ups.seal_transport(send, index, 3, b"")
    assert len(message) == ups.MIN_TRANSPORT_SIZE == 32
    assert ups.open_transport(receive, message) == (3, b"")


def test_a_changed_transport_message_is_refused():
    """Every bit but the receiver index's, which is not sealed: it picks the keys."""
    send, receive, index = transport_pair()
    message = ups.seal_transport(send, index, 2 ** 40, b"a packet")
    for bit in [*bits(0, 4), *bits(8, len(message))]:
        with pytest.raises(WireGuardRefused):
            ups.open_transport(receive, flipped(message, bit))
    initiator, _, _, _ = handshake()
    with pytest.raises(WireGuardRefused):  # the other direction's key
        ups.open_transport(ups.transport_cipher(initiator.receive_key), message)
    with pytest.raises(WireGuardRefused):
        ups.open_transport(receive, message[:31])


def test_datagrams_are_told_apart_by_type_and_size():
    _, _, first, second = handshake()
    assert [ups.message_type(m) for m in (first, second, bytes([4]) + bytes(31))] == [1, 2, 4]
    for other in (b"", b"\x01\x00\x00", first[:-1], second + b"\0", bytes([4]) + bytes(30),
                  b"\x01\x00\x00\x01" + first[4:], bytes([5]) + bytes(63)):
        assert ups.message_type(other) is None
    assert ups.receiver_index(second) == INITIATOR_INDEX
    reply = ups.CookieChecker(RESPONDER_PUBLIC).create_reply(first, *SOURCE, now=0)
    assert ups.message_type(reply) == ups.MESSAGE_COOKIE_REPLY
    assert ups.receiver_index(reply) == INITIATOR_INDEX
