"""A node whose disk fills up: it refuses what it cannot commit, with a typed error,
keeps running, and takes everything in once there is space again. Nothing is lost.

The full node's home is a small tmpfs (root only), so SQLite meets a real ENOSPC:
no storage call is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from federation.envelope import Envelope, Kind
from federation.errors import KakehashiError, StorageError
from gateway.local import LocalFederation
from gateway.membership import create_federation
from gateway.monitoring import health_report
from gateway.node import Node
from gateway.store import Store
from tests.integration.conftest import eventually
from tests.system.conftest import unavailable

pytestmark = pytest.mark.system

HOME_MB = 16
MESSAGES = 3000
TEXT = "停電のお知らせ " + "x" * 1000
EXPECTED_ERRORS = {("audit_write_failed", "disk_full"), ("health_round_failed", "disk_full")}
"""What a node may log at error level while its disk is full: the audit records and
the peers' health it could not write (typed, no traceback). Anything else failed."""
LARGER_THAN_THE_LOG = ["津: 届かないはず " + "x" * 1000] * 300
"""A send at the full node: about 300 KB. Smaller, it could fit in the write-ahead log's
existing file (about 75 KB here), which SQLite reuses from the start once it is
checkpointed, so it would not need the disk to grow."""


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A tmpfs of HOME_MB mounted at `path`; skipped (failed on CI) where mounting is
    not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={HOME_MB}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fill `disk` to the last byte with a ballast file; returns it."""
    ballast = disk / "ballast"
    chunk = b"\0" * (64 * 1024)
    with ballast.open("wb", buffering=0) as out:
        for size in (len(chunk), 4096, 512, 1):
            while True:
                try:
                    out.write(chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return ballast


async def send_all(node: Node, room: str) -> list[str]:
    """Send MESSAGES numbered messages from `node`, 500 a call; returns their texts."""
    sent = [f"{k}: {TEXT}" for k in range(MESSAGES)]
    for start in range(0, MESSAGES, 500):
        await node.rooms.send(room, sent[start : start + 500])
    return sent


async def texts_at(node: Node, room: str) -> list[str]:
    rows = await node.rooms.store.history(room, 10**6)
    envelopes = [Envelope.from_bytes(wire) for _, wire in reversed(rows)]
    return [e.content.body["text"] for e in envelopes if e.content.kind is Kind.MESSAGE]


async def admin_send(node: Node, room: str) -> tuple[int, dict[str, Any]]:
    """A send on `node`'s admin socket: HTTP status and answer. Sent again while it is
    commit_failed (chained behind another failed commit), as that error asks."""
    connector = aiohttp.UnixConnector(path=str(node.home.admin_socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            async with session.post(
                "http://node/v1/rooms/send", json={"room": room, "texts": LARGER_THAN_THE_LOG}
            ) as response:
                answer = await response.json()
            if answer.get("error") != "commit_failed":
                break
    return response.status, answer


async def log_emptied(node: Node) -> bool:
    """Checkpoint and truncate `node`'s write-ahead log; False while a reader holds it
    (busy, or locked by a statement under way on the node's connection)."""
    try:
        async with node.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
            row = await cursor.fetchone()
    except sqlite3.OperationalError:
        return False
    return row is not None and row[0] == 0


async def outbox_empty(node: Node, peer: str) -> bool:
    return peer not in await node.rooms.store.outbox_depths()


async def on_disk(node: Node, room: str, count: int) -> bool:
    return len(await node.rooms.store.history(room, 10**6)) >= count


async def two_nodes_in_a_room(cluster: LocalFederation) -> tuple[Node, Node, str]:
    """mie-pref (retrying deliveries every half second at most, so tests need not wait
    long) and tsu, in one room where tsu has said one thing."""
    home = await cluster.init("mie-pref", "三重県", "240001")
    home.config.write_text(
        home.config.read_text().replace("retry_cap_seconds = 30.0", "retry_cap_seconds = 0.5")
    )
    await create_federation(home, name="三重県 市町連携")
    mie = await cluster.start("mie-pref")
    tsu = await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: {n.roster.version for n in cluster.nodes.values()} == {2})
    room = await mie.rooms.create("停電対応", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await tsu.rooms.send(room, ["津: 受信準備よし"])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 1)
    return mie, tsu, room


