"""Tests for gateway.store: migrations, transactions, the write lock and error translation."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import gateway.store as store_module
from federation.errors import StorageError
from federation.invites import Approval, JoinState
from gateway.store import MIGRATIONS, PeerHealth, Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "node.db") as opened:
        yield opened


async def _schema(store: Store) -> tuple[int, list[str]]:
    async with store.db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    async with store.db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    ) as cursor:
        tables = [r[0] for r in await cursor.fetchall()]
    assert row is not None
    return int(row[0]), tables


def _health(node_id: str, now_ms: int = 1_000) -> PeerHealth:
    return PeerHealth(
        node_id=node_id,
        last_contact_ms=now_ms,
        rtt_ms=2.5,
        last_attempt_ms=now_ms,
        failures=0,
        last_error=None,
    )


# --------------------------------------------------------------------------- migrations


async def test_migrations_create_the_schema_once_and_reopening_keeps_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    async with Store(path) as store:
        version, tables = await _schema(store)
        assert version == len(MIGRATIONS)
        assert tables == [
            "audit",
            "audit_head",
            "envelope",
            "envelope_key",
            "file",
            "file_ref",
            "invitation",
            "login_failure",
            "meta",
            "outbox",
            "peer_health",
            "read_marker",
            "receipt",
            "refresh_token",
            "relation",
            "relayed",
            "relayed_to",
            "remote_user",
            "room",
            "roster",
            "session",
            "user_account",
        ]
        await store.set_meta("federation_id", b"mie-1234abcd")
        await store.save_roster(1, b"signed-v1", 1_000)

    # Reopening must not re-run the migration (CREATE TABLE would fail) nor lose data.
    async with Store(path) as store:
        assert await _schema(store) == (len(MIGRATIONS), tables)
        assert await store.get_meta("federation_id") == b"mie-1234abcd"
        assert await store.latest_roster() == b"signed-v1"


async def test_the_nodes_connection_has_its_page_cache_size_at_every_open(
    tmp_path: Path,
) -> None:
    # A per-connection setting, not stored in the file: it must be set at every open.
    for _ in range(2):
        async with Store(tmp_path / "node.db") as store:
            async with store.db.execute("PRAGMA cache_size") as cursor:
                row = await cursor.fetchone()
            assert row is not None and row[0] == -store_module.CACHE_MIB * 1024


async def test_closed_store_raises_storage_error_store_closed(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    with pytest.raises(StorageError) as caught:
        await store.get_meta("role")
    assert caught.value.code == "store_closed"


# --------------------------------------------------------------------------- roster


async def test_latest_roster_is_none_in_an_empty_store(store: Store) -> None:
    assert await store.latest_roster() is None


async def test_latest_roster_returns_the_highest_version_not_the_last_saved(
    store: Store,
) -> None:
    await store.save_roster(1, b"v1", 1_000)
    await store.save_roster(3, b"v3", 3_000)
    await store.save_roster(2, b"v2", 4_000)  # an older version arriving late
    assert await store.latest_roster() == b"v3"


async def test_saving_a_roster_version_twice_keeps_the_first_copy(store: Store) -> None:
    await store.save_roster(5, b"original", 1_000)
    await store.save_roster(5, b"replay", 2_000)
    assert await store.latest_roster() == b"original"


# --------------------------------------------------------------------------- transactions


async def test_transaction_that_raises_rolls_back_everything_it_wrote(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as db:
            await Store.insert_roster(db, 1, b"v1", 1_000)
            await db.execute("INSERT INTO meta (key, value) VALUES ('role', x'00')")
            raise RuntimeError("boom")
    assert await store.latest_roster() is None
    assert await store.get_meta("role") is None
    # The lock was released and no transaction is left open: the next write works.
    await store.save_roster(2, b"v2", 2_000)
    assert await store.latest_roster() == b"v2"


async def test_transaction_cancelled_while_waiting_to_begin_leaves_no_transaction_open(
    store: Store, tmp_path: Path
) -> None:
    # Another connection holds the write lock, so BEGIN IMMEDIATE waits in aiosqlite's thread;
    # the waiting task is cancelled (a node stopping). Once the lock is free, that BEGIN still
    # runs: it must not leave a transaction open on the node's one connection.
    other = sqlite3.connect(tmp_path / "node.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def write() -> None:
        async with store.transaction() as db:
            await db.execute("INSERT INTO meta (key, value) VALUES ('lost', x'00')")

    waiting = asyncio.create_task(write())
    await asyncio.sleep(0.2)
    waiting.cancel()
    await asyncio.sleep(0.1)
    await asyncio.to_thread(other.execute, "ROLLBACK")
    other.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await store.set_meta("after", b"1")  # failed with "within a transaction" before
    assert await store.get_meta("after") == b"1"
    assert await store.get_meta("lost") is None


async def test_sqlite_error_inside_a_transaction_surfaces_as_storage_error(
    store: Store,
) -> None:
    await store.set_meta("role", b"member")
    with pytest.raises(StorageError) as caught:
        async with store.transaction() as db:
            await db.execute("UPDATE meta SET value = x'01' WHERE key = 'role'")
            await db.execute("INSERT INTO meta (key, value) VALUES ('role', x'02')")  # duplicate
    assert not isinstance(caught.value, sqlite3.Error)
    assert isinstance(caught.value.code, str)
    assert await store.get_meta("role") == b"member"  # the first statement was rolled back


async def test_fifty_concurrent_health_writes_all_succeed_under_the_write_lock(
    store: Store,
) -> None:
    nodes = [f"node-{i:02d}" for i in range(50)]
    await asyncio.gather(*(store.record_health(_health(n, 1_000 + i)) for i, n in enumerate(nodes)))
    health = await store.peer_health()
    assert sorted(health) == nodes
    assert health["node-07"].last_contact_ms == 1_007


async def test_record_health_overwrites_the_previous_record_of_a_peer(store: Store) -> None:
    await store.record_health(_health("tsu", 1_000))
    failed = PeerHealth(
        node_id="tsu",
        last_contact_ms=1_000,
        rtt_ms=2.5,
        last_attempt_ms=6_000,
        failures=1,
        last_error="transport_error: refused",
    )
    await store.record_health(failed)
    assert await store.peer_health() == {"tsu": failed}


# --------------------------------------------------------------------------- read aside


def _meta_keys(connection: sqlite3.Connection) -> list[str]:
    """The keys these tests set (the migrations set others)."""
    query = "SELECT key FROM meta WHERE key LIKE 'test-%' ORDER BY key"
    return [row[0] for row in connection.execute(query)]


async def test_a_read_aside_does_not_wait_behind_the_nodes_connection(store: Store) -> None:
    await store.set_meta("test-committed", b"1")
    release = threading.Event()
    # The node's connection is busy (as with a long commit) until `release` is set.
    busy = asyncio.create_task(store.read(lambda _connection: release.wait(10)))
    await asyncio.sleep(0.05)
    try:
        keys = await asyncio.wait_for(store.read_aside(_meta_keys), 5)
        assert not busy.done()
    finally:
        release.set()
    assert await busy is True
    assert keys == ["test-committed"]


async def test_a_read_aside_sees_what_is_committed_and_nothing_of_a_transaction_under_way(
    store: Store,
) -> None:
    async with store.transaction() as db:
        await db.execute("INSERT INTO meta (key, value) VALUES ('test-open', x'00')")
        assert await store.read_aside(_meta_keys) == []
    assert await store.read_aside(_meta_keys) == ["test-open"]


async def test_a_read_aside_cannot_write_and_its_errors_are_storage_errors(store: Store) -> None:
    with pytest.raises(StorageError) as caught:
        await store.read_aside(
            lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('test-no', x'00')")
        )
    assert caught.value.code == "database_error"
    assert "readonly" in str(caught.value)
    with pytest.raises(StorageError):
        await store.read_aside(lambda c: c.execute("SELECT nothing FROM nowhere"))
    assert await store.get_meta("test-no") is None
    assert await store.read_aside(_meta_keys) == []  # usable after the refusals


async def test_a_closed_store_refuses_a_read_aside_and_a_reopened_one_reads_again(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "node.db")
    with pytest.raises(StorageError) as caught:
        await store.read_aside(_meta_keys)
    assert caught.value.code == "store_closed"
    async with store:
        await store.set_meta("test-kept", b"1")
        assert await store.read_aside(_meta_keys) == ["test-kept"]
        readers = [t for t in threading.enumerate() if t.name.startswith("db-reader")]
        assert readers
    for thread in readers:
        assert not thread.is_alive()  # ended at close, its connection closed on it
    with pytest.raises(StorageError) as caught:
        await store.read_aside(_meta_keys)
    assert caught.value.code == "store_closed"
    async with store:
        assert await store.read_aside(_meta_keys) == ["test-kept"]
        # A read asked for while the store closes is refused, not run on a new thread.
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)
        with pytest.raises(StorageError) as caught:
            await store.read_aside(_meta_keys)
        assert caught.value.code == "store_closed"
        await closing
    assert not [t for t in threading.enumerate() if t.name.startswith("db-reader")]


# --------------------------------------------------------------------------- invitations


async def test_invitation_round_trips_and_update_inside_a_transaction_keeps_unset_fields(
    store: Store,
) -> None:
    await store.add_invitation(
        nonce="n-1", node_id="tsu", expires_at=9_000, approval=Approval.MANUAL, relay=True, now=100
    )
    row = await store.invitation("n-1")
    assert row is not None
    assert (row.node_id, row.expires_at, row.approval, row.relay) == (
        "tsu",
        9_000,
        Approval.MANUAL,
        True,
    )
    assert (row.state, row.created_at, row.updated_at) == (JoinState.ISSUED, 100, 100)
    assert (row.request, row.request_keys, row.certificate) == (None, None, None)

    async with store.transaction() as db:
        await store.update_invitation(
            db, "n-1", state=JoinState.PENDING, now=200, request=b"req", request_keys=b"keys"
        )
    async with store.transaction() as db:
        await store.update_invitation(
            db, "n-1", state=JoinState.APPROVED, now=300, certificate=b"cert"
        )

    row = await store.invitation("n-1")
    assert row is not None
    assert (row.state, row.created_at, row.updated_at) == (JoinState.APPROVED, 100, 300)
    assert (row.request, row.request_keys, row.certificate) == (b"req", b"keys", b"cert")
    assert [r.nonce for r in await store.invitations(JoinState.APPROVED)] == ["n-1"]
    assert await store.invitations(JoinState.PENDING) == []
    assert [r.nonce for r in await store.invitations()] == ["n-1"]


async def test_unknown_invitation_is_none(store: Store) -> None:
    assert await store.invitation("missing") is None


async def test_invitation_update_in_a_failed_transaction_is_not_kept(store: Store) -> None:
    await store.add_invitation(
        nonce="n-2", node_id="ise", expires_at=9_000, approval=Approval.AUTO, relay=False, now=100
    )
    with pytest.raises(RuntimeError):
        async with store.transaction() as db:
            await store.update_invitation(db, "n-2", state=JoinState.DENIED, now=200)
            raise RuntimeError("operator interrupted")
    row = await store.invitation("n-2")
    assert row is not None
    assert (row.state, row.updated_at) == (JoinState.ISSUED, 100)


# --------------------------------------------------------------------------- open errors


async def test_opening_a_directory_as_the_database_raises_storage_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    before = set(threading.enumerate())
    with pytest.raises(StorageError) as caught:
        await store.open()
    # The database thread of the failed connect is gone, not left to report to a loop
    # that may be closed by the time it does.
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert [t for t in left if "_connection_worker_thread" in t.name] == []
    assert type(caught.value) is StorageError
    assert not isinstance(caught.value, sqlite3.Error)
    assert isinstance(caught.value.code, str)
    assert caught.value.code


async def test_opening_a_database_in_a_missing_directory_raises_storage_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(StorageError) as caught:
        async with Store(tmp_path / "no-such-dir" / "node.db"):
            pass
    assert isinstance(caught.value.code, str)


async def test_a_database_of_an_earlier_version_gains_the_staff_tables_and_keeps_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.db"
    monkeypatch.setattr("gateway.store.MIGRATIONS", MIGRATIONS[:3])
    async with Store(path) as store:
        await store.set_meta("federation_id", b"mie-1234abcd")
        assert "user_account" not in (await _schema(store))[1]
    monkeypatch.setattr("gateway.store.MIGRATIONS", MIGRATIONS)
    async with Store(path) as store:
        version, tables = await _schema(store)
        assert version == len(MIGRATIONS)
        assert {"user_account", "session", "refresh_token", "login_failure"} <= set(tables)
        assert await store.get_meta("federation_id") == b"mie-1234abcd"


# --------------------------------------------------------------------------- write_all


@pytest.mark.parametrize("one_trip", [True, False])
async def test_write_all_commits_every_statement_or_none(
    store: Store, one_trip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "ONE_TRIP", one_trip)
    insert = "INSERT INTO meta (key, value) VALUES (?, ?)"
    await store.write_all([(insert, [("a", b"1"), ("b", b"2")]), (insert, []), (insert, [])])
    with pytest.raises(StorageError):
        # The second statement breaks the primary key: the first is rolled back with it.
        await store.write_all([(insert, [("c", b"3")]), (insert, [("a", b"again")])])
    async with store.db.execute("SELECT key, value FROM meta WHERE key IN ('a', 'b', 'c')") as c:
        assert sorted(await c.fetchall()) == [("a", b"1"), ("b", b"2")]
    await store.write_all([(insert, [("d", b"4")])], durable=False)
    async with store.db.execute("PRAGMA synchronous") as cursor:
        row = await cursor.fetchone()
    assert row is not None and row[0] == 2  # FULL again after a write without fsync
    async with store.transaction() as db:  # the connection is usable, in no transaction
        await db.execute(insert, ("e", b"5"))


async def test_the_log_is_copied_into_the_database_file_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.05)
    database = tmp_path / "node.db"
    store = Store(database)
    await store.open()
    try:
        store.checkpoint_in_background()
        await asyncio.sleep(0.2)
        # Commits no longer checkpoint every 1,000 pages themselves, only as a backstop.
        async with store.db.execute("PRAGMA wal_autocheckpoint") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        assert row[0] == store_module.CHECKPOINT_BACKSTOP_BYTES // store_module.PAGE_BYTES
        before = database.stat().st_size
        for batch in range(40):  # about 2.4 MB: below any automatic checkpoint
            rows = [(f"k{batch}-{n}", bytes([n]) * 3000) for n in range(20)]
            await store.write_all([("INSERT INTO meta (key, value) VALUES (?, ?)", rows)])
        for _ in range(200):
            if store.checkpoints and database.stat().st_size > before + 2_000_000:
                break
            await asyncio.sleep(0.05)
        assert store.checkpoints > 0
        assert database.stat().st_size > before + 2_000_000  # the pages are in the file
    finally:
        await store.close()
    # Closing stopped it; the data is all there when the store is opened again.
    async with Store(database) as again:
        rows = await again.read_all("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'")
        assert rows[0][0] == 800


async def test_a_new_database_has_16_kib_pages(tmp_path: Path) -> None:
    async with Store(tmp_path / "node.db") as store:
        assert await store.page_size() == store_module.PAGE_BYTES == 16 * 1024
    database = sqlite3.connect(tmp_path / "node.db")
    try:
        assert database.execute("PRAGMA page_size").fetchone()[0] == 16 * 1024
        assert database.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        database.close()


async def test_a_database_made_with_4_kib_pages_keeps_them_and_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node upgraded from a version that left SQLite's default page size: the store
    # opens the database as it is, migrations and all, and sizes the log's backstop in
    # its pages.
    path = tmp_path / "node.db"
    monkeypatch.setattr(store_module, "PAGE_BYTES", 4096)
    async with Store(path) as old:
        await old.set_meta("kept", b"from before")
    monkeypatch.undo()
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.05)
    store = Store(path)
    await store.open()
    try:
        assert await store.page_size() == 4096
        assert await store.get_meta("kept") == b"from before"
        store.checkpoint_in_background()
        await asyncio.sleep(0.2)
        async with store.db.execute("PRAGMA wal_autocheckpoint") as cursor:
            row = await cursor.fetchone()
        assert row is not None and row[0] == store_module.CHECKPOINT_BACKSTOP_BYTES // 4096
        rows = [(f"row-{n}", bytes([n]) * 3000) for n in range(50)]
        await store.write_all([("INSERT INTO meta (key, value) VALUES (?, ?)", rows)])
    finally:
        await store.close()
    async with Store(path) as again:
        assert await again.page_size() == 4096
        counted = await again.read_all("SELECT COUNT(*) FROM meta WHERE key LIKE 'row-%'")
        assert counted[0][0] == 50


def _bytes_written() -> int:
    """What this process has handed the kernel to write, in bytes (`wchar`)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


