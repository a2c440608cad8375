"""WireGuard sessions and timers without root and without sleeping: the replay window at
its edges, a keypair's counters and limits, the keypairs' rotation, and every timer of the
paper's section 6 on an injected clock that the tests set."""

import random

import pytest
from hypothesis import given, settings, strategies as st

import udpProxyServer as ups
from udpProxyServer import (DROP_KEYS, FLUSH_STAGED, KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES,
                            REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES,
                            REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, REPLAY_BLOCK_BITS,
                            REPLAY_BLOCKS, REPLAY_WINDOW, SEND_INITIATION, SEND_KEEPALIVE,
                            SEND_STAGED, Keypair, KeypairExhausted, Keypairs, PeerTimers,
                            ReplayWindow)

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


# --- The timers -----------------------------------------------------------------


class Peer:
    """One peer's keypairs and timers on the injected clock, with a stand-in for the
    daemon's data path: it does what due() lists and calls the hooks back, as the daemon
    will; what it does is logged as (time, action)."""

    def __init__(self, jitter_ms=0, randbelow=None, persistent_keepalive=0):
        self.clock = Clock()
        self.retired = []
        self.keypairs = Keypairs(self.clock, retire=self.retired.append)
        self.timers = PeerTimers(self.keypairs, self.clock, randbelow or (lambda n: jitter_ms),
                                 persistent_keepalive)
        self.staged, self.sent, self.log = [], [], []
        self.indices = iter(range(1, 1000))

    def run_to(self, until):
        """The daemon's loop from now to until: wake at each next_wakeup(), do what due()
        lists. Returns what was done."""
        assert until >= self.clock.now, "the clock goes forward only"
        start = len(self.log)
        for _ in range(10000):
            wakeup = self.timers.next_wakeup()
            if wakeup is None or wakeup > until:
                break
            self.clock.now = max(self.clock.now, wakeup)
            for action in self.timers.due(self.clock.now):
                self.log.append((self.clock.now, action))
                self.act(action)
        else:
            pytest.fail("the timers never settle")
        self.clock.now = until
        return self.log[start:]

    def act(self, action):
        if action == ups.SEND_INITIATION:
            self.timers.on_initiation_sent()
        elif action == ups.SEND_KEEPALIVE and self.staged:
            self.send_staged()
        elif action == ups.SEND_KEEPALIVE:
            self.send(b"")
        elif action == ups.SEND_STAGED:
            self.send_staged()
        elif action == ups.FLUSH_STAGED:
            self.staged.clear()

    def send(self, packet=b"data"):
        pair = self.keypairs.current_for_sending()
        if pair is None:
            self.staged.append(packet)
            self.timers.on_packet_staged()
            return
        self.sent.append((pair.local_index, pair.next_counter(), packet))
        if packet:
            self.timers.on_data_sent()
        else:
            self.timers.on_keepalive_sent()

    def send_staged(self):
        staged, self.staged = self.staged, []
        for packet in staged:
            self.send(packet)

    def at(self, when):
        self.clock.now = when
        return self

    def response_arrives(self):
        pair = self.keypairs.begin_session(KEY, OTHER_KEY, next(self.indices), 1, True)
        self.timers.on_response_received()
        return pair

    def initiation_arrives(self):
        self.timers.on_initiation_received()
        pair = self.keypairs.begin_session(KEY, OTHER_KEY, next(self.indices), 1, False)
        self.timers.on_response_sent()
        return pair

    def receive(self, pair, packet=b"data"):
        """A transport message with pair, opened; its counter as the peer would count."""
        assert self.keypairs.lookup(pair.local_index) is pair
        assert pair.replay_window.accept(pair.replay_window.newest + 1)
        (self.timers.on_data_received if packet else self.timers.on_keepalive_received)(pair)

    def session(self, is_initiator=True):
        """A keypair in place without the handshake's timers, for the rules that read it."""
        pair = self.keypairs.begin_session(KEY, OTHER_KEY, next(self.indices), 1, is_initiator)
        self.keypairs.received_with(pair)
        return pair

    def initiations(self):
        return [when for when, action in self.log if action == SEND_INITIATION]


def test_a_new_peer_sleeps_until_told_something():
    peer = Peer()
    assert peer.timers.next_wakeup() is None and peer.timers.due(T0) == []


