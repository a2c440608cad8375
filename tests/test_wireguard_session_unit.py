"""WireGuard sessions without root and without sleeping: the replay window at its edges,
a keypair's counters and limits, and the keypairs' rotation, on an injected clock."""

import random

import pytest
from hypothesis import given, settings, strategies as st

import udpProxyServer as ups
from udpProxyServer import (KEEPALIVE_TIMEOUT, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME,
                            REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME,
                            REKEY_TIMEOUT, REPLAY_BLOCK_BITS, REPLAY_BLOCKS, REPLAY_WINDOW, Keypair,
                            KeypairExhausted, Keypairs, ReplayWindow)

T0 = 1000.0
TICK = 0.001  # "just before" a boundary
RING = REPLAY_BLOCKS * REPLAY_BLOCK_BITS  # counters the ring of blocks holds, window and all
KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))


def test_the_constants_are_the_papers():
    assert (REKEY_AFTER_MESSAGES, REJECT_AFTER_MESSAGES) == (2 ** 60, 2 ** 64 - 2 ** 13 - 1)
    assert (REKEY_AFTER_TIME, REJECT_AFTER_TIME, REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (REKEY_TIMEOUT, KEEPALIVE_TIMEOUT, ups.COOKIE_REFRESH_TIME) == (5, 10, 120)
    assert ups.REKEY_TIMEOUT_JITTER_MAX_MS / 1000 <= 1 / 3 + 0.001
    assert REPLAY_WINDOW == 8128 >= 2048
    assert REJECT_AFTER_MESSAGES + RING == 2 ** 64 - 1  # the window fits below 2**64


# --- The replay window ---------------------------------------------------------


def test_counter_zero_is_taken_once():
    window = ReplayWindow()
    assert window.accept(0)
    assert not window.accept(0)


def test_a_first_counter_above_zero_leaves_those_below_it_open():
    window = ReplayWindow()
    assert window.accept(5)
    assert [window.accept(counter) for counter in range(5)] == [True] * 5
    assert not any(window.accept(counter) for counter in range(6))


def test_counters_in_order_are_each_taken_once():
    window = ReplayWindow()
    assert all(window.accept(counter) for counter in range(3 * RING))
    assert not any(window.accept(counter) for counter in range(3 * RING - REPLAY_WINDOW, 3 * RING))


def test_counters_out_of_order_across_the_whole_window_are_each_taken_once():
    counters = list(range(REPLAY_WINDOW + 1))
    random.Random(1).shuffle(counters)
    window = ReplayWindow()
    assert all(window.accept(counter) for counter in counters)
    assert not any(window.accept(counter) for counter in counters)


@pytest.mark.parametrize("newest", [REPLAY_WINDOW, REPLAY_WINDOW + REPLAY_BLOCK_BITS - 1, RING,
                                    RING + REPLAY_BLOCK_BITS - 1, 10000, 2 ** 40 + 17])
def test_the_window_ends_exactly_replay_window_behind_the_newest(newest):
    """Newest at each end of its block: the edge falls at each end of the oldest block."""
    window = ReplayWindow()
    assert window.accept(newest)
    assert not window.accept(newest - REPLAY_WINDOW - 1)  # just beyond the edge
    assert window.accept(newest - REPLAY_WINDOW)  # exactly at it
    assert not window.accept(newest - REPLAY_WINDOW)  # and its replay
    assert window.accept(newest - REPLAY_WINDOW + 1)
    assert not window.accept(newest)


def test_the_edge_moves_with_the_newest():
    window = ReplayWindow()
    newest = 10000
    assert window.accept(newest) and window.accept(newest + 1)
    assert not window.accept(newest - REPLAY_WINDOW)  # at the edge a moment ago, beyond it now


def test_a_huge_jump_forgets_all_behind_the_window_and_opens_all_within():
    window = ReplayWindow()
    assert all(window.accept(counter) for counter in range(100))
    jump = 2 ** 40
    assert window.accept(jump)
    assert not window.accept(99)
    assert window.accept(jump - 1) and window.accept(jump - REPLAY_WINDOW)
    assert not window.accept(jump) and not window.accept(jump - 1)


@pytest.mark.parametrize("jump", [2, REPLAY_BLOCK_BITS, REPLAY_BLOCK_BITS + 1, REPLAY_WINDOW, RING - 1,
                                  RING, RING + 1, 2 ** 40])
def test_a_jump_clears_the_blocks_it_moves_onto(jump):
    """The ring full, then a jump: the counters newly in the window share blocks with old
    ones, and are taken all the same; those seen and still in the window are not."""
    window = ReplayWindow()
    assert all(window.accept(counter) for counter in range(RING))
    newest = RING - 1 + jump
    assert window.accept(newest)
    assert all(window.accept(counter) for counter in range(max(RING, newest - REPLAY_WINDOW), newest))
    assert not any(window.accept(counter) for counter in range(max(0, newest - REPLAY_WINDOW), RING))


def test_counters_end_just_below_reject_after_messages():
    window = ReplayWindow()
    last = REJECT_AFTER_MESSAGES - 1
    assert not window.accept(REJECT_AFTER_MESSAGES) and not window.accept(2 ** 64 - 1)
    assert window.accept(last)
    assert not window.accept(last)
    assert window.accept(last - REPLAY_WINDOW) and not window.accept(last - REPLAY_WINDOW - 1)
    assert not window.accept(REJECT_AFTER_MESSAGES)


def test_a_refused_counter_does_not_move_the_window():
    window = ReplayWindow()
    assert window.accept(REPLAY_WINDOW)
    assert not window.accept(2 ** 64 - 1) and not window.accept(-1)
    assert window.accept(0)


COUNTERS = st.one_of(st.integers(0, 4 * RING),
                     st.integers(REJECT_AFTER_MESSAGES - 2 * RING, 2 ** 64 - 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(COUNTERS, st.integers(0, 200)), max_size=400))
def test_the_window_agrees_with_a_set_of_all_counters_seen(counters):
    window, seen, newest = ReplayWindow(), set(), 0
    for counter in counters:
        new = (counter < REJECT_AFTER_MESSAGES and counter not in seen
               and counter >= newest - REPLAY_WINDOW)
        assert window.accept(counter) == new, counter
        if new:
            seen.add(counter)
            newest = max(newest, counter)


# --- A keypair and the keypairs -------------------------------------------------


def keypair(created=T0, is_initiator=True, index=1):
    return Keypair(KEY, OTHER_KEY, index, 100 + index, is_initiator, created)


def test_a_keypair_counts_its_messages_from_zero():
    pair = keypair()
    assert [pair.next_counter() for _ in range(3)] == [0, 1, 2]


def test_a_keypair_refuses_to_send_past_reject_after_messages():
    pair = keypair()
    pair.send_counter = REJECT_AFTER_MESSAGES - 1
    assert pair.may_send(T0)
    assert pair.next_counter() == REJECT_AFTER_MESSAGES - 1
    assert not pair.may_send(T0)
    with pytest.raises(KeypairExhausted):
        pair.next_counter()
    assert pair.send_counter == REJECT_AFTER_MESSAGES


def test_a_keypair_tells_when_rekey_after_messages_are_sent():
    pair = keypair()
    pair.send_counter = REKEY_AFTER_MESSAGES - 1
    assert not pair.rekey_after_messages_reached
    pair.next_counter()
    assert pair.rekey_after_messages_reached


def test_a_keypair_expires_at_reject_after_time():
    pair = keypair()
    assert not pair.expired(T0 + REJECT_AFTER_TIME - TICK) and pair.may_send(T0 + REJECT_AFTER_TIME - TICK)
    assert pair.expired(T0 + REJECT_AFTER_TIME) and not pair.may_send(T0 + REJECT_AFTER_TIME)


class Clock:
    """The injected clock: the time the test sets. Nothing sleeps."""

    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def holder():
    retired = []
    return Keypairs(Clock(), retire=retired.append), retired


def begin(keypairs, index, is_initiator):
    return keypairs.begin_session(KEY, OTHER_KEY, index, 100 + index, is_initiator)


def test_the_initiators_keypair_is_current_at_once():
    keypairs, retired = holder()
    first = begin(keypairs, 1, True)
    assert (keypairs.previous, keypairs.current, keypairs.next) == (None, first, None)
    assert first.created == T0 and first.is_initiator and first.remote_index == 101
    second = begin(keypairs, 2, True)
    third = begin(keypairs, 3, True)
    assert (keypairs.previous, keypairs.current, keypairs.next) == (second, third, None)
    assert retired == [first] and first.send_key == bytes(32) and first.receive_key == bytes(32)
    assert keypairs.current_for_sending() is third


def test_the_responders_keypair_is_current_only_once_a_message_came_with_it():
    keypairs, retired = holder()
    old = begin(keypairs, 1, True)
    new = begin(keypairs, 2, False)
    assert (keypairs.previous, keypairs.current, keypairs.next) == (None, old, new)
    assert keypairs.current_for_sending() is old  # the initiator may not have the new keys yet
    assert keypairs.lookup(2) is new  # but what it sends with them is opened
    assert not keypairs.received_with(old)
    assert keypairs.received_with(new)
    assert (keypairs.previous, keypairs.current, keypairs.next) == (old, new, None)
    assert keypairs.current_for_sending() is new
    assert not keypairs.received_with(new)
    assert retired == []


def test_a_responder_without_a_session_cannot_send_before_the_confirmation():
    keypairs, _ = holder()
    new = begin(keypairs, 1, False)
    assert keypairs.current_for_sending() is None
    assert keypairs.received_with(new) and keypairs.current_for_sending() is new


def test_a_new_responder_keypair_replaces_an_unconfirmed_one():
    keypairs, retired = holder()
    current, first, second = begin(keypairs, 1, True), begin(keypairs, 2, False), begin(keypairs, 3, False)
    assert (keypairs.previous, keypairs.current, keypairs.next) == (None, current, second)
    assert retired == [first]


def test_an_initiators_keypair_keeps_the_unconfirmed_one_as_previous():
    """The peer may be sending with the keypair it has not yet confirmed to us."""
    keypairs, retired = holder()
    old, unconfirmed = begin(keypairs, 1, True), begin(keypairs, 2, False)
    new = begin(keypairs, 3, True)
    assert (keypairs.previous, keypairs.current, keypairs.next) == (unconfirmed, new, None)
    assert retired == [old]


def test_keypairs_are_found_by_our_receiver_index_until_reject_after_time():
    keypairs, _ = holder()
    previous, current = begin(keypairs, 7, True), begin(keypairs, 8, True)
    assert [keypairs.lookup(index) for index in (7, 8, 9)] == [previous, current, None]
    following = begin(keypairs, 9, False)  # a responder's new keypair retires the previous one
    assert [keypairs.lookup(index) for index in (7, 8, 9)] == [None, current, following]
    keypairs.clock.now = T0 + REJECT_AFTER_TIME - TICK
    assert keypairs.lookup(8) is current and keypairs.current_for_sending() is current
    keypairs.clock.now = T0 + REJECT_AFTER_TIME
    assert keypairs.lookup(8) is None and keypairs.current_for_sending() is None


def test_clear_retires_every_keypair():
    keypairs, retired = holder()
    pairs = [begin(keypairs, 1, True), begin(keypairs, 2, True), begin(keypairs, 3, False)]
    keypairs.clear()
    assert (keypairs.previous, keypairs.current, keypairs.next) == (None, None, None)
    assert sorted(pair.local_index for pair in retired) == [1, 2, 3]
    assert all(pair.send_key == bytes(32) for pair in pairs)
