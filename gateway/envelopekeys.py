"""Finding an envelope by its id, without an index that every commit writes into.

An envelope's id is the SHA-256 of its bytes, so an index on ids takes each new id at
a random place: once the index is much larger than a commit's batch, every envelope of
the batch dirties a page of its own, and the commit writes that page whole to the
write-ahead log. That was most of what storing an envelope cost once a node held a few
hundred thousand (`make bench`, storage figures). The node looks envelopes up by id
rarely: an annotation's target, a message a staff client names. So ids are indexed in
bulk instead:

- `envelope_key` (id -> row number) holds every envelope up to a row number kept in
  meta (`envelope_keys_through`);
- the envelopes above it are found through memory, id -> place (room, origin, seq),
  the table's unique key; rebuilt from the table when the node loads;
- when those in memory reach an eighth of those indexed (at least FLUSH_MIN, at most
  FLUSH_MAX), the next processing step's transaction indexes them all, sorted by id:
  one pass over the index's pages for many envelopes, instead of a page per envelope.

The table of envelopes stays the record; `envelope_key` and the memory only say where
an envelope is. A lookup checks the id of the row it finds, so a stale entry (a row
deleted, an entry planned by a transaction that failed) finds nothing rather than
another envelope.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import Store

__all__ = ["FLUSH_MAX", "FLUSH_MIN", "EnvelopeKeys", "Place", "find"]

FLUSH_MIN = 20_000
"""Envelopes held in memory before they are indexed, at the least..."""

FLUSH_SHARE = 8
"""...and at the least the indexed ones divided by this: the index grows in steps of an
eighth, so each envelope costs about FLUSH_SHARE / (entries per page) page writes..."""

FLUSH_MAX = 65_536
"""...but never more than this many (about 10 MB of memory): past half a million
envelopes, each flush is one pass over an index that many more share."""

Place = tuple[str, str, int]
"""(room, origin, seq): an envelope's unique key in the `envelope` table."""

_WATERMARK = "envelope_keys_through"


class EnvelopeKeys:
    """Where each envelope of this node is, by id (owned by `RoomStore`).

    In memory, an envelope's place is one integer, seq << 32 | n, where n numbers its
    (room, origin): about 150 bytes an envelope with its id, against 300 for a tuple."""

    def __init__(self) -> None:
        self._recent: dict[bytes, int] = {}
        """Envelopes planned since the last flush was planned."""
        self._flushing: dict[bytes, int] = {}
        """Envelopes a planned flush indexes, until its transaction commits."""
        self._streams: list[tuple[str, str]] = []
        self._stream_numbers: dict[tuple[str, str], int] = {}
        self._indexed = 0
        """About how many envelopes `envelope_key` holds (the watermark's row number)."""

    async def load(self, store: Store) -> None:
        """Rebuild from the table: the envelopes above the watermark (at start, and after
        a failed commit, when memory is rebuilt from disk)."""
        fresh = EnvelopeKeys()  # swapped in whole: lookups meanwhile use the old one
        fresh._indexed = await store.read(_load, fresh.note)
        self.__dict__.update(fresh.__dict__)

    def __len__(self) -> int:
        return len(self._recent) + len(self._flushing)

    def note(self, envelope_id: bytes, room: str, origin: str, seq: int) -> None:
        """An envelope row planned for the next transaction."""
        stream = (room, origin)
        number = self._stream_numbers.get(stream)
        if number is None:
            number = self._stream_numbers[stream] = len(self._streams)
            self._streams.append(stream)
        self._recent[envelope_id] = seq << 32 | number

    def plan_flush(self) -> list[tuple[str, Sequence[Sequence[object]]]]:
        """The statements that index every envelope above the watermark, when enough are
        waiting and no flush is planned already (none otherwise). For the transaction of
        the step being planned, after its own envelope rows; `flushed` once it commits."""
        due = min(max(FLUSH_MIN, self._indexed // FLUSH_SHARE), FLUSH_MAX)
        if self._flushing or len(self._recent) < due:
            return []
        self._flushing, self._recent = self._recent, {}
        return [
            (
                # OR IGNORE, not an upsert: no constraint can abort the statement, so
                # SQLite keeps no copy of the pages it changes to undo it alone (in
                # memory, TEMP_STORE: as large as the index). An id is never indexed
                # twice: each row is indexed once, and a deleted row's key goes with
                # it (the trigger `envelope_key_gone`).
                "INSERT OR IGNORE INTO envelope_key (id, row) SELECT id, row FROM envelope "
                "WHERE row > (SELECT value FROM meta WHERE key = ?) ORDER BY id",
                [(_WATERMARK,)],
            ),
            (
                "UPDATE meta SET value = (SELECT COALESCE(MAX(row), 0) FROM envelope) "
                "WHERE key = ?",
                [(_WATERMARK,)],
            ),
        ]

    def flushed(self) -> None:
        """The transaction of the planned flush committed: what it indexed is in
        `envelope_key` now."""
        self._indexed += len(self._flushing)
        self._flushing = {}

    def places(self, ids: Iterable[bytes]) -> tuple[dict[bytes, Place], list[bytes]]:
        """`ids` split: those known in memory with their places, and the others (to
        look up in `envelope_key`)."""
        known: dict[bytes, Place] = {}
        others: list[bytes] = []
        for envelope_id in set(ids):
            value = self._recent.get(envelope_id)
            if value is None:
                value = self._flushing.get(envelope_id)
            if value is None:
                others.append(envelope_id)
            else:
                room, origin = self._streams[value & 0xFFFFFFFF]
                known[envelope_id] = (room, origin, value >> 32)
        return known, others


def _load(connection: sqlite3.Connection, note: Callable[[bytes, str, str, int], None]) -> int:
    """`EnvelopeKeys.load` on the database thread: the watermark, each envelope above it
    given to `note`."""
    row = connection.execute("SELECT value FROM meta WHERE key = ?", (_WATERMARK,)).fetchone()
    through = int(row[0]) if row else 0
    cursor = connection.execute(
        "SELECT id, room_id, origin, seq FROM envelope WHERE row > ?", (through,)
    )
    try:
        for envelope_id, room, origin, seq in cursor:
            note(bytes(envelope_id), room, origin, seq)
    finally:
        cursor.close()
    return through


def find(
    connection: sqlite3.Connection,
    columns: str,
    known: dict[bytes, Place],
    others: Sequence[bytes],
    where: str = "",
) -> list[Any]:
    """Rows (`columns` of `envelope e`) of the envelopes among `known` and `others`
    (from `EnvelopeKeys.places`) that this node holds and that meet `where` (an extra
    condition on `e`), on the database thread."""
    rows: list[Any] = []
    by_place = (
        f"SELECT {columns} FROM envelope e "  # noqa: S608 (the callers' fixed SQL)
        f"WHERE e.room_id = ? AND e.origin = ? AND e.seq = ? AND e.id = ?{where}"
    )
    for envelope_id, place in known.items():
        rows.extend(connection.execute(by_place, (*place, envelope_id)).fetchall())
    for start in range(0, len(others), 500):
        chunk = others[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        rows.extend(
            connection.execute(
                f"SELECT {columns} FROM envelope_key k "  # noqa: S608 (as above)
                f"JOIN envelope e ON e.row = k.row AND e.id = k.id "
                f"WHERE k.id IN ({marks}){where}",
                chunk,
            ).fetchall()
        )
    return rows