def test_data_without_a_keypair_is_staged_and_asks_for_an_initiation_at_once():
    peer = Peer()
    peer.send()
    assert peer.staged == [b"data"] and peer.timers.next_wakeup() == T0
    assert peer.run_to(T0) == [(T0, SEND_INITIATION)]


def test_initiations_are_sent_rekey_timeout_apart_at_most():
    peer = Peer(jitter_ms=200)
    for when in (T0, T0 + 1, T0 + REKEY_TIMEOUT - TICK):
        peer.at(when).send()
        peer.run_to(when)
    retry = T0 + REKEY_TIMEOUT + 0.2
    assert peer.run_to(retry - TICK) == [] and peer.initiations() == [T0]
    assert peer.run_to(retry) == [(retry, SEND_INITIATION)]


def test_after_our_response_we_wait_rekey_timeout_before_initiating():
    """The initiator's first message will confirm our keypair: no crossing handshakes."""
    peer = Peer()
    peer.initiation_arrives()
    peer.at(T0 + REKEY_TIMEOUT - TICK).send()
    assert peer.run_to(T0 + REKEY_TIMEOUT - TICK) == []
    peer.at(T0 + REKEY_TIMEOUT).send()
    assert peer.run_to(T0 + REKEY_TIMEOUT) == [(T0 + REKEY_TIMEOUT, SEND_INITIATION)]


@pytest.mark.parametrize("jitter_ms", [0, 333])
def test_an_unanswered_initiation_is_sent_again_after_rekey_timeout_and_jitter(jitter_ms):
    peer = Peer(jitter_ms=jitter_ms)
    peer.send()
    retry = T0 + REKEY_TIMEOUT + jitter_ms / 1000
    assert peer.run_to(retry - TICK) == [(T0, SEND_INITIATION)]
    assert peer.run_to(retry) == [(retry, SEND_INITIATION)]
    assert peer.staged == [b"data"]


def test_the_retry_jitter_is_drawn_below_a_third_of_a_second():
    asked = []
    draw = random.Random(7).randrange

    def randbelow(n):
        asked.append(n)
        return draw(n)

    peer = Peer(randbelow=randbelow)
    peer.send()
    peer.run_to(T0 + 200)
    sent = peer.initiations()
    gaps = [later - earlier for earlier, later in zip(sent, sent[1:])]
    assert len(gaps) == MAX_TIMER_HANDSHAKES + 1
    assert all(REKEY_TIMEOUT - 1e-9 <= gap < REKEY_TIMEOUT + 1 / 3 for gap in gaps)
    assert len(set(gaps)) > 1 and set(asked) == {ups.REKEY_TIMEOUT_JITTER_MAX_MS}


def test_unanswered_initiations_are_given_up_after_rekey_attempt_time_and_the_packets_dropped():
    peer = Peer()
    peer.send()
    give_up = T0 + (MAX_TIMER_HANDSHAKES + 2) * REKEY_TIMEOUT
    peer.run_to(give_up - TICK)
    sent = peer.initiations()
    assert sent == [T0 + n * REKEY_TIMEOUT for n in range(MAX_TIMER_HANDSHAKES + 2)]
    assert sent[-1] - sent[1] == REKEY_ATTEMPT_TIME  # retried for that long
    assert peer.staged == [b"data"]
    assert peer.run_to(give_up) == [(give_up, FLUSH_STAGED)]
    assert peer.staged == []
    assert peer.timers.next_wakeup() == give_up + 3 * REJECT_AFTER_TIME  # the residue's erasure


def test_new_data_restarts_the_attempts():
    peer = Peer()
    peer.send()
    peer.run_to(T0 + 52)
    peer.send()  # paced (the retry of T0 + 50 is under way) but the count starts again
    peer.run_to(T0 + 52 + 100)
    assert (T0 + 100, FLUSH_STAGED) not in peer.log
    assert peer.log[-1] == (T0 + 150, FLUSH_STAGED) and len(peer.initiations()) == 30


def test_a_response_ends_the_retries_and_sends_what_waited():
    peer = Peer()
    peer.send()
    peer.run_to(T0 + 2)
    pair = peer.at(T0 + 2).response_arrives()
    assert peer.run_to(T0 + 2) == [(T0 + 2, SEND_KEEPALIVE)]
    assert peer.sent == [(pair.local_index, 0, b"data")] and peer.staged == []
    done = peer.run_to(T0 + 2 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - TICK)
    assert SEND_INITIATION not in [action for _, action in done]


