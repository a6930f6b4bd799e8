"""Delivery: one sender loop per peer, draining that peer's durable outbox.

Enqueueing (a committed processing step) calls `wake(peer)`: it sets the peer's
"new data" flag and starts its loop only if none runs. The loop reads the
oldest queued envelopes (bounded by count and bytes), posts them as one batch,
and deletes them from the outbox only after the peer acknowledged, which the peer
does only after committing them. On failure it waits an exponential backoff with
jitter and tries again; the envelopes stay queued, across restarts too (a loop is
started at start-up for every peer with a non-empty outbox).

A destination on no segment we sit on is reached through relays: the loop asks
the router (a pure function of the roster and the hops known to be down) for the
next hop and posts the batch to that relay's `/relay` with the destination named.
The relay acknowledges only after it has verified and durably queued the batch, so
the guarantee is the same hop by hop. When a relay fails, it is marked down and, if
the router then finds another path, the batch goes that way at once, without
waiting out a backoff.

Every loop is a task owned by `Outbox`, cancelled by `stop()`, and its failure is
logged, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import structlog

from federation import codec
from federation.backoff import Backoff
from federation.errors import KakehashiError, StorageError, TransportError, TrustError
from federation.roster import Roster
from federation.routing import Route

from .roomstore import OutboxBatch, Queued, RoomStore
from .stream import PeerStreams
from .tasks import cancel_all

__all__ = ["DeliverySettings", "Outbox"]

log = structlog.get_logger("kakehashi.outbox")

TAIL_BATCHES = 2
EAGER_ROWS = 64
"""Rows that go to a peer while another batch is on its way to it, at most (see `_loop`)."""
"""Rows a sender keeps in memory at most, in full batches: beyond that it reads the outbox."""


class _Tail(Enum):
    """What a sender's tail (rows handed over by commits, kept in memory) is good for."""

    OFF = "off"
    """Ignored: the next batch is read from the outbox."""
    COLLECTING = "collecting"
    """An outbox read began: every row committed since is kept."""
    SERVING = "serving"
    """The outbox held nothing beyond the last read: batches come from the tail, without
    reading back what was just written. Overflow, a failure or a new loop turn it OFF."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverySettings:
    """How senders batch and retry."""

    max_batch_count: int = 2000
    """Envelopes per request at most."""
    max_batch_bytes: int = 4 * 1024 * 1024
    """Bytes of envelopes per request at most."""
    window: int = 2
    """Batches posted to one peer before the first is acknowledged."""
    backoff: Backoff = field(default_factory=Backoff)
    """Retry timing after a failed delivery."""


@dataclass(slots=True)
class PeerDelivery:
    """Counters of one peer's sender, for `peer list` and metrics."""

    delivered: int = 0
    batches: int = 0
    failures: int = 0
    last_error: str | None = None
    last_delivery_ms: int | None = None
    route: str | None = None
    """How the last batch went: "direct" or "via RELAY[,RELAY...]"."""


@dataclass(slots=True)
class _InFlight:
    """A batch posted and not yet answered."""

    batch: OutboxBatch
    route: Route | None
    task: asyncio.Task[dict[str, Any]]
    started: float


