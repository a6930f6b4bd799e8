"""Tests for the outbox in gateway.roomstore: positions, batches, and acknowledgements."""

from __future__ import annotations

from pathlib import Path

from federation.envelope import Content, Envelope, Kind, seal_batch
from federation.signing import SigningKey
from gateway.roomstore import EnvelopeRow, RoomStore, Status
from gateway.store import Store

ROOM = "!outboxroom:tsu"


def _envelopes(count: int) -> list[Envelope]:
    key = SigningKey.generate()
    contents = [
        Content(
            room=ROOM,
            origin="tsu",
            seq=seq,
            kind=Kind.MESSAGE,
            sender="tanaka@tsu",
            hlc=(1 << 40) + seq,
            deps={"tsu": seq - 1} if seq > 1 else {},
            key_id=key.key_id,
            body={"text": f"message {seq}"},
        )
        for seq in range(1, count + 1)
    ]
    return seal_batch(contents, key)


async def _queue(rooms: RoomStore, store: Store, envelopes: list[Envelope], peer: str) -> list[int]:
    async with store.transaction() as db:
        queued = await rooms.write(
            db,
            [EnvelopeRow(e, Status.ACCEPTED) for e in envelopes],
            [(peer, e) for e in envelopes],
            [(ROOM, "tsu")],
            1_000,
        )
    assert [wire for _, wire in queued[peer]] == [e.to_bytes() for e in envelopes]
    return [pos for pos, _ in queued[peer]]


async def test_positions_grow_in_commit_order_and_are_never_reused_after_a_reopen(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(6)
    async with Store(tmp_path / "node.db") as store:
        rooms = RoomStore(store)
        first = await _queue(rooms, store, envelopes[:3], "ise")
        assert first == sorted(first) and len(set(first)) == 3
        batch = await rooms.outbox_batch("ise", 100, 1 << 20)
        assert batch is not None and batch.complete
        assert (batch.first_pos, batch.last_pos) == (first[0], first[-1])
        rooms.outbox_ack("ise", batch.first_pos, batch.last_pos)
        assert await rooms.outbox_depths() == {}  # the delete is written before counting
    async with Store(tmp_path / "node.db") as store:
        # The outbox is empty; positions still go on above every one used before, so a
        # sender that saw a position acknowledged never skips a new row.
        rooms = RoomStore(store)
        second = await _queue(rooms, store, envelopes[3:], "ise")
        assert min(second) > max(first)
        assert second == sorted(second)
        batch = await rooms.outbox_batch("ise", 100, 1 << 20, after=0)
        assert batch is not None
        assert batch.wires == [e.to_bytes() for e in envelopes[3:]]


async def test_a_batch_cut_by_count_or_bytes_is_not_complete(tmp_path: Path) -> None:
    envelopes = _envelopes(5)
    async with Store(tmp_path / "node.db") as store:
        rooms = RoomStore(store)
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


async def test_acknowledged_ranges_of_several_batches_are_deleted_together(
    tmp_path: Path,
) -> None:
    envelopes = _envelopes(6)
    async with Store(tmp_path / "node.db") as store:
        rooms = RoomStore(store)
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