def test_a_response_with_nothing_staged_sends_a_keepalive():
    peer = Peer()
    peer.timers.on_initiation_sent()
    pair = peer.at(T0 + 1).response_arrives()
    assert peer.run_to(T0 + 1) == [(T0 + 1, SEND_KEEPALIVE)]
    assert peer.sent == [(pair.local_index, 0, b"")]


def test_the_responder_sends_what_waited_once_its_keypair_is_confirmed():
    peer = Peer()
    pair = peer.initiation_arrives()
    peer.at(T0 + 1).send()
    assert peer.run_to(T0 + 1) == [] and peer.staged == [b"data"]
    peer.receive(pair, b"")
    assert peer.run_to(T0 + 1) == [(T0 + 1, SEND_STAGED)]
    assert peer.sent == [(pair.local_index, 0, b"data")] and peer.keypairs.current is pair


@pytest.mark.parametrize("is_initiator, rekeys", [(True, True), (False, False)])
def test_the_initiator_rekeys_when_it_sends_with_a_keypair_rekey_after_time_old(is_initiator, rekeys):
    peer = Peer()
    peer.session(is_initiator)
    peer.at(T0 + REKEY_AFTER_TIME - TICK).send()
    assert peer.run_to(T0 + REKEY_AFTER_TIME - TICK) == []
    peer.at(T0 + REKEY_AFTER_TIME).send()
    assert peer.run_to(T0 + REKEY_AFTER_TIME) == ([(T0 + REKEY_AFTER_TIME, SEND_INITIATION)] if rekeys else [])


@pytest.mark.parametrize("is_initiator", [True, False])
def test_either_side_rekeys_after_rekey_after_messages(is_initiator):
    peer = Peer()
    pair = peer.session(is_initiator)
    pair.send_counter = REKEY_AFTER_MESSAGES - 1
    peer.send()  # the message with counter REKEY_AFTER_MESSAGES - 1
    assert peer.run_to(T0) == [(T0, SEND_INITIATION)]
    other = Peer()
    other.session(is_initiator).send_counter = REKEY_AFTER_MESSAGES - 2
    other.send()
    assert other.run_to(T0) == []


@pytest.mark.parametrize("is_initiator, rekeys", [(True, True), (False, False)])
def test_an_initiator_that_receives_rekeys_before_reject_after_time(is_initiator, rekeys):
    """Receiving, the initiator starts a new session while there is time for a handshake
    and a retry: at REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT, and once."""
    peer = Peer()
    pair = peer.session(is_initiator)
    last_minute = T0 + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
    peer.at(last_minute - TICK).receive(pair)
    assert peer.timers.due(last_minute - TICK) == []
    peer.at(last_minute).receive(pair)
    assert peer.timers.due(last_minute) == ([SEND_INITIATION] if rekeys else [])
    peer.at(last_minute + REKEY_TIMEOUT + 1).receive(pair)
    assert peer.timers.due(last_minute + REKEY_TIMEOUT + 1) == []


def test_the_last_minute_rekey_is_allowed_again_in_the_next_session():
    peer = Peer()
    pair = peer.session(True)
    peer.at(T0 + 165).receive(pair)
    assert peer.timers.due(T0 + 165) == [SEND_INITIATION]
    peer.timers.on_initiation_sent()
    new = peer.at(T0 + 166).response_arrives()
    peer.timers.due(T0 + 166)
    peer.at(T0 + 166 + 165).receive(new)
    assert peer.timers.due(T0 + 166 + 165) == [SEND_INITIATION]


def test_data_received_and_nothing_sent_gets_a_keepalive_after_keepalive_timeout():
    peer = Peer()
    pair = peer.session()
    peer.receive(pair)
    peer.at(T0 + 4).receive(pair)  # does not push the keepalive back
    assert peer.run_to(T0 + KEEPALIVE_TIMEOUT - TICK) == []
    assert peer.run_to(T0 + KEEPALIVE_TIMEOUT) == [(T0 + KEEPALIVE_TIMEOUT, SEND_KEEPALIVE)]
    assert peer.sent == [(pair.local_index, 0, b"")]


def test_anything_sent_makes_the_keepalive_unneeded():
    peer = Peer()
    pair = peer.session()
    peer.receive(pair)
    peer.at(T0 + 3).send()
    assert SEND_KEEPALIVE not in [action for _, action in peer.run_to(T0 + 30)]