async def test_a_full_disk_refuses_cleanly_and_loses_nothing_once_freed(tmp_path: Path) -> None:
    root = tmp_path / "federation"
    with small_disk(root / "tsu") as disk:
        cluster = LocalFederation(root)
        try:
            mie, tsu, room = await two_nodes_in_a_room(cluster)
            ballast = fill(disk)
            # Monitoring says so before anyone sends: /healthz answers 503.
            code, report = await health_report(tsu)
            found = {c["check"]: c for c in report["checks"]}
            assert (code, found["disk"]["status"]) == (503, "critical")
            assert found["disk"]["detail"].startswith("0 B free of 16.0 MiB")

            with capture_logs() as logs:
                sent = await send_all(mie, room)
                await eventually(
                    lambda: any(
                        e["event"] == "delivery_failed" and e.get("code") == "disk_full"
                        for e in logs
                    ),
                    timeout=20,
                )
                # A send at the full node fails with the same typed error, and nothing
                # of it stays: its sequence number does not move on.
                own = tsu.rooms.vector(room)["tsu"]
                with pytest.raises(KakehashiError) as refused:
                    await tsu.rooms.send(room, LARGER_THAN_THE_LOG)
                assert refused.value.code in {"disk_full", "commit_failed"}
                assert tsu.rooms.vector(room)["tsu"] == own
                # As the operator sees it (`kakehashi room send` prints the message and
                # the hint): 507 Insufficient Storage, the code and what to do.
                status, answer = await admin_send(tsu, room)
                assert (status, answer["error"]) == (507, "disk_full")
                assert answer["hint"] == "free space, then retry"
                assert tsu.rooms.vector(room)["tsu"] == own

                ballast.unlink()
                # On disk, not in memory: memory runs ahead while a batch commits.
                await eventually(lambda: on_disk(tsu, room, 1 + MESSAGES + 1), timeout=60)
            # The full node said why it refused; the only errors are the typed ones of
            # EXPECTED_ERRORS (no task died, no commit chain broke).
            refusals = [e for e in logs if e["event"] == "peer_refused"]
            reasons = {e["reason"] for e in refusals}
            assert "disk_full" in reasons
            assert reasons <= {"disk_full", "commit_failed"}  # chained behind a failed one
            errors = [e for e in logs if e["log_level"] == "error"]
            assert {(e["event"], e.get("code")) for e in errors} <= EXPECTED_ERRORS
            # Every message once, in the order sent, and the same timeline on both nodes.
            at_tsu = await texts_at(tsu, room)
            assert [t for t in at_tsu if not t.startswith("津")] == sent
            assert at_tsu == await texts_at(mie, room)
            assert LARGER_THAN_THE_LOG[0] not in at_tsu
            # And the node works as before: a send from it reaches the other.
            await tsu.rooms.send(room, ["津: 復旧しました"])
            await eventually(
                lambda: mie.rooms.vector(room).get("tsu") == tsu.rooms.vector(room)["tsu"]
            )
        finally:
            await asyncio.wait_for(cluster.stop_all(), 30)


async def test_a_sender_whose_disk_fills_still_delivers_its_outbox(tmp_path: Path) -> None:
    """The sending node's disk fills while its peer is down: what is in its outbox still
    goes out, exactly once; only what needs the disk waits (new sends are refused, the
    acknowledged rows are deleted once there is space)."""
    root = tmp_path / "federation"
    with small_disk(root / "mie-pref") as disk:
        cluster = LocalFederation(root)
        try:
            mie, _, room = await two_nodes_in_a_room(cluster)
            await cluster.stop("tsu")
            sent = await send_all(mie, room)
            assert (await mie.rooms.store.outbox_depths())["tsu"][0] == MESSAGES
            # Empty the write-ahead log's file first: SQLite reuses it once checkpointed,
            # so writes that fit in it would not yet need the full disk to grow.
            await eventually(lambda: log_emptied(mie))
            ballast = fill(disk)
            with capture_logs() as logs:
                with pytest.raises(KakehashiError) as refused:
                    await mie.rooms.send(room, LARGER_THAN_THE_LOG)
                assert refused.value.code == "disk_full"
                tsu = await cluster.start("tsu")
                await eventually(lambda: on_disk(tsu, room, 1 + 1 + MESSAGES), timeout=60)
                assert [t for t in await texts_at(tsu, room) if not t.startswith("津")] == sent
                # Acknowledged, but the rows cannot be deleted yet: kept, and said so.
                await eventually(
                    lambda: any(
                        e["event"] == "outbox_ack_not_written" and e["code"] == "disk_full"
                        for e in logs
                    )
                )
                assert (await mie.rooms.store.outbox_depths())["tsu"][0] == MESSAGES
                ballast.unlink()
                # The acknowledged rows go once they can be deleted.
                await eventually(lambda: outbox_empty(mie, "tsu"), timeout=30)
            errors = [e for e in logs if e["log_level"] == "error"]
            assert {(e["event"], e.get("code")) for e in errors} <= EXPECTED_ERRORS
            assert await texts_at(tsu, room) == await texts_at(mie, room)
        finally:
            await asyncio.wait_for(cluster.stop_all(), 30)


async def test_a_transaction_that_cannot_commit_on_a_full_disk_says_disk_full(
    tmp_path: Path,
) -> None:
    """Every `Store.transaction` caller (accounts, audit, roster, ...) gets the typed
    error: SQLite has rolled back by itself, and a second ROLLBACK must not replace
    the error with "no transaction is active"."""
    with small_disk(tmp_path / "disk") as disk:
        async with Store(disk / "node.db") as store:
            ballast = fill(disk)
            with pytest.raises(StorageError) as full:
                async with store.transaction() as db:
                    await db.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?)", ("big", b"\1" * 2**20)
                    )
            assert full.value.code == "disk_full"
            assert await store.get_meta("big") is None
            ballast.unlink()
            async with store.transaction() as db:
                await db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", ("big", b"\1"))
            assert await store.get_meta("big") == b"\1"
