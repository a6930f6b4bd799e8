"""Tests for the outbox in gateway.roomstore: positions, batches, and acknowledgements."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sealing import sealed_messages

from federation.envelope import Envelope
from federation.errors import StorageError
from federation.signing import SigningKey
from gateway.roomstore import ACK_DELAY, EnvelopeRow, RoomStore, Status
from gateway.store import Store

ROOM = "!outboxroom:tsu"


def _envelopes(count: int) -> list[Envelope]:
    return sealed_messages(
        ROOM, "tsu", range(1, count + 1), key=SigningKey.generate(), sender="tanaka@tsu"
    )


async def _opened(store: Store) -> RoomStore:
    rooms = RoomStore(store)
    await rooms.load_positions()
    return rooms


async def _queue(rooms: RoomStore, store: Store, envelopes: list[Envelope], peer: str) -> list[int]:
    planned = rooms.plan_write(
        [EnvelopeRow(e, Status.ACCEPTED) for e in envelopes],
        [(peer, e) for e in envelopes],
        [(ROOM, "tsu")],
        1_000,
    )
    await store.write_all(planned.statements)
    rooms.step_committed(planned.acks_through)
    queued = planned.queued
    assert [wire for _, wire in queued[peer]] == [e.to_bytes() for e in envelopes]
    return [pos for pos, _ in queued[peer]]


async def test_positions_grow_in_commit_order_and_are_never_reused_after_a_reopen(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(6)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        first = await _queue(rooms, store, envelopes[:3], "ise")
        assert first == sorted(first) and len(set(first)) == 3
        batch = await rooms.outbox_batch("ise", 100, 1 << 20)
        assert batch is not None and batch.complete
        assert (batch.first_pos, batch.last_pos) == (first[0], first[-1])
        rooms.outbox_ack("ise", batch.first_pos, batch.last_pos)
        assert await rooms.outbox_depths() == {}  # the delete is written before counting
        await rooms.stop_acks()
    async with Store(tmp_path / "node.db") as store:
        # The outbox is empty; positions still go on above every one used before, so a
        # sender that saw a position acknowledged never skips a new row.
        rooms = await _opened(store)
        second = await _queue(rooms, store, envelopes[3:], "ise")
        assert min(second) > max(first)
        assert second == sorted(second)
        batch = await rooms.outbox_batch("ise", 100, 1 << 20, after=0)
        assert batch is not None
        assert batch.wires == [e.to_bytes() for e in envelopes[3:]]


async def test_a_batch_cut_by_count_or_bytes_is_not_complete(tmp_path: Path) -> None:
    envelopes = _envelopes(5)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        positions = await _queue(rooms, store, envelopes, "ise")
        by_count = await rooms.outbox_batch("ise", 2, 1 << 20)
        assert by_count is not None and not by_count.complete
        assert by_count.last_pos == positions[1]
        two = len(envelopes[2].to_bytes()) + len(envelopes[3].to_bytes())
        by_bytes = await rooms.outbox_batch("ise", 100, two, after=by_count.last_pos)
        assert by_bytes is not None and not by_bytes.complete
        assert len(by_bytes.wires) == 2
        rest = await rooms.outbox_batch("ise", 100, 1 << 20, after=by_bytes.last_pos)
        assert rest is not None and rest.complete and len(rest.wires) == 1
        assert await rooms.outbox_batch("ise", 100, 1 << 20, after=rest.last_pos) is None


async def _outbox_rows(store: Store) -> list[tuple[str, int, int, int]]:
    rows = await store.read_all("SELECT peer, pos, count, seq FROM outbox ORDER BY pos")
    return [tuple(row) for row in rows]


async def test_a_commits_envelopes_for_a_peer_are_one_row_per_run_of_seqs(
    tmp_path: Path,
) -> None:
    """Queued as a node queues its own messages (each envelope for every peer in turn),
    each peer's envelopes get consecutive positions and one row; the senders read them
    back one by one, in order, and the queues count envelopes, not rows."""
    envelopes = _envelopes(10)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        planned = rooms.plan_write(
            [EnvelopeRow(e, Status.ACCEPTED) for e in envelopes],
            [(peer, e) for e in envelopes for peer in ("ise", "kameyama")],
            [(ROOM, "tsu")],
            1_000,
        )
        await store.write_all(planned.statements)
        rooms.step_committed(planned.acks_through)
        ise = [pos for pos, _ in planned.queued["ise"]]
        kameyama = [pos for pos, _ in planned.queued["kameyama"]]
        assert ise == list(range(ise[0], ise[0] + 10))
        assert kameyama == list(range(kameyama[0], kameyama[0] + 10))
        assert await _outbox_rows(store) == [
            ("ise", ise[-1], 10, 1),
            ("kameyama", kameyama[-1], 10, 1),
        ]
        for peer, positions in (("ise", ise), ("kameyama", kameyama)):
            batch = await rooms.outbox_batch(peer, 100, 1 << 20)
            assert batch is not None and batch.complete
            assert (batch.first_pos, batch.last_pos) == (positions[0], positions[-1])
            assert batch.wires == [e.to_bytes() for e in envelopes]
            middle = await rooms.outbox_batch(peer, 3, 1 << 20, after=positions[4])
            assert middle is not None and not middle.complete
            assert (middle.first_pos, middle.last_pos) == (positions[5], positions[7])
            assert middle.wires == [e.to_bytes() for e in envelopes[5:8]]
        depths = await rooms.outbox_depths()
        assert {peer: count for peer, (count, _) in depths.items()} == {"ise": 10, "kameyama": 10}
        assert await rooms.drop_outbox("kameyama") == 10
        await rooms.stop_acks()


async def test_an_acknowledgement_ending_inside_a_run_shortens_it_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(10)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        positions = await _queue(rooms, store, envelopes, "ise")
        batch = await rooms.outbox_batch("ise", 4, 1 << 20)
        assert batch is not None and batch.wires == [e.to_bytes() for e in envelopes[:4]]
        rooms.outbox_ack("ise", batch.first_pos, batch.last_pos)
        await rooms.stop_acks()
        assert await _outbox_rows(store) == [("ise", positions[-1], 6, 5)]
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)  # a sender after a restart starts from the oldest row
        rest = await rooms.outbox_batch("ise", 100, 1 << 20)
        assert rest is not None and rest.complete
        assert (rest.first_pos, rest.last_pos) == (positions[4], positions[-1])
        assert rest.wires == [e.to_bytes() for e in envelopes[4:]]
        assert {p: n for p, (n, _) in (await rooms.outbox_depths()).items()} == {"ise": 6}
        # A range that begins inside a run (not how a sender acknowledges: it goes in
        # order) deletes nothing of it: the run is sent again, and its repeats dropped.
        rooms.outbox_ack("ise", positions[6], positions[7])
        await rooms.flush_acks()
        assert await _rows(store) == positions[4:]
        rooms.outbox_ack("ise", positions[4], positions[-1])
        await rooms.stop_acks()
        assert await _rows(store) == []


async def test_acknowledgements_of_consecutive_batches_of_a_run_written_together(
    tmp_path: Path,
) -> None:
    """Batches of one run, acknowledged before either delete is written: the second
    begins where the first shortened the run, so it takes the rest of it."""
    envelopes = _envelopes(10)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        positions = await _queue(rooms, store, envelopes, "ise")
        rooms.outbox_ack("ise", positions[0], positions[3])
        rooms.outbox_ack("ise", positions[4], positions[6])
        rooms.outbox_ack("ise", positions[7], positions[9])
        await rooms.flush_acks()
        assert await _rows(store) == []
        assert await rooms.outbox_depths() == {}
        await rooms.stop_acks()


async def test_relayed_copies_and_other_origins_are_rows_of_their_own(tmp_path: Path) -> None:
    """A run is one room, one origin, consecutive seqs, all in the envelope table: a
    copy kept only to forward (found by its id) is always alone, and an envelope whose
    row is gone is skipped, its position still covered by the batch."""
    key = SigningKey.generate()
    own = _envelopes(4)
    forwarded = sealed_messages("!elsewhere:ise", "ise", range(1, 3), key=key, sender="a@ise")
    other = sealed_messages(ROOM, "ise", range(1, 3), key=key, sender="b@ise", others={"tsu": 1})
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        queued = [*own[:2], *forwarded, *other, *own[2:]]
        planned = rooms.plan_write(
            [EnvelopeRow(e, Status.ACCEPTED) for e in [*own, *other]],
            [("kameyama", e) for e in queued],
            [(ROOM, "tsu")],
            1_000,
            relayed=[(e, "kameyama") for e in forwarded],
        )
        await store.write_all(planned.statements)
        rooms.step_committed(planned.acks_through)
        positions = [pos for pos, _ in planned.queued["kameyama"]]
        assert [count for _, _, count, _ in await _outbox_rows(store)] == [2, 1, 1, 2, 2]
        await store.write_all([("DELETE FROM envelope WHERE origin = 'tsu' AND seq = 4", [()])])
        batch = await rooms.outbox_batch("kameyama", 100, 1 << 20)
        assert batch is not None and batch.complete
        assert (batch.first_pos, batch.last_pos) == (positions[0], positions[-1])
        assert batch.wires == [e.to_bytes() for e in queued[:-1]]
        await rooms.stop_acks()


async def test_acknowledged_ranges_of_several_batches_are_deleted_together(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(6)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        to_ise = await _queue(rooms, store, envelopes[:4], "ise")
        to_kameyama = await _queue(rooms, store, envelopes[4:], "kameyama")
        rooms.outbox_ack("ise", to_ise[0], to_ise[1])
        rooms.outbox_ack("ise", to_ise[2], to_ise[2])
        depths = await rooms.outbox_depths()
        assert {peer: count for peer, (count, _) in depths.items()} == {"ise": 1, "kameyama": 2}
        left = await rooms.outbox_batch("ise", 100, 1 << 20)
        assert left is not None and (left.first_pos, left.last_pos) == (to_ise[3], to_ise[3])
        rooms.outbox_ack("kameyama", to_kameyama[0], to_kameyama[-1])
        await rooms.flush_acks()
        assert await rooms.outbox_peers() == ["ise"]
        await rooms.stop_acks()


async def _rows(store: Store) -> list[int]:
    """The positions queued, of every outbox row (a run of `count` ends at `pos`)."""
    rows = await store.read_all("SELECT pos, count FROM outbox ORDER BY pos")
    return [pos for last, count in rows for pos in range(last - count + 1, last + 1)]


async def test_the_next_commit_takes_acknowledged_deletes_along(tmp_path: Path) -> None:
    envelopes = _envelopes(4)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        first = await _queue(rooms, store, envelopes[:2], "ise")
        rooms.outbox_ack("ise", first[0], first[-1])
        assert await _rows(store) == first  # not deleted yet: waiting for a commit
        second = await _queue(rooms, store, envelopes[2:], "ise")
        assert await _rows(store) == second  # deleted in that commit
        await rooms.stop_acks()


async def test_acknowledged_deletes_are_written_alone_when_no_commit_comes(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(2)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        positions = await _queue(rooms, store, envelopes, "ise")
        rooms.outbox_ack("ise", positions[0], positions[0])
        await asyncio.sleep(ACK_DELAY * 3)
        assert await _rows(store) == positions[1:]
        rooms.outbox_ack("ise", positions[1], positions[1])
        await rooms.stop_acks()  # at stop, what is pending is written at once
        assert await _rows(store) == []


async def test_a_failed_commit_keeps_its_acknowledged_deletes_pending(tmp_path: Path) -> None:
    envelopes = _envelopes(3)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        positions = await _queue(rooms, store, envelopes[:2], "ise")
        rooms.outbox_ack("ise", positions[0], positions[1])
        statements = rooms.plan_write([], [("ise", envelopes[2])], [], 1_000).statements
        failing = [*statements, ("INSERT INTO no_such_table VALUES (?)", [(1,)])]
        with pytest.raises(StorageError):
            await store.write_all(failing)
        assert await _rows(store) == positions  # rolled back, deletes included
        assert await rooms.outbox_depths() == {}  # still pending, and written now
        await rooms.stop_acks()


async def test_reads_of_the_outbox_never_fail_while_acknowledged_rows_are_deleted(
    tmp_path: Path,
) -> None:
    """Senders read batches and operators count the queues while acknowledged rows are
    deleted on the same connection. A read whose statement stayed open across calls to
    the database thread, with a delete of the rows it was reading in between, failed
    with 'database disk image is malformed' (the file itself intact)."""
    envelopes = _envelopes(600)
    async with Store(tmp_path / "node.db") as store:
        rooms = await _opened(store)
        positions: dict[str, list[int]] = {"ise": [], "kameyama": []}
        for start in range(0, 600, 50):
            for peer in positions:
                positions[peer] += await _queue(rooms, store, envelopes[start : start + 25], peer)

        async def acknowledge() -> None:
            for first in range(0, 300, 3):
                for peer, queued in positions.items():
                    rooms.outbox_ack(peer, queued[first], queued[first + 2])
                await rooms.flush_acks()

        async def read() -> int:
            reads = 0
            while True:
                for peer in positions:
                    await rooms.outbox_batch(peer, 1000, 1 << 30)  # one chunk at most
                await rooms.outbox_depths()
                reads += 1
                await asyncio.sleep(0)
                if not await rooms.outbox_peers():
                    return reads

        reader = asyncio.create_task(read())
        await acknowledge()
        assert await reader > 1
        assert await rooms.outbox_depths() == {}
        await rooms.stop_acks()
