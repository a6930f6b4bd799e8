"""The node's rooms: make envelopes, take them in from peers, keep every room's timeline.

One `RoomService` per node owns the causal buffer, every room's state history
and this node's hybrid logical clock. All processing (local sends and incoming
batches alike) runs under one lock, in three steps: decide in memory with the
pure core (verify, buffer, judge), write everything the step produced in one
transaction (envelope rows, status changes, outbox rows), then wake the senders.
If the write fails, the in-memory state is rebuilt from the database, so memory
never runs ahead of disk; the peer gets no acknowledgement and sends again.

A peer's batch is acknowledged only after that transaction committed; duplicates
are recognised by (room, origin, seq) in the version vector and dropped, which
makes delivery exactly-once at every node. Once dropped, a duplicate's id is compared
with that of the envelope held at its place: a different envelope there is refused and
logged (tampered on the way, or signed twice by its origin: see `_check_repeats`).

A node restored from a backup has forgotten the envelopes it made after the
backup, but its peers have not: making new ones at once would reuse those
sequence numbers with other content (equivocation; peers would drop them as
duplicates). So the node holds local sends (`hold_local`) until a catch-up pass
has brought its own envelopes back (`release_local`, see `Node`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from federation import codec
from federation.causal import (
    CausalBuffer,
    OfferStatus,
    Vector,
    hlc_receive,
    hlc_send,
    hlc_to_ms,
)
from federation.envelope import (
    Content,
    Envelope,
    Kind,
    RootCache,
    check_room_id,
    complete_batches,
    contents_in_series,
    peek_id,
    peek_place,
    room_home,
    seal_batch,
    verify_batch,
)
from federation.errors import KakehashiError, ProtocolError, StorageError, TrustError
from federation.identity import check_node_id
from federation.rooms import (
    MAX_ROOM_NODES,
    RoomHistory,
    RoomKind,
    RoomState,
    Verdict,
    check_body,
    decide_request,
    judge,
)
from federation.roster import MemberStatus, PublishedKey, Roster, RosterEntry
from federation.signing import SigningKey

from .decoder import Decoded, Decoder, decode_here
from .roomstore import EnvelopeRow, PlannedWrite, Queued, RoomStore, Status
from .tasks import cancel_all

if TYPE_CHECKING:
    from .store import Statements, Store

__all__ = ["BATCH_LIMITS", "CommitWriter", "EnvelopeCounts", "Refusal", "RoomService", "Served"]

log = structlog.get_logger("kakehashi.rooms")

# One request carries at most this many envelopes / bytes (senders stay well below).
# max_bin is not MAX_ENVELOPE_BYTES: an oversized envelope must reach `Envelope.from_bytes`
# and be refused alone as envelope_too_large, not fail the whole batch as malformed_msgpack.
BATCH_LIMITS = codec.Limits(
    max_bytes=8 * 1024 * 1024, max_depth=3, max_array=5000, max_bin=8 * 1024 * 1024, max_map=8
)
CLAIM_WAIT = 5.0
"""Longest a batch waits for envelopes another batch claimed to be processed."""
GROUP_COMMIT = 32
"""Steps written in one transaction at most (see `RoomService._write`)."""
COMMIT_SETTLE_SECONDS = 10.0
"""At stop, how long the commits under way are waited for (see `RoomService.settle`)."""


CommitWriter = Callable[[Sequence[Envelope]], "Statements"]
"""The statements writing rows derived from a step's accepted envelopes, run in the
step's transaction."""

_LocalRequest = tuple[str, list[tuple[Kind, dict[str, Any], str]], "asyncio.Future[list[bytes]]"]
"""A waiting local send: room, (kind, body, sender) items, and the caller's future."""


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


def _mark_committing(group: Sequence[_Write]) -> None:
    """On the event loop: the transaction of `group` has reached its COMMIT."""
    for write in group:
        if not write.committing.done():
            write.committing.set_result(None)


def _fail_local(requests: Sequence[_LocalRequest], exc: BaseException) -> None:
    """Fail every caller of a round of local sends not answered yet."""
    for _, _, future in requests:
        if not future.done():
            future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An envelope refused before it reached a timeline, and why."""

    envelope_id: bytes
    code: str
    message: str


@dataclass(slots=True)
class EnvelopeCounts:
    """What this node took in from peers since it started (for metrics)."""

    accepted: Counter[str] = field(default_factory=Counter)
    """Envelopes accepted into a timeline, by the peer that sent them."""
    refused: Counter[str] = field(default_factory=Counter)
    """Envelopes refused (undecodable, bad signature, unknown room, room rules), by reason."""


class _EarlierCommitFailed(Exception):
    """A step planned after a step whose commit failed is not written."""


@dataclass(slots=True)
class _Write:
    """A step's transaction, planned under the lock, written in plan order without it."""

    planned: PlannedWrite | None
    """What to write; None when the step changed nothing (all duplicates)."""
    after: asyncio.Future[None] | None
    """Done when the step planned before this one is committed (or has failed)."""
    done: asyncio.Future[None]
    """Done when this one is."""
    taken: bool = False
    """Taken into a transaction: its own, or that of a step planned before it (see
    `RoomService._write`)."""
    committing: asyncio.Future[None] = field(default_factory=_new_future)
    """Done when the transaction that carries it reaches its COMMIT (see `_flush_local`);
    never, if it fails before."""


@dataclass(slots=True)
class _Step:
    """What one processing step produced, to be written in one transaction."""

    rows: dict[bytes, EnvelopeRow] = field(default_factory=dict)
    outbox: list[tuple[str, Envelope]] = field(default_factory=list)
    queued: Queued = field(default_factory=dict)
    """The outbox rows the commit wrote (positions and wires), for the senders."""
    new_rooms: dict[str, str] = field(default_factory=dict)
    requests: list[Envelope] = field(default_factory=list)
    relayed: list[tuple[Envelope, str]] = field(default_factory=list)
    accepted: list[Envelope] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    duplicates: int = 0
    repeats: list[tuple[tuple[str, str, int], Envelope | bytes]] = field(default_factory=list)
    """Envelopes dropped as duplicates by their place (room, origin, seq), decoded or as
    received, for `RoomService._check_repeats`."""
    recipients: dict[str, tuple[RoomState, list[str]]] = field(default_factory=dict)
    """room -> its state and the nodes that an envelope made here in that state goes to
    (see `RoomService._recipients`)."""


@dataclass(slots=True)
class Served:
    """What catch-up serves a peer in one page."""

    wires: list[bytes] = field(default_factory=list)
    more: bool = False
    """Whether more lay beyond the page."""
    through: dict[str, dict[str, int]] = field(default_factory=dict)
    """room -> origin -> the highest seq served: the peer's vectors once it has the page,
    so it can ask for the next page before it has processed this one."""


def _places(decoded: Sequence[Decoded]) -> list[tuple[str, str, int]]:
    """(room, origin, seq) of each envelope that decoded."""
    return [
        (e.content.room, e.content.origin, e.content.seq)
        for e in decoded
        if not isinstance(e, ProtocolError)
    ]