async def test_a_multi_row_write_into_a_random_index_writes_its_log_and_no_statement_journal(
    tmp_path: Path,
) -> None:
    # Each joined INSERT may undo itself alone, so SQLite keeps a copy of every page it
    # changes. On disk (its default past 64 KiB) that copy is written to a temporary
    # file: in a receiver's batch, one 4 KiB page per envelope for the id index alone.
    # The whole transaction is the unit of undo here, so the copy stays in memory.
    insert = "INSERT INTO meta (key, value) VALUES (?, ?)"
    async with Store(tmp_path / "node.db") as store:
        await store.write_all([(insert, [(secrets.token_hex(16), b"v") for _ in range(20_000)])])
        await store.read_all("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = [(secrets.token_hex(16), b"x" * 40) for _ in range(2_000)]  # all over the index
        before = _bytes_written()
        await store.write_all([(insert, rows)])
        written = _bytes_written() - before
        log = (tmp_path / "node.db-wal").stat().st_size
    assert log > 500_000  # the commit touched hundreds of pages of the index
    assert written < 1.3 * log, f"{written:,} bytes written for a log of {log:,}"


async def test_migrations_sort_on_disk_and_the_running_node_keeps_temporary_files_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A migration that builds an index over a large table sorts all of it; in memory that
    # sort would take as much RAM as the index. The node's own writes keep theirs there.
    probe = "CREATE TABLE probe AS SELECT temp_store FROM pragma_temp_store()"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, probe))
    async with Store(tmp_path / "node.db") as store:
        during = await store.read_all("SELECT temp_store FROM probe")
        after = await store.read_all("PRAGMA temp_store")
    assert during == [(0,)]  # the default: files, past SQLite's own memory limits
    assert after == [(2,)]  # MEMORY


