"""SQL for what staff see of a room: messages by display order, receipts, relations.

Positions are display order, `(hlc, origin, seq)`, compared as SQLite row values.
`receipt` keeps every accepted receipt (room, message, reader, when); `read_marker`
the furthest message each reader has read in each room, which is what read counts
and unread counts need; `relation` the edits, reactions and redactions by the id
of the envelope they point at. All three are derived from accepted envelopes and
written by `Timeline` only (see its docstring for how they are kept complete).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .envelopekeys import EnvelopeKeys, find
from .store import Store

__all__ = ["Position", "ReceiptRow", "RelationRow", "TargetRow", "TimelineStore"]

Position = tuple[int, str, int]
"""Display order of an envelope: (hlc, origin, seq)."""


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    """An accepted receipt: `reader` has read `room` up to `message_id`."""

    envelope_id: bytes
    room: str
    reader: str
    message_id: bytes
    position: Position | None
    """Of the message; None when it is not an accepted message of this room here."""
    at_ms: int
    """When the reader sent it (its hybrid clock time, the same at every node)."""


@dataclass(frozen=True, slots=True)
class RelationRow:
    """An accepted edit, reaction or redaction of the envelope `target`."""

    envelope_id: bytes
    room: str
    target: bytes
    kind: str
    sender: str
    position: Position
    value: str
    """edit: the new text; reaction: the emoji; redact: the reason."""


@dataclass(frozen=True, slots=True)
class TargetRow:
    """An accepted envelope an annotation points at."""

    envelope_id: bytes
    room: str
    kind: str
    sender: str
    position: Position


def _marks(count: int) -> str:
    return ",".join("?" * count)


class TimelineStore:
    """Queries and writes over the node's `Store`."""

    def __init__(self, store: Store, keys: EnvelopeKeys) -> None:
        self._store = store
        self._keys = keys

    async def _all(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._store.read_all(sql, params)]

    # writing ----------------------------------------------------------------------

    async def write(self, receipts: Sequence[ReceiptRow], relations: Sequence[RelationRow]) -> None:
        """Index annotations in one transaction; markers only move forward.

        Not fsynced: everything here is derived from envelopes that are, and a row lost
        on a power cut is indexed again at the next start (`unindexed`).
        """
        if not receipts and not relations:
            return
        async with self._store.transaction(durable=False) as db:
            await db.executemany(
                "INSERT INTO receipt (envelope_id, room_id, reader, message_id, message_hlc, "
                "message_origin, message_seq, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (envelope_id) DO NOTHING",
                [
                    (
                        r.envelope_id,
                        r.room,
                        r.reader,
                        r.message_id,
                        *(r.position or (None, None, None)),
                        r.at_ms,
                    )
                    for r in receipts
                ],
            )
            await db.executemany(
                "INSERT INTO read_marker (room_id, reader, message_id, hlc, origin, seq, at_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (room_id, reader) DO UPDATE SET "
                "message_id = excluded.message_id, hlc = excluded.hlc, "
                "origin = excluded.origin, seq = excluded.seq, at_ms = excluded.at_ms "
                "WHERE (excluded.hlc, excluded.origin, excluded.seq) > "
                "(read_marker.hlc, read_marker.origin, read_marker.seq)",
                [
                    (r.room, r.reader, r.message_id, *r.position, r.at_ms)
                    for r in receipts
                    if r.position is not None and r.reader
                ],
            )
            await db.executemany(
                "INSERT INTO relation (envelope_id, room_id, target, kind, sender, hlc, origin, "
                "seq, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (envelope_id) DO NOTHING",
                [
                    (r.envelope_id, r.room, r.target, r.kind, r.sender, *r.position, r.value)
                    for r in relations
                ],
            )

    async def unindexed(self, limit: int) -> list[bytes]:
        """Wires of accepted annotations not indexed yet (after a crash between an
        envelope's commit and its indexing), at most `limit`."""
        # The kinds are written out as in the partial index's definition (migration 6),
        # which SQLite uses only for a query whose terms match it literally.
        rows = await self._all(
            "SELECT e.wire FROM envelope e INDEXED BY envelope_annotations "
            "WHERE e.status = 1 AND e.kind IN ('edit', 'reaction', 'redact', 'receipt') "
            "AND NOT EXISTS (SELECT 1 FROM receipt r WHERE r.envelope_id = e.id) "
            "AND NOT EXISTS (SELECT 1 FROM relation l WHERE l.envelope_id = e.id) LIMIT ?",
            [limit],
        )
        return [bytes(row[0]) for row in rows]

    # envelopes ---------------------------------------------------------------------

    async def targets(self, ids: Iterable[bytes]) -> dict[bytes, TargetRow]:
        """The accepted envelopes among `ids`."""
        known, others = self._keys.places(ids)
        if not known and not others:
            return {}
        found: dict[bytes, TargetRow] = {}
        for row in await self._store.read(
            find,
            "e.id, e.room_id, e.kind, e.sender, e.hlc, e.origin, e.seq",
            known,
            others,
            " AND e.status = 1",
        ):
            key = bytes(row[0])
            found[key] = TargetRow(
                key, row[1], row[2], row[3], (int(row[4]), str(row[5]), int(row[6]))
            )
        return found

    async def messages(
        self,
        room: str,
        limit: int,
        *,
        before: Position | None = None,
        after: Position | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """(id, wire) of accepted messages: the newest `limit` before `before` (newest
        first), or with `after` the oldest `limit` after it (oldest first)."""
        sql = (
            "SELECT id, wire FROM envelope INDEXED BY envelope_messages "
            "WHERE room_id = ? AND status = 1 AND kind = 'message'"
        )
        params: list[object] = [room]
        if after is not None:
            sql += " AND (hlc, origin, seq) > (?, ?, ?) ORDER BY hlc, origin, seq LIMIT ?"
            params += [*after, limit]
        else:
            if before is not None:
                sql += " AND (hlc, origin, seq) < (?, ?, ?)"
                params += list(before)
            sql += " ORDER BY hlc DESC, origin DESC, seq DESC LIMIT ?"
            params.append(limit)
        return [(bytes(r[0]), bytes(r[1])) for r in await self._all(sql, params)]

    async def unread(self, room: str, reader: str, after: Position | None) -> int:
        """Messages of others in `room` after `after` (all of them without a marker)."""
        sql = (
            "SELECT COUNT(*) FROM envelope INDEXED BY envelope_messages "
            "WHERE room_id = ? AND status = 1 AND kind = 'message' AND sender != ?"
        )
        params: list[object] = [room, reader]
        if after is not None:
            sql += " AND (hlc, origin, seq) > (?, ?, ?)"
            params += list(after)
        rows = await self._all(sql, params)
        return int(rows[0][0]) if rows else 0

    # annotations ------------------------------------------------------------------

    async def relations(self, targets: Iterable[bytes]) -> list[RelationRow]:
        """Relations pointing at any of `targets`, in display order."""
        rows = await self._relations_in("target", targets)
        rows.sort(key=lambda r: r.position)
        return rows

    async def markers(self, room: str) -> list[tuple[str, Position]]:
        """(reader, furthest position read) of everyone who has read anything in `room`."""
        rows = await self._all(
            "SELECT reader, hlc, origin, seq FROM read_marker WHERE room_id = ?", [room]
        )
        return [(str(r[0]), (int(r[1]), str(r[2]), int(r[3]))) for r in rows]

    async def marker(self, room: str, reader: str) -> tuple[bytes, Position] | None:
        """The furthest message `reader` has read in `room`, and its position."""
        rows = await self._all(
            "SELECT message_id, hlc, origin, seq FROM read_marker WHERE room_id = ? AND reader = ?",
            [room, reader],
        )
        if not rows:
            return None
        row = rows[0]
        return bytes(row[0]), (int(row[1]), str(row[2]), int(row[3]))

    async def readers(self, room: str, position: Position) -> list[tuple[str, int]]:
        """(reader, first time a receipt of theirs covered it) of the message at `position`."""
        rows = await self._all(
            "SELECT reader, MIN(at_ms) FROM receipt WHERE room_id = ? "
            "AND (message_hlc, message_origin, message_seq) >= (?, ?, ?) AND reader != '' "
            "GROUP BY reader ORDER BY MIN(at_ms), reader",
            [room, *position],
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    async def reactions_by_id(self, ids: Iterable[bytes]) -> list[RelationRow]:
        """The reaction relations whose own envelope ids are among `ids`."""
        return [r for r in await self._relations_in("envelope_id", ids) if r.kind == "reaction"]

    async def _relations_in(
        self, column: Literal["target", "envelope_id"], ids: Iterable[bytes]
    ) -> list[RelationRow]:
        """Relations whose `column` is among `ids` (asked 500 at a time)."""
        wanted = list(set(ids))
        rows: list[RelationRow] = []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for row in await self._all(
                "SELECT envelope_id, room_id, target, kind, sender, hlc, origin, seq, value "  # noqa: S608
                f"FROM relation WHERE {column} IN ({_marks(len(chunk))})",
                chunk,
            ):
                rows.append(_relation(row))
        return rows

    async def wire(self, envelope_id: bytes) -> bytes:
        """The wire bytes of an envelope this node holds (the caller knows it does)."""
        known, others = self._keys.places([envelope_id])
        rows = await self._store.read(find, "e.id, e.wire", known, others)
        return bytes(rows[0][1])


def _relation(row: Sequence[Any]) -> RelationRow:
    return RelationRow(
        bytes(row[0]),
        str(row[1]),
        bytes(row[2]),
        str(row[3]),
        str(row[4]),
        (int(row[5]), str(row[6]), int(row[7])),
        str(row[8]),
    )
