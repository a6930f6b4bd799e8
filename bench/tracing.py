"""Wall-clock timing of a node's storage and delivery steps (only with `--profile`).

py-spy shows where CPU goes; it cannot show time spent waiting: for the SQLite
thread, for fsync, for the write lock, for a peer. This module wraps, in the
node worker's process only (never in the gateway's code), the calls where a node
waits and records how long each took:

- every aiosqlite call, split into: queued (from the event loop handing it over
  until the SQLite thread starts it), run (inside sqlite3, fsync included) and
  resume (from the result being ready until the coroutine runs again);
- `Store.write_all` as a whole (hand-over, write lock, transaction, resume);
- `Store.transaction`: entering (write lock + BEGIN IMMEDIATE), body, COMMIT;
- the coarse async steps of sending, receiving, delivering and catching up.

`dump()` returns the table since the last dump and starts a new one.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite.core

from gateway.catchup import CatchUp
from gateway.node import Node
from gateway.rooms import RoomService
from gateway.roomstore import RoomStore
from gateway.store import Store
from gateway.transport import PeerClient

_samples: dict[str, list[float]] = defaultdict(list)
skipped: list[str] = []
_LIMIT = 200_000


def _record(label: str, seconds: float) -> None:
    samples = _samples[label]
    if len(samples) < _LIMIT:
        samples.append(seconds * 1000)


def _sql_label(fn: Any, args: tuple[Any, ...]) -> str:
    name = getattr(fn, "__name__", "call")
    if args and isinstance(args[0], str):
        words = " ".join(args[0].split())
        return f"sql {name}: {words[:60]}"
    return f"sql {name}"


def _wrap_execute() -> None:
    original = aiosqlite.core.Connection._execute

    async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        marks = [0.0, 0.0]

        def timed(*a: Any, **k: Any) -> Any:
            marks[0] = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                marks[1] = time.perf_counter()

        handed = time.perf_counter()
        try:
            return await original(self, timed, *args, **kwargs)
        finally:
            resumed = time.perf_counter()
            if marks[1]:
                label = _sql_label(fn, args)
                _record(label + " [run]", marks[1] - marks[0])
                _record("aiosqlite queued (all calls)", marks[0] - handed)
                _record("aiosqlite run (all calls)", marks[1] - marks[0])
                _record("aiosqlite resume (all calls)", resumed - marks[1])

    aiosqlite.core.Connection._execute = _execute  # type: ignore[method-assign]


def _wrap_transaction() -> None:
    original = Store.transaction

    @asynccontextmanager
    async def transaction(self: Store, *, durable: bool = True) -> AsyncIterator[Any]:
        started = time.perf_counter()
        manager = original(self, durable=durable)
        db = await manager.__aenter__()
        entered = time.perf_counter()
        _record("Store.transaction enter (write lock + BEGIN)", entered - started)
        try:
            yield db
        except BaseException as exc:
            if not await manager.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            return
        body_done = time.perf_counter()
        await manager.__aexit__(None, None, None)
        done = time.perf_counter()
        _record("Store.transaction body", body_done - entered)
        _record("Store.transaction COMMIT", done - body_done)

    Store.transaction = transaction  # type: ignore[method-assign]


def _wrap_async(
    cls: type, name: str, label: Callable[[tuple[Any, ...]], str] | None = None
) -> None:
    original = getattr(cls, name, None)
    if original is None:  # renamed by a gateway change: time what still exists
        skipped.append(f"{cls.__name__}.{name}")
        return

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            text = label(args) if label else f"{cls.__name__}.{name}"
            _record(text, time.perf_counter() - started)

    setattr(cls, name, wrapper)


def _wrap_sync(cls: type, name: str) -> None:
    original = getattr(cls, name, None)
    if original is None:
        skipped.append(f"{cls.__name__}.{name}")
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _record(f"{cls.__name__}.{name}", time.perf_counter() - started)

    setattr(cls, name, wrapper)


def install() -> None:
    _wrap_execute()
    _wrap_transaction()
    _wrap_async(Store, "write_all")
    _wrap_async(RoomService, "send")
    _wrap_async(RoomService, "_originate")
    _wrap_async(RoomService, "_commit")
    _wrap_async(RoomService, "_after")
    _wrap_sync(RoomService, "_plan_local")
    _wrap_async(RoomService, "receive")
    _wrap_async(RoomService, "_write")
    _wrap_async(RoomService, "missing_for")
    _wrap_async(RoomStore, "outbox_batch")
    _wrap_async(RoomStore, "_write_acks")
    _wrap_async(RoomStore, "processed_after")
    _wrap_async(Node, "_handle_envelopes")
    _wrap_async(Node, "_handle_sync")
    _wrap_async(CatchUp, "sync_with")
    _wrap_async(PeerClient, "request", lambda args: f"PeerClient.request {args[3]}")


def dump() -> list[dict[str, Any]]:
    rows = []
    for label, samples in _samples.items():
        if not samples:
            continue
        ordered = sorted(samples)
        rows.append(
            {
                "label": label,
                "calls": len(samples),
                "total_ms": sum(samples),
                "mean_ms": sum(samples) / len(samples),
                "p50_ms": ordered[len(ordered) // 2],
                "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                "max_ms": ordered[-1],
            }
        )
    _samples.clear()
    rows.sort(key=lambda row: -row["total_ms"])
    if skipped:
        rows.append(
            {
                "label": "not timed (gone from the gateway): " + ", ".join(skipped),
                "calls": 0,
                "total_ms": 0.0,
                "mean_ms": 0.0,
                "p50_ms": 0.0,
                "p99_ms": 0.0,
                "max_ms": 0.0,
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]], wall_s: float | None = None, top: int = 22) -> str:
    head = f"    {'calls':>7} {'total ms':>10} {'mean':>8} {'p50':>8} {'p99':>8} {'max':>8}  step"
    lines = [head]
    gone = [row["label"] for row in rows if not row["calls"]]
    for row in [row for row in rows if row["calls"]][:top]:
        lines.append(
            f"    {row['calls']:7d} {row['total_ms']:10.1f} {row['mean_ms']:8.3f} "
            f"{row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['max_ms']:8.2f}  {row['label']}"
        )
    lines += [f"    {label}" for label in gone]
    if wall_s:
        lines.append(f"    (over {wall_s:.1f}s of wall time; steps nest, so totals overlap)")
    return "\n".join(lines) + "\n"
