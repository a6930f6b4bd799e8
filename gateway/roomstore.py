"""Rooms, envelopes and per-peer outboxes in the node's SQLite database.

Every envelope a node holds is one row: its wire bytes, its place (room, origin,
seq, hlc) and its status: pending (waiting for dependencies), accepted (in the
timeline) or rejected (processed, refused by the room rules, kept for audit).
Accepted and rejected envelopes both count as processed, which is what version
vectors describe.

The outbox is one table for all peers, ordered by an autoincrement position: a
sender reads its peer's oldest rows, and deletes them only after the peer has
acknowledged the batch, which it does only after committing it. So an envelope
stays queued across crashes until its receiver has it. Every queued envelope has a
position of its own, but one row stands for a run of them (`count`): envelopes of
one room and origin with consecutive seqs, queued for one peer by one commit, at
consecutive positions up to the row's `pos`. A node's own messages to a peer are then
one row per commit, not one each, and so is their delete; an acknowledgement that
ends inside a run shortens it (`_ACK_STATEMENTS`).

A relay that is not a member of a room keeps what it forwards for that room in
`relayed` (verified, never part of a timeline), and in `relayed_to` which node
each was addressed to; outbox rows point at either table (at an envelope by its
place, at a relayed copy by its id). It serves those copies in catch-up, each only
to a node the origin addressed it to.

Envelopes are found by id through `EnvelopeKeys` (gateway/envelopekeys.py), not
through an index on the table that every commit would write into.

All writes of one processing step (envelope rows, status changes, outbox rows)
happen in one transaction: a crash leaves the step wholly done or not at all.
"""

from __future__ import annotations

import asyncio
import heapq
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, cast

import structlog

from federation.envelope import Envelope
from federation.errors import KakehashiError

from .envelopekeys import EnvelopeKeys, Place
from .store import Store
from .tasks import cancel_all

__all__ = ["EnvelopeRow", "OutboxBatch", "Page", "PlannedWrite", "Queued", "RoomStore", "Status"]

log = structlog.get_logger("kakehashi.store")

ACK_DELAY = 0.2
"""Seconds acknowledged outbox rows wait for a commit to take their delete along."""


class Status(IntEnum):
    """Where an envelope stands at this node."""

    PENDING = 0
    ACCEPTED = 1
    REJECTED = 2


@dataclass(frozen=True, slots=True)
class EnvelopeRow:
    """An envelope to write, with its status and the verdict that set it."""

    envelope: Envelope
    status: Status
    verdict: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxBatch:
    """The oldest queued envelopes for one peer."""

    first_pos: int
    """Position of the first row read."""
    last_pos: int
    """Position of the last row read; acknowledging deletes first_pos..last_pos."""
    wires: list[bytes]
    """Wire bytes of the envelopes, oldest first."""
    complete: bool = False
    """Nothing else was queued for the peer beyond `last_pos` when it was read."""


@dataclass(frozen=True, slots=True)
class Page:
    """Envelopes of one room served in catch-up, in hlc order."""

    wires: list[bytes]
    more: bool
    """Whether more lay beyond what fitted."""
    through: dict[str, int]
    """origin -> the highest seq served: each origin's envelopes are served in seq order
    from just after the asker's vector, so this is where the next page starts."""


Queued = dict[str, list[tuple[int, bytes]]]
"""What one commit put in the outboxes: peer -> [(position, wire)], in position order."""


class PlannedWrite(NamedTuple):
    """The statements of one processing step, planned by `RoomStore.plan_write`."""

    statements: list[tuple[str, Sequence[Sequence[object]]]]
    """For one transaction (`Store.write_all`)."""
    queued: Queued
    """The outbox rows it writes, by peer: for the senders once committed."""
    acks_through: int
    """For `step_committed`: the acknowledged ranges it deletes."""
    keys_flushed: bool = False
    """For `step_committed`: whether it indexes the envelopes' ids."""