def test_a_keepalive_received_asks_for_no_keepalive():
    peer = Peer()
    pair = peer.session()
    peer.receive(pair, b"")
    assert peer.run_to(T0 + 60) == []


@pytest.mark.parametrize("jitter_ms", [0, 333])
def test_data_sent_and_nothing_received_starts_a_new_handshake(jitter_ms):
    peer = Peer(jitter_ms=jitter_ms)
    peer.session()
    peer.send()
    peer.at(T0 + 5).send()  # does not push the deadline back
    deadline = T0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter_ms / 1000
    assert peer.run_to(deadline - TICK) == []
    assert peer.run_to(deadline) == [(deadline, SEND_INITIATION)]


def test_anything_received_makes_the_new_handshake_unneeded():
    peer = Peer()
    pair = peer.session()
    peer.send()
    peer.at(T0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - TICK).receive(pair, b"")
    assert peer.run_to(T0 + 60) == []


def test_a_persistent_keepalive_goes_when_nothing_crossed_for_its_interval():
    peer = Peer()
    pair = peer.session()
    peer.timers.set_persistent_keepalive(25)
    assert peer.run_to(T0) == [(T0, SEND_KEEPALIVE)]  # at once, when turned on
    assert peer.run_to(T0 + 25 - TICK) == []
    assert peer.run_to(T0 + 25) == [(T0 + 25, SEND_KEEPALIVE)]
    peer.at(T0 + 30).receive(pair, b"")  # anything authenticated pushes it back
    assert peer.run_to(T0 + 55 - TICK) == []
    assert peer.run_to(T0 + 55) == [(T0 + 55, SEND_KEEPALIVE)]
    peer.timers.set_persistent_keepalive(0)
    assert peer.timers.next_wakeup() is None


def test_a_persistent_keepalive_without_a_keypair_starts_a_handshake():
    peer = Peer(persistent_keepalive=25)
    assert peer.run_to(T0) == [(T0, SEND_KEEPALIVE), (T0, SEND_INITIATION)]
    assert peer.staged == [b""]


def test_every_key_is_erased_after_three_reject_after_times_without_a_new_session():
    peer = Peer()
    first = peer.initiation_arrives()
    peer.receive(first, b"")
    second = peer.at(T0 + 300).initiation_arrives()
    zero = T0 + 300 + 3 * REJECT_AFTER_TIME
    peer.run_to(zero - TICK)
    assert DROP_KEYS not in [action for _, action in peer.log] and second.send_key == KEY
    assert peer.run_to(zero) == [(zero, DROP_KEYS), (zero, FLUSH_STAGED)]
    assert (peer.keypairs.previous, peer.keypairs.current, peer.keypairs.next) == (None, None, None)
    assert set(peer.retired) == {first, second} and second.send_key == bytes(32)


def test_a_keypair_reject_after_time_old_sends_and_receives_nothing():
    peer = Peer()
    pair = peer.session()
    peer.at(T0 + REJECT_AFTER_TIME - TICK).send()
    assert peer.sent and peer.keypairs.lookup(pair.local_index) is pair
    peer.at(T0 + REJECT_AFTER_TIME).send()
    assert peer.staged == [b"data"] and peer.keypairs.lookup(pair.local_index) is None
    assert SEND_INITIATION in peer.timers.due(T0 + REJECT_AFTER_TIME)


def test_keys_are_erased_before_a_new_initiation_is_made():
    peer = Peer()
    peer.initiation_arrives()
    zero = T0 + 3 * REJECT_AFTER_TIME
    peer.at(zero).timers.on_packet_staged()
    assert peer.timers.due(zero) == [DROP_KEYS, FLUSH_STAGED, SEND_INITIATION]


def test_next_wakeup_is_the_earliest_deadline():
    peer = Peer(jitter_ms=100)
    peer.session()
    peer.send()  # a new handshake if nothing comes back
    peer.timers.on_initiation_sent()  # and a retry
    assert peer.timers.next_wakeup() == T0 + REKEY_TIMEOUT + 0.1
    peer.timers.on_response_received()
    assert peer.timers.next_wakeup() == T0  # the keepalive the response asks for
    peer.run_to(T0)
    assert peer.timers.next_wakeup() == T0 + 3 * REJECT_AFTER_TIME  # the session's erasure