_REASONS = {
    Verdict.ORIGIN_NOT_MEMBER: "this node is not a member of the room",
    Verdict.SENDER_NOT_MEMBER: "the sender is not a member of the room",
    Verdict.NOT_ALLOWED_TO_POST: "only the room's admins post in an announcement room",
    Verdict.UNKNOWN_ROOM: "this node does not know the room",
    Verdict.BAD_STATE_CHANGE: f"a room spans at most {MAX_ROOM_NODES} nodes",
}
"""What a refusal of a local send tells its caller, beside the verdict's code."""


def _refusal(verdict: Verdict, made: Sequence[Content]) -> TrustError:
    """Why a local send is refused. `judge` keeps only the verdict; for a bad body, the
    rule it breaks is found again here, off the path of accepted sends."""
    reason = _REASONS.get(verdict, verdict.value)
    if verdict is Verdict.BAD_BODY:
        for content in made:
            try:
                creation = content.kind is Kind.STATE and content.seq == 1  # as `judge` does
                check_body(content.kind, content.body, creation=creation)
            except ProtocolError as exc:
                reason = str(exc)
                break
    return TrustError(f"refused by the room's rules: {reason}", code=verdict.value)


def _report_unawaited(task: asyncio.Task[None]) -> None:
    """A commit whose caller was cancelled meanwhile: its failure is logged here."""
    error = None if task.cancelled() else task.exception()
    if error is not None:
        code = error.code if isinstance(error, KakehashiError) else "internal_error"
        log.warning("room_commit_failed", caller="cancelled", code=code, error=str(error))