class RoomStore:
    """SQL for rooms, envelopes and outboxes, over the node's `Store`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._acks: list[tuple[str, int, int]] = []
        """Acknowledged outbox ranges (peer, first, last) not deleted yet."""
        self._ack_task: asyncio.Task[None] | None = None
        self._acks_gone = 0
        """How many acknowledged ranges were dropped from the front of `_acks` so far:
        `_acks[i]` is range number `_acks_gone + i` (the counting `plan_write` and
        `step_committed` use, with several steps planned ahead of their commits)."""
        self._last_pos: int | None = None
        """The highest outbox position used (read at the first write)."""
        self.keys = EnvelopeKeys()
        """Where each envelope is, by id."""

    # loading ------------------------------------------------------------------

    async def rooms(self) -> list[tuple[str, str]]:
        """(room id, home) of every room this node takes part in."""
        rows = await self._store.read_all("SELECT room_id, home FROM room ORDER BY room_id")
        return [(row[0], row[1]) for row in rows]

    async def vectors(self) -> dict[str, dict[str, int]]:
        """room -> origin -> highest processed seq (processed prefixes have no gaps)."""
        vectors: dict[str, dict[str, int]] = {}
        for room, origin, seq in await self._store.read_all(
            "SELECT room_id, origin, MAX(seq) FROM envelope WHERE status != 0 "
            "GROUP BY room_id, origin"
        ):
            vectors.setdefault(room, {})[origin] = seq
        return vectors

    async def state_envelopes(self, room: str) -> list[bytes]:
        """Accepted state envelopes of a room, in home order, to rebuild its history."""
        rows = await self._store.read_all(
            "SELECT wire FROM envelope INDEXED BY envelope_others WHERE room_id = ? "
            "AND status = 1 AND kind != 'message' AND kind = 'state' ORDER BY seq",
            (room,),
        )
        return [bytes(row[0]) for row in rows]

    async def state_requests(self, home: str) -> list[bytes]:
        """Accepted state requests to the rooms whose home is `home`, oldest first."""
        rows = await self._store.read_all(
            "SELECT e.wire FROM room r JOIN envelope e INDEXED BY envelope_others "
            "ON e.room_id = r.room_id WHERE r.home = ? AND e.status = 1 "
            "AND e.kind != 'message' AND e.kind = 'state-request' ORDER BY e.hlc",
            (home,),
        )
        return [bytes(row[0]) for row in rows]

    async def pending(self) -> list[bytes]:
        """Envelopes stored but still waiting for dependencies."""
        rows = await self._store.read_all(
            "SELECT wire FROM envelope INDEXED BY envelope_pending WHERE status = 0 ORDER BY hlc"
        )
        return [bytes(row[0]) for row in rows]

    async def max_hlc(self, origin: str) -> tuple[int, int]:
        """The highest timestamp stored, and the highest of `origin`'s (0 if none)."""
        query = (
            "SELECT COALESCE(MAX(hlc), 0), COALESCE(MAX(CASE WHEN origin = ? THEN hlc END), 0) "
            "FROM envelope"
        )
        row = await self._store.read_one(query, (origin,))
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # writing -----------------------------------------------------------------

    async def load_positions(self) -> None:
        """Read the highest outbox position used and where the envelopes not indexed by
        id are (at start, before any `plan_write`; again after a failed commit)."""
        await self.keys.load(self._store)
        row = await self._store.read_one(
            "SELECT MAX(p) FROM (SELECT MAX(pos) AS p FROM outbox "
            "UNION ALL SELECT seq FROM sqlite_sequence WHERE name = 'outbox')"
        )
        highest = int(row[0]) if row and row[0] is not None else 0
        self._last_pos = max(self._last_pos or 0, highest)

    def plan_write(
        self,
        rows: Iterable[EnvelopeRow],
        outbox: Iterable[tuple[str, Envelope]],
        new_rooms: Iterable[tuple[str, str]],
        now_ms: int,
        relayed: Iterable[tuple[Envelope, str]] = (),
    ) -> PlannedWrite:
        """The statements of one processing step, for one transaction (`Store.write_all`):
        envelope rows (insert or status update), copies kept only to forward (`relayed`:
        envelope and destination), outbox rows (peer and envelope), rooms, and the deletes
        of acknowledged outbox rows; with the outbox rows, for the senders once committed.

        Outbox positions are given here, in order, above any used before (the table's
        AUTOINCREMENT sequence included), so they grow in commit order (gaps are left by
        steps that fail, which is harmless)."""
        if self._last_pos is None:
            raise RuntimeError("load_positions() must run before the first write")
        relayed = list(relayed)
        queued, outbox_rows = self._plan_outbox(outbox, {e.id for e, _ in relayed}, now_ms)
        rows = list(rows)
        note = self.keys.note
        for row in rows:
            content = row.envelope.content
            note(row.envelope.id, content.room, content.origin, content.seq)
        statements: list[tuple[str, Sequence[Sequence[object]]]] = [
            (
                "INSERT INTO relayed (id, room_id, origin, seq, hlc, wire, received_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [
                    (
                        e.id,
                        e.content.room,
                        e.content.origin,
                        e.content.seq,
                        e.content.hlc,
                        e.to_bytes(),
                        now_ms,
                    )
                    for e, _ in relayed
                ],
            ),
            (
                "INSERT INTO relayed_to (destination, envelope_id) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING",
                [(destination, e.id) for e, destination in relayed],
            ),
            (
                "INSERT INTO room (room_id, home, joined_at) VALUES (?, ?, ?) "
                "ON CONFLICT (room_id) DO NOTHING",
                [(room, home, now_ms) for room, home in new_rooms],
            ),
            (
                "INSERT INTO envelope (id, room_id, origin, seq, kind, sender, hlc, wire, "
                "status, verdict, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (room_id, origin, seq) DO UPDATE SET status = excluded.status, "
                "verdict = excluded.verdict WHERE envelope.id = excluded.id",
                [
                    (
                        row.envelope.id,
                        row.envelope.content.room,
                        row.envelope.content.origin,
                        row.envelope.content.seq,
                        row.envelope.content.kind.value,
                        row.envelope.content.sender,
                        row.envelope.content.hlc,
                        row.envelope.to_bytes(),
                        int(row.status),
                        row.verdict,
                        now_ms,
                    )
                    for row in rows
                ],
            ),
            (
                "INSERT INTO outbox (pos, peer, envelope_id, room_id, origin, seq, enqueued_ms, "
                "count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                outbox_rows,
            ),
            # Acknowledged rows go with this transaction (see `outbox_ack`), dropped from
            # memory once it committed (`step_committed`).
            *_ack_statements(self._acks),
        ]
        flush = self.keys.plan_flush()
        statements.extend(flush)
        return PlannedWrite(statements, queued, self._acks_gone + len(self._acks), bool(flush))

    def _plan_outbox(
        self, outbox: Iterable[tuple[str, Envelope]], relayed: set[bytes], now_ms: int
    ) -> tuple[Queued, list[list[object]]]:
        """Positions for the envelopes queued by one step, and the outbox rows that hold
        them: each peer's envelopes at consecutive positions, in the order given, and
        runs of one room and origin with consecutive seqs in one row (a relayed copy,
        found by its id, always alone)."""
        by_peer: dict[str, list[Envelope]] = {}
        for peer, envelope in outbox:
            by_peer.setdefault(peer, []).append(envelope)
        queued: Queued = {}
        rows: list[list[object]] = []
        pos = cast(int, self._last_pos)
        for peer, envelopes in by_peer.items():
            wires: list[tuple[int, bytes]] = []
            queued[peer] = wires
            row: list[object] = []
            room, origin, next_seq = "", "", -1
            for envelope in envelopes:
                pos += 1
                wires.append((pos, envelope.to_bytes()))
                content = envelope.content
                if (
                    content.seq == next_seq
                    and content.room == room
                    and content.origin == origin
                    and envelope.id not in relayed
                ):
                    row[0] = pos
                    row[2] = b""  # a run's envelopes are found by seq, never by id
                    row[7] = cast(int, row[7]) + 1
                    next_seq += 1
                    continue
                room, origin = content.room, content.origin
                row = [pos, peer, envelope.id, room, origin, content.seq, now_ms, 1]
                rows.append(row)
                # A relayed copy ends its row, so nothing follows it in one.
                next_seq = -1 if envelope.id in relayed else content.seq + 1
        self._last_pos = pos
        return queued, rows

    # outbox --------------------------------------------------------------------

    async def outbox_batch(
        self, peer: str, max_count: int, max_bytes: int, *, after: int = 0
    ) -> OutboxBatch | None:
        """The oldest envelopes queued for `peer` after position `after` (those before are
        on their way), bounded by count and total bytes: read in one call, which stops
        reading at the byte bound, on the store's read-only connection, beside the commits
        of the envelopes still coming in. A row is queued by a commit that ended before
        its sender is woken, so the read finds every row the sender was told of."""
        return await self._store.read_aside(_outbox_batch, peer, after, max_count, max_bytes)

    def outbox_ack(self, peer: str, first_pos: int, last_pos: int) -> None:
        """The peer committed the batch of rows first_pos..last_pos: forget them, soon.

        The sender does not wait for the delete. The next commit of a processing step
        takes every pending delete along (`plan_write`); if none comes within ACK_DELAY, one
        background transaction writes them, without an fsync. Losing them on a crash or
        power cut only re-sends batches the peer drops as duplicates, and the sender never
        reads rows it saw acknowledged again (see `Outbox`)."""
        self._acks.append((peer, first_pos, last_pos))
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._write_acks_later(), name="outbox-acks")

    async def _write_acks_later(self) -> None:
        delay = ACK_DELAY
        while self._acks:
            await asyncio.sleep(delay)
            written = await self._write_acks()
            delay = ACK_DELAY if written else min(2 * delay, 5.0)

    async def _write_acks(self) -> bool:
        """Delete the acknowledged rows now; False if the database refused (kept pending)."""
        if not self._acks:
            return True
        through = self._acks_gone + len(self._acks)
        try:
            await self._store.write_all(_ack_statements(self._acks), durable=False)
        except KakehashiError as exc:
            log.warning("outbox_ack_not_written", rows=len(self._acks), code=exc.code)
            return False
        self.step_committed(through)
        return True

    def step_committed(self, acks_through: int, keys_flushed: bool = False) -> None:
        """The transaction of a `plan_write` that gave `acks_through` and `keys_flushed`
        committed: the acknowledged ranges up to that number are deleted, and, if it
        indexed ids, those are in `envelope_key` now."""
        if keys_flushed:
            self.keys.flushed()
        done = acks_through - self._acks_gone
        if done > 0:
            del self._acks[:done]
            self._acks_gone += done

    async def flush_acks(self) -> None:
        """Write every acknowledgement so far (before counting rows)."""
        await self._write_acks()

    async def stop_acks(self) -> None:
        """At stop: write what is pending, and end the task waiting to."""
        await cancel_all([self._ack_task])
        self._ack_task = None
        await self._write_acks()

    async def drop_outbox(self, peer: str) -> int:
        """Forget everything queued for `peer` (revoked: nothing is sent to it any more);
        how many envelopes that was. Without an fsync: rows back after a power cut are
        dropped again at the next start."""
        await self.flush_acks()
        row = await self._store.read_one("SELECT SUM(count) FROM outbox WHERE peer = ?", (peer,))
        count = int(row[0] or 0) if row else 0
        if count:
            delete = "DELETE FROM outbox WHERE peer = ?"
            await self._store.write_all([(delete, [(peer,)])], durable=False)
        return count

    async def outbox_peers(self) -> list[str]:
        await self.flush_acks()
        return [row[0] for row in await self._store.read_all("SELECT DISTINCT peer FROM outbox")]

    async def outbox_depths(self) -> dict[str, tuple[int, int]]:
        """peer -> (queued envelopes, enqueue time in ms of the oldest)."""
        await self.flush_acks()
        rows = await self._store.read_all(
            "SELECT peer, SUM(count), MIN(enqueued_ms) FROM outbox GROUP BY peer"
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    # catch-up and views --------------------------------------------------------

    async def processed_after(
        self,
        room: str,
        vector: Mapping[str, int],
        limit: int,
        max_bytes: int,
        *,
        held: Mapping[str, int],
    ) -> Page:
        """Processed envelopes of `room` beyond `vector`, in hlc order (a causal order);
        `held` is this node's own vector of the room (what it has processed).

        One range scan per origin on the (room, origin, seq) index, merged by hlc: an
        origin's envelopes are in hlc order by seq, so the merge is the room's hlc
        order without sorting the room (which made each page cost the whole backlog).
        Origins with nothing beyond `vector` are not read at all.
        """
        streams = []
        for origin, top in held.items():
            after = vector.get(origin, 0)
            if top <= after:
                continue
            rows = await self._store.read_all(
                "SELECT hlc, origin, seq, wire FROM envelope WHERE room_id = ? AND origin = ? "
                "AND seq > ? AND status != 0 ORDER BY seq LIMIT ?",
                (room, origin, after, limit + 1),
            )
            streams.append([(r[0], r[1], r[2], bytes(r[3])) for r in rows])
        return _merged_page(streams, limit, max_bytes)

    async def relayed_after(
        self, room: str, destination: str, vector: dict[str, int], limit: int, max_bytes: int
    ) -> Page:
        """Kept copies of `room` addressed to `destination` beyond `vector`, in hlc order.
        Per origin in seq order, merged by hlc, as `processed_after`."""
        origins = [
            row[0]
            for row in await self._store.read_all(
                "SELECT DISTINCT r.origin FROM relayed r WHERE r.room_id = ?", (room,)
            )
        ]
        streams = []
        for origin in origins:
            rows = await self._store.read_all(
                "SELECT r.hlc, r.origin, r.seq, r.wire FROM relayed r "
                "JOIN relayed_to t ON t.envelope_id = r.id AND t.destination = ? "
                "WHERE r.room_id = ? AND r.origin = ? AND r.seq > ? ORDER BY r.seq LIMIT ?",
                (destination, room, origin, vector.get(origin, 0), limit + 1),
            )
            streams.append([(r[0], r[1], r[2], bytes(r[3])) for r in rows])
        return _merged_page(streams, limit, max_bytes)

    async def ids_at(self, places: Iterable[Place]) -> dict[Place, bytes]:
        """The id of the envelope held at each of `places` (room, origin, seq) that holds
        one: read on the read-only connection, so only what is committed. Point lookups
        on the table's unique (room, origin, seq) key, the seqs of one room and origin
        together."""
        streams: dict[tuple[str, str], list[int]] = {}
        for room, origin, seq in places:
            streams.setdefault((room, origin), []).append(seq)
        return await self._store.read_aside(_ids_at, streams)

    async def history(
        self, room: str, limit: int, before_hlc: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """(id, wire) of the newest accepted envelopes of `room`, newest first.

        Messages and the other kinds are in two indexes (see the last migration): the
        newest of each, merged."""
        before = "" if before_hlc is None else " AND hlc < ?"
        order = "ORDER BY hlc DESC, origin DESC, seq DESC"
        part = (
            "SELECT * FROM (SELECT id, wire, hlc, origin, seq FROM envelope INDEXED BY {index} "
            "WHERE room_id = ? AND status = 1 AND {kind}{before} {order} LIMIT ?)"
        )
        sql = (
            part.format(
                index="envelope_messages", kind="kind = 'message'", before=before, order=order
            )
            + " UNION ALL "
            + part.format(
                index="envelope_others", kind="kind != 'message'", before=before, order=order
            )
            + f" {order} LIMIT ?"
        )
        one: list[object] = [room, *([] if before_hlc is None else [before_hlc]), limit]
        rows = await self._store.read_all(sql, [*one, *one, limit])
        return [(bytes(row[0]), bytes(row[1])) for row in rows]

    async def counts(self) -> dict[str, tuple[int, int]]:
        """room -> (accepted envelopes, pending envelopes)."""
        rows = await self._store.read_all(
            "SELECT room_id, SUM(status = 1), SUM(status = 0) FROM envelope GROUP BY room_id"
        )
        return {row[0]: (int(row[1] or 0), int(row[2] or 0)) for row in rows}


_IDS_AT_CHUNK = 500
"""Seqs one `ids_at` statement asks for at most (well within SQLite's parameter limit)."""


def _ids_at(
    connection: sqlite3.Connection, streams: Mapping[tuple[str, str], Sequence[int]]
) -> dict[Place, bytes]:
    """`RoomStore.ids_at` on the database thread."""
    found: dict[Place, bytes] = {}
    for (room, origin), seqs in streams.items():
        unique = sorted(set(seqs))
        for start in range(0, len(unique), _IDS_AT_CHUNK):
            chunk = unique[start : start + _IDS_AT_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for seq, envelope_id in connection.execute(
                "SELECT seq, id FROM envelope WHERE room_id = ? AND origin = ? "  # noqa: S608
                f"AND seq IN ({marks})",  # only question marks
                (room, origin, *chunk),
            ):
                found[(room, origin, seq)] = bytes(envelope_id)
    return found


def _outbox_batch(
    connection: sqlite3.Connection, peer: str, after: int, max_count: int, max_bytes: int
) -> OutboxBatch | None:
    """`RoomStore.outbox_batch` on the database thread: rows in position order, each run
    read from the envelope table by seq, up to `max_count` envelopes and `max_bytes`."""
    wires: list[bytes] = []
    total, first, last, taken = 0, 0, 0, 0
    cursor = connection.execute(
        "SELECT o.pos, o.count, o.room_id, o.origin, o.seq, COALESCE(e.wire, r.wire) "
        "FROM outbox o "
        "LEFT JOIN envelope e ON o.count = 1 AND e.room_id = o.room_id "
        "AND e.origin = o.origin AND e.seq = o.seq "
        "LEFT JOIN relayed r ON o.count = 1 AND r.id = o.envelope_id "
        "WHERE o.peer = ? AND o.pos > ? ORDER BY o.pos",
        (peer, after),
    )
    try:
        for pos, count, room, origin, seq, wire in cursor:
            # Positions pos - count + 1 .. pos hold seqs seq .. seq + count - 1.
            skip = max(0, after - (pos - count))
            room_left = max_count - taken
            if count == 1:
                run = {seq: wire}
            else:
                run = _run_wires(connection, room, origin, seq + skip, min(count - skip, room_left))
            for offset in range(skip, min(count, skip + room_left)):
                at = pos - count + 1 + offset
                wire = run.get(seq + offset)
                taken += 1
                first = first or at
                if wire is None:
                    last = at  # its envelope is gone (not while envelopes are kept)
                    continue
                if wires and total + len(wire) > max_bytes:
                    return OutboxBatch(first_pos=first, last_pos=last, wires=wires)
                last = at
                wires.append(bytes(wire))
                total += len(wire)
            if taken >= max_count:
                return OutboxBatch(first_pos=first, last_pos=last, wires=wires)
    finally:
        cursor.close()
    if not last:
        return None
    return OutboxBatch(first_pos=first, last_pos=last, wires=wires, complete=True)


def _run_wires(
    connection: sqlite3.Connection, room: str, origin: str, seq: int, count: int
) -> dict[int, bytes]:
    """seq -> wire of the envelopes stored at seqs seq .. seq + count - 1 of a room and
    origin (a run's, read with its row)."""
    cursor = connection.execute(
        "SELECT seq, wire FROM envelope WHERE room_id = ? AND origin = ? AND seq BETWEEN ? AND ?",
        (room, origin, seq, seq + count - 1),
    )
    try:
        return dict(cursor.fetchall())
    finally:
        cursor.close()


_ACK_STATEMENTS = (
    # Rows wholly acknowledged go.
    "DELETE FROM outbox WHERE peer = ? AND pos BETWEEN ? AND ? AND pos - count + 1 >= ?",
    # A run the acknowledgement ends inside loses its acknowledged head: its first
    # position and seq move up to just after `last` (every expression reads the row as
    # it was). A run that began before `first` is left whole: sent again, its repeats
    # are dropped as duplicates.
    "UPDATE outbox SET seq = seq + count - (pos - ?), count = pos - ? "
    "WHERE peer = ? AND pos > ? AND pos - count < ? AND pos - count + 1 >= ?",
)


def _ack_statements(
    acks: Sequence[tuple[str, int, int]],
) -> list[tuple[str, list[tuple[object, ...]]]]:
    """The deletes of acknowledged ranges (peer, first, last), and the shortening of the
    runs they end inside, range by range in order: the batch after one that ended inside
    a run begins where the shortened run now begins."""
    delete, shorten = _ACK_STATEMENTS
    statements: list[tuple[str, list[tuple[object, ...]]]] = []
    for peer, first, last in acks:
        statements.append((delete, [(peer, first, last, first)]))
        statements.append((shorten, [(last, last, peer, last, last, first)]))
    return statements


def _merged_page(
    streams: list[list[tuple[int, str, int, bytes]]], limit: int, max_bytes: int
) -> Page:
    """Merge per-origin runs (each in seq order, hence hlc order) into the room's hlc
    order, up to `limit` envelopes and `max_bytes`."""
    wires: list[bytes] = []
    through: dict[str, int] = {}
    total = 0
    for _, origin, seq, wire in heapq.merge(*streams):
        if len(wires) >= limit or (wires and total + len(wire) > max_bytes):
            return Page(wires, True, through)
        wires.append(wire)
        through[origin] = seq
        total += len(wire)
    return Page(wires, False, through)
