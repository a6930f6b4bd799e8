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
the same processing as pushed batches. Each answer says where its page ended in
each room (`through`), so the next page is asked for while this one is verified
and committed.

`recover` is the pass a node restored from a backup runs first with each peer:
it also asks which rooms the peer counts it a member of (`discover`), since the
backup may predate joining some of them, and it reports unreachable peers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from federation import codec
from federation.envelope import check_room_id
from federation.errors import KakehashiError, ProtocolError
from federation.roster import Roster, RosterEntry

from .decoder import Decoded
from .rooms import BATCH_LIMITS, RoomService
from .tasks import cancel_all
from .transport import PeerClient

__all__ = ["CatchUp"]

log = structlog.get_logger("kakehashi.catchup")

PENDING_GRACE = 1.0
"""Seconds envelopes may wait for dependencies before they are pulled from the peer."""
SYNC_ROOMS = 2000
"""Rooms named in one catch-up request at most; more are asked in several passes."""
PAGE_COUNT = 2000
PAGES_AHEAD = 2
"""Pages asked for and decoded ahead of the one being processed, at most: the peer serves
one, the decoding helper decodes another, while this node verifies and commits a third."""
PAGE_BYTES = 4 * 1024 * 1024
ANSWER_LIMITS = codec.Limits(
    max_bytes=BATCH_LIMITS.max_bytes,
    max_depth=3,
    max_array=BATCH_LIMITS.max_array,
    max_bin=BATCH_LIMITS.max_bin,
    max_map=5 * SYNC_ROOMS,
)
"""A catch-up answer: a page of envelopes, and where it went in each of the rooms asked."""


