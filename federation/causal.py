"""Causal delivery: apply an envelope only after everything it depends on.

Every envelope names its dependencies as a sparse vector clock (origin -> seq),
always including its origin's previous envelope. So at every node the envelopes
processed from one origin in one room form a gap-free prefix, and a **version
vector** (origin -> highest processed seq) describes exactly what a node holds.
"Are my dependencies satisfied?" is then a lookup per origin, with no per-id set
in memory, and catch-up is "send me everything above my vector".

`CausalBuffer` holds envelopes that arrived early and releases them, in causal
order, the moment their dependencies are processed. It is pure: it never reads a
clock or storage; the node feeds it what it received and what it had.

The display order of a room (its timeline) is (hlc, origin, seq), which every
node computes identically once it holds the same envelopes.

Hybrid logical clock: `hlc = (unix_ms << 16) | counter`. `hlc_send` never goes
backwards and never repeats; `hlc_receive` keeps the clock ahead of everything seen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .envelope import Envelope

__all__ = [
    "MAX_CLOCK_AHEAD_MS",
    "CausalBuffer",
    "Offer",
    "OfferStatus",
    "hlc_receive",
    "hlc_send",
    "hlc_to_ms",
    "missing_from",
    "timeline_key",
]

Vector = dict[str, int]


def hlc_send(last: int, now_ms: int) -> int:
    """The timestamp for a new envelope: after `last`, and at least the physical time."""
    return max(last + 1, now_ms << 16)


MAX_CLOCK_AHEAD_MS = 5 * 60 * 1000
"""How far ahead of this node's own clock a timestamp seen from another node can move it.

A node whose clock is wrong (hours or years ahead: a server without NTP on a closed
network) signs envelopes with its own time. Followed without a bound, every node
would send with that time from then on: wrong times on every message, and keys
judged at that time, so valid keys would look expired. Within the bound, clocks
that differ by minutes still order replies after what they answer."""


def hlc_receive(last: int, remote: int, now_ms: int) -> int:
    """The clock after seeing a remote timestamp: the next send will be after it, unless
    it is more than `MAX_CLOCK_AHEAD_MS` ahead of `now_ms` (physical time here); then
    the clock moves only that far. Never backwards."""
    return max(last, min(remote, (now_ms + MAX_CLOCK_AHEAD_MS) << 16))


def hlc_to_ms(hlc: int) -> int:
    """The physical part of a timestamp, in unix milliseconds."""
    return hlc >> 16


def timeline_key(envelope: Envelope) -> tuple[int, str, int]:
    """Display order: (hlc, origin, seq); identical on every node."""
    content = envelope.content
    return (content.hlc, content.origin, content.seq)


def missing_from(have: Mapping[str, int], other: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Per origin, the seq range (first, last) that `other` holds and `have` lacks."""
    return {
        origin: (have.get(origin, 0) + 1, seq)
        for origin, seq in other.items()
        if seq > have.get(origin, 0)
    }


class OfferStatus(StrEnum):
    """What became of an offered envelope."""

    DUPLICATE = "duplicate"
    """Already processed (or already waiting): dropped."""
    BUFFERED = "buffered"
    """Waiting for dependencies."""
    READY = "ready"
    """Released (with whatever it unblocked) in `Offer.ready`."""


@dataclass(frozen=True, slots=True)
class Offer:
    """Result of offering one envelope to the buffer."""

    status: OfferStatus
    """duplicate, buffered or ready."""
    ready: tuple[Envelope, ...] = ()
    """Envelopes now ready to process, in causal order (the offered one and any it unblocked)."""


_DUPLICATE = Offer(OfferStatus.DUPLICATE)
_BUFFERED = Offer(OfferStatus.BUFFERED)


