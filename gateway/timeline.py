"""What staff see of a room: messages with their edits, reactions, redactions and 既読.

Envelopes stay the record; this module keeps an index beside them and reads it.

- **Indexing**: `Timeline.on_accepted` is the node's `RoomService.listen` callback.
  It only queues; one worker task (owned here) takes what is queued, looks up the
  envelopes the annotations point at, writes receipt and relation rows in one
  transaction, then hands subscribers (the WebSocket hub) past-tense events, in
  the order the envelopes were accepted. The listener runs after the envelopes'
  commit, so a crash can fall between the two: at start, accepted annotations
  missing from the index are indexed first (`TimelineStore.unindexed`).
- **Rules applied when showing a message** (the room rules, `federation.rooms.judge`,
  already made sure every sender was a member user when they sent): an edit counts
  only from the message's own sender (the edit body schema: "by the same sender");
  a redaction from the sender or a current room admin; a reaction is withdrawn by a
  redaction of the reaction envelope by whoever reacted.
- **既読**: a receipt says its sender has read everything up to a message, in display
  order (hlc, origin, seq); receipts are cumulative, so only each reader's furthest
  message matters for counts (`read_marker`). A message's read count is the number
  of readers other than its sender whose furthest message is at or after it; its
  `read_at` for a reader is the time of that reader's first receipt covering it
  (the receipt's hybrid clock time, so every node shows the same).
- **Announcement board**: per member node, how many of its users in the room (the
  sender excepted) have read each announcement.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from federation.causal import hlc_to_ms
from federation.envelope import Envelope, Kind
from federation.errors import KakehashiError, ProtocolError
from federation.rooms import Role, RoomKind, RoomState

from .tasks import cancel_all
from .timelinestore import Position, ReceiptRow, RelationRow, TargetRow, TimelineStore

if TYPE_CHECKING:
    from .rooms import RoomService
    from .store import Store

__all__ = [
    "BoardEntry",
    "MessageEdited",
    "MessagePosted",
    "MessageRedacted",
    "MessageView",
    "MessagesRead",
    "NodeReads",
    "Page",
    "ReactionChanged",
    "RoomChanged",
    "Subscriber",
    "Timeline",
    "TimelineEvent",
]

log = structlog.get_logger("kakehashi.timeline")

Subscriber = Callable[[Sequence["TimelineEvent"]], Awaitable[None]]
"""Told what each indexed step did; awaited in order by the indexing task."""

_ANNOTATIONS = {Kind.EDIT, Kind.REACTION, Kind.REDACT, Kind.RECEIPT}
_REINDEX_CHUNK = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageView:
    """A message as staff see it now."""

    id: bytes
    """Envelope id."""
    room: str
    """Room id."""
    sender: str
    """`login@node`."""
    position: Position
    """Display order (hlc, origin, seq)."""
    text: str | None
    """The latest text by its sender; None once redacted."""
    format: str
    """plain or markdown."""
    files: tuple[Any, ...]
    """File references as the body carries them (bytes as hex)."""
    edited_at_ms: int | None
    """Unix ms of the edit shown, if edited."""
    redacted: bool
    """Withdrawn by its sender or a room admin."""
    reactions: tuple[tuple[str, tuple[str, ...]], ...]
    """(emoji, users who reacted with it), in order of first use."""
    read_count: int
    """Readers other than the sender who have read it."""

    @property
    def time_ms(self) -> int:
        """Unix ms at which it was sent (its hybrid clock time)."""
        return hlc_to_ms(self.position[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    """Messages oldest first, and the cursors of the neighbouring pages."""

    messages: tuple[MessageView, ...]
    """Oldest first."""
    next_before: bytes | None
    """Id to pass as `before` for older messages; None when there are none."""
    next_after: bytes | None
    """Id to pass as `after` for newer messages (paging forward); None when there are none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeReads:
    """How many of one member node's users in a room have read an announcement."""

    node: str
    """Node id."""
    read: int
    """Its users in the room (the sender excepted) who have read it."""
    members: int
    """Its users in the room, the sender excepted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BoardEntry:
    """One announcement and who has read it, per member node."""

    message: MessageView
    """The announcement."""
    nodes: tuple[NodeReads, ...]
    """Per member node, by node id."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessagePosted:
    """A message was accepted into a room."""

    message: MessageView
    """The message (read count 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageEdited:
    """A message's sender replaced its text."""

    room: str
    """Room id."""
    message_id: bytes
    """The edited message."""
    sender: str
    """Who edited it (its sender)."""
    text: str
    """The new text."""
    at_ms: int
    """When."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRedacted:
    """A message was withdrawn."""

    room: str
    """Room id."""
    message_id: bytes
    """The withdrawn message."""
    sender: str
    """Who withdrew it (its sender or a room admin)."""
    at_ms: int
    """When."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactionChanged:
    """A user reacted to a message, or took a reaction back."""

    room: str
    """Room id."""
    message_id: bytes
    """The message reacted to."""
    sender: str
    """Who reacted."""
    emoji: str
    """The reaction."""
    added: bool
    """True when added, False when taken back."""
    at_ms: int
    """When."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessagesRead:
    """A reader has read a room up to a message."""

    room: str
    """Room id."""
    reader: str
    """`login@node`."""
    message_id: bytes
    """The furthest message read."""
    read_count: int
    """That message's read count now."""
    at_ms: int
    """When the reader read it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomChanged:
    """A room's state changed (name, member nodes, users, roles)."""

    state: RoomState
    """The state now."""
    previous_users: frozenset[str]
    """Users before the change (a removed user is told too)."""