class RoomService:
    """Rooms of one node."""

    def __init__(
        self,
        *,
        node_id: str,
        store: Store,
        signing_key: SigningKey,
        roster: Callable[[], Roster],
        clock: Callable[[], float],
        on_enqueued: Callable[[Queued], None],
        decoder: Decoder | None = None,
    ) -> None:
        self.node_id = node_id
        self._decoder = decoder if decoder is not None else Decoder(use_helper=False)
        self._store = store
        self._rooms = RoomStore(store)
        self._key = signing_key
        self._roster = roster
        self._clock = clock
        self._on_enqueued = on_enqueued
        self._lock = asyncio.Lock()
        self._roots = RootCache()
        self._buffer = CausalBuffer()
        self._histories: dict[str, RoomHistory] = {}
        self._homes: dict[str, str] = {}
        self._hlc = 0
        self._listeners: list[Callable[[list[Envelope]], None]] = []
        self._writers: list[CommitWriter] = []
        self._local_queue: list[_LocalRequest] = []
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._commits: set[asyncio.Task[None]] = set()
        """Steps committing (see `_commit`): waited for, not cancelled, at stop."""
        self._settling: set[asyncio.Task[None]] = set()
        """Rounds of local sends waiting for their commit (see `_flush_local`)."""
        self._unanswered: list[Envelope] = []
        self.counts = EnvelopeCounts()
        self.audit_refusal: Callable[..., None] | None = None
        """Where a refusal that is evidence against a member node is recorded (the node's
        audit log, `AuditLog.refused`, once it runs): a reason, then fields."""
        self._answered: set[bytes] = set()
        self._repeating: set[str] = set()
        """Peers whose last batch held duplicates (see `receive`)."""
        self._claims: set[tuple[str, str, int]] = set()
        """(room, origin, seq) being decoded from a batch of a repeating peer."""
        self._unclaimed = asyncio.Event()
        self._last_write: asyncio.Future[None] | None = None
        """Done when the last step planned is committed (see `_write`)."""
        self._unwritten: deque[_Write] = deque()
        """Steps planned and not yet taken into a transaction, in plan order."""
        self._pulls: dict[str, asyncio.Event] = {}
        """Peers catch-up is pulling from: set when the pull ends."""
        self._expected: set[str] = set()
        # Set while local sends may go ahead; cleared only after a restore (`hold_local`).
        self._local_open = asyncio.Event()
        self._local_open.set()

    @property
    def store(self) -> RoomStore:
        return self._rooms

    @property
    def signing_key(self) -> SigningKey:
        return self._key

    async def set_signing_key(self, key: SigningKey) -> None:
        """Sign from now on with `key` (after a rotation); batches being sealed finish first."""
        async with self._lock:
            self._key = key

    # loading -------------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild vectors, room histories, pending envelopes and the clock from storage."""
        await self._rooms.load_positions()
        self._buffer = CausalBuffer(await self._rooms.vectors())
        self._histories = {}
        self._homes = dict(await self._rooms.rooms())
        answered: set[bytes] = set()
        for room in self._homes:
            history = RoomHistory()
            for wire in await self._rooms.state_envelopes(room):
                envelope = Envelope.from_bytes(wire)
                verdict, state = judge(history, envelope.content)
                if verdict is Verdict.ACCEPTED and state is not None:
                    history.add(state)
                    answered.update(envelope.content.body.get("answers", []))
            self._histories[room] = history
        # State requests to rooms we are home of, accepted but never answered: the node
        # stopped between committing one and answering it. `resume` answers them.
        self._unanswered = [
            envelope
            for envelope in map(Envelope.from_bytes, await self._rooms.state_requests(self.node_id))
            if envelope.id not in answered
        ]
        self._answered = answered
        pending = [Envelope.from_bytes(wire) for wire in await self._rooms.pending()]
        for envelope in pending:
            # Stored pending envelopes wait again; none can be ready, or it would
            # have been processed before it was written.
            self._buffer.offer(envelope)
        highest, own = await self._rooms.max_hlc(self.node_id)
        # Never below our own last timestamp; others' only as far as `hlc_receive` follows.
        self._hlc = max(own, hlc_receive(0, highest, self._now_ms()))

    def resume(self) -> None:
        """Answer the state requests a previous run committed but did not answer."""
        unanswered, self._unanswered = self._unanswered, []
        for request in unanswered:
            log.info(
                "state_request_resumed", room=request.content.room, origin=request.content.origin
            )
            self._in_background(self._answer_request(request), "state-request")

    def hold_local(self) -> None:
        """Refuse local sends (`catching_up`) until `release_local`: this node was restored
        from a backup and may not know the sequence numbers it used after it."""
        self._local_open.clear()

    def release_local(self) -> None:
        """Allow local sends again; state-request answers held meanwhile go ahead."""
        self._local_open.set()

    @property
    def catching_up(self) -> bool:
        """True while local sends are held after a restore."""
        return not self._local_open.is_set()

    def require_caught_up(self) -> None:
        """`ProtocolError` `catching_up` (HTTP 503) while local sends are held."""
        if not self._local_open.is_set():
            raise ProtocolError(
                "this node was restored from a backup and is catching up with its peers "
                "before it sends anything new",
                code="catching_up",
                status=503,
                hint="retry in a few seconds; `kakehashi status` shows catching_up",
            )

    def expect(self, rooms: Iterable[str]) -> None:
        """Admit envelopes of `rooms`, which a peer counts this node a member of although
        this node does not know them (it was restored from a backup made before it joined).
        Signatures and room rules still apply to every envelope."""
        self._expected.update(rooms)

    def listen(self, callback: Callable[[list[Envelope]], None]) -> None:
        """Call `callback` with newly accepted envelopes after each committed step."""
        self._listeners.append(callback)

    def write_with(self, writer: CommitWriter) -> None:
        """Have `writer` add its own rows for the envelopes each step accepts, inside that
        step's transaction: what it derives is committed with the envelopes or not at all
        (e.g. the file references of messages, see `gateway.files`)."""
        self._writers.append(writer)

    # views ------------------------------------------------------------------------

    def state(self, room: str) -> RoomState | None:
        history = self._histories.get(room)
        return history.current if history else None

    def vector(self, room: str) -> dict[str, int]:
        return self._buffer.vector(room)

    def room_ids(self) -> list[str]:
        return sorted(set(self._homes) | set(self._buffer.rooms()))

    def pending_count(self) -> int:
        return self._buffer.pending_count()

    def pending_keys(self) -> set[tuple[str, str, int]]:
        """(room, origin, seq) of the envelopes waiting for dependencies now."""
        return self._buffer.pending_keys()

    def still_pending(self, keys: set[tuple[str, str, int]]) -> bool:
        """Whether any of `keys` still waits for dependencies."""
        return self._buffer.any_pending(keys)

    def own_rooms(self) -> list[str]:
        """Rooms this node is a member node of."""
        return [
            room
            for room in self.room_ids()
            if (state := self.state(room)) is not None and self.node_id in state.nodes
        ]

    def member_rooms(self, peer: str) -> list[str]:
        """Rooms whose current state lists `peer` as a member node."""
        rooms = []
        for room in self.room_ids():
            state = self.state(room)
            if state is not None and peer in state.nodes:
                rooms.append(room)
        return rooms

    def shares_room_with(self, peer: str) -> list[str]:
        """Rooms in which `peer` is a member node (or whose home it is)."""
        rooms = []
        for room in self.room_ids():
            state = self.state(room)
            if (state is not None and peer in state.nodes) or room_home(room) == peer:
                rooms.append(room)
        return rooms

    # local commands -----------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _contents(
        self,
        room: str,
        items: Sequence[tuple[Kind, dict[str, Any], str]],
        first_seq: int,
        others: Vector,
    ) -> list[Content]:
        """New envelopes' contents, made at one moment: seqs from `first_seq` on, each
        stamped by the node's clock. `others`: their dependencies on the other origins (the
        room's vector without this node), the same for every envelope of one batch."""
        now_ms = self._now_ms()
        hlcs = []
        for _ in items:
            self._hlc = hlc_send(self._hlc, now_ms)
            hlcs.append(self._hlc)
        return contents_in_series(
            room=room,
            origin=self.node_id,
            key_id=self._key.key_id,
            first_seq=first_seq,
            others=others,
            hlcs=hlcs,
            items=items,
        )

    async def create(
        self,
        name: str,
        *,
        nodes: Sequence[str] = (),
        kind: RoomKind = RoomKind.STANDARD,
        topic: str = "",
        admins: Sequence[str] = (),
        members: Sequence[str] = (),
    ) -> str:
        """Create a room with this node as home; returns its id. `admins` and `members`
        are its first users (`login@node`), with those roles."""
        self.require_caught_up()
        for node in nodes:
            self.require_addable(node)
        room = f"!{secrets.token_urlsafe(12).replace('-', 'x').replace('_', 'y')}:{self.node_id}"
        check_room_id(room)
        body: dict[str, Any] = {
            "name": name,
            "add_nodes": sorted(set(nodes) | {self.node_id}),
        }
        if topic:
            body["topic"] = topic
        if kind is not RoomKind.STANDARD:
            body["room_kind"] = kind.value
        users = {user: "member" for user in members} | {user: "admin" for user in admins}
        if users:
            body["set_users"] = dict(sorted(users.items()))
        await self._originate(room, [(Kind.STATE, body, "")])
        log.info("room_created", room=room, name=name, nodes=body["add_nodes"])
        return room

    async def send(self, room: str, texts: Sequence[str], *, sender: str = "") -> list[bytes]:
        """Send messages (one envelope each, sealed as one batch); returns their ids."""
        self.require_caught_up()
        self._require_member(room)
        items: list[tuple[Kind, dict[str, Any], str]] = [
            (Kind.MESSAGE, {"text": text}, sender) for text in texts
        ]
        return await self._originate(room, items)

    async def post(self, room: str, kind: Kind, body: dict[str, Any], *, sender: str = "") -> bytes:
        """Send one envelope of any kind but state changes (edits, reactions, receipts, ...)."""
        if kind in (Kind.STATE, Kind.STATE_REQUEST):
            raise ProtocolError("state changes go through RoomService.change", code="bad_request")
        self.require_caught_up()
        self._require_member(room)
        return (await self._originate(room, [(kind, body, sender)]))[0]

    async def change(self, room: str, body: dict[str, Any], *, sender: str = "") -> str:
        """Change a room's state: directly at the home node, by request to it elsewhere.

        Returns "changed" or "requested". Refused (room_home_revoked) when the home node
        is revoked: nothing is sent to it any more, so a request would never be decided.
        """
        self.require_caught_up()
        self._require_member(room)
        home = room_home(room)
        if home != self.node_id and self._roster().revoked(home):
            raise TrustError(
                f"the home node of {room}, {home}, is revoked: the room's name, topic and "
                "members can no longer change",
                code="room_home_revoked",
                hint="messages still reach its other member nodes; for other members, "
                "create a new room",
            )
        kind = Kind.STATE if home == self.node_id else Kind.STATE_REQUEST
        await self._originate(room, [(kind, body, sender)])
        return "changed" if kind is Kind.STATE else "requested"

    async def invite(self, room: str, node_id: str) -> str:
        """Add a node to a room: directly at the home node, by request elsewhere."""
        self.require_addable(node_id)
        result = await self.change(room, {"add_nodes": [node_id]})
        return "added" if result == "changed" else "requested"

    async def remove_node(self, room: str, node_id: str) -> str:
        """Take `node_id` out of `room`, with its users: the home node removes any node
        but itself; another node only itself (leave), by request to the home.

        Returns "removed" or "requested". The removed node keeps the history it holds
        and receives nothing sent after the change."""
        check_node_id(node_id)
        state = self._require_member(room)
        if node_id not in state.nodes:
            raise ProtocolError(
                f"{node_id!r} is not a member node of {room}", code="not_in_room", status=404
            )
        if node_id == state.home:
            raise ProtocolError(
                f"{node_id!r} is the room's home node: it cannot leave or be removed",
                code="home_node_stays",
            )
        if state.home != self.node_id and node_id != self.node_id:
            raise TrustError(
                f"only the room's home node {state.home} removes other nodes from it",
                code="not_room_home",
                hint=f"run this on {state.home}; here, only {self.node_id} itself can leave",
            )
        result = await self.change(room, {"remove_nodes": [node_id]})
        log.info("room_node_removed", room=room, node=node_id, result=result)
        return "removed" if result == "changed" else "requested"

    def remove_revoked(self) -> None:
        """In the background: take revoked nodes out of the rooms this node is home of
        (a revoked node never comes back; left in, it would count among the towns that
        have not read an announcement). Run at start and when a roster revokes a node;
        waits while local sends are held (see `hold_local`)."""
        self._in_background(self._remove_revoked(), "remove-revoked")

    async def _remove_revoked(self) -> None:
        await self._local_open.wait()
        roster = self._roster()
        for room in self.room_ids():
            state = self.state(room)
            if state is None or state.home != self.node_id:
                continue
            gone = sorted(node for node in state.nodes if roster.revoked(node))
            if gone:
                await self._originate(room, [(Kind.STATE, {"remove_nodes": gone}, "")])
                log.info("revoked_nodes_removed", room=room, nodes=gone)

    def require_addable(self, node: str) -> None:
        """`node` may be made a member of a room: in the federation, and not revoked (a
        suspended node may, and receives the room when it is resumed)."""
        check_node_id(node)
        entry = self._roster().member(node)
        if entry is None:
            raise TrustError(f"{node!r} is not a member of the federation", code="unknown_peer")
        if entry.status is MemberStatus.REVOKED:
            raise TrustError(
                f"{node!r} is revoked: it can no longer be added to a room", code="peer_revoked"
            )

    def _require_member(self, room: str) -> RoomState:
        check_room_id(room)
        state = self.state(room)
        if state is None:
            raise ProtocolError(f"this node knows no room {room}", code="unknown_room", status=404)
        if self.node_id not in state.nodes:
            raise TrustError(f"this node is not a member of {room}", code="not_a_member")
        return state

    async def _originate(
        self, room: str, items: Sequence[tuple[Kind, dict[str, Any], str]]
    ) -> list[bytes]:
        """Seal and commit envelopes made here. Concurrent calls share one transaction
        (group commit): under many small sends, one fsync serves them all."""
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._local_queue.append((room, list(items), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_local(), name="local-commit")
        return await future

    async def _flush_local(self) -> None:
        """Plan the waiting local sends round after round; each round is committed and
        answered by a task of its own (`_settle_local`).

        The next round is planned once this one's transaction reaches its COMMIT: the
        log write and its fsync, a third of the transaction's time, hold no interpreter
        lock, so sealing the next round fits there. Planned any earlier, while the
        statements are being stepped, the sealing and the statements contend for the
        interpreter lock and both take longer (docs/benchmarks.md, twenty-third round).
        As for received batches, memory then runs ahead of disk by a step, commits happen
        in plan order (`_write`), and if this commit fails the round planned after it
        fails unwritten and memory is rebuilt from disk."""
        while self._local_queue:
            requests, self._local_queue = self._local_queue, []
            step = _Step()
            planned: list[tuple[asyncio.Future[list[bytes]], list[bytes]]] = []
            try:
                async with self._lock:
                    by_room: dict[str, list[_LocalRequest]] = {}
                    for request in requests:
                        by_room.setdefault(request[0], []).append(request)
                    for room, group in by_room.items():
                        try:
                            planned.extend(self._plan_local(room, group, step))
                        except KakehashiError as exc:
                            # Refused before anything entered memory (e.g. too large
                            # to seal): this room's callers fail, the others go on.
                            _fail_local(group, exc)
                    write = self._plan(step)
            except BaseException as exc:
                _fail_local(requests, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            task = asyncio.create_task(
                self._settle_local(write, step, requests, planned), name="local-settle"
            )
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            await asyncio.wait((task, write.committing), return_when=asyncio.FIRST_COMPLETED)

    async def _settle_local(
        self,
        write: _Write,
        step: _Step,
        requests: list[_LocalRequest],
        planned: list[tuple[asyncio.Future[list[bytes]], list[bytes]]],
    ) -> None:
        """Commit one round of local sends and answer its callers."""
        try:
            await self._commit(write, step)
        except BaseException as exc:
            # Every caller of this round gets the failure, including those whose
            # envelopes were not planned (e.g. a message too large to seal).
            _fail_local(requests, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for future, ids in planned:
            if not future.done():
                future.set_result(ids)

    def _plan_local(
        self, room: str, group: Sequence[_LocalRequest], step: _Step
    ) -> list[tuple[asyncio.Future[list[bytes]], list[bytes]]]:
        """Make, check and seal the envelopes of every waiting call for one room, as one
        signing batch (one signature however many calls), into the shared step. Lock held.

        The room's rules are applied before anything enters the causal buffer, so a
        refused call fails alone and changes nothing; the others go ahead.
        """
        history = self._histories.get(room)
        vector = self._buffer.vector(room)
        seq = vector.pop(self.node_id, 0)
        others = {origin: s for origin, s in vector.items() if s > 0}
        contents: list[Content] = []
        spans: list[tuple[asyncio.Future[list[bytes]], int, int]] = []
        for _, items, future in group:
            if future.done():
                continue  # its caller stopped waiting (cancelled) before it was planned: not sent
            made = self._contents(room, items, seq + 1, others)
            verdicts = [judge(history, content)[0] for content in made]
            refused = next((v for v in verdicts if v is not Verdict.ACCEPTED), None)
            if refused is not None:
                future.set_exception(_refusal(refused, made))
                continue
            spans.append((future, len(contents), len(contents) + len(made)))
            contents.extend(made)
            seq += len(made)
        if not contents:
            return []
        try:
            envelopes = seal_batch(contents, self._key)
        except ProtocolError as exc:
            if exc.code != "envelope_too_large" or len(spans) == 1:
                raise
            # A message too large to seal must fail its own call only, not the calls that
            # happened to share its signing batch: plan them one by one (rare; nothing of
            # this round has entered memory yet).
            return self._plan_local_each(room, group, step)
        if room_home(room) == self.node_id and room not in self._homes:
            step.new_rooms[room] = self.node_id
        self._process(envelopes, step, local=True)
        return [
            (future, [envelope.id for envelope in envelopes[start:end]])
            for future, start, end in spans
        ]

    def _plan_local_each(
        self, room: str, group: Sequence[_LocalRequest], step: _Step
    ) -> list[tuple[asyncio.Future[list[bytes]], list[bytes]]]:
        """`_plan_local` for each call of `group` alone; a call that fails gets its error."""
        planned: list[tuple[asyncio.Future[list[bytes]], list[bytes]]] = []
        for request in group:
            future = request[2]
            if future.done():  # refused by the room's rules already, or its caller is gone
                continue
            try:
                planned.extend(self._plan_local(room, [request], step))
            except KakehashiError as exc:
                future.set_exception(exc)
        return planned

    # from peers ---------------------------------------------------------------------

    def _signer(
        self,
        envelope: Envelope,
        roster: Roster,
        known: dict[tuple[str, str], tuple[RosterEntry, PublishedKey]],
    ) -> tuple[bytes, RosterEntry | None]:
        """The public key that must have signed `envelope`, and the origin's entry if it
        signed after the origin was suspended or revoked (see `_vouched`); `TrustError` if
        no key may have signed it. `known` remembers, for one batch, the member and key of
        each (origin, key id)."""
        content = envelope.content
        found = known.get((content.origin, content.key_id))
        if found is None:
            member = roster.member(content.origin)
            if member is None:
                raise TrustError(
                    f"origin {content.origin!r} is not a federation member", code="unknown_origin"
                )
            published = member.signing_key(content.key_id)
            if published is None:
                raise TrustError(
                    f"origin {content.origin!r} has no key {content.key_id}", code="unknown_key"
                )
            found = known[(content.origin, content.key_id)] = (member, published)
        member, key = found
        signed_at = hlc_to_ms(content.hlc) // 1000
        if not key.valid_at(signed_at):
            raise TrustError(
                "envelope signed outside its key's validity window", code="key_not_valid"
            )
        if member.status is not MemberStatus.ACTIVE and signed_at >= member.status_since:
            return key.public_key, member
        return key.public_key, None

    def _vouched(
        self,
        late: Sequence[tuple[Envelope, bytes, RosterEntry]],
        accepted: Sequence[Envelope],
        refused: list[Refusal],
    ) -> list[Envelope]:
        """Of envelopes signed after their origin was suspended or revoked, those an
        envelope of another origin depends on (verified, in this batch or waiting in the
        buffer); the others go to `refused`.

        A node that had not yet adopted the roster that suspended or revoked the origin
        took such an envelope in, and its own next envelope depends on it. Refusing it
        here would leave everything that node sends waiting for it, for good. On its own,
        such an envelope is refused."""
        depended: dict[tuple[str, str], int] = {}
        for envelope in accepted:
            content = envelope.content
            for origin, seq in content.deps.items():
                if origin != content.origin and seq > depended.get((content.room, origin), 0):
                    depended[(content.room, origin)] = seq
        kept: list[tuple[Envelope, bytes]] = []
        for envelope, key, member in late:
            content = envelope.content
            wanted = max(
                depended.get((content.room, content.origin), 0),
                self._buffer.depended_on(content.room, content.origin),
            )
            if wanted >= content.seq:
                kept.append((envelope, key))
            else:
                refused.append(
                    Refusal(
                        envelope.id,
                        f"origin_{member.status.value}",
                        f"origin {content.origin!r} was {member.status.value} when this was signed",
                    )
                )
        verified = self._verify_signatures(kept, refused)
        vouched = [envelope for envelope, _ in kept if envelope.id in verified]
        for envelope in vouched:
            log.info(
                "late_envelope_vouched",
                room=envelope.content.room,
                origin=envelope.content.origin,
                seq=envelope.content.seq,
            )
        return vouched

    def _verify_signatures(
        self, candidates: Sequence[tuple[Envelope, bytes]], refused: list[Refusal]
    ) -> set[bytes]:
        """Ids whose batch signature and inclusion path verify; the others go to `refused`.

        Whole signing batches (the usual push) are checked with one tree build each;
        anything else, and any envelope a whole-batch check singles out, one by one.
        """
        keys = {envelope.id: key for envelope, key in candidates}
        whole, rest = complete_batches([envelope for envelope, _ in candidates])
        verified: set[bytes] = set()
        for batch in whole:
            key = keys[batch[0].id]
            if any(keys[e.id] != key for e in batch):
                rest.extend(batch)  # one signing batch has one signer; check each alone
                continue
            try:
                bad = set(verify_batch(self._roots, batch, key))
            except TrustError:
                rest.extend(batch)
                continue
            for envelope in batch:
                if envelope.id in bad:
                    rest.append(envelope)
                else:
                    verified.add(envelope.id)
        for envelope in rest:
            try:
                self._roots.verify(envelope, keys[envelope.id])
            except KakehashiError as exc:
                refused.append(Refusal(envelope.id, exc.code, str(exc)))
                continue
            verified.add(envelope.id)
        return verified

    def _admissible_room(self, content: Content) -> bool:
        """A room we know, or the state envelope by which its home adds us to it."""
        if content.room in self._homes or self._buffer.vector(content.room):
            return True
        if content.room in self._expected:
            return True
        if self._buffer.pending_count(content.room):
            return True
        return (
            content.kind is Kind.STATE
            and content.origin == room_home(content.room)
            and self.node_id in content.body.get("add_nodes", [])
        )

    def _verified(
        self, peer: str, decoded: Sequence[Decoded], *, relaying: bool = False
    ) -> tuple[list[Envelope], list[Refusal]]:
        """Check the origin signatures of `decoded` envelopes (refusing those that did not
        decode): (verified envelopes, refusals, logged).

        Taking in (not `relaying`), an envelope for a room this node is not in is refused;
        a relay forwards those too, for it only vouches for the origin's signature.
        """
        roster = self._roster()
        signers: dict[tuple[str, str], tuple[RosterEntry, PublishedKey]] = {}
        candidates: list[tuple[Envelope, bytes]] = []
        late: list[tuple[Envelope, bytes, RosterEntry]] = []
        refused: list[Refusal] = []
        for envelope in decoded:
            if isinstance(envelope, ProtocolError):
                refused.append(Refusal(b"", envelope.code, str(envelope)))
                continue
            try:
                key, inactive = self._signer(envelope, roster, signers)
            except KakehashiError as exc:
                refused.append(Refusal(envelope.id, exc.code, str(exc)))
                continue
            if inactive is None:
                candidates.append((envelope, key))
            else:
                late.append((envelope, key, inactive))
        verified = self._verify_signatures(candidates, refused)
        accepted = [envelope for envelope, _ in candidates if envelope.id in verified]
        if late:
            accepted += self._vouched(late, accepted, refused)
        if not relaying:
            accepted = self._in_known_rooms(accepted, refused)
        for refusal in refused:
            log.warning(
                "relay_refused" if relaying else "envelope_refused",
                peer=peer,
                envelope_id=refusal.envelope_id.hex()[:16],
                reason=refusal.code,
                message=refusal.message,
            )
        return accepted, refused

    def _in_known_rooms(self, envelopes: list[Envelope], refused: list[Refusal]) -> list[Envelope]:
        """The envelopes of rooms this node is in or is being added to; others refused.

        A verified state envelope by which a room's home adds this node makes the room's
        other envelopes welcome at once: in the same batch, and in a batch checked before
        that state is processed (a sender has two batches on the way, and the second can
        be checked first)."""
        for envelope in envelopes:
            content = envelope.content
            if (
                content.kind is Kind.STATE
                and content.origin == room_home(content.room)
                and self.node_id in content.body.get("add_nodes", [])
            ):
                self._expected.add(content.room)
        kept = []
        for envelope in envelopes:
            if self._admissible_room(envelope.content):
                kept.append(envelope)
            else:
                room = envelope.content.room
                refused.append(Refusal(envelope.id, "unknown_room", f"unknown room {room}"))
        return kept

    async def decode(self, wires: Sequence[bytes]) -> list[Decoded]:
        """Decode a batch ahead of `receive` (on the helper process when large, see
        `Decoder`), so that decoding the next batch overlaps processing this one. For
        catch-up pages: the node serving them is nearly idle, so a core is free. Pushes are
        decoded in `receive`: the sending node is busy too, and a helper competing with
        both for the cores cost 15% of the two-node throughput.

        The places of its envelopes are claimed (a push of the same envelopes meanwhile is
        set aside, see `receive`) until `receive` or `release` is given the result."""
        decoded = await self._decoder.decode(wires)
        self._claims.update(_places(decoded))
        return decoded

    def release(self, decoded: Sequence[Decoded]) -> None:
        """Drop the claims of a batch `decode` gave that will not be received."""
        self._unclaim(_places(decoded))

    @contextlib.contextmanager
    def pulling(self, peer: str) -> Iterator[None]:
        """While catch-up pulls from `peer`: a push from `peer` waits for the pull to end
        (at most CLAIM_WAIT), then sets aside what the pull brought (see `receive`)."""
        ended = self._pulls.setdefault(peer, asyncio.Event())
        try:
            yield
        finally:
            if self._pulls.get(peer) is ended:
                del self._pulls[peer]
            ended.set()

    async def _pull_ended(self, peer: str) -> bool:
        """If catch-up is pulling from `peer`, wait for it to end (at most CLAIM_WAIT): True."""
        ended = self._pulls.get(peer)
        if ended is None:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), CLAIM_WAIT)
        return True

    def _unclaim(self, places: Iterable[tuple[str, str, int]]) -> None:
        self._claims.difference_update(places)
        self._unclaimed.set()  # wakes the batches waiting in `_settled`
        self._unclaimed = asyncio.Event()

    async def _settled(self, places: Sequence[tuple[str, str, int]]) -> None:
        """Wait until none of `places` is claimed (at most CLAIM_WAIT seconds: a claim
        is only a hint, and what is still missing then is decoded here)."""
        deadline = asyncio.get_running_loop().time() + CLAIM_WAIT
        while any(place in self._claims for place in places):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unclaimed.wait(), remaining)

    async def receive(
        self, peer: str, wires: Sequence[bytes], *, decoded: Sequence[Decoded] | None = None
    ) -> tuple[int, int, list[Refusal]]:
        """Process a batch from `peer`: returns (accepted, duplicates, refusals), after commit.
        `decoded`: what `decode` gave for `wires`, if it was called ahead.

        While a peer's batches repeat what this node holds (its outbox pushing what
        catch-up already pulled, after an outage), or while catch-up has claimed places
        (pages decoded ahead), envelopes whose place is already processed or claimed are
        set aside before the full decode, the costly part; they would be dropped as
        duplicates after it anyway. A batch waits for the claims it ran into to be
        settled, so that it finds those envelopes processed: after an outage the outbox
        and catch-up carry the same envelopes at the same time, and each would otherwise
        decode all of them."""
        held: list[tuple[bytes, tuple[str, str, int]]] = []
        claimed: list[tuple[str, str, int]] = []
        decoded_ahead = decoded
        if decoded is None:
            pulled = await self._pull_ended(peer)
            if pulled or self._claims or peer in self._repeating:
                wires, held, claimed = self._set_aside_held(wires)
        try:
            if decoded is None:
                decoded = decode_here(wires)
            accepted, refused = self._verified(peer, decoded)
            step = _Step(refused=refused)
            if held:
                await self._settled([place for _, place in held])
            async with self._lock:
                if held:
                    # Set aside as processed (memory runs ahead of disk while a commit is
                    # under way; not now, the lock is ours) or as on its way in another
                    # batch. If that commit failed, or the other batch is not in yet, it
                    # goes the full way here.
                    again: list[bytes] = []
                    for wire, place in held:
                        if self._buffer.seen(*place):
                            step.repeats.append((place, wire))
                        else:
                            again.append(wire)
                    if again:
                        more, more_refused = self._verified(peer, decode_here(again))
                        accepted += more
                        step.refused += more_refused
                    step.duplicates += len(held) - len(again)
                self._take_in(accepted, step)
                write = self._plan(step)
            await self._commit(write, step)
        finally:
            self._unclaim(claimed)
            if decoded_ahead is not None:
                self.release(decoded_ahead)
        await self._check_repeats(peer, step)  # with the claims released: only a read
        if step.duplicates:
            self._repeating.add(peer)
        else:
            self._repeating.discard(peer)
        self._count(peer, step)
        return len(step.accepted), step.duplicates, step.refused

    def _set_aside_held(
        self, wires: Sequence[bytes]
    ) -> tuple[list[bytes], list[tuple[bytes, tuple[str, str, int]]], list[tuple[str, str, int]]]:
        """Split `wires` into those to decode and those whose claimed place is processed or
        being decoded from another batch (a push and a catch-up page carrying the same
        envelopes at once); the places of the first are claimed until this batch is in."""
        rest: list[bytes] = []
        held: list[tuple[bytes, tuple[str, str, int]]] = []
        claimed: list[tuple[str, str, int]] = []
        for wire in wires:
            place = peek_place(wire)
            if place is not None and (place in self._claims or self._buffer.seen(*place)):
                held.append((wire, place))
            else:
                rest.append(wire)
                if place is not None:
                    claimed.append(place)
        self._claims.update(claimed)
        return rest, held, claimed

    async def relay(
        self, peer: str, destination: str, wires: Sequence[bytes]
    ) -> tuple[int, list[Refusal]]:
        """As a relay: keep and queue for `destination` every envelope whose origin
        signature verifies; returns (queued, refusals), after commit.

        Forged or tampered envelopes are refused here and never forwarded. Envelopes of
        rooms this node is a member of are also taken in as usual (so it serves them in
        catch-up); those of other rooms are kept apart, only to be forwarded.
        """
        decoded, refused = self._verified(peer, decode_here(wires), relaying=True)
        step = _Step(refused=refused)
        mine: list[Envelope] = []
        async with self._lock:
            for envelope in decoded:
                if self._admissible_room(envelope.content):
                    mine.append(envelope)
                else:
                    step.relayed.append((envelope, destination))
            self._take_in(mine, step)
            step.outbox.extend((destination, envelope) for envelope in decoded)
            write = self._plan(step)
        await self._commit(write, step)
        await self._check_repeats(peer, step)
        self._count(peer, step)
        return len(decoded), step.refused

    def _count(self, peer: str, step: _Step) -> None:
        """After commit: what `peer`'s batch brought, for metrics."""
        if step.accepted:
            self.counts.accepted[peer] += len(step.accepted)
        self.counts.refused.update(refusal.code for refusal in step.refused)

    async def _check_repeats(self, peer: str, step: _Step) -> None:
        """Of the envelopes `step` dropped as duplicates by their place, refuse (and log)
        those that are not the envelope this node holds at that place; they were never
        applied. After the step committed: whichever step wrote the envelopes at those
        places, they are durable by then, and read back by their unique key.

        A copy whose content was changed on the way fails its origin's signature and is
        refused as any tampered envelope is. One that verifies is a second envelope its
        origin signed for the same place (equivocation: a node restored from an old backup
        that did not wait for catch-up, or one that misbehaves). Nodes that took the other
        one first show a different timeline there, so that is logged as an error
        (`envelope_equivocation`), refused with the code `equivocation`, and recorded in
        the audit log against the origin (`audit_refusal`).

        Free while nothing repeats; after an outage, when a peer's outbox pushes what
        catch-up already pulled, one hash and one indexed lookup per repeat. If that
        lookup fails, the repeats are logged as not checked (`repeats_not_checked`)."""
        repeats = step.repeats
        if not repeats:
            return
        ids = [item.id if isinstance(item, Envelope) else peek_id(item) for _, item in repeats]
        try:
            held = await self._rooms.ids_at(place for place, _ in repeats)
        except StorageError as exc:
            # The step is committed and nothing it dropped was applied: the batch is
            # answered as it is, rather than sent again and again for a check.
            log.warning(
                "repeats_not_checked", peer=peer, count=len(repeats), code=exc.code, error=str(exc)
            )
            return
        differing = [
            (place, item)
            for (place, item), envelope_id in zip(repeats, ids, strict=True)
            if envelope_id is not None and held.get(place, envelope_id) != envelope_id
        ]
        if not differing:
            return
        step.duplicates -= len(differing)
        signed = [item for _, item in differing if isinstance(item, Envelope)]
        wires = [item for _, item in differing if not isinstance(item, Envelope)]
        if wires:
            accepted, refused = self._verified(peer, decode_here(wires))  # refusals logged
            step.refused += refused
            signed += accepted
        for envelope in signed:
            content = envelope.content
            held_id = held[(content.room, content.origin, content.seq)].hex()[:16]
            message = (
                f"{content.origin} signed another envelope for seq {content.seq} of "
                f"{content.room}: this node holds {held_id}"
            )
            if self.audit_refusal is not None:
                self.audit_refusal("equivocation", peer=content.origin, message=message)
            log.error(
                "envelope_equivocation",
                reason="equivocation",
                peer=peer,
                room=content.room,
                origin=content.origin,
                seq=content.seq,
                envelope_id=envelope.id.hex()[:16],
                held_id=held_id,
            )
            step.refused.append(Refusal(envelope.id, "equivocation", message))

    def _take_in(self, decoded: Sequence[Envelope], step: _Step) -> None:
        """Advance the clock past, note the rooms of, and process envelopes from a peer."""
        now_ms = self._now_ms()
        for envelope in decoded:
            self._hlc = hlc_receive(self._hlc, envelope.content.hlc, now_ms)
            if envelope.content.room not in self._homes:
                step.new_rooms[envelope.content.room] = room_home(envelope.content.room)
        self._process(decoded, step, local=False)

    # the processing step ----------------------------------------------------------

    def _process(self, envelopes: Sequence[Envelope], step: _Step, *, local: bool) -> None:
        """Offer, judge and plan writes in memory. Nothing is written here."""
        for envelope in envelopes:
            offer = self._buffer.offer(envelope)
            if offer.status is OfferStatus.DUPLICATE:
                step.duplicates += 1
                content = envelope.content
                step.repeats.append(((content.room, content.origin, content.seq), envelope))
                continue
            if offer.status is OfferStatus.BUFFERED:
                step.rows[envelope.id] = EnvelopeRow(envelope, Status.PENDING)
                continue
            for ready in offer.ready:
                self._decide(ready, step, local=local and ready is envelope)

    def _decide(self, envelope: Envelope, step: _Step, *, local: bool) -> None:
        """Apply one envelope whose dependencies are processed. `local`: made here by
        `_plan_local`, which judged it already."""
        content = envelope.content
        history = self._histories.get(content.room)
        previous = history.current if history else None
        if local and content.kind is not Kind.STATE:
            # Accepted by `_plan_local` a moment ago. Only a state envelope's verdict
            # depends on the room's current state; any other's depends on the state its
            # dependencies name, which is applied and cannot change.
            verdict, new_state = Verdict.ACCEPTED, None
        else:
            verdict, new_state = judge(history, content)
        if verdict is not Verdict.ACCEPTED:
            step.rows[envelope.id] = EnvelopeRow(envelope, Status.REJECTED, verdict.value)
            step.refused.append(Refusal(envelope.id, verdict.value, f"refused: {verdict.value}"))
            log.warning(
                "envelope_rejected",
                room=content.room,
                origin=content.origin,
                seq=content.seq,
                reason=verdict.value,
            )
            if local and previous is not None:
                # Our own refused envelope still fills its seq: every member must see it
                # (and refuse it alike), or they would wait for that seq forever.
                for peer in self._recipients(previous, None, step):
                    step.outbox.append((peer, envelope))
            return
        step.rows[envelope.id] = EnvelopeRow(envelope, Status.ACCEPTED, None)
        step.accepted.append(envelope)
        if content.kind is Kind.STATE:
            self._answered.update(content.body.get("answers", []))
        if new_state is not None:
            if history is None:
                history = self._histories[content.room] = RoomHistory()
            history.add(new_state)
            step.new_rooms.setdefault(content.room, room_home(content.room))
        if local:
            outbox = step.outbox
            for peer in self._recipients(previous, new_state, step):
                outbox.append((peer, envelope))
        if content.kind is Kind.STATE_REQUEST and room_home(content.room) == self.node_id:
            step.requests.append(envelope)

    def _recipients(
        self, previous: RoomState | None, new_state: RoomState | None, step: _Step
    ) -> list[str]:
        """The nodes an envelope made here goes to: every member node, of the new state
        and, for a state change, of the old one too (so a removed node learns it); never
        a revoked one (revoked for good: nothing more is sent to it). Remembered for the
        step while the room's state stays the same object: the roster does not change
        while a step is planned, and a batch of messages has one list of recipients."""
        if new_state is None and previous is not None:
            known = step.recipients.get(previous.room)
            if known is not None and known[0] is previous:
                return known[1]
        members = set(new_state.nodes if new_state else (previous.nodes if previous else ()))
        if new_state is not None and previous is not None:
            members |= previous.nodes
        roster = self._roster()
        peers = [peer for peer in sorted(members - {self.node_id}) if not roster.revoked(peer)]
        if new_state is None and previous is not None:
            step.recipients[previous.room] = (previous, peers)
        return peers

    def _plan(self, step: _Step) -> _Write:
        """Lock held: the step's transaction, to be written after the one planned before
        it (see `_write`)."""
        planned = None
        if step.rows or step.new_rooms or step.outbox:
            planned = self._rooms.plan_write(
                step.rows.values(),
                step.outbox,
                step.new_rooms.items(),
                self._now_ms(),
                step.relayed,
            )
            if step.accepted:
                for writer in self._writers:
                    planned.statements.extend(writer(step.accepted))
            self._homes.update(step.new_rooms)
        write = _Write(planned, self._last_write, asyncio.get_running_loop().create_future())
        self._last_write = write.done
        self._unwritten.append(write)
        return write

    async def _commit(self, write: _Write, step: _Step) -> None:
        """Commit a planned step (`_write`), then hand what it committed on (`_after`):
        to the senders, the listeners, the home node's answers.

        Once planned, a step is in memory and in the chain of commits, so it is carried
        through even if its caller is cancelled (a node stopping while a batch commits,
        a catch-up pass given up): the caller stops waiting, the commit goes on. A
        commit cut off halfway would leave memory ahead of disk, and every step planned
        after it chained to a failure (failing with commit_failed until a restart)."""
        task = asyncio.create_task(self._write_and_hand_on(write, step), name="room-commit")
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(_report_unawaited)  # no caller left to report it
            raise

    async def _write_and_hand_on(self, write: _Write, step: _Step) -> None:
        await self._write(write, step)
        await self._after(step)

    async def _write(self, write: _Write, step: _Step) -> None:
        """Lock released: commit the step once the step planned before it is committed.

        So the next step is processed while this one commits (memory runs ahead of
        disk by the steps planned and not yet written), and transactions still commit in
        the order their steps changed memory. When this returns, the step and every
        step before it are durable: a duplicate is acknowledged only once the envelope
        it repeats is. If a commit fails, the steps planned after it fail unwritten and
        memory is rebuilt from disk once, by the step that failed.

        Group commit: a step whose turn comes writes, in the same transaction, the steps
        planned after it meanwhile (at most `GROUP_COMMIT` in all), so that under load
        steps queued behind a commit share the next one and its fsync instead of each
        waiting for all the commits before its own. Each is still done in plan order."""
        try:
            if write.after is not None:
                # Shielded: cancelling this wait must not cancel the step before it.
                await asyncio.shield(write.after)
            if not write.taken:
                group: list[_Write] = []
                while self._unwritten and len(group) < GROUP_COMMIT:
                    taken = self._unwritten.popleft()
                    taken.taken = True
                    group.append(taken)
                statements = [
                    statement
                    for taken in group
                    if taken.planned is not None
                    for statement in taken.planned.statements
                ]
                if statements:
                    loop = asyncio.get_running_loop()
                    await self._store.write_all(
                        statements,
                        committing=lambda: loop.call_soon_threadsafe(_mark_committing, group),
                    )
        except BaseException as exc:
            earlier = isinstance(exc, _EarlierCommitFailed)
            write.done.set_exception(
                exc if earlier else _EarlierCommitFailed("an earlier commit failed")
            )
            write.done.exception()  # retrieved: nothing may be chained after it
            if earlier:
                raise StorageError(
                    "not written: an earlier commit of this node failed; send again",
                    code="commit_failed",
                ) from exc
            if not isinstance(exc, asyncio.CancelledError):
                async with self._lock:
                    await self.load()  # memory must not run ahead of disk
                    # Every step planned after this one waits on it and fails unwritten.
                    self._last_write = None
                    self._unwritten.clear()
            raise
        if write.planned is not None:
            step.queued = write.planned.queued
            self._rooms.step_committed(write.planned.acks_through, write.planned.keys_flushed)
        write.done.set_result(None)

    async def _after(self, step: _Step) -> None:
        if step.queued:
            self._on_enqueued(step.queued)
        if step.accepted:
            for callback in self._listeners:
                callback(step.accepted)
        for request in step.requests:
            # Answered in a task of its own: the answer is itself a local send, which
            # must not wait on the commit queue from inside the commit queue.
            self._in_background(self._answer_request(request), "state-request")

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in a task this service owns (cancelled on `stop`, failure logged)."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("room_task_failed", task=task.get_name(), error=repr(task.exception()))

    async def settle(self) -> None:
        """Wait for the steps committing to be written (see `_commit`); after
        `COMMIT_SETTLE_SECONDS` (a disk that hangs), cancel those still waiting."""
        if not self._commits:
            return
        _, pending = await asyncio.wait(set(self._commits), timeout=COMMIT_SETTLE_SECONDS)
        if pending:
            log.warning("room_commits_abandoned", count=len(pending))
            await cancel_all(pending)

    async def stop(self) -> None:
        """Cancel background work (state-request answers, the commit queue) and wait for
        the commits under way (`settle`)."""
        await cancel_all([*self._tasks, self._flusher, *self._settling])
        self._tasks.clear()
        await self.settle()
        await self._decoder.stop()

    async def _answer_request(self, request: Envelope) -> None:
        """At the home node: grant a member's state request by issuing the state change."""
        await self._local_open.wait()  # an answer is a local send too (see `hold_local`)
        if request.id in self._answered:
            return  # after a restore: answered before the disk died, the answer came back
        state = self.state(request.content.room)
        if state is None:
            return
        body = decide_request(state, request.content)
        if body is not None and any(
            self._roster().revoked(node) for node in body.get("add_nodes", [])
        ):
            body = None  # a revoked node never comes back (see `require_addable`)
        if body is None:
            log.info(
                "state_request_denied", room=request.content.room, origin=request.content.origin
            )
            return
        # The change names the request it grants, so after a restart only requests no
        # change has answered are answered again (see `load` and `resume`).
        body["answers"] = [request.id]
        await self._originate(request.content.room, [(Kind.STATE, body, "")])
        log.info("state_request_granted", room=request.content.room, origin=request.content.origin)

    # catch-up (serving side) ------------------------------------------------------

    async def backlog_for(self, peer: str, vectors: dict[str, dict[str, int]]) -> int:
        """How many envelopes of its rooms `peer` lacks against its `vectors` (an estimate
        for progress: what this node holds beyond them)."""
        total = 0
        for room, vector in vectors.items():
            state = self.state(room)
            if state is not None and peer in state.nodes:
                held = self._buffer.vector(room)
                total += sum(max(0, top - vector.get(origin, 0)) for origin, top in held.items())
        return total

    async def missing_for(
        self, peer: str, vectors: dict[str, dict[str, int]], limit: int, max_bytes: int
    ) -> Served:
        """Envelopes of the requested rooms beyond the peer's vectors: of rooms it is a
        member of, and, in rooms this node only relays, what was addressed to it."""
        served = Served()
        for room, vector in sorted(vectors.items()):
            state = self.state(room)
            budget = limit - len(served.wires)
            if budget <= 0:
                served.more = True
                return served
            room_bytes = max_bytes - sum(len(w) for w in served.wires)
            if state is None:
                # Not a member: as a relay, serve the copies the origins addressed to this
                # peer (and only those: nothing it was not sent already).
                check_room_id(room)
                page = await self._rooms.relayed_after(room, peer, vector, budget, room_bytes)
            elif peer not in state.nodes:
                continue  # never serve a room to a node that is not (or no longer) a member
            else:
                page = await self._rooms.processed_after(
                    room, vector, budget, room_bytes, held=self._buffer.vector(room)
                )
            served.wires.extend(page.wires)
            served.more = served.more or page.more
            if page.through:
                served.through[room] = page.through
        return served
