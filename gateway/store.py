"""The node's durable state in SQLite (WAL): roster history, invitations, peer health, audit.

One `Store` owns one aiosqlite connection, through which every write goes. Writes that
belong together happen in one transaction (`async with store.transaction()`), so a
crash leaves either the old or the new state, never half. Two more connections, each
on a thread of its own, change no row: one copies the log into the database file
(`checkpoint_in_background`), one serves reads that must not queue behind commits
(`read_aside`). Every aiosqlite/sqlite3 error is translated to `StorageError` here,
with 'disk full' and 'locked' called out, because those are what an operator can fix.

Schema changes are numbered migrations applied at open; the version lives in
`PRAGMA user_version`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import structlog

from federation.errors import StorageError
from federation.invites import Approval, JoinState

__all__ = [
    "CHECKPOINT_BACKSTOP_BYTES",
    "CHECKPOINT_INTERVAL",
    "PAGE_BYTES",
    "InvitationRow",
    "PeerHealth",
    "Statements",
    "Store",
]

log = structlog.get_logger("kakehashi.store")

ONE_TRIP = hasattr(aiosqlite.Connection, "_execute")
"""Whether aiosqlite can run a function on its thread (the method its own calls use, not
public API): then `Store.write_all` is one round trip, else one per statement."""

CHECKPOINT_INTERVAL = 0.5
"""Seconds between the background checkpoints of the write-ahead log (see
`Store.checkpoint_in_background`)."""
CHECKPOINT_BACKSTOP_BYTES = 100 * 1024 * 1024
"""How large the log may grow before a commit checkpoints it itself, should the
background checkpoints fall behind (SQLite's own default is 1,000 pages: 16 MiB here)."""

PAGE_BYTES = 16 * 1024
"""Page size of a database the node creates (SQLite's default is 4 KiB). A stored
envelope row is about 1.8 kB: a 4 KiB page holds two and leaves 15% of itself unused, a
16 KiB page holds nine and leaves 3%; and each page is one frame of the write-ahead log
(a header, a checksum, its own writes) and again one write when the log is copied into
the database file. Measured in a 100,000-message transfer between two nodes, in 11
alternating pairs: 20.1k/s against 18.3k/s with 4 KiB on average (won 9), 9-11% less
CPU per envelope at each node; 8 KiB and 32 KiB pages were both slower than 16 KiB
(lost 5 of 6). One-hop latency did not change beyond the host's noise. A database
created before keeps its page size and works as before: SQLite changes it only by
rewriting the whole file (`VACUUM` outside WAL mode), too long to do unasked while a
node starts (see the README, "Upgrading")."""

TEMP_STORE = "MEMORY"
"""Where the node's connection keeps temporary files: in memory. The one that matters is
the statement journal of a joined INSERT (`_insert_rows`): a copy of every page the
statement changes, so that it can be undone alone. SQLite writes it to a file in
/var/tmp once it passes 64 KiB; for a received batch that is one more 4 KiB page per
envelope (the pages of the id index), written, then thrown away, since the whole
transaction is what is undone here. Measured in a 100,000-message transfer between two
nodes: 36-41% fewer bytes written per node, about 10% more envelopes per second. It
costs a few MiB while a batch commits; the node's sorts are over small sets (its
queries use indexes). Set after the migrations: building an index over a large table
sorts all of it, and in memory that sort would take as much RAM as the index."""

CACHE_MIB = 32
"""Page cache of the node's own database connection, in MiB (SQLite's default is 2).
Chosen when every stored envelope added a key to an index on ids at a random place: with
2 MiB, the pages of that index soon no longer fit, and inserts read them back from the
operating system over and over. Measured then in a 100,000-message transfer between two
nodes, 32 MiB took 13% less CPU in the two database threads for the same work. Ids are
indexed in bulk now (gateway/envelopekeys.py), each bulk pass over every page of that
index; not measured again since. Paid in memory only as the cache fills."""

READER_CACHE_MIB = 2
"""Page cache of the second, read-only connection (`Store.read_aside`), in MiB (SQLite's
default): it reads rows just written, which the operating system still holds. With 8 MiB
a node holding 1,000,000 queued envelopes used 155-157 MB, with 2 MiB 147 MB."""

MULTI_ROW = 256
"""Rows one INSERT statement carries at most when `Store.write_all` joins them (see
`_insert_rows`)."""
_MAX_PARAMETERS = 32_766  # SQLITE_MAX_VARIABLE_NUMBER's default since SQLite 3.32

Statements = Sequence[tuple[str, Sequence[Sequence[Any]]]]
"""Prepared writes: SQL with the rows of parameters to run it with (`Store.write_all`)."""

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE roster (
        version INTEGER PRIMARY KEY,
        signed BLOB NOT NULL,
        stored_at INTEGER NOT NULL
    );
    CREATE TABLE invitation (
        nonce TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        approval TEXT NOT NULL,
        relay INTEGER NOT NULL,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        request BLOB,
        request_keys BLOB,
        certificate BLOB
    );
    CREATE INDEX invitation_node ON invitation (node_id, state);
    CREATE TABLE peer_health (
        node_id TEXT PRIMARY KEY,
        last_contact_ms INTEGER,
        rtt_ms REAL,
        last_attempt_ms INTEGER NOT NULL,
        failures INTEGER NOT NULL,
        last_error TEXT
    );
    """,
    """
    CREATE TABLE room (
        room_id TEXT PRIMARY KEY,
        home TEXT NOT NULL,
        joined_at INTEGER NOT NULL
    );
    CREATE TABLE envelope (
        id BLOB PRIMARY KEY,
        room_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        sender TEXT NOT NULL,
        hlc INTEGER NOT NULL,
        wire BLOB NOT NULL,
        status INTEGER NOT NULL,
        verdict TEXT,
        received_ms INTEGER NOT NULL,
        UNIQUE (room_id, origin, seq)
    );
    CREATE INDEX envelope_timeline ON envelope (room_id, status, hlc, origin, seq);
    CREATE TABLE outbox (
        pos INTEGER PRIMARY KEY AUTOINCREMENT,
        peer TEXT NOT NULL,
        envelope_id BLOB NOT NULL,
        enqueued_ms INTEGER NOT NULL
    );
    CREATE INDEX outbox_peer ON outbox (peer, pos);
    """,
    """
    CREATE TABLE relayed (
        id BLOB PRIMARY KEY,
        room_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        hlc INTEGER NOT NULL,
        wire BLOB NOT NULL,
        received_ms INTEGER NOT NULL
    );
    CREATE INDEX relayed_order ON relayed (room_id, origin, seq);
    CREATE TABLE relayed_to (
        destination TEXT NOT NULL,
        envelope_id BLOB NOT NULL,
        PRIMARY KEY (destination, envelope_id)
    ) WITHOUT ROWID;
    """,
    # The audit log (gateway/audit.py): append-only, hash-chained, with signed heads. The
    # triggers refuse changes through SQL so no code path can rewrite the record by mistake;
    # deliberate tampering (dropping them first) is what `kakehashi audit verify` detects.
    """
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        event TEXT NOT NULL,
        fields BLOB NOT NULL,
        prev BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE INDEX audit_time ON audit (at_ms);
    CREATE INDEX audit_event ON audit (event, seq);
    CREATE TABLE audit_head (
        seq INTEGER PRIMARY KEY,
        hash BLOB NOT NULL,
        at_ms INTEGER NOT NULL,
        signature BLOB NOT NULL,
        key_id TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_head_no_update BEFORE UPDATE ON audit_head
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # Staff accounts (gateway/accounts.py). `user_account`, not `user`: USER is a
    # reserved word in PostgreSQL, which a larger node's store may run on.
    """
    CREATE TABLE user_account (
        login TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        department TEXT NOT NULL,
        role TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        disabled INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_login_at INTEGER
    );
    CREATE TABLE session (
        id TEXT PRIMARY KEY,
        login TEXT NOT NULL REFERENCES user_account (login),
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER,
        revoked_reason TEXT
    );
    CREATE INDEX session_login ON session (login);
    CREATE INDEX session_expiry ON session (expires_at);
    CREATE TABLE refresh_token (
        hash BLOB PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES session (id),
        issued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        rotated_at INTEGER
    );
    CREATE INDEX refresh_token_session ON refresh_token (session_id);
    CREATE INDEX refresh_token_expiry ON refresh_token (expires_at);
    CREATE TABLE login_failure (
        scope TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX login_failure_scope ON login_failure (scope, at_ms);
    """,
    # What staff see of a room (gateway/timeline.py): read receipts (既読) and the edits,
    # reactions and redactions of messages, indexed from accepted envelopes (which stay
    # the record: these tables can be rebuilt from them). Positions are the display
    # order (hlc, origin, seq). The partial indexes serve history pages and unread counts
    # (messages only) and the rebuild after a crash (annotations only).
    """
    CREATE TABLE receipt (
        envelope_id BLOB PRIMARY KEY,
        room_id TEXT NOT NULL,
        reader TEXT NOT NULL,
        message_id BLOB NOT NULL,
        message_hlc INTEGER,
        message_origin TEXT,
        message_seq INTEGER,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX receipt_position
        ON receipt (room_id, message_hlc, message_origin, message_seq);
    CREATE TABLE read_marker (
        room_id TEXT NOT NULL,
        reader TEXT NOT NULL,
        message_id BLOB NOT NULL,
        hlc INTEGER NOT NULL,
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        PRIMARY KEY (room_id, reader)
    ) WITHOUT ROWID;
    CREATE TABLE relation (
        envelope_id BLOB PRIMARY KEY,
        room_id TEXT NOT NULL,
        target BLOB NOT NULL,
        kind TEXT NOT NULL,
        sender TEXT NOT NULL,
        hlc INTEGER NOT NULL,
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        value TEXT NOT NULL
    );
    CREATE INDEX relation_target ON relation (target, kind);
    CREATE INDEX envelope_messages ON envelope (room_id, hlc, origin, seq)
        WHERE status = 1 AND kind = 'message';
    CREATE INDEX envelope_annotations ON envelope (id)
        WHERE status = 1 AND kind IN ('edit', 'reaction', 'redact', 'receipt');
    """,
    # Shared files (gateway/files.py): one row per file this node knows of (its bytes here
    # or not yet), one per reference an accepted message makes to one, written in the
    # transaction that accepts the message.
    """
    CREATE TABLE file (
        sha256 BLOB PRIMARY KEY,
        size INTEGER NOT NULL,
        mime TEXT NOT NULL,
        state TEXT NOT NULL,
        stored_at INTEGER
    );
    CREATE TABLE file_ref (
        envelope_id BLOB NOT NULL,
        position INTEGER NOT NULL,
        sha256 BLOB NOT NULL REFERENCES file (sha256),
        room_id TEXT NOT NULL,
        name TEXT NOT NULL,
        mime TEXT NOT NULL,
        uploader TEXT NOT NULL,
        origin TEXT NOT NULL,
        uploaded_at INTEGER NOT NULL,
        PRIMARY KEY (envelope_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX file_ref_file ON file_ref (sha256, room_id);
    CREATE INDEX file_ref_room ON file_ref (room_id, uploaded_at);
    """,
    # Display names of other nodes' users (gateway/names.py): the latest their own node
    # gave in an accepted envelope, by its hybrid clock time, written in the transaction
    # that accepts it.
    """
    CREATE TABLE remote_user (
        user_id TEXT PRIMARY KEY,
        hlc INTEGER NOT NULL,
        display_name TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # One B-tree fewer for every message stored. The timeline order of accepted messages
    # is already kept by envelope_messages; the other accepted kinds (state, requests,
    # annotations: few) get a partial index of their own, and so do envelopes waiting for
    # dependencies (fewer still), instead of one index over every envelope.
    """
    DROP INDEX envelope_timeline;
    CREATE INDEX envelope_others ON envelope (room_id, hlc, origin, seq)
        WHERE status = 1 AND kind != 'message';
    CREATE INDEX envelope_pending ON envelope (hlc) WHERE status = 0;
    """,
    # No index on envelope ids that every commit writes into (gateway/envelopekeys.py):
    # ids are random, so each new one lands on a page of its own in such an index. The
    # table is rebuilt with the id an ordinary column and a row number that only grows
    # (AUTOINCREMENT: a deleted row's number is never given again), and ids get a table
    # of their own, `envelope_key`, filled in bulk up to the row number kept in meta.
    # Outbox rows name their envelope by its place (room, origin, seq), as the table's
    # unique key does; they keep the id for copies kept only to forward (`relayed`).
    """
    ALTER TABLE outbox ADD COLUMN room_id TEXT;
    ALTER TABLE outbox ADD COLUMN origin TEXT;
    ALTER TABLE outbox ADD COLUMN seq INTEGER;
    UPDATE outbox SET (room_id, origin, seq) =
        (SELECT e.room_id, e.origin, e.seq FROM envelope e WHERE e.id = outbox.envelope_id);
    ALTER TABLE envelope RENAME TO envelope_before_keys;
    DROP INDEX envelope_messages;
    DROP INDEX envelope_annotations;
    DROP INDEX envelope_others;
    DROP INDEX envelope_pending;
    CREATE TABLE envelope (
        row INTEGER PRIMARY KEY AUTOINCREMENT,
        id BLOB NOT NULL,
        room_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        sender TEXT NOT NULL,
        hlc INTEGER NOT NULL,
        wire BLOB NOT NULL,
        status INTEGER NOT NULL,
        verdict TEXT,
        received_ms INTEGER NOT NULL,
        UNIQUE (room_id, origin, seq)
    );
    INSERT INTO envelope (id, room_id, origin, seq, kind, sender, hlc, wire, status, verdict,
        received_ms)
        SELECT id, room_id, origin, seq, kind, sender, hlc, wire, status, verdict, received_ms
        FROM envelope_before_keys ORDER BY rowid;
    DROP TABLE envelope_before_keys;
    CREATE INDEX envelope_messages ON envelope (room_id, hlc, origin, seq)
        WHERE status = 1 AND kind = 'message';
    CREATE INDEX envelope_annotations ON envelope (id)
        WHERE status = 1 AND kind IN ('edit', 'reaction', 'redact', 'receipt');
    CREATE INDEX envelope_others ON envelope (room_id, hlc, origin, seq)
        WHERE status = 1 AND kind != 'message';
    CREATE INDEX envelope_pending ON envelope (hlc) WHERE status = 0;
    CREATE TABLE envelope_key (id BLOB PRIMARY KEY, row INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TRIGGER envelope_key_gone AFTER DELETE ON envelope
        BEGIN DELETE FROM envelope_key WHERE id = old.id; END;
    INSERT INTO envelope_key (id, row) SELECT id, row FROM envelope WHERE true ORDER BY id;
    INSERT INTO meta (key, value) VALUES
        ('envelope_keys_through', (SELECT COALESCE(MAX(row), 0) FROM envelope));
    """,
    # An outbox row may stand for a run of envelopes (gateway/roomstore.py): `count` of
    # one room and origin, seqs from `seq` up, at the positions up to `pos`. A node's own
    # messages to a peer take one row per commit instead of one each, and so do their
    # deletes once acknowledged. A run's envelope_id is empty: its envelopes are found by
    # seq. Rows written before stand for one envelope each.
    """
    ALTER TABLE outbox ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
    """,
)


def _write_in_thread(
    connection: sqlite3.Connection,
    statements: Statements,
    durable: bool,
    committing: Callable[[], object] | None = None,
) -> None:
    """`Store.write_all`'s transaction, run on the connection's own thread."""
    if not durable:
        connection.execute("PRAGMA synchronous=NORMAL")
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                _insert_rows(connection, sql, rows)
            if committing is not None:
                committing()
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
    finally:
        if not durable:
            connection.execute("PRAGMA synchronous=FULL")


_ONE_ROW = re.compile(r"(INSERT\b.*?\bVALUES\s*)(\(\s*\?(?:\s*,\s*\?)*\s*\))(.*)", re.S)


@functools.lru_cache(maxsize=256)
def _joined(sql: str, count: int) -> tuple[str, int] | None:
    """`sql` (an INSERT of one row of `?`s) rewritten to insert up to `count` rows, and how
    many it takes; None if `sql` is not such an INSERT."""
    match = _ONE_ROW.fullmatch(sql)
    if match is None:
        return None
    head, row, tail = match.groups()
    count = min(count, MULTI_ROW, _MAX_PARAMETERS // row.count("?"))
    count = 1 << (count.bit_length() - 1)  # a power of two: few shapes, each compiled once
    return f"{head}{', '.join([row] * count)}{tail}", count


def _insert_rows(connection: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """`executemany`, with the rows of an INSERT joined into multi-row statements.

    `executemany` steps the statement once per row, and sqlite3 releases the interpreter
    lock around each step: the database thread then waits for the lock once per row, and
    while the event loop is busy (a catch-up decoding its next page) each wait lasts up
    to the interpreter's switch interval. Measured with one busy thread beside it: 2000
    rows took 100-2,500 µs each instead of 20. Joined, one step inserts up to `MULTI_ROW`
    rows without the lock. The rows, their order and their conflicts are the same, and
    an error fails the transaction either way."""
    start = 0
    while len(rows) - start > 1:
        joined = _joined(sql, len(rows) - start)
        if joined is None:
            break
        text, count = joined
        connection.execute(text, [value for row in rows[start : start + count] for value in row])
        start += count
    if start < len(rows):
        connection.executemany(sql, rows[start:])


async def _connect(path: Path) -> aiosqlite.Connection:
    connecting = aiosqlite.connect(path, isolation_level=None)
    try:
        return await connecting
    except BaseException:
        # A failed connect stops aiosqlite's thread without waiting for it; waited for
        # here, it cannot report to an event loop that is gone by then.
        thread = getattr(connecting, "_thread", None)
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
        raise


_T = TypeVar("_T")


def _first_row(connection: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    cursor = connection.execute(sql, params)
    try:
        return cursor.fetchone()
    finally:
        cursor.close()


def _all_rows(connection: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    cursor = connection.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _checkpoint(connection: sqlite3.Connection) -> int:
    """One passive checkpoint: how many pages of the log are now in the database file."""
    _busy, _logged, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(copied)


def _reader_connection(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA query_only=ON")
        connection.execute("PRAGMA busy_timeout=5000")
        connection.execute(f"PRAGMA cache_size=-{READER_CACHE_MIB * 1024}")
        connection.execute(f"PRAGMA temp_store={TEMP_STORE}")
    except BaseException:
        connection.close()
        raise
    return connection


def _checkpoint_connection(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA synchronous=FULL")  # the database file is synced after each
    return connection


async def _rollback(db: aiosqlite.Connection) -> None:
    """Undo the open transaction unless SQLite already has: on some errors (a full disk
    at COMMIT) it rolls back by itself, and a second ROLLBACK would raise "no
    transaction is active" in place of the error that says what happened."""
    if db.in_transaction:
        await db.execute("ROLLBACK")


def _translate(exc: BaseException) -> StorageError:
    text = str(exc)
    if ("disk" in text and "full" in text) or "SQLITE_FULL" in text:
        return StorageError(
            f"the node's disk is full: {text}", code="disk_full", hint="free space, then retry"
        )
    if "locked" in text:
        return StorageError(f"the database is locked: {text}", code="database_locked")
    return StorageError(f"database error: {text}", code="database_error")


@dataclass(frozen=True, slots=True, kw_only=True)
class InvitationRow:
    """An invitation as the authority stores it."""

    nonce: str
    node_id: str
    expires_at: int
    approval: Approval
    relay: bool
    state: JoinState
    created_at: int
    updated_at: int
    request: bytes | None
    request_keys: bytes | None
    certificate: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerHealth:
    """What the last health checks of a peer found."""

    node_id: str
    last_contact_ms: int | None
    """Unix milliseconds of the last successful exchange."""
    rtt_ms: float | None
    """Round-trip time of the last successful health check."""
    last_attempt_ms: int
    """Unix milliseconds of the last attempt."""
    failures: int
    """Consecutive failed attempts."""
    last_error: str | None
    """Why the last attempt failed, if it did."""


class Store:
    """The node's SQLite database."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: aiosqlite.Connection | None = None
        # One connection, so one transaction at a time: concurrent writers queue here
        # instead of failing with "cannot start a transaction within a transaction".
        self._write_lock = asyncio.Lock()
        self._checkpointer: asyncio.Task[None] | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_thread: ThreadPoolExecutor | None = None
        self.checkpoints = 0
        """Background checkpoints that copied pages into the database file."""

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("store is not open", code="store_closed")
        return self._db

    async def open(self) -> None:
        if not self._path.parent.is_dir():
            # Checked first, to say what to do about it.
            raise StorageError(
                f"the database directory {self._path.parent} does not exist",
                code="database_error",
                hint="check --home; `kakehashi init` creates the node's home",
            )
        try:
            self._db = await _connect(self._path)
            # Takes effect only in a new, empty database (before its first table).
            await self._db.execute(f"PRAGMA page_size={PAGE_BYTES}")
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA busy_timeout=5000")
            await self._db.execute(f"PRAGMA cache_size=-{CACHE_MIB * 1024}")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._migrate()
            await self._db.execute(f"PRAGMA temp_store={TEMP_STORE}")
        except (sqlite3.Error, OSError) as exc:
            if self._db is not None:
                db, self._db = self._db, None
                with suppress(sqlite3.Error):
                    await db.close()
            raise _translate(exc) from exc
        with suppress(OSError):
            self._path.chmod(0o600)
        # Its thread starts, and its connection opens, at the first `read_aside`.
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="db-reader")

    def checkpoint_in_background(self) -> None:
        """Copy the write-ahead log into the database file from a second connection on
        its own thread, every CHECKPOINT_INTERVAL, instead of in the commit that fills
        the log (SQLite's default, every 1,000 pages).

        A checkpoint copies every page written since the last one and syncs the database
        file: when a commit pays for it, that commit takes several times as long (half of
        all database time in a catch-up of 100,000 envelopes). Passive checkpoints never
        block a writer or a reader; a commit still checkpoints itself if the log reaches
        CHECKPOINT_BACKSTOP_BYTES. For a running node; the store stops it on `close`."""
        if self._checkpointer is not None:
            return
        self._checkpointer = asyncio.create_task(self._checkpoints(), name="wal-checkpoint")

    async def _checkpoints(self) -> None:
        pages = CHECKPOINT_BACKSTOP_BYTES // await self.page_size()
        await self.db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        connection: sqlite3.Connection | None = None
        running: asyncio.Future[int] | None = None
        failing, copied = False, 0
        try:
            connection = await asyncio.to_thread(_checkpoint_connection, self._path)
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL)
                running = asyncio.ensure_future(asyncio.to_thread(_checkpoint, connection))
                try:
                    # Shielded: on close, the connection is closed only once it is done.
                    now_copied = await asyncio.shield(running)
                except sqlite3.Error as exc:
                    if not failing:  # once per run of failures, not every half second
                        log.warning("checkpoint_failed", error=str(_translate(exc)))
                    failing = True
                    continue
                failing = False
                if now_copied and now_copied != copied:
                    self.checkpoints += 1
                copied = now_copied
        except sqlite3.Error as exc:
            log.warning("checkpoint_unavailable", error=str(_translate(exc)))
        except Exception:
            log.exception("checkpoint_stopped")  # commits checkpoint themselves from now on
        finally:
            if running is not None:
                if not running.done():
                    await asyncio.wait([running])
                if not running.cancelled():
                    running.exception()  # seen: its failure, if any, was logged or is moot
            if connection is not None:
                with suppress(sqlite3.Error):
                    connection.close()

    async def close(self) -> None:
        reader_thread, self._reader_thread = self._reader_thread, None  # refuses new reads
        if reader_thread is not None:
            # After the reads under way (their callers may be gone), on their thread.
            reader_thread.submit(self._close_reader)
            await asyncio.to_thread(reader_thread.shutdown)
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.cancel()
            with suppress(asyncio.CancelledError):
                await checkpointer
        if self._db is not None:
            db, self._db = self._db, None
            try:
                await db.close()
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            await self.db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    async def write_all(
        self,
        statements: Statements,
        *,
        durable: bool = True,
        committing: Callable[[], object] | None = None,
    ) -> None:
        """One transaction of prepared statements (SQL and its rows; empty ones skipped),
        committed or rolled back as `transaction` does, in one round trip to the database
        thread instead of one per statement: under load each round trip waits behind the
        event loop's other work, and a commit paid for every one of them.

        `committing` is called on the database thread once every statement ran, as the
        COMMIT begins (not on the fallback path without a round trip)."""
        todo = [(sql, rows) for sql, rows in statements if rows]
        if not todo:
            return
        if not ONE_TRIP:
            async with self.transaction(durable=durable) as db:
                for sql, rows in todo:
                    await db.executemany(sql, rows)
            return
        async with self._write_lock:
            try:
                run = cast(Callable[..., Awaitable[None]], self.db._execute)
                await run(_write_in_thread, self.db._conn, todo, durable, committing)
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """One atomic write: committed on success, rolled back on any error.

        `durable=False` skips the fsync for writes whose loss on a power cut is harmless
        (deleting acknowledged outbox rows: at worst a batch is sent again and dropped
        as a duplicate). Atomicity is kept either way, and the next durable commit
        makes it durable too, since WAL commits are ordered.
        """
        async with self._write_lock:
            db = self.db
            if not durable:
                await db.execute("PRAGMA synchronous=NORMAL")
            try:
                try:
                    await db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise _translate(exc) from exc
                except BaseException:
                    # Cancelled while waiting: the worker thread still runs the BEGIN, and a
                    # transaction left open would make every later write on this connection
                    # fail ("within a transaction") and hold the write lock. Queued after it,
                    # the ROLLBACK undoes it (or finds nothing to undo if the BEGIN failed).
                    with suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                    raise
                try:
                    yield db
                except BaseException as exc:
                    await _rollback(db)
                    if isinstance(exc, sqlite3.Error):
                        raise _translate(exc) from exc
                    raise
                try:
                    await db.execute("COMMIT")
                except sqlite3.Error as exc:
                    await _rollback(db)
                    raise _translate(exc) from exc
            finally:
                if not durable:
                    with suppress(sqlite3.Error):
                        await db.execute("PRAGMA synchronous=FULL")

    async def read(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(connection, *args)` on the connection's thread, in one call, errors
        translated to `StorageError`: for a read that must stop early (a batch bounded
        by bytes). Every read outside a `transaction` goes through here, so its
        statements run and are closed before anything else uses the connection (inside
        one, the write lock keeps every other writer out).

        A statement left open across calls (aiosqlite's cursors fetch in several) let a
        write of the same connection run in between; when that write deleted rows the
        statement was reading (the outbox, as acknowledgements come), reading on failed
        with "database disk image is malformed", the file itself intact."""
        try:
            run = cast(Callable[..., Awaitable[_T]], self.db._execute)
            return await run(fn, self.db._conn, *args)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def read_aside(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(connection, *args)` as `read` does, but on a second, read-only connection
        with a thread of its own (both started at the first call): for a read that should
        not wait behind the node's commits.

        On the node's one connection a read queues behind every write before it; a
        sender reading its next batch from the outbox while the node commits the envelopes
        it takes in waited half of each read that way. Write-ahead logging lets a reader
        run beside the writer. It sees what was committed when its statement began:
        never a transaction under way, and, unlike `read` during a `transaction`, not
        that transaction's own writes."""
        reader_thread = self._reader_thread
        if self._db is None or reader_thread is None:  # closed, or closing
            raise StorageError("store is not open", code="store_closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(reader_thread, self._read_aside, fn, args)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    def _read_aside(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        """On the reader's thread."""
        if self._reader is None:
            self._reader = _reader_connection(self._path)
        return fn(self._reader, *args)

    def _close_reader(self) -> None:
        """On the reader's thread."""
        reader, self._reader = self._reader, None
        if reader is not None:
            with suppress(sqlite3.Error):
                reader.close()

    async def read_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query (None if none), errors translated to `StorageError`."""
        return await self.read(_first_row, sql, params)

    async def read_all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a query, errors translated to `StorageError`."""
        return await self.read(_all_rows, sql, params)

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            async with self.transaction() as db:
                await db.execute(sql, params)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    # meta ---------------------------------------------------------------

    async def page_size(self) -> int:
        """The database's page size in bytes (`PAGE_BYTES` unless it was made before)."""
        async with self.db.execute("PRAGMA page_size") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else PAGE_BYTES

    async def get_meta(self, key: str) -> bytes | None:
        row = await self.read_one("SELECT value FROM meta WHERE key = ?", (key,))
        return bytes(row[0]) if row else None

    async def set_meta(self, key: str, value: bytes) -> None:
        await self._write(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def delete_meta(self, key: str) -> None:
        await self._write("DELETE FROM meta WHERE key = ?", (key,))

    async def probe(self, now_ms: int) -> None:
        """Write a value and read it back in one transaction: `StorageError` unless the
        database takes writes. Not fsynced (a health check must stay cheap); the write
        still reaches the WAL file, so a full disk or a read-only file shows."""
        value = str(now_ms).encode()
        try:
            async with self.transaction(durable=False) as db:
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES ('health_probe', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (value,),
                )
                rows = list(
                    await db.execute_fetchall("SELECT value FROM meta WHERE key = 'health_probe'")
                )
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        row = rows[0] if rows else None
        if row is None or bytes(row[0]) != value:
            raise StorageError("the probe value did not read back", code="database_error")

    # roster -------------------------------------------------------------

    async def latest_roster(self) -> bytes | None:
        """The signed bytes of the newest roster held."""
        row = await self.read_one("SELECT signed FROM roster ORDER BY version DESC LIMIT 1")
        return bytes(row[0]) if row else None

    async def roster(self, version: int) -> bytes | None:
        """The stored signed roster of `version`, if this node holds it."""
        row = await self.read_one("SELECT signed FROM roster WHERE version = ?", (version,))
        return bytes(row[0]) if row else None

    async def rosters_after(self, version: int) -> list[bytes]:
        """Every stored signed roster newer than `version`, oldest first."""
        rows = await self.read_all(
            "SELECT signed FROM roster WHERE version > ? ORDER BY version", (version,)
        )
        return [bytes(row[0]) for row in rows]

    async def save_roster(self, version: int, signed: bytes, now_ms: int) -> None:
        """Keep a verified roster version (history is kept for audit and key-rotation chains)."""
        try:
            async with self.transaction() as db:
                await self.insert_roster(db, version, signed, now_ms)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    @staticmethod
    async def insert_roster(
        db: aiosqlite.Connection, version: int, signed: bytes, now_ms: int
    ) -> None:
        """Inside a caller's transaction: keep a roster version."""
        await db.execute(
            "INSERT INTO roster (version, signed, stored_at) VALUES (?, ?, ?) "
            "ON CONFLICT (version) DO NOTHING",
            (version, signed, now_ms),
        )

    # invitations (authority) -------------------------------------------

    @staticmethod
    def _invitation(row: Any) -> InvitationRow:
        return InvitationRow(
            nonce=row[0],
            node_id=row[1],
            expires_at=row[2],
            approval=Approval(row[3]),
            relay=bool(row[4]),
            state=JoinState(row[5]),
            created_at=row[6],
            updated_at=row[7],
            request=None if row[8] is None else bytes(row[8]),
            request_keys=None if row[9] is None else bytes(row[9]),
            certificate=None if row[10] is None else bytes(row[10]),
        )

    _INVITATION_COLUMNS = (
        "nonce, node_id, expires_at, approval, relay, state, created_at, updated_at, "
        "request, request_keys, certificate"
    )

    async def add_invitation(
        self,
        *,
        nonce: str,
        node_id: str,
        expires_at: int,
        approval: Approval,
        relay: bool,
        now: int,
    ) -> None:
        try:
            async with self.transaction() as db:
                await self.insert_invitation(
                    db,
                    nonce=nonce,
                    node_id=node_id,
                    expires_at=expires_at,
                    approval=approval,
                    relay=relay,
                    now=now,
                )
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    @staticmethod
    async def insert_invitation(
        db: aiosqlite.Connection,
        *,
        nonce: str,
        node_id: str,
        expires_at: int,
        approval: Approval,
        relay: bool,
        now: int,
    ) -> None:
        """Inside a caller's transaction: keep a newly issued invitation."""
        await db.execute(
            "INSERT INTO invitation (nonce, node_id, expires_at, approval, relay, state, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                nonce,
                node_id,
                expires_at,
                approval.value,
                int(relay),
                JoinState.ISSUED.value,
                now,
                now,
            ),
        )

    async def invitation(self, nonce: str) -> InvitationRow | None:
        row = await self.read_one(
            f"SELECT {self._INVITATION_COLUMNS} FROM invitation WHERE nonce = ?",  # noqa: S608
            (nonce,),
        )
        return self._invitation(row) if row else None

    async def invitations(self, state: JoinState | None = None) -> list[InvitationRow]:
        if state is None:
            rows = await self.read_all(
                f"SELECT {self._INVITATION_COLUMNS} FROM invitation ORDER BY created_at"  # noqa: S608
            )
        else:
            rows = await self.read_all(
                f"SELECT {self._INVITATION_COLUMNS} FROM invitation "  # noqa: S608
                "WHERE state = ? ORDER BY created_at",
                (state.value,),
            )
        return [self._invitation(row) for row in rows]

    async def update_invitation(
        self,
        db: aiosqlite.Connection,
        nonce: str,
        *,
        state: JoinState,
        now: int,
        request: bytes | None = None,
        request_keys: bytes | None = None,
        certificate: bytes | None = None,
    ) -> None:
        """Inside a caller's transaction: move an invitation on, keeping fields not given."""
        await db.execute(
            "UPDATE invitation SET state = ?, updated_at = ?, "
            "request = COALESCE(?, request), request_keys = COALESCE(?, request_keys), "
            "certificate = COALESCE(?, certificate) WHERE nonce = ?",
            (state.value, now, request, request_keys, certificate, nonce),
        )

    # peer health --------------------------------------------------------

    async def record_health(self, health: PeerHealth) -> None:
        await self._write(
            "INSERT INTO peer_health (node_id, last_contact_ms, rtt_ms, last_attempt_ms, "
            "failures, last_error) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
            "last_contact_ms = excluded.last_contact_ms, rtt_ms = excluded.rtt_ms, "
            "last_attempt_ms = excluded.last_attempt_ms, failures = excluded.failures, "
            "last_error = excluded.last_error",
            (
                health.node_id,
                health.last_contact_ms,
                health.rtt_ms,
                health.last_attempt_ms,
                health.failures,
                health.last_error,
            ),
        )

    async def peer_health(self) -> dict[str, PeerHealth]:
        rows = await self.read_all(
            "SELECT node_id, last_contact_ms, rtt_ms, last_attempt_ms, failures, last_error "
            "FROM peer_health"
        )
        return {
            row[0]: PeerHealth(
                node_id=row[0],
                last_contact_ms=row[1],
                rtt_ms=row[2],
                last_attempt_ms=row[3],
                failures=row[4],
                last_error=row[5],
            )
            for row in rows
        }