TimelineEvent = (
    MessagePosted | MessageEdited | MessageRedacted | ReactionChanged | MessagesRead | RoomChanged
)


def _position(envelope: Envelope) -> Position:
    content = envelope.content
    return (content.hlc, content.origin, content.seq)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _target_of(envelope: Envelope) -> bytes:
    body = envelope.content.body
    value = body.get("up_to" if envelope.content.kind is Kind.RECEIPT else "target")
    return value if isinstance(value, bytes) else b""


class _Readers:
    """Each reader's furthest position in one room, for counting."""

    def __init__(self, markers: Iterable[tuple[str, Position]]) -> None:
        self.by_reader = dict(markers)
        self._sorted = sorted(self.by_reader.values())

    def count(self, position: Position, sender: str) -> int:
        """Readers other than `sender` at or after `position`."""
        count = len(self._sorted) - bisect.bisect_left(self._sorted, position)
        own = self.by_reader.get(sender)
        return count - 1 if own is not None and own >= position else count


class Timeline:
    """The index and views of every room's timeline at this node (owned by `Node`)."""

    def __init__(self, *, store: Store, rooms: RoomService) -> None:
        self._rows = TimelineStore(store, rooms.store.keys)
        self._rooms = rooms
        self._queue: asyncio.Queue[list[Envelope]] = asyncio.Queue()
        self._subscribers: list[tuple[Subscriber, Callable[[], bool]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._users: dict[str, frozenset[str]] = {}
        self._queued = 0
        self._done = 0
        self._progress = asyncio.Condition()

    @property
    def rows(self) -> TimelineStore:
        return self._rows

    # lifecycle ---------------------------------------------------------------------

    def on_accepted(self, envelopes: list[Envelope]) -> None:
        """`RoomService.listen` callback: queue newly accepted envelopes."""
        self._queued += 1
        self._queue.put_nowait(envelopes)

    def subscribe(self, callback: Subscriber, listening: Callable[[], bool] = lambda: True) -> None:
        """Call `callback` with the events of each indexed step, in order.

        `listening` says whether the subscriber has anyone to pass events to now (the
        staff connections of the client API); while no subscriber has, no events are
        made: a node catching up on 100,000 messages would otherwise build a view of
        each for nobody."""
        self._subscribers.append((callback, listening))

    def unsubscribe(self, callback: Subscriber) -> None:
        self._subscribers = [entry for entry in self._subscribers if entry[0] != callback]

    async def start(self) -> None:
        """Index what a crash left unindexed, then follow newly accepted envelopes."""
        for room in self._rooms.room_ids():
            state = self._rooms.state(room)
            if state is not None:
                self._users[room] = frozenset(state.users)
        indexed = 0
        seen: set[bytes] = set()
        while True:
            envelopes = [
                Envelope.from_bytes(wire) for wire in await self._rows.unindexed(_REINDEX_CHUNK)
            ]
            if not envelopes or all(e.id in seen for e in envelopes):
                break  # (each yields an index row; the check only guards against a loop)
            seen.update(e.id for e in envelopes)
            await self._index(envelopes)
            indexed += len(envelopes)
        if indexed:
            log.info("timeline_reindexed", envelopes=indexed)
        self._worker = asyncio.create_task(self._run(), name="timeline")

    async def stop(self) -> None:
        await cancel_all([self._worker])
        self._worker = None
        async with self._progress:
            self._done = self._queued  # nothing more will be indexed: let waiters go
            self._progress.notify_all()

    async def settled(self) -> None:
        """Return once everything accepted before the call is indexed (read your writes)."""
        target = self._queued
        if self._worker is None:
            return
        async with self._progress:
            await self._progress.wait_for(lambda: self._done >= target)

    async def _run(self) -> None:
        while True:
            batches = [await self._queue.get()]
            while not self._queue.empty():
                batches.append(self._queue.get_nowait())
            envelopes = [envelope for batch in batches for envelope in batch]
            try:
                events = await self._index(envelopes)
            except Exception as exc:
                # Left for the next start to index; the envelopes themselves are safe. The
                # task goes on: readers waiting in `settled` must not wait forever.
                code = exc.code if isinstance(exc, KakehashiError) else type(exc).__name__
                log.error("timeline_index_failed", code=code, error=str(exc))
                events = []
            async with self._progress:
                self._done += len(batches)
                self._progress.notify_all()
            if events:
                for callback, _ in list(self._subscribers):
                    try:
                        await callback(events)
                    except Exception:
                        log.exception("timeline_subscriber_failed")

    # indexing ----------------------------------------------------------------------

    async def _index(self, envelopes: Sequence[Envelope]) -> list[TimelineEvent]:
        """Write the index rows of `envelopes` and return what happened, in order."""
        annotations = [e for e in envelopes if e.content.kind in _ANNOTATIONS]
        targets = await self._rows.targets(_target_of(e) for e in annotations)
        receipts: list[ReceiptRow] = []
        relations: list[RelationRow] = []
        for envelope in annotations:
            content = envelope.content
            target_id = _target_of(envelope)
            target = targets.get(target_id)
            if target is not None and target.room != content.room:
                target = None  # an id from another room points at nothing here
            at_ms = hlc_to_ms(content.hlc)
            if content.kind is Kind.RECEIPT:
                known = target is not None and target.kind == Kind.MESSAGE.value
                receipts.append(
                    ReceiptRow(
                        envelope.id,
                        content.room,
                        content.sender,
                        target_id,
                        target.position if known and target is not None else None,
                        at_ms,
                    )
                )
                continue
            value = content.body.get("text" if content.kind is Kind.EDIT else "emoji", "")
            if content.kind is Kind.REDACT:
                value = content.body.get("reason", "")
            relations.append(
                RelationRow(
                    envelope.id,
                    content.room,
                    target_id,
                    content.kind.value,
                    content.sender,
                    _position(envelope),
                    str(value),
                )
            )
        await self._rows.write(receipts, relations)
        if not any(listening() for _, listening in self._subscribers):
            self._rooms_changed(envelopes)
            return []
        return await self._events(envelopes, targets, relations)

    async def _events(
        self,
        envelopes: Sequence[Envelope],
        targets: dict[bytes, TargetRow],
        relations: Sequence[RelationRow],
    ) -> list[TimelineEvent]:
        withdrawn = {
            r.envelope_id: r
            for r in await self._rows.reactions_by_id(
                r.target for r in relations if r.kind == Kind.REDACT.value
            )
        }
        readers: dict[str, _Readers] = {}
        events: list[TimelineEvent] = []
        for envelope in envelopes:
            content = envelope.content
            at_ms = hlc_to_ms(content.hlc)
            kind = content.kind
            if kind is Kind.MESSAGE:
                events.append(MessagePosted(message=self._plain_view(envelope)))
                continue
            if kind not in _ANNOTATIONS:
                continue
            target = targets.get(_target_of(envelope))
            if target is None or target.room != content.room:
                continue
            if kind is Kind.RECEIPT:
                if target.kind != Kind.MESSAGE.value or not content.sender:
                    continue
                if content.room not in readers:
                    readers[content.room] = _Readers(await self._rows.markers(content.room))
                count = readers[content.room].count(target.position, target.sender)
                events.append(
                    MessagesRead(
                        room=content.room,
                        reader=content.sender,
                        message_id=target.envelope_id,
                        read_count=count,
                        at_ms=at_ms,
                    )
                )
            elif kind is Kind.EDIT:
                if target.kind == Kind.MESSAGE.value and content.sender == target.sender:
                    events.append(
                        MessageEdited(
                            room=content.room,
                            message_id=target.envelope_id,
                            sender=content.sender,
                            text=str(content.body.get("text", "")),
                            at_ms=at_ms,
                        )
                    )
            elif kind is Kind.REACTION:
                if target.kind == Kind.MESSAGE.value:
                    events.append(
                        ReactionChanged(
                            room=content.room,
                            message_id=target.envelope_id,
                            sender=content.sender,
                            emoji=str(content.body.get("emoji", "")),
                            added=True,
                            at_ms=at_ms,
                        )
                    )
            elif target.kind == Kind.MESSAGE.value:
                if self._may_redact(content.room, content.sender, target.sender):
                    events.append(
                        MessageRedacted(
                            room=content.room,
                            message_id=target.envelope_id,
                            sender=content.sender,
                            at_ms=at_ms,
                        )
                    )
            elif target.kind == Kind.REACTION.value:
                reaction = withdrawn.get(target.envelope_id)
                if reaction is not None and reaction.sender == content.sender:
                    events.append(
                        ReactionChanged(
                            room=content.room,
                            message_id=reaction.target,
                            sender=content.sender,
                            emoji=reaction.value,
                            added=False,
                            at_ms=at_ms,
                        )
                    )
        events.extend(self._rooms_changed(envelopes))
        return events

    def _rooms_changed(self, envelopes: Sequence[Envelope]) -> list[RoomChanged]:
        """Each room whose state `envelopes` change, with its users before: kept up to date
        whether anyone listens or not, so the next event says who was in the room."""
        changed: list[str] = []
        for envelope in envelopes:
            room = envelope.content.room
            if envelope.content.kind is Kind.STATE and room not in changed:
                changed.append(room)
        events = []
        for room in changed:
            state = self._rooms.state(room)
            if state is None:
                continue
            previous = self._users.get(room, frozenset())
            self._users[room] = frozenset(state.users)
            events.append(RoomChanged(state=state, previous_users=previous))
        return events

    def _may_redact(self, room: str, redactor: str, sender: str) -> bool:
        if redactor and redactor == sender:
            return True
        state = self._rooms.state(room)
        return bool(redactor) and state is not None and state.role(redactor) is Role.ADMIN

    # views -------------------------------------------------------------------------

    def _plain_view(self, envelope: Envelope, read_count: int = 0) -> MessageView:
        content = envelope.content
        body = content.body
        return MessageView(
            id=envelope.id,
            room=content.room,
            sender=content.sender,
            position=_position(envelope),
            text=str(body.get("text", "")),
            format=str(body.get("format", "plain")),
            files=tuple(_jsonable(body.get("files", []))),
            edited_at_ms=None,
            redacted=False,
            reactions=(),
            read_count=read_count,
        )

    async def views(self, room: str, wires: Sequence[bytes]) -> list[MessageView]:
        """Message envelopes of `room` as staff see them now, in the order given."""
        envelopes = [Envelope.from_bytes(wire) for wire in wires]
        relations = await self._rows.relations(e.id for e in envelopes)
        withdrawals = await self._rows.relations(
            r.envelope_id for r in relations if r.kind == Kind.REACTION.value
        )
        reacted_by = {r.envelope_id: r.sender for r in relations}
        withdrawn = {
            w.target
            for w in withdrawals
            if w.kind == Kind.REDACT.value and reacted_by.get(w.target) == w.sender
        }
        by_target: dict[bytes, list[RelationRow]] = defaultdict(list)
        for relation in relations:
            if relation.room == room:
                by_target[relation.target].append(relation)
        readers = _Readers(await self._rows.markers(room))
        views = []
        for envelope in envelopes:
            view = self._plain_view(
                envelope, readers.count(_position(envelope), envelope.content.sender)
            )
            text, edited, redacted = view.text, None, False
            reactions: dict[str, list[str]] = {}
            for relation in by_target.get(envelope.id, ()):
                if relation.kind == Kind.EDIT.value and relation.sender == view.sender:
                    text, edited = relation.value, hlc_to_ms(relation.position[0])
                elif relation.kind == Kind.REDACT.value and self._may_redact(
                    room, relation.sender, view.sender
                ):
                    redacted = True
                elif (
                    relation.kind == Kind.REACTION.value
                    and relation.envelope_id not in withdrawn
                    and relation.sender not in reactions.setdefault(relation.value, [])
                ):
                    reactions[relation.value].append(relation.sender)
            views.append(
                MessageView(
                    id=view.id,
                    room=view.room,
                    sender=view.sender,
                    position=view.position,
                    text=None if redacted else text,
                    format=view.format,
                    files=() if redacted else view.files,
                    edited_at_ms=edited,
                    redacted=redacted,
                    reactions=tuple(
                        (emoji, tuple(users)) for emoji, users in reactions.items() if users
                    ),
                    read_count=view.read_count,
                )
            )
        return views

    async def page(
        self,
        room: str,
        *,
        limit: int,
        before: bytes | None = None,
        after: bytes | None = None,
    ) -> Page:
        """A page of messages, oldest first: the newest `limit` before the message `before`
        (or the newest of all), or with `after` the oldest `limit` after that message."""
        if before is not None and after is not None:
            raise ProtocolError("give before or after, not both", code="bad_request")
        cursor = before if before is not None else after
        position = None if cursor is None else (await self.message_row(room, cursor)).position
        if after is not None:
            rows = await self._rows.messages(room, limit + 1, after=position)
            more = len(rows) > limit
            rows = rows[:limit]
            views = await self.views(room, [wire for _, wire in rows])
            return Page(
                messages=tuple(views),
                next_before=views[0].id if views else None,
                next_after=views[-1].id if more and views else None,
            )
        rows = await self._rows.messages(room, limit + 1, before=position)
        more = len(rows) > limit
        rows = rows[:limit]
        views = await self.views(room, [wire for _, wire in reversed(rows)])
        newest = rows[0][0] if rows else None
        return Page(
            messages=tuple(views),
            next_before=views[0].id if more and views else None,
            next_after=newest if before is not None else None,
        )

    async def message_row(self, room: str, message_id: bytes) -> TargetRow:
        """The accepted message `message_id` of `room` (its target row); 404 otherwise."""
        found = (await self._rows.targets([message_id])).get(message_id)
        if found is None or found.room != room or found.kind != Kind.MESSAGE.value:
            raise ProtocolError(
                f"no message {message_id.hex()} in {room}", code="unknown_message", status=404
            )
        return found

    async def message(self, room: str, message_id: bytes) -> MessageView:
        """One message as staff see it now; 404 unknown_message."""
        await self.message_row(room, message_id)
        wire = await self._rows.wire(message_id)
        return (await self.views(room, [wire]))[0]

    async def readers(self, room: str, message_id: bytes) -> list[tuple[str, int]]:
        """(reader, read_at ms) of a message, its sender excepted, earliest first."""
        row = await self.message_row(room, message_id)
        return [
            (reader, at)
            for reader, at in await self._rows.readers(room, row.position)
            if reader != row.sender
        ]

    async def unread(self, room: str, user: str) -> int:
        """Messages of others `user` has not read in `room`."""
        marker = await self._rows.marker(room, user)
        return await self._rows.unread(room, user, None if marker is None else marker[1])

    async def read_position(self, room: str, user: str) -> Position | None:
        """The furthest position `user` has read in `room`."""
        marker = await self._rows.marker(room, user)
        return None if marker is None else marker[1]

    async def board(
        self,
        state: RoomState,
        *,
        limit: int,
        before: bytes | None = None,
        after: bytes | None = None,
    ) -> tuple[list[BoardEntry], Page]:
        """Announcements of an announcement room with, per member node, how many of its
        users in the room have read each; paged like `page`."""
        if state.kind is not RoomKind.ANNOUNCEMENT:
            raise ProtocolError(
                f"{state.room} is not an announcement room",
                code="not_announcement_room",
                hint="the board lists the messages of rooms created with kind announcement",
            )
        page = await self.page(state.room, limit=limit, before=before, after=after)
        members = set(state.users)
        readers = _Readers(
            (reader, position)
            for reader, position in await self._rows.markers(state.room)
            if reader in members
        )
        by_node: dict[str, list[str]] = {node: [] for node in state.nodes}
        for user in members:
            by_node.setdefault(user.rpartition("@")[2], []).append(user)
        entries = []
        for message in page.messages:
            counts = []
            for node in sorted(by_node):
                users = [u for u in by_node[node] if u != message.sender]
                read = sum(
                    1
                    for u in users
                    if (mark := readers.by_reader.get(u)) is not None and mark >= message.position
                )
                counts.append(NodeReads(node=node, read=read, members=len(users)))
            entries.append(BoardEntry(message=message, nodes=tuple(counts)))
        return entries, page
