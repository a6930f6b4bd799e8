"""What a durable commit of received envelopes costs as the node's envelope table grows.

The node's own storage path, no network: `Store` opened as a node opens it (WAL,
synchronous=FULL, the schema of every migration), `RoomStore.plan_write` statements
for batches of 1,500 sealed 1 KiB messages (a receiver's batch in the throughput
figure), committed by `Store.write_all`, with a passive checkpoint every 5 commits
(as the node's checkpointer at that rate). CPU time of the process per envelope,
sealing left out.

- envelope_commit_us_first_50k: while the table holds up to 50,000 envelopes;
- envelope_commit_us_at_250k: while it grows from 200,000 to 250,000.

The baseline of each is the same run over the same table without the index on
envelope ids (a random SHA-256, so each commit touches pages all over that index: a
page per envelope once the index is much larger than a batch), which the node uses
to find an annotation's target and to join outbox rows to their envelope. The
difference is what that index costs, and how it grows with the table.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline import Contents
from common import progress, result
from flow import Baselines, Profiler, Sizes

from federation.envelope import seal_batch
from gateway.roomstore import EnvelopeRow, RoomStore, Status
from gateway.store import Store, _checkpoint, _checkpoint_connection

BATCH = 1500
CHECKPOINT_EVERY = 5


async def _drop_id_index(store: Store) -> None:
    """Rebuild the (still empty) envelope table as the migrations made it, less the
    index on its ids: the id no longer its primary key, the partial index on ids gone."""
    rows = await store.read_all(
        "SELECT type, sql FROM sqlite_master WHERE tbl_name = 'envelope' AND sql IS NOT NULL"
    )
    table = next(sql for kind, sql in rows if kind == "table")
    without = table.replace("id BLOB PRIMARY KEY", "id BLOB NOT NULL")
    if without == table:
        raise RuntimeError("the envelope table's id is no longer `id BLOB PRIMARY KEY`")
    indexes = [sql for kind, sql in rows if kind == "index" and "(id)" not in sql]
    script = ["BEGIN", "DROP TABLE envelope", without, *indexes, "COMMIT"]
    await store.db.executescript(";\n".join(script) + ";")


async def _costs(total: int, *, id_index: bool) -> list[float]:
    """CPU µs per envelope of each 50,000 or so committed (whole batches), in order."""
    step = min(50_000, total)
    costs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kakehashi-storage-") as tmp:
        path = Path(tmp) / "node.db"
        store = Store(path)
        await store.open()
        checkpoints = _checkpoint_connection(path)  # as the node's checkpointer
        try:
            if not id_index:
                await _drop_id_index(store)
            rooms = RoomStore(store)
            await rooms.load_positions()
            contents = Contents()
            spent, done, counted, commits = 0.0, 0, 0, 0
            while done < total:
                sealed = seal_batch(contents.make(min(BATCH, total - done)), contents.key)
                rows = [EnvelopeRow(envelope, Status.ACCEPTED) for envelope in sealed]
                statements: list[Any] = rooms.plan_write(rows, [], [], 0).statements
                if not id_index:
                    statements = [
                        (sql.replace("ON CONFLICT (id)", "ON CONFLICT (room_id, origin, seq)"), r)
                        for sql, r in statements
                    ]
                started = time.process_time()
                await store.write_all(statements)
                commits += 1
                if commits % CHECKPOINT_EVERY == 0:
                    _checkpoint(checkpoints)
                spent += time.process_time() - started
                done += len(rows)
                counted += len(rows)
                if counted >= step or done == total:
                    costs.append(spent / counted * 1e6)
                    spent, counted = 0.0, 0
        finally:
            checkpoints.close()
            await store.close()
    return costs


def envelope_commit(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    total = sizes.storage
    progress(f"storage: committing {total:,} envelopes in batches of {BATCH:,}, as stored now")
    now = asyncio.run(_costs(total, id_index=True))
    progress("storage: the same without the index on envelope ids")
    without = asyncio.run(_costs(total, id_index=False))
    for index, (a, b) in enumerate(zip(now, without, strict=True)):
        progress(
            f"storage: envelopes {index * 50:,}k-{(index + 1) * 50:,}k: {a:.1f} µs each, "
            f"{b:.1f} without the id index"
        )
    return [
        result("envelope_commit_us_first_50k", now[0], "us", without[0]),
        result("envelope_commit_us_at_250k", now[-1], "us", without[-1]),
    ]


FIGURES = {
    "storage": (("envelope_commit_us_first_50k", "envelope_commit_us_at_250k"), envelope_commit)
}