@dataclass(slots=True)
class _Room:
    vector: Vector = field(default_factory=dict)
    pending: dict[tuple[str, int], Envelope] = field(default_factory=dict)
    # (origin, seq) a pending envelope still waits for -> keys of the pending envelopes waiting
    waiting: dict[tuple[str, int], list[tuple[str, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )


class CausalBuffer:
    """Per-room version vectors and the envelopes waiting for their dependencies."""

    def __init__(self, vectors: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self._rooms: dict[str, _Room] = {}
        for room, vector in (vectors or {}).items():
            self._rooms[room] = _Room(vector=dict(vector))

    def vector(self, room: str) -> Vector:
        """A copy of the room's version vector (origin -> highest processed seq)."""
        state = self._rooms.get(room)
        return dict(state.vector) if state else {}

    def rooms(self) -> Iterable[str]:
        return self._rooms.keys()

    def pending_count(self, room: str | None = None) -> int:
        """Envelopes waiting for dependencies (in one room, or all)."""
        if room is not None:
            state = self._rooms.get(room)
            return len(state.pending) if state else 0
        return sum(len(state.pending) for state in self._rooms.values())

    def pending_keys(self) -> set[tuple[str, str, int]]:
        """(room, origin, seq) of every envelope waiting for dependencies."""
        return {
            (room, origin, seq)
            for room, state in self._rooms.items()
            for origin, seq in state.pending
        }

    def any_pending(self, keys: Iterable[tuple[str, str, int]]) -> bool:
        """Whether any of `keys` (room, origin, seq) is still waiting for dependencies."""
        for room, origin, seq in keys:
            state = self._rooms.get(room)
            if state is not None and (origin, seq) in state.pending:
                return True
        return False

    def depended_on(self, room: str, origin: str) -> int:
        """The highest seq of `origin` that a waiting envelope of another origin depends
        on (0 if none): proof that a member took it in. Scans the room's waiting
        envelopes; for the rare envelope that needs such proof."""
        state = self._rooms.get(room)
        if state is None:
            return 0
        return max(
            (
                waiting.content.deps.get(origin, 0)
                for (by, _), waiting in state.pending.items()
                if by != origin
            ),
            default=0,
        )

    def _unmet(self, state: _Room, envelope: Envelope) -> tuple[str, int] | None:
        for origin, seq in envelope.content.deps.items():
            if state.vector.get(origin, 0) < seq:
                return (origin, seq)
        return None

    def offer(self, envelope: Envelope) -> Offer:
        """Take an envelope; release it and anything it unblocks once dependencies are met.

        The caller must `processed` each released envelope (in order) before
        offering more; the buffer marks them processed itself, since releasing
        means the node will apply or reject them deterministically.
        """
        content = envelope.content
        state = self._rooms.get(content.room)
        if state is None:  # not setdefault: that would build a _Room for every envelope
            state = self._rooms[content.room] = _Room()
        origin, seq, vector = content.origin, content.seq, state.vector
        key = (origin, seq)
        if vector.get(origin, 0) >= seq or key in state.pending:
            return _DUPLICATE
        unmet = self._unmet(state, envelope)
        if unmet is not None:
            state.pending[key] = envelope
            state.waiting[unmet].append(key)
            return _BUFFERED
        vector[origin] = seq
        if not state.waiting:  # the common case: nothing waits, so nothing more is released
            return Offer(OfferStatus.READY, (envelope,))
        ready = [envelope]
        self._release(state, key, ready)
        return Offer(OfferStatus.READY, tuple(ready))

    def _release(self, state: _Room, applied: tuple[str, int], ready: list[Envelope]) -> None:
        # Iterative: a long chain of early arrivals must not recurse once per envelope.
        stack = [applied]
        while stack:
            origin, seq = stack.pop()
            # Waiters on (origin, s) for any s <= seq may now be satisfied; entries are
            # registered on the exact (origin, seq) they found unmet.
            for waiter_key in state.waiting.pop((origin, seq), ()):
                waiter = state.pending.get(waiter_key)
                if waiter is None:
                    continue
                unmet = self._unmet(state, waiter)
                if unmet is not None:
                    state.waiting[unmet].append(waiter_key)
                    continue
                del state.pending[waiter_key]
                state.vector[waiter.content.origin] = waiter.content.seq
                ready.append(waiter)
                stack.append(waiter_key)

    def seen(self, room: str, origin: str, seq: int) -> bool:
        """Whether (origin, seq) was processed in `room`."""
        state = self._rooms.get(room)
        return state is not None and state.vector.get(origin, 0) >= seq
