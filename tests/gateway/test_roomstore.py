"""Tests for the envelope queries of gateway.roomstore: history, pending and state, each
answered from its own index (messages, other accepted kinds, envelopes still waiting);
the ids held at given places."""

from __future__ import annotations

import itertools
from pathlib import Path

from federation.envelope import Content, Envelope, Kind, seal_batch
from federation.signing import SigningKey
from gateway.roomstore import EnvelopeRow, RoomStore, Status
from gateway.store import Store

ROOM = "!historyroom:tsu"
KINDS = [Kind.STATE, Kind.MESSAGE, Kind.MESSAGE, Kind.REACTION, Kind.MESSAGE, Kind.RECEIPT]


def _stream(origin: str, count: int, offset: int) -> list[Envelope]:
    """`count` envelopes of `origin` of mixed kinds, interleaving in hlc with the other
    stream (`offset`), some at equal hlc."""
    key = SigningKey.generate()
    return seal_batch(
        [
            Content(
                room=ROOM,
                origin=origin,
                seq=seq,
                kind=KINDS[seq % len(KINDS)],
                sender=f"staff@{origin}",
                hlc=(1 << 40) + 2 * seq + offset * (seq % 3 == 0),
                deps={"tsu": 1, **({origin: seq - 1} if seq > 1 else {})}
                if (origin, seq) != ("tsu", 1)
                else {},
                key_id=key.key_id,
                body={"n": seq},
            )
            for seq in range(1, count + 1)
        ],
        key,
    )


async def test_history_pending_and_state_read_the_right_envelopes_in_timeline_order(
    tmp_path: Path,
) -> None:
    envelopes = _stream("tsu", 60, 0) + _stream("ise", 45, 1)
    # Every seventh waits for a dependency; the rest are accepted.
    statuses = {
        e.id: Status.PENDING if i % 7 == 3 else Status.ACCEPTED for i, e in enumerate(envelopes)
    }
    async with Store(tmp_path / "node.db") as store:
        rooms = RoomStore(store)
        await rooms.load_positions()
        statements = rooms.plan_write(
            [EnvelopeRow(e, statuses[e.id]) for e in envelopes], [], [(ROOM, "tsu")], 1_000
        ).statements
        await store.write_all(statements)

        def order(e: Envelope) -> tuple[int, str, int]:
            return (e.content.hlc, e.content.origin, e.content.seq)

        accepted = sorted(
            (e for e in envelopes if statuses[e.id] is Status.ACCEPTED), key=order, reverse=True
        )
        assert {e.content.kind for e in accepted} >= {Kind.STATE, Kind.MESSAGE, Kind.RECEIPT}
        middle = accepted[len(accepted) // 2].content.hlc
        for limit, before in itertools.product([1, 5, 40, 500], [None, middle]):
            expected = [e for e in accepted if before is None or e.content.hlc < before][:limit]
            got = await rooms.history(ROOM, limit, before_hlc=before)
            assert got == [(e.id, e.to_bytes()) for e in expected], (limit, before)

        waiting = [e for e in envelopes if statuses[e.id] is Status.PENDING]
        assert sorted(await rooms.pending()) == sorted(e.to_bytes() for e in waiting)
        hlcs = [Envelope.from_bytes(w).content.hlc for w in await rooms.pending()]
        assert hlcs == sorted(hlcs)

        states = [e for e in accepted if e.content.kind is Kind.STATE]
        by_seq = sorted(states, key=lambda e: e.content.seq)
        assert sorted(await rooms.state_envelopes(ROOM)) == sorted(e.to_bytes() for e in by_seq)
        assert await rooms.history("!otherroom:tsu", 10) == []


async def test_ids_at_gives_the_id_held_at_each_place_and_leaves_out_places_with_none(
    tmp_path: Path,
) -> None:
    # More seqs of one origin than one statement asks for, given out of order and twice.
    envelopes = _stream("tsu", 1_200, 0) + _stream("ise", 30, 1)
    async with Store(tmp_path / "node.db") as store:
        rooms = RoomStore(store)
        await rooms.load_positions()
        rows = [EnvelopeRow(e, Status.ACCEPTED) for e in envelopes]
        await store.write_all(rooms.plan_write(rows, [], [(ROOM, "tsu")], 1_000).statements)
        held = {(e.content.room, e.content.origin, e.content.seq): e.id for e in envelopes}
        asked = [*reversed(held), *held]
        missing = [(ROOM, "tsu", 1_201), (ROOM, "nabari", 1), ("!otherroom:tsu", "tsu", 1)]
        assert await rooms.ids_at(asked + missing) == held
        assert await rooms.ids_at([]) == {}
