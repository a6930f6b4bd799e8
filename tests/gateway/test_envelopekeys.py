"""Tests for gateway.envelopekeys: envelopes found by id whether their ids are still in
memory, being indexed, or in `envelope_key`; across a reopen, a failed commit and the
upgrade of a database from before the table existed."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sealing import sealed_messages

from federation.envelope import Envelope
from federation.errors import StorageError
from federation.signing import SigningKey
from gateway import envelopekeys
from gateway.roomstore import EnvelopeRow, RoomStore, Status
from gateway.store import MIGRATIONS, Store
from gateway.timelinestore import TimelineStore

ROOM = "!keysroom:tsu"
KEY = SigningKey.generate()


def _envelopes(first: int, count: int, *, body: str = "n") -> list[Envelope]:
    """Messages of tsu with seqs first..first+count-1 (seq 1 the room's first)."""
    return sealed_messages(
        ROOM,
        "tsu",
        range(first, first + count),
        key=KEY,
        sender="staff@tsu",
        text=lambda seq: f"{body}{seq}",
    )


@asynccontextmanager
async def _opened(path: Path) -> AsyncIterator[tuple[Store, RoomStore]]:
    """The node's store at `path` and its room store, loaded as the node loads it."""
    async with Store(path) as store:
        rooms = RoomStore(store)
        await rooms.load_positions()
        yield store, rooms


async def _commit(rooms: RoomStore, store: Store, envelopes: list[Envelope]) -> bool:
    """Plan and commit one step of accepted envelopes; whether it indexed ids."""
    planned = rooms.plan_write(
        [EnvelopeRow(e, Status.ACCEPTED) for e in envelopes], [], [(ROOM, "tsu")], 1_000
    )
    await store.write_all(planned.statements)
    rooms.step_committed(planned.acks_through, planned.keys_flushed)
    return planned.keys_flushed


async def _found(store: Store, rooms: RoomStore, envelopes: list[Envelope]) -> set[bytes]:
    """The ids of `envelopes` the timeline's queries find, checked against their wires."""
    rows = TimelineStore(store, rooms.keys)
    found = await rows.targets(e.id for e in envelopes)
    for envelope in envelopes:
        if envelope.id in found:
            assert found[envelope.id].position[2] == envelope.content.seq
            assert await rows.wire(envelope.id) == envelope.to_bytes()
    return set(found)


async def _keyed(store: Store) -> tuple[int, int]:
    """(rows of envelope_key, the watermark)."""
    count = await store.read_one("SELECT COUNT(*) FROM envelope_key")
    mark = await store.read_one("SELECT value FROM meta WHERE key = 'envelope_keys_through'")
    return int(count[0]), int(mark[0])


@pytest.fixture(autouse=True)
def _small_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelopekeys, "FLUSH_MIN", 10)
    monkeypatch.setattr(envelopekeys, "FLUSH_SHARE", 2)
    monkeypatch.setattr(envelopekeys, "FLUSH_MAX", 20)


async def test_ids_are_found_in_memory_then_in_the_index_and_after_a_reopen(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(1, 25)
    async with _opened(tmp_path / "node.db") as (store, rooms):
        assert not await _commit(rooms, store, envelopes[:6])
        assert await _keyed(store) == (0, 0)
        assert len(rooms.keys) == 6
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes[:6]}
        # The step that brings memory to FLUSH_MIN indexes every envelope so far, its own
        # included, in its own transaction.
        assert await _commit(rooms, store, envelopes[6:12])
        assert await _keyed(store) == (12, 12)
        assert len(rooms.keys) == 0
        assert not await _commit(rooms, store, envelopes[12:20])
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes[:20]}
    async with _opened(tmp_path / "node.db") as (store, rooms):
        assert len(rooms.keys) == 8  # those above the watermark, from the table
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes[:20]}
        assert await _commit(rooms, store, envelopes[20:])
        assert await _keyed(store) == (25, 25)
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes}


