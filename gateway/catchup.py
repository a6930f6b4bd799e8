"""Anti-entropy: peers compare version vectors per shared room and pull what they lack.

Pushes from origins cover the normal case; this covers everything else: a node
that was down, a link that was cut, a node added to a room later (it receives
the room's whole history), envelopes that arrived before their dependencies.
Since origins sign, any peer that holds an envelope can serve it, so a node pulls
only from peers it reaches directly; a room spanning segments is caught up from
its members on ours (normally the relay at the prefecture).

`CatchUp` owns one background task. It runs a pass with every peer
periodically, and at once for a peer when that peer comes back up or when a
batch left envelopes waiting for dependencies. A pass asks the peer, room by
room, for everything beyond our vectors, page by page, and feeds each page to
the same processing as pushed batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from federation import codec
from federation.errors import KakehashiError
from federation.roster import Roster

from .rooms import BATCH_LIMITS, RoomService
from .tasks import cancel_all
from .transport import PeerClient

__all__ = ["CatchUp"]

log = structlog.get_logger("kakehashi.catchup")

PAGE_COUNT = 2000
PAGE_BYTES = 4 * 1024 * 1024


class CatchUp:
    """Periodic and on-demand catch-up with peers."""

    def __init__(
        self,
        *,
        node_id: str,
        rooms: RoomService,
        client: PeerClient,
        roster: Callable[[], Roster],
        interval: float,
        direct: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self._node_id = node_id
        self._rooms = rooms
        self._client = client
        self._roster = roster
        self._interval = interval
        self._direct = direct
        self._wanted: set[str] = set()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Lock] = {}
        self._pushed: dict[str, float] = {}
        self.pulled = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="catch-up")

    async def stop(self) -> None:
        await cancel_all([self._task])
        self._task = None

    def note_push(self, peer: str) -> None:
        """`peer` just pushed us a batch: its own envelopes are flowing already."""
        self._pushed[peer] = asyncio.get_running_loop().time()

    def request(self, peer: str) -> None:
        """Catch up with `peer` soon (it came back, or we hold envelopes waiting on it)."""
        self._wanted.add(peer)
        self._kick.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            # Not wait_for: on 3.11 it swallows a cancel that races a kick, and stop() hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_full - loop.time())):
                    await self._kick.wait()
            self._kick.clear()
            if loop.time() >= next_full:
                # A routine pass skips a peer that is pushing to us right now: pulling
                # what its sender is delivering would do the same work twice. Explicit
                # requests (a peer came back, dependencies missing) always run.
                quiet_since = loop.time() - 2 * self._interval
                peers = {
                    m.node_id
                    for m in self._roster().members
                    if m.active
                    and m.node_id != self._node_id
                    and self._pushed.get(m.node_id, 0.0) < quiet_since
                }
                next_full = loop.time() + self._interval
            else:
                peers = set()
            peers |= self._wanted
            self._wanted.clear()
            results = await asyncio.gather(
                *(self.sync_with(peer) for peer in sorted(peers)), return_exceptions=True
            )
            for peer, result in zip(sorted(peers), results, strict=True):
                if isinstance(result, BaseException) and not isinstance(result, KakehashiError):
                    log.error("catch_up_failed", peer=peer, error=repr(result))

    async def sync_with(self, peer: str) -> int:
        """Pull what `peer` has beyond our vectors in the rooms we share; returns the count."""
        lock = self._running.setdefault(peer, asyncio.Lock())
        if lock.locked():
            return 0  # a pass with this peer is already running
        async with lock:
            entry = self._roster().member(peer)
            if entry is None or not entry.active:
                return 0
            if self._direct is not None and peer not in self._direct():
                return 0  # on another segment: we pull from peers we reach (any holder serves)
            rooms = self._rooms.shares_room_with(peer)
            if entry.relay:
                # A relay also serves the rooms it only forwards for us (what was sent us).
                rooms = sorted(set(rooms) | set(self._rooms.member_rooms()))
            if not rooms:
                return 0
            total = 0
            while True:
                vectors = {room: self._rooms.vector(room) for room in rooms}
                body = codec.encode({"rooms": vectors, "limit": PAGE_COUNT})
                try:
                    response = await self._client.request(entry, "POST", "/sync", body)
                    answer = codec.decode_map(response.body, BATCH_LIMITS, canonical=False)
                except KakehashiError as exc:
                    log.debug("catch_up_unavailable", peer=peer, code=exc.code)
                    return total
                wires = answer.get("envelopes") or []
                if wires:
                    _, _, refused = await self._rooms.receive(peer, wires)
                    total += len(wires)
                    self.pulled += len(wires)
                    if refused:
                        log.warning("catch_up_refusals", peer=peer, count=len(refused))
                after = {room: self._rooms.vector(room) for room in rooms}
                # Pages come in causal order, so each one advances our vectors; if one did
                # not, asking again would return the same page: stop and retry next pass.
                if not answer.get("more") or not wires or after == vectors:
                    break
            if total:
                log.info("caught_up", peer=peer, envelopes=total)
            return total