@pytest.mark.parametrize("count", [1, 2, 7, 256, 300, 1000])
async def test_rows_joined_into_multi_row_inserts_are_stored_as_executemany_stores_them(
    tmp_path: Path, count: int
) -> None:
    # An upsert whose rows repeat a key within one batch, an autoincrement key, and a
    # statement that is not an INSERT (run row by row, as given).
    schema = "CREATE TABLE t (pos INTEGER PRIMARY KEY AUTOINCREMENT, k TEXT UNIQUE, v BLOB, n INT)"
    upsert = "INSERT INTO t (k, v, n) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET n = t.n + 1"
    update = "UPDATE t SET v = ? WHERE k = ?"
    rows = [(f"k{i % (count // 2 + 1)}", bytes([i % 256]) * (i % 5), i) for i in range(count)]
    updates = [(b"u", f"k{i}") for i in range(0, count, 3)]
    tables = []
    for name, write in (("joined", store_module._insert_rows), ("plain", None)):
        connection = sqlite3.connect(tmp_path / f"{name}.db", isolation_level=None)
        connection.execute(schema)
        connection.execute("BEGIN")
        for sql, given in ((upsert, rows), (update, updates)):
            if write is None:
                connection.executemany(sql, given)
            else:
                write(connection, sql, given)
        connection.execute("COMMIT")
        tables.append(connection.execute("SELECT * FROM t ORDER BY pos").fetchall())
        connection.close()
    assert tables[0] == tables[1]
    assert len(tables[0]) == count // 2 + 1


def test_joined_inserts_take_a_few_shapes_of_statement_each_within_sqlites_limits() -> None:
    one = "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT DO NOTHING"
    joined = store_module._joined(one, 1000)
    assert joined is not None
    text, count = joined
    assert count == store_module.MULTI_ROW
    assert text.count("(?, ?)") == count and text.endswith(") ON CONFLICT DO NOTHING")
    assert store_module._joined(one, 300) == joined  # then 32, 8 and 4 rows for the 44 left
    assert store_module._joined(one, 44) == (text.replace(", (?, ?)" * (count - 32), ""), 32)
    wide = "INSERT INTO t VALUES (" + ", ".join(["?"] * 500) + ")"
    assert store_module._joined(wide, 1000) is not None
    assert store_module._joined(wide, 1000)[1] == 64  # 66 rows would pass 32,766 parameters
    assert store_module._joined("DELETE FROM t WHERE a = ?", 10) is None
    assert store_module._joined("INSERT INTO t SELECT * FROM u WHERE a = ?", 10) is None