@dataclass(slots=True)
class CatchUpProgress:
    """One pass with one peer, as far as it went."""

    pulled: int = 0
    """Envelopes received in this pass."""
    remaining: int = 0
    """What the peer said this node still lacked after the last page."""
    running: bool = True
    number: int = 0
    """Passes are numbered in the order they start (to tell this one from older ones)."""

    def to_json(self) -> dict[str, object]:
        return {
            "pulled": self.pulled,
            "remaining": self.remaining,
            "running": self.running,
            "number": self.number,
        }


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
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._waiting: dict[str, set[tuple[str, str, int]]] = {}
        """Per peer: the envelopes that waited when its grace period began."""
        self._later: dict[str, asyncio.TimerHandle] = {}
        self.pulled = 0
        self.passes = 0
        self.progress: dict[str, CatchUpProgress] = {}
        """Per peer: the pass running or last run, for `kakehashi catchup --wait`."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="catch-up")

    async def stop(self) -> None:
        for handle in [*self._grace.values(), *self._later.values()]:
            handle.cancel()
        self._grace.clear()
        self._later.clear()
        self._waiting.clear()
        await cancel_all([self._task])
        self._task = None

    def note_push(self, peer: str) -> None:
        """`peer` just pushed us a batch: its own envelopes are flowing already."""
        self._pushed[peer] = asyncio.get_running_loop().time()

    def request(self, peer: str) -> None:
        """Catch up with `peer` soon (it came back, or we hold envelopes waiting on it)."""
        self._wanted.add(peer)
        self._kick.set()

    def request_if_still_waiting(self, peer: str, grace: float = PENDING_GRACE) -> None:
        """Envelopes from `peer` wait for dependencies: catch up if they still wait after
        `grace` seconds. A peer pushing several batches at once often has the missing
        ones on the way already; pulling them at once would fetch everything twice.

        Only the envelopes waiting now count: under a steady stream some envelope is
        almost always waiting a few milliseconds for the batch before it, and pulling
        because of those would fetch the stream a second time, every `grace` seconds."""
        if peer in self._grace:
            return
        self._waiting[peer] = self._rooms.pending_keys()
        loop = asyncio.get_running_loop()
        self._grace[peer] = loop.call_later(grace, self._grace_over, peer)

    def request_later(self, peer: str, delay: float = PENDING_GRACE) -> None:
        """Catch up with `peer` after `delay` seconds (once, however often asked meanwhile):
        it sent envelopes of a room this node learns of from a batch still on the way."""
        if peer in self._later:
            return
        loop = asyncio.get_running_loop()
        self._later[peer] = loop.call_later(delay, self._later_due, peer)

    def _later_due(self, peer: str) -> None:
        self._later.pop(peer, None)
        self.request(peer)

    def _grace_over(self, peer: str) -> None:
        self._grace.pop(peer, None)
        if self._rooms.still_pending(self._waiting.pop(peer, set())):
            self.request(peer)

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
            rooms: list[str] = []
            # A peer on another segment is not asked: we pull from the peers we reach
            # (any holder serves).
            reachable = self._direct is None or peer in self._direct()
            if entry is not None and entry.active and reachable:
                rooms = self._rooms.shares_room_with(peer)
                if entry.relay:
                    # A relay also serves the rooms it only forwards for us (what was sent
                    # to us).
                    rooms = sorted(set(rooms) | set(self._rooms.own_rooms()))
            if entry is None or not rooms:
                self._begin(peer).running = False  # nothing to ask: a pass that is over
                return 0
            total = 0
            for start in range(0, len(rooms), SYNC_ROOMS):
                total += await self._pull(
                    peer, entry, rooms[start : start + SYNC_ROOMS], discover=False
                )
            return total

    def _begin(self, peer: str) -> CatchUpProgress:
        self.passes += 1
        progress = self.progress[peer] = CatchUpProgress(number=self.passes)
        return progress

    async def recover(self, peer: str) -> int:
        """After a restore from backup: pull everything `peer` holds for this node.

        Unlike `sync_with`, it asks `peer` which rooms this node is a member of, so rooms
        joined after the backup are learnt again (nothing else would bring them back: their
        outbox rows were acknowledged before the crash), and it pulls this node's own
        envelopes made after the backup with the rest. It waits for a pass already running
        with `peer` instead of skipping, and raises `KakehashiError` if `peer` cannot be
        reached, so the caller knows which peers it has heard from.
        """
        async with self._running.setdefault(peer, asyncio.Lock()):
            entry = self._roster().member(peer)
            if entry is None or not entry.active:
                return 0
            rooms = self._rooms.shares_room_with(peer)
            return await self._pull(peer, entry, rooms, discover=True)

    async def _pull(
        self, peer: str, entry: RosterEntry, rooms: list[str], *, discover: bool
    ) -> int:
        """Page through `peer`'s envelopes beyond our vectors; lock for `peer` held.

        With `discover`, the first request also asks for the rooms `peer` counts this node
        a member of, and those this node does not know are pulled from their start; and a
        failed request raises instead of ending the pass quietly.
        """
        progress = self._begin(peer)
        try:
            with self._rooms.pulling(peer):  # pushes from the peer meanwhile wait, see `receive`
                return await self._pages(peer, entry, list(rooms), discover, progress)
        finally:
            progress.running = False

    def _vectors(self, rooms: Iterable[str]) -> dict[str, dict[str, int]]:
        return {room: self._rooms.vector(room) for room in rooms}

    async def _ask(
        self, entry: RosterEntry, vectors: dict[str, dict[str, int]], *, discover: bool
    ) -> dict[str, Any]:
        request: dict[str, object] = {"rooms": vectors, "limit": PAGE_COUNT, "through": True}
        if discover:
            request["discover"] = True
        response = await self._client.request(entry, "POST", "/sync", codec.encode(request))
        return codec.decode_map(response.body, ANSWER_LIMITS, canonical=False)

    async def _fetch(
        self,
        entry: RosterEntry,
        vectors: dict[str, dict[str, int]],
        window: asyncio.Semaphore,
        *,
        discover: bool = False,
    ) -> _Page:
        """A page and its envelopes, decoded (on the helper process when large).

        As soon as the answer says where the page ended, the page after it is asked for
        (in a task of its own: `_Page.next`) while this one is decoded, as long as fewer
        than `PAGES_AHEAD` pages are fetched and not yet taken in: one place in `window`
        per page, given back when the page is taken in, or when its fetch fails."""
        await window.acquire()
        following: dict[str, dict[str, int]] | None = None
        after: asyncio.Task[_Page] | None = None
        try:
            answer = await self._ask(entry, vectors, discover=discover)
            wires = answer.get("envelopes") or []
            if not isinstance(wires, list):
                raise ProtocolError("a page's envelopes must be a list", code="bad_answer")
            if answer.get("more") is True and wires and not discover:
                following = _following(vectors, answer.get("through"))
            if following is not None:
                after = asyncio.create_task(
                    self._fetch(entry, following, window), name="catch-up-page"
                )
            decoded = await self._rooms.decode(wires)
        except BaseException:
            window.release()
            await _drop_pages(self._rooms, after)
            raise
        return _Page(answer, wires, decoded, following, after)

    async def _pages(
        self,
        peer: str,
        entry: RosterEntry,
        rooms: list[str],
        discover: bool,
        progress: CatchUpProgress,
    ) -> int:
        total = 0
        asking = discover
        vectors = self._vectors(rooms)
        window = asyncio.Semaphore(PAGES_AHEAD)
        ahead: asyncio.Task[_Page] | None = None
        # The page before, still committing: this one is verified and planned meanwhile
        # (commits are pipelined, in plan order), and awaited before the next is taken in.
        landing: asyncio.Task[int] | None = None
        try:
            while True:
                try:
                    if ahead is not None:
                        page, ahead = await ahead, None
                    else:
                        page = await self._fetch(entry, vectors, window, discover=asking)
                except KakehashiError as exc:
                    if landing is not None:  # the page before is good: let it land
                        total += await landing
                        landing = None
                    if discover:
                        raise
                    log.debug("catch_up_unavailable", peer=peer, code=exc.code)
                    return total
                window.release()
                ahead = page.next
                answer, wires = page.answer, page.wires
                more = answer.get("more") is True
                remaining = answer.get("remaining", 0)
                progress.remaining = remaining if isinstance(remaining, int) else 0
                if wires:
                    previous, landing = (
                        landing,
                        asyncio.create_task(
                            self._take(peer, wires, page.decoded, progress), name="catch-up-receive"
                        ),
                    )
                    if previous is not None:
                        total += await previous
                learnt: list[str] = []
                if asking:
                    asking = False
                    learnt = [
                        room for room in _room_ids(answer.get("member_of")) if room not in rooms
                    ]
                    if learnt:
                        self._rooms.expect(learnt)
                        rooms.extend(learnt)
                        log.info("rooms_rediscovered", peer=peer, rooms=learnt)
                if page.following is not None:
                    vectors = page.following
                    continue
                if landing is not None:
                    total += await landing
                    landing = None
                after = self._vectors(vectors)
                # Pages come in causal order, so each one advances our vectors; if one did
                # not, asking again would return the same page: stop and retry next pass.
                if not learnt and (not more or not wires or after == vectors):
                    break
                vectors = self._vectors(rooms)
        finally:
            if landing is not None:
                await cancel_all([landing])
            await _drop_pages(self._rooms, ahead)
        if total:
            log.info("caught_up", peer=peer, envelopes=total)
        return total

    async def _take(
        self, peer: str, wires: list[bytes], decoded: list[Decoded], progress: CatchUpProgress
    ) -> int:
        """One page processed and committed: how many envelopes it carried."""
        _, _, refused = await self._rooms.receive(peer, wires, decoded=decoded)
        self.pulled += len(wires)
        progress.pulled += len(wires)
        if refused:
            log.warning("catch_up_refusals", peer=peer, count=len(refused))
        return len(wires)


@dataclass(slots=True)
class _Page:
    """A catch-up page, fetched and decoded."""

    answer: dict[str, Any]
    wires: list[bytes]
    decoded: list[Decoded]
    following: dict[str, dict[str, int]] | None
    """The vectors after this page, if the answer said where it ended and there is more."""
    next: asyncio.Task[_Page] | None
    """The page after it, already asked for."""


async def _drop_pages(rooms: RoomService, task: asyncio.Task[_Page] | None) -> None:
    """Cancel a chain of pages fetched ahead, and drop the claims of those already decoded
    (a page cancelled while decoding drops the rest of the chain itself)."""
    while task is not None:
        await cancel_all([task])
        if task.cancelled() or task.exception() is not None:
            return
        page = task.result()
        rooms.release(page.decoded)  # decoded, never received
        task = page.next


def _following(
    vectors: dict[str, dict[str, int]], through: object
) -> dict[str, dict[str, int]] | None:
    """The vectors after a page whose answer says where it went (`through`: room -> origin
    -> highest seq served); None if it does not say so usably, or would not move on."""
    if not isinstance(through, dict):
        return None
    following = {room: dict(vector) for room, vector in vectors.items()}
    moved = False
    for room, served in through.items():
        vector = following.get(room)
        if vector is None or not isinstance(served, dict):
            return None
        for origin, seq in served.items():
            if not isinstance(origin, str) or type(seq) is not int:
                return None
            if seq > vector.get(origin, 0):
                vector[origin] = seq
                moved = True
    return following if moved else None


def _room_ids(value: object) -> list[str]:
    """The room ids of a `member_of` answer; anything malformed is ignored (it is optional)."""
    if not isinstance(value, list):
        return []
    rooms = []
    for room in value:
        try:
            check_room_id(room)
        except KakehashiError:
            continue
        rooms.append(room)
    return rooms