async def test_a_failed_commit_indexes_nothing_and_a_reload_finds_every_committed_envelope(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(1, 14)
    async with _opened(tmp_path / "node.db") as (store, rooms):
        await _commit(rooms, store, envelopes[:8])
        planned = rooms.plan_write(
            [EnvelopeRow(e, Status.ACCEPTED) for e in envelopes[8:]], [], [], 1_000
        )
        assert planned.keys_flushed
        failing = [*planned.statements, ("INSERT INTO no_such_table VALUES (?)", [(1,)])]
        with pytest.raises(StorageError):
            await store.write_all(failing)
        assert await _keyed(store) == (0, 0)  # rolled back with the rest
        await rooms.load_positions()  # as the room service does after a failed commit
        assert len(rooms.keys) == 8
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes[:8]}
        assert await _commit(rooms, store, envelopes[8:])
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes}


async def test_a_deleted_envelope_takes_its_key_along_and_is_found_once_stored_again(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(1, 12)
    async with _opened(tmp_path / "node.db") as (store, rooms):
        assert await _commit(rooms, store, envelopes)
        await store.write_all([("DELETE FROM envelope WHERE seq > ?", [(10,)])])
        assert await _keyed(store) == (10, 12)
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes[:10]}
        # Stored again (a catch-up), under a new row number: found again once indexed.
        await _commit(rooms, store, envelopes[10:])
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes}


async def test_another_envelope_at_a_stored_place_does_not_replace_it(tmp_path: Path) -> None:
    stored = _envelopes(1, 3)
    other = _envelopes(3, 1, body="forged ")[0]
    assert other.id != stored[2].id
    async with _opened(tmp_path / "node.db") as (store, rooms):
        await _commit(rooms, store, stored)
        planned = rooms.plan_write([EnvelopeRow(other, Status.REJECTED, "forged")], [], [], 0)
        await store.write_all(planned.statements)
        assert await _found(store, rooms, [*stored, other]) == {e.id for e in stored}
        row = await store.read_one("SELECT wire, status, verdict FROM envelope WHERE seq = 3")
        assert tuple(row) == (stored[2].to_bytes(), Status.ACCEPTED, None)


async def test_a_database_from_before_the_key_table_keeps_its_envelopes_and_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.db"
    envelopes = _envelopes(1, 5)
    before = next(n for n, script in enumerate(MIGRATIONS) if "envelope_key" in script)
    monkeypatch.setattr("gateway.store.MIGRATIONS", MIGRATIONS[:before])
    async with Store(path) as store:
        # As the node wrote them then: the id the key of both tables.
        await store.write_all(
            [
                (
                    "INSERT INTO envelope (id, room_id, origin, seq, kind, sender, hlc, wire, "
                    "status, verdict, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, 0)",
                    [
                        (
                            e.id,
                            ROOM,
                            "tsu",
                            e.content.seq,
                            "message",
                            "staff@tsu",
                            e.content.hlc,
                            e.to_bytes(),
                        )
                        for e in envelopes
                    ],
                ),
                (
                    "INSERT INTO outbox (peer, envelope_id, enqueued_ms) VALUES ('ise', ?, 0)",
                    [(e.id,) for e in envelopes[3:]],
                ),
            ]
        )
    monkeypatch.setattr("gateway.store.MIGRATIONS", MIGRATIONS)
    async with _opened(path) as (store, rooms):
        assert await _keyed(store) == (5, 5)
        assert len(rooms.keys) == 0
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes}
        batch = await rooms.outbox_batch("ise", 10, 1 << 20)
        assert batch is not None
        assert batch.wires == [e.to_bytes() for e in envelopes[3:]]
        # Row numbers go on from the copied rows.
        await _commit(rooms, store, _envelopes(6, 1))
        row = await store.read_one("SELECT row FROM envelope WHERE seq = 6")
        assert row[0] == 6
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_flushes_come_as_the_index_grows_by_a_share_and_never_above_the_cap(
    tmp_path: Path,
) -> None:
    # Here FLUSH_MIN 10, FLUSH_SHARE 2, FLUSH_MAX 20: due at max(10, indexed / 2), at most 20.
    envelopes = _envelopes(1, 90)
    flushes: list[int] = []
    async with _opened(tmp_path / "node.db") as (store, rooms):
        for count, envelope in enumerate(envelopes, start=1):
            if await _commit(rooms, store, [envelope]):
                flushes.append(count)
                assert await _keyed(store) == (count, count)
        assert flushes == [10, 20, 30, 45, 65, 85]
        assert len(rooms.keys) == 5
        assert await _found(store, rooms, envelopes) == {e.id for e in envelopes}
