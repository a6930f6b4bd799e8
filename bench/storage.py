"""What a durable commit of received envelopes costs as the node's envelope table grows.

The node's own storage path, no network: `Store` opened as a node opens it (WAL,
synchronous=FULL, the schema of every migration), `RoomStore.plan_write` statements
for batches of 1,500 sealed 1 KiB messages (a receiver's batch in the throughput
figure), committed by `Store.write_all`, with a passive checkpoint every 5 commits
(as the node's checkpointer at that rate). CPU time of the process per envelope,
sealing left out.

- envelope_commit_us_first_50k: while the table holds up to 50,000 envelopes;
- envelope_commit_us_at_250k: while it grows from 200,000 to 250,000.

The node finds envelopes by id through `EnvelopeKeys` (gateway/envelopekeys.py): ids
indexed in bulk, sorted, every eighth or so of the table; the cost of those bulk
passes is in the figures. The baseline of each is the same run with the index on ids
the node had before, written by every commit: an id is a random SHA-256, so each
commit touches pages all over that index, a page per envelope once the index is much
larger than a batch. The ratio is what indexing in bulk saves, and how that grows with
the table.
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
            if id_index:  # as before envelope_key: an index every commit writes into
                await store.db.execute("CREATE UNIQUE INDEX envelope_id ON envelope (id)")
            rooms = RoomStore(store)
            await rooms.load_positions()
            contents = Contents()
            spent, done, counted, commits = 0.0, 0, 0, 0
            while done < total:
                sealed = seal_batch(contents.make(min(BATCH, total - done)), contents.key)
                rows = [EnvelopeRow(envelope, Status.ACCEPTED) for envelope in sealed]
                planned = rooms.plan_write(rows, [], [], 0)
                statements: list[Any] = planned.statements
                if id_index:
                    statements = [(sql, r) for sql, r in statements if "envelope_key" not in sql]
                started = time.process_time()
                await store.write_all(statements)
                rooms.step_committed(planned.acks_through, planned.keys_flushed)
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
    now = asyncio.run(_costs(total, id_index=False))
    progress("storage: the same with an index on envelope ids written by every commit")
    indexed = asyncio.run(_costs(total, id_index=True))
    for index, (a, b) in enumerate(zip(now, indexed, strict=True)):
        progress(
            f"storage: envelopes {index * 50:,}k-{(index + 1) * 50:,}k: {a:.1f} µs each, "
            f"{b:.1f} with the id index in every commit"
        )
    return [
        result("envelope_commit_us_first_50k", now[0], "us", indexed[0]),
        result("envelope_commit_us_at_250k", now[-1], "us", indexed[-1]),
    ]


FIGURES = {
    "storage": (("envelope_commit_us_first_50k", "envelope_commit_us_at_250k"), envelope_commit)
}
