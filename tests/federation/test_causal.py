"""Causal delivery and the hybrid logical clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.causal import (
    MAX_CLOCK_AHEAD_MS,
    CausalBuffer,
    OfferStatus,
    hlc_receive,
    hlc_send,
    hlc_to_ms,
    missing_from,
    timeline_key,
)
from federation.envelope import Content, Envelope, Kind

HOME = "mie-pref"
ROOM = "!kaigi2024:mie-pref"
OTHER_ROOM = "!bousai:tsu"
NOW_MS = 1_714_521_600_000


def envelope(
    origin: str, seq: int, *, deps: dict[str, int] | None = None, room: str = ROOM, hlc: int = 0
) -> Envelope:
    """An unsigned envelope (the buffer only reads content); deps default to own previous and,
    off the home node, home seq 1."""
    home = room.rpartition(":")[2]
    if deps is None:
        deps = {}
        if origin != home:
            deps[home] = 1
    if seq > 1:
        deps = {**deps, origin: seq - 1}
    content = Content(
        room=room,
        origin=origin,
        seq=seq,
        kind=Kind.MESSAGE,
        sender="",
        hlc=hlc or (NOW_MS << 16) + seq,
        deps=deps,
        key_id="0123456789abcdef",
        body={"text": f"{origin} {seq}"},
    )
    return Envelope(
        content_bytes=content.to_bytes(),
        content=content,
        signature=bytes(64),
        index=0,
        size=1,
        path=(),
    )


def keys(envelopes: tuple[Envelope, ...]) -> list[tuple[str, int]]:
    return [(e.content.origin, e.content.seq) for e in envelopes]


# --- hybrid logical clock --------------------------------------------------------------------


def test_hlc_send_starts_at_the_physical_time_shifted_by_16_bits() -> None:
    assert hlc_send(0, NOW_MS) == NOW_MS << 16
    assert hlc_to_ms(hlc_send(0, NOW_MS)) == NOW_MS


def test_hlc_send_counts_up_within_one_millisecond() -> None:
    first = hlc_send(0, NOW_MS)
    second = hlc_send(first, NOW_MS)
    assert second == first + 1
    assert hlc_to_ms(second) == NOW_MS


def test_hlc_send_keeps_increasing_when_the_wall_clock_goes_back() -> None:
    last = hlc_send(0, NOW_MS)
    after = hlc_send(last, NOW_MS - 60_000)  # NTP stepped the clock back a minute
    assert after == last + 1


@settings(max_examples=200, deadline=None, database=None)
@given(
    start=st.integers(0, 2**60),
    nows=st.lists(st.integers(NOW_MS - 10**6, NOW_MS + 10**6), min_size=1, max_size=50),
)
def test_hlc_send_is_strictly_increasing_and_never_behind_the_wall_clock(
    start: int, nows: list[int]
) -> None:
    last = start
    for now in nows:
        stamp = hlc_send(last, now)
        assert stamp > last
        assert stamp >= now << 16
        last = stamp


@settings(max_examples=200, deadline=None, database=None)
@given(last=st.integers(0, 2**60), remote=st.integers(0, 2**60), now=st.integers(0, 2**40))
def test_hlc_receive_keeps_the_next_send_after_everything_seen_within_the_bound(
    last: int, remote: int, now: int
) -> None:
    clock = hlc_receive(last, remote, now)
    bound = (now + MAX_CLOCK_AHEAD_MS) << 16
    assert clock >= last  # never backwards
    assert clock <= max(last, bound)  # never pulled further ahead than the bound
    if remote <= bound:
        assert clock >= remote
        assert hlc_send(clock, now) > remote


def test_hlc_receive_ignores_an_older_remote_time() -> None:
    now = 1_800_000_000_000
    assert hlc_receive(500, 100, now) == 500
    assert hlc_receive(100, 500, now) == 500


def test_a_node_with_a_clock_years_ahead_moves_the_others_only_minutes_ahead() -> None:
    now = 1_795_000_000_000  # 2026-11, in unix ms
    wrong = (now + 10 * 365 * 86_400_000) << 16  # a server whose clock says 2036
    clock = hlc_receive(now << 16, wrong, now)
    assert hlc_to_ms(clock) == now + MAX_CLOCK_AHEAD_MS
    # A peer a minute ahead is followed exactly: a reply still sorts after it.
    minute_ahead = (now + 60_000) << 16 | 5
    assert hlc_send(hlc_receive(now << 16, minute_ahead, now), now) > minute_ahead


# --- CausalBuffer ----------------------------------------------------------------------------


def test_envelopes_in_causal_order_are_released_one_by_one() -> None:
    buffer = CausalBuffer()
    for seq in range(1, 5):
        offer = buffer.offer(envelope(HOME, seq))
        assert offer.status is OfferStatus.READY
        assert keys(offer.ready) == [(HOME, seq)]
        assert buffer.vector(ROOM) == {HOME: seq}
    assert buffer.pending_count() == 0


def test_early_envelopes_wait_and_are_released_in_causal_order() -> None:
    buffer = CausalBuffer()
    home = [envelope(HOME, seq) for seq in range(1, 4)]
    tsu1 = envelope("tsu", 1, deps={HOME: 2})
    tsu2 = envelope("tsu", 2, deps={HOME: 3})
    for early in (tsu2, home[2], tsu1, home[1]):
        assert buffer.offer(early).status is OfferStatus.BUFFERED
    assert buffer.pending_count(ROOM) == 4
    assert buffer.vector(ROOM) == {}
    offer = buffer.offer(home[0])
    assert offer.status is OfferStatus.READY
    released = keys(offer.ready)
    assert sorted(released) == [(HOME, 1), (HOME, 2), (HOME, 3), ("tsu", 1), ("tsu", 2)]
    position = {key: i for i, key in enumerate(released)}
    for env in offer.ready:
        for dep in env.content.deps.items():
            assert position[dep] < position[(env.content.origin, env.content.seq)]
    assert buffer.vector(ROOM) == {HOME: 3, "tsu": 2}
    assert buffer.pending_count() == 0


def test_pending_keys_name_what_waits_and_any_pending_sees_them_released() -> None:
    buffer = CausalBuffer()
    waiting = [envelope(HOME, 3), envelope("tsu", 2, room=OTHER_ROOM)]
    for early in waiting:
        assert buffer.offer(early).status is OfferStatus.BUFFERED
    snapshot = buffer.pending_keys()
    assert snapshot == {(ROOM, HOME, 3), (OTHER_ROOM, "tsu", 2)}
    assert buffer.any_pending(snapshot)
    buffer.offer(envelope(HOME, 1))
    buffer.offer(envelope(HOME, 2))  # releases HOME 3; OTHER_ROOM still waits
    assert buffer.pending_keys() == {(OTHER_ROOM, "tsu", 2)}
    assert buffer.any_pending(snapshot)
    assert not buffer.any_pending({(ROOM, HOME, 3), ("!unknown:tsu", "tsu", 1)})
    later = envelope(HOME, 5)  # waits too, but only since after the snapshot
    buffer.offer(later)
    buffer.offer(envelope("tsu", 1, room=OTHER_ROOM))
    assert not buffer.any_pending(snapshot)
    assert buffer.pending_keys() == {(ROOM, HOME, 5)}


def test_envelope_waiting_on_two_origins_is_released_only_when_both_arrive() -> None:
    buffer = CausalBuffer()
    buffer.offer(envelope(HOME, 1))
    ise = envelope("ise", 1, deps={HOME: 1, "tsu": 2})
    assert buffer.offer(ise).status is OfferStatus.BUFFERED
    assert buffer.offer(envelope("tsu", 1)).ready[-1].content.origin == "tsu"
    assert buffer.pending_count(ROOM) == 1
    offer = buffer.offer(envelope("tsu", 2))
    assert keys(offer.ready) == [("tsu", 2), ("ise", 1)]


def test_depended_on_names_the_highest_seq_another_origins_waiting_envelope_needs() -> None:
    buffer = CausalBuffer()
    buffer.offer(envelope(HOME, 1))
    assert buffer.depended_on(ROOM, "tsu") == 0
    buffer.offer(envelope("tsu", 3))  # waits for tsu 2: its own dependency is no proof
    assert buffer.depended_on(ROOM, "tsu") == 0
    buffer.offer(envelope("ise", 1, deps={HOME: 1, "tsu": 2}))
    buffer.offer(envelope("ise", 2, deps={HOME: 1, "tsu": 5}))
    assert buffer.depended_on(ROOM, "tsu") == 5
    assert buffer.depended_on(ROOM, "nabari") == 0
    assert buffer.depended_on("!other:mie-pref", "tsu") == 0
    buffer.offer(envelope("tsu", 1))
    buffer.offer(envelope("tsu", 2))  # releases ise 1 (and tsu 3); ise 2 still waits
    assert buffer.depended_on(ROOM, "tsu") == 5


def test_already_processed_envelope_is_a_duplicate() -> None:
    buffer = CausalBuffer()
    first = envelope(HOME, 1)
    buffer.offer(first)
    offer = buffer.offer(first)
    assert offer.status is OfferStatus.DUPLICATE
    assert offer.ready == ()
    assert buffer.vector(ROOM) == {HOME: 1}


def test_already_pending_envelope_is_a_duplicate_and_is_released_once() -> None:
    buffer = CausalBuffer()
    second = envelope(HOME, 2)
    assert buffer.offer(second).status is OfferStatus.BUFFERED
    assert buffer.offer(second).status is OfferStatus.DUPLICATE
    assert buffer.pending_count(ROOM) == 1
    assert keys(buffer.offer(envelope(HOME, 1)).ready) == [(HOME, 1), (HOME, 2)]


def test_a_long_reversed_chain_is_released_without_recursion() -> None:
    chain = [envelope(HOME, seq) for seq in range(1, 5001)]
    buffer = CausalBuffer()
    for env in reversed(chain[1:]):
        assert buffer.offer(env).status is OfferStatus.BUFFERED
    offer = buffer.offer(chain[0])
    assert [e.content.seq for e in offer.ready] == list(range(1, 5001))
    assert buffer.vector(ROOM) == {HOME: 5000}
    assert buffer.pending_count() == 0


def test_a_long_chain_waiting_across_two_origins_is_released_in_full() -> None:
    # Each tsu envelope waits on the home envelope of the same number: released alternately.
    home = [envelope(HOME, seq) for seq in range(1, 2001)]
    tsu = [envelope("tsu", seq, deps={HOME: seq}) for seq in range(1, 2001)]
    buffer = CausalBuffer()
    for env in reversed(home[1:] + tsu):
        buffer.offer(env)
    offer = buffer.offer(home[0])
    assert len(offer.ready) == 4000
    assert buffer.vector(ROOM) == {HOME: 2000, "tsu": 2000}


def test_rooms_are_independent() -> None:
    buffer = CausalBuffer()
    buffer.offer(envelope(HOME, 1))
    assert buffer.offer(envelope("tsu", 1, room=OTHER_ROOM)).status is OfferStatus.READY
    assert buffer.offer(envelope(HOME, 1, room=OTHER_ROOM, deps={"tsu": 1})).status is (
        OfferStatus.READY
    )
    assert buffer.vector(ROOM) == {HOME: 1}
    assert buffer.vector(OTHER_ROOM) == {"tsu": 1, HOME: 1}
    assert set(buffer.rooms()) == {ROOM, OTHER_ROOM}


def test_vector_is_a_copy_and_empty_for_an_unknown_room() -> None:
    buffer = CausalBuffer()
    buffer.offer(envelope(HOME, 1))
    vector = buffer.vector(ROOM)
    vector[HOME] = 99
    assert buffer.vector(ROOM) == {HOME: 1}
    assert buffer.vector("!nothing:tsu") == {}
    assert buffer.pending_count("!nothing:tsu") == 0


def test_buffer_resumes_from_stored_vectors() -> None:
    buffer = CausalBuffer({ROOM: {HOME: 3, "tsu": 1}})
    assert buffer.offer(envelope(HOME, 3)).status is OfferStatus.DUPLICATE
    assert buffer.offer(envelope("tsu", 2, deps={HOME: 3})).status is OfferStatus.READY
    assert buffer.offer(envelope(HOME, 4)).status is OfferStatus.READY
    assert buffer.vector(ROOM) == {HOME: 4, "tsu": 2}


def test_seen_reports_processed_envelopes_only() -> None:
    buffer = CausalBuffer()
    buffer.offer(envelope(HOME, 1))
    buffer.offer(envelope(HOME, 3))
    assert buffer.seen(ROOM, HOME, 1)
    assert not buffer.seen(ROOM, HOME, 3)  # pending is not processed
    assert not buffer.seen(ROOM, "tsu", 1)
    assert not buffer.seen(OTHER_ROOM, HOME, 1)


def test_missing_from_lists_the_ranges_the_other_side_has_beyond_us() -> None:
    have = {HOME: 5, "tsu": 2, "ise": 9}
    other = {HOME: 7, "tsu": 2, "ise": 3, "nabari": 4}
    assert missing_from(have, other) == {HOME: (6, 7), "nabari": (1, 4)}
    assert missing_from(other, other) == {}
    assert missing_from({}, {"tsu": 1}) == {"tsu": (1, 1)}


def test_timeline_key_orders_by_hlc_then_origin_then_seq() -> None:
    early = envelope("tsu", 1, hlc=10)
    same_time_ise = envelope("ise", 1, hlc=20)
    same_time_tsu = envelope("tsu", 2, hlc=20)
    later = envelope(HOME, 1, hlc=30)
    shuffled = [later, same_time_tsu, early, same_time_ise]
    assert sorted(shuffled, key=timeline_key) == [early, same_time_ise, same_time_tsu, later]
    assert timeline_key(early) == (10, "tsu", 1)


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_any_arrival_order_releases_every_envelope_once_in_causal_order(
    data: st.DataObject,
) -> None:
    # Three origins, each a chain; each envelope also depends on a random earlier seq of the
    # others (a random, causally consistent history).
    origins = [HOME, "tsu", "ise"]
    made: list[Envelope] = []
    heads = dict.fromkeys(origins, 0)
    for _ in range(data.draw(st.integers(1, 30), label="count")):
        origin = data.draw(st.sampled_from(origins if heads[HOME] else [HOME]))
        deps = {}
        for other in origins:
            if other != origin and heads[other]:
                deps[other] = data.draw(st.integers(1, heads[other]))
        if origin != HOME:
            deps.setdefault(HOME, 1)
        heads[origin] += 1
        made.append(envelope(origin, heads[origin], deps=deps))
    arrival = data.draw(st.permutations(made), label="arrival")
    buffer = CausalBuffer()
    released: list[tuple[str, int]] = []
    for env in arrival:
        released.extend(keys(buffer.offer(env).ready))
    assert sorted(released) == sorted((e.content.origin, e.content.seq) for e in made)
    position = {key: i for i, key in enumerate(released)}
    for env in made:
        for dep in env.content.deps.items():
            assert position[dep] < position[(env.content.origin, env.content.seq)]
    assert buffer.vector(ROOM) == {o: s for o, s in heads.items() if s}
    assert buffer.pending_count() == 0