class _Sender:
    """The loop for one peer."""

    def __init__(self, outbox: Outbox, peer: str) -> None:
        self.peer = peer
        self.outbox = outbox
        self.new_data = asyncio.Event()
        self.retry = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.stats = PeerDelivery()
        self.attempt = 0
        self.acked_through = 0
        """Position of the last row the peer acknowledged: never read again, even while
        its delete is still on the way to disk."""
        self.tail: deque[tuple[int, bytes]] = deque()
        """Rows queued since the last outbox read began (position, wire), when collecting."""
        self.tail_bytes = 0
        self.tail_state = _Tail.OFF

    def offer(self, rows: list[tuple[int, bytes]]) -> None:
        """Rows just committed for this peer (in position order)."""
        if self.tail_state is _Tail.OFF:
            return
        limits = self.outbox.settings
        for pos, wire in rows:
            if (
                (self.tail and pos <= self.tail[-1][0])
                or len(self.tail) >= TAIL_BATCHES * limits.max_batch_count
                or self.tail_bytes + len(wire) > TAIL_BATCHES * limits.max_batch_bytes
            ):
                # Too far behind to keep in memory (or out of order): read the outbox.
                self._forget_tail()
                return
            self.tail.append((pos, wire))
            self.tail_bytes += len(wire)

    def _forget_tail(self) -> None:
        self.tail_state = _Tail.OFF
        self.tail.clear()
        self.tail_bytes = 0

    async def _next_batch(self, after: int) -> OutboxBatch | None:
        """The next batch beyond position `after`: from memory while tailing, else read."""
        settings = self.outbox.settings
        if self.tail_state is _Tail.SERVING:
            return self._from_tail(settings.max_batch_count, settings.max_batch_bytes)
        # Everything offered so far is committed, so the read below finds it; what is
        # committed from now on is offered to the tail.
        self._forget_tail()
        self.tail_state = _Tail.COLLECTING
        batch = await self.outbox.store.outbox_batch(
            self.peer, settings.max_batch_count, settings.max_batch_bytes, after=after
        )
        read_to = batch.last_pos if batch is not None else after
        while self.tail and self.tail[0][0] <= read_to:
            self.tail_bytes -= len(self.tail.popleft()[1])
        if self.tail_state is _Tail.COLLECTING and (batch is None or batch.complete):
            self.tail_state = _Tail.SERVING
        return batch

    def _from_tail(self, max_count: int, max_bytes: int) -> OutboxBatch | None:
        if not self.tail:
            return None
        wires: list[bytes] = []
        total, first, last = 0, self.tail[0][0], 0
        while self.tail and len(wires) < max_count:
            pos, wire = self.tail[0]
            if wires and total + len(wire) > max_bytes:
                break
            self.tail.popleft()
            self.tail_bytes -= len(wire)
            wires.append(wire)
            total += len(wire)
            last = pos
        return OutboxBatch(first_pos=first, last_pos=last, wires=wires)

    def wake(self) -> None:
        self.new_data.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name=f"sender-{self.peer}")
            self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("sender_failed", peer=self.peer, error=repr(task.exception()))

    async def _run(self) -> None:
        in_flight: deque[_InFlight] = deque()
        self._forget_tail()  # a new loop starts from the outbox
        try:
            await self._loop(in_flight)
        finally:
            await cancel_all(flight.task for flight in in_flight)

    async def _loop(self, in_flight: deque[_InFlight]) -> None:
        settings = self.outbox.settings
        after = self.acked_through  # the last row posted (acknowledged or on its way)
        answered = True  # an answer came (or nothing is on its way): fill the window
        while True:
            self.new_data.clear()
            # Keep up to `window` batches on the way: the receiver verifies the next one
            # while it commits this one. Each is acknowledged by its own position range.
            # While one is on its way, a few rows just committed (messages coming one at a
            # time) go at once; many wait for the answer and go as one large batch, which
            # costs the receiver one commit instead of several.
            while len(in_flight) < settings.window and (
                answered or not in_flight or self._few_waiting()
            ):
                try:
                    batch = await self._next_batch(after)
                except StorageError as exc:
                    # The outbox could not be read (a disk error): read again after the
                    # backoff, as a failed post is sent again; the loop goes on.
                    await self._failed(None, exc)
                    self.new_data.set()
                    break
                if batch is None:
                    break
                route = self.outbox.router(self.peer)
                task = asyncio.create_task(self._post(route, batch.wires), name="post-batch")
                task.add_done_callback(self._answered)
                in_flight.append(_InFlight(batch, route, task, time.perf_counter()))
                after = batch.last_pos
            answered = False
            if not in_flight:
                # Nothing queued: sleep until woken. A wake between the read and the
                # wait is not lost, because the flag was cleared before the read.
                await self.new_data.wait()
                continue
            flight = in_flight[0]
            if not flight.task.done():
                if len(in_flight) < settings.window:
                    # Room for another batch: woken by rows just committed (posted at
                    # once if few) or by an answer (the flag is set by both).
                    await self.new_data.wait()
                    continue
                await asyncio.wait((flight.task,))
            in_flight.popleft()
            answered = True
            try:
                answer = flight.task.result()
            except KakehashiError as exc:
                # Everything after it goes again from the oldest row not acknowledged
                # (a later batch that did arrive is dropped there as duplicates).
                await cancel_all(other.task for other in in_flight)
                in_flight.clear()
                self._forget_tail()
                after = self.acked_through
                await self._failed(flight.route, exc)
                continue
            self._delivered(flight, answer)

    async def _failed(self, route: Route | None, exc: KakehashiError) -> None:
        """After a failed post: take a detour at once if one exists, else back off."""
        settings = self.outbox.settings
        if route is not None and not route.direct:
            self.outbox.note_down(route.next_hop)
            detour = self.outbox.router(self.peer)
            if detour is not None and not detour.degraded and detour != route:
                log.info(
                    "route_changed",
                    peer=self.peer,
                    failed=route.next_hop,
                    via=list(detour.relays) or "direct",
                )
                return
        self.attempt += 1
        self.stats.failures += 1
        self.stats.last_error = f"{exc.code}: {exc}"
        delay = settings.backoff.delay(self.attempt, random.random())  # noqa: S311 - jitter
        if self.attempt == 1 or self.attempt % 10 == 0:
            log.warning(
                "delivery_failed",
                peer=self.peer,
                code=exc.code,
                error=str(exc),
                attempt=self.attempt,
                retry_in_s=round(delay, 2),
            )
        self.retry.clear()
        # Not wait_for: on 3.11 it swallows a cancel that races a wake-up.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self.retry.wait()

    def _answered(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.new_data.set()

    def _few_waiting(self) -> bool:
        """Rows committed since the last batch are in memory, and few enough to post
        while another batch is on its way."""
        return self.tail_state is _Tail.SERVING and 0 < len(self.tail) <= EAGER_ROWS

    def _delivered(self, flight: _InFlight, answer: dict[str, Any]) -> None:
        batch, route = flight.batch, flight.route
        self.outbox.store.outbox_ack(self.peer, batch.first_pos, batch.last_pos)
        self.acked_through = batch.last_pos
        if route is not None and not route.direct:
            self.outbox.note_up(route.next_hop)
        self.stats.route = _describe(route)
        self.attempt = 0
        self.stats.delivered += len(batch.wires)
        self.stats.batches += 1
        self.stats.last_error = None
        self.stats.last_delivery_ms = int(time.time() * 1000)
        refused = answer.get("refused") or []
        if refused:
            log.warning("envelopes_refused_by_peer", peer=self.peer, count=len(refused))
        log.debug(
            "batch_delivered",
            peer=self.peer,
            count=len(batch.wires),
            ms=round((time.perf_counter() - flight.started) * 1000, 2),
        )

    async def _post(self, route: Route | None, wires: list[bytes]) -> dict[str, Any]:
        """Post one batch along `route`; the peer's answer."""
        roster = self.outbox.roster()
        if roster.member(self.peer) is None:
            raise TrustError(f"{self.peer} is not in the roster", code="unknown_peer")
        if route is None:
            raise TransportError(
                f"no route to {self.peer}: it is not active, or no relay reaches its segments",
                code="no_route",
            )
        hop = roster.member(route.next_hop)
        if hop is None:
            raise TrustError(f"{route.next_hop} is not in the roster", code="unknown_peer")
        body: dict[str, Any] = {"envelopes": wires}
        path = "/envelopes"
        if not route.direct:
            path, body["to"] = "/relay", self.peer  # framing maps keep sorted keys
        response = await self.outbox.streams.exchange(hop, path, codec.encode_frame(body))
        return codec.decode_map(response.body, canonical=False)


def _describe(route: Route | None) -> str | None:
    if route is None:
        return None
    return "direct" if route.direct else "via " + ",".join(route.relays)


class Outbox:
    """Owns every peer's sender loop."""

    def __init__(
        self,
        *,
        store: RoomStore,
        streams: PeerStreams,
        roster: Callable[[], Roster],
        router: Callable[[str], Route | None],
        settings: DeliverySettings | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.roster = roster
        self.router = router
        self.settings = settings or DeliverySettings()
        self._senders: dict[str, _Sender] = {}
        self._down: set[str] = set()
        self._dropping: set[asyncio.Task[None]] = set()
        self._stopped = False

    @property
    def down(self) -> frozenset[str]:
        """Relays whose last delivery attempt failed (routes avoid them while others exist)."""
        return frozenset(self._down)

    def note_down(self, relay: str) -> None:
        if relay not in self._down:
            self._down.add(relay)
            log.warning("relay_down", relay=relay)

    def note_up(self, relay: str) -> None:
        self._down.discard(relay)

    async def start(self) -> None:
        """Resume delivery of everything left queued by a previous run (and forget what is
        queued for revoked nodes)."""
        for peer in await self.store.outbox_peers():
            if self.roster().revoked(peer):
                await self._drop_queued(peer)
            else:
                self.wake(peer)

    def drop(self, peer: str) -> None:
        """`peer` is revoked, for good: stop its sender and forget what is queued for it.
        (A suspended peer keeps its queue, delivered when it is resumed.)"""
        if self._stopped:
            return
        sender = self._senders.pop(peer, None)
        tasks = [asyncio.create_task(self._drop_queued(peer), name=f"drop-{peer}")]
        if sender is not None and sender.task is not None and not sender.task.done():
            sender.task.cancel()
            tasks.append(sender.task)  # `stop` waits for it to end
        for task in tasks:
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)

    async def _drop_queued(self, peer: str) -> None:
        try:
            count = await self.store.drop_outbox(peer)
        except KakehashiError as exc:  # left for the next start, which drops it again
            log.warning("outbox_drop_failed", peer=peer, code=exc.code, error=str(exc))
            return
        if count:
            log.info("outbox_dropped", peer=peer, envelopes=count, reason="revoked")

    def wake(self, peer: str) -> None:
        if self._stopped:
            return
        sender = self._senders.get(peer)
        if sender is None:
            sender = self._senders[peer] = _Sender(self, peer)
        sender.wake()

    def enqueued(self, queued: Queued) -> None:
        """A commit queued these rows: hand them to their senders and wake them."""
        if self._stopped:
            return
        for peer, rows in queued.items():
            if self.roster().revoked(peer):
                # Planned before the revocation reached this node: never sent.
                self.drop(peer)
                continue
            sender = self._senders.get(peer)
            if sender is None:
                sender = self._senders[peer] = _Sender(self, peer)
            sender.offer(rows)
            sender.wake()

    def retry_now(self, peer: str) -> None:
        """A peer came back: skip the rest of the backoff of every sender waiting on a
        failure (its own, and those of destinations routed through it)."""
        self._down.discard(peer)
        for sender in self._senders.values():
            if sender.attempt:
                sender.retry.set()

    def stats(self, peer: str) -> PeerDelivery | None:
        sender = self._senders.get(peer)
        return sender.stats if sender else None

    async def stop(self) -> None:
        self._stopped = True
        await cancel_all([*(sender.task for sender in self._senders.values()), *self._dropping])
        await self.store.stop_acks()
