"""The node's audit log in its database: what happened to its trust relationships, and proof.

`AuditLog` appends records (`federation.audit`) to the `audit` table and signs a
head now and then into `audit_head`. Each append reads the chain's tail inside
the write transaction, so appends are serialised by the store's one writer, and
a record written inside a caller's transaction (`append_in`) commits or rolls
back together with the change it describes: a member is suspended if and only if
the log says so.

A head is signed every `head_every_records` records, at least every
`head_every_seconds` while records arrive, and when the node stops; each is also
logged (`audit_head_signed`, seq and hash), so a copy of the head lives outside
the database, in whatever collects the node's logs.

Refused peers are noisy (a misconfigured town retries every few seconds; an
attacker can retry thousands of times), so they pass a `Throttle`: at most one
record per (peer or remote address, reason) per window, the next one carrying how
many were held back, and a `refusals_suppressed` summary for a window that ends
quietly. They are queued without blocking the request (`note`) and written by the
log's own task.

Reading is separate and synchronous (`read_log`, `read_records`, `verify_log`):
the CLI opens the database read-only, whether the node runs or not (WAL lets a
reader see the last commit while the node writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from federation.audit import (
    ZERO_HASH,
    AuditRecord,
    Problem,
    ProblemKind,
    SignedHead,
    Throttle,
    Unreadable,
    head_from_row,
    record_from_row,
    seal_record,
    sign_head,
    verify_chain,
)
from federation.errors import ConfigError, KakehashiError, ProtocolError, StorageError
from federation.roster import SignedRoster, verify_roster
from federation.signing import SigningKey

from .config import Home, load_config
from .store import Store
from .tasks import cancel_all

__all__ = [
    "AuditLog",
    "AuditReport",
    "AuditSettings",
    "node_public_keys",
    "read_log",
    "read_records",
    "verify_log",
    "write_record",
]

log = structlog.get_logger("kakehashi.audit")

REFUSAL_FIELDS = ("remote", "peer", "claimed", "path", "fingerprint", "size", "message")
"""What a refusal record keeps of the fields the transport reports (nothing else)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSettings:
    """How often heads are signed and how refusals are throttled."""

    head_every_records: int = 100
    """Sign a head once this many records were appended since the last one."""
    head_every_seconds: float = 60.0
    """Sign a head at least this often while new records arrive."""
    refusal_window_seconds: float = 60.0
    """At most one `peer_refused` record per (peer or address, reason) in this window."""
    max_refusal_keys: int = 256
    """Distinct (peer or address, reason) windows kept; beyond, one shared per reason."""
    max_queued: int = 1000
    """Queued records (refusals) waiting for the writer; beyond, they are counted and dropped."""


def _plain(value: Any) -> Any:
    """A value as the audit core takes it: enums by value, bytes as hex, floats as text."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted(str(_plain(item)) for item in value)
    raise ProtocolError(
        f"a {type(value).__name__} cannot be an audit field", code="bad_audit_record"
    )


async def write_record(
    db: aiosqlite.Connection, *, at_ms: int, event: str, fields: Mapping[str, Any]
) -> AuditRecord:
    """Inside a caller's write transaction: append one record after the chain's tail."""
    async with db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1") as cursor:
        tail = await cursor.fetchone()
    seq, prev = (int(tail[0]) + 1, bytes(tail[1])) if tail else (1, ZERO_HASH)
    record = seal_record(
        seq=seq,
        at_ms=at_ms,
        event=event,
        fields={name: _plain(value) for name, value in fields.items()},
        prev=prev,
    )
    await db.execute(
        "INSERT INTO audit (seq, at_ms, event, fields, prev, hash) VALUES (?, ?, ?, ?, ?, ?)",
        (record.seq, record.at_ms, record.event, record.fields_bytes(), record.prev, record.hash),
    )
    return record


@dataclass(slots=True)
class _Queued:
    at_ms: int
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """Appends to the node's audit log and signs its head; owns one background task."""

    def __init__(
        self,
        store: Store,
        *,
        signing_key: SigningKey,
        clock: Callable[[], float] = time.time,
        settings: AuditSettings | None = None,
    ) -> None:
        self._store = store
        self._key = signing_key
        self._clock = clock
        self.settings = settings or AuditSettings()
        self._throttle = Throttle(
            window_ms=int(self.settings.refusal_window_seconds * 1000),
            max_keys=self.settings.max_refusal_keys,
        )
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._since_head = 0
        self._last_head = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.dropped = 0
        """Queued records dropped because the writer fell behind (counted in the next one)."""

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._last_head = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="audit-log")

    async def stop(self) -> None:
        """Stop the writer, write what is queued and sign the final head.

        The writer is asked to finish its pass rather than cancelled in the middle of a
        write, after which it could not tell whether its batch had committed; it is
        cancelled only if it does not finish in time.
        """
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(10.0):
                    await asyncio.shield(self._task)
            except TimeoutError:
                await cancel_all([self._task])
            self._task = None
        try:
            self._summarise(self._now_ms() + int(self.settings.refusal_window_seconds * 1000))
            await self._flush()
            await self.sign_head()
        except KakehashiError:
            log.exception("audit_stop_failed")

    # appending ------------------------------------------------------------

    async def append(self, event: str, **fields: Any) -> AuditRecord:
        """Append one record in its own transaction; returns it once committed."""
        async with self._store.transaction() as db:
            record = await self.append_in(db, event, **fields)
        return record

    async def append_in(self, db: aiosqlite.Connection, event: str, **fields: Any) -> AuditRecord:
        """Append inside the caller's transaction: the record commits with the caller's change."""
        record = await write_record(db, at_ms=self._now_ms(), event=event, fields=fields)
        self._since_head += 1
        if self._since_head >= self.settings.head_every_records:
            self._wake.set()
        return record

    def note(self, event: str, **fields: Any) -> None:
        """Queue a record without waiting (from code that cannot await); written shortly."""
        if len(self._queue) >= self.settings.max_queued:
            self.dropped += 1
            return
        self._queue.append(_Queued(at_ms=self._now_ms(), event=event, fields=fields))
        self._wake.set()

    def refused(self, reason: str, **fields: Any) -> None:
        """A peer request was refused: record it, at most once per source and reason a window."""
        source = str(fields.get("peer") or fields.get("remote") or "unknown")
        key = self._throttle.key(source, reason)
        carried = self._throttle.admit(key, self._now_ms())
        if carried is None:
            return
        kept = {name: fields[name] for name in REFUSAL_FIELDS if fields.get(name) is not None}
        self.note("peer_refused", reason=reason, source=key[0], suppressed=carried, **kept)

    def use_signing_key(self, key: SigningKey) -> None:
        """Sign heads with `key` from now on (after a rotation)."""
        self._key = key

    async def signing_key_rotated(self, *, old_key_id: str, new_key_id: str, reason: str) -> None:
        """Record that this node's signing key changed (for the key rotation command).

        Heads signed before the change verify with the old key, which the roster keeps
        publishing for this node; `verify_log` passes every published key.
        """
        await self.append(
            "signing_key_rotated", old_key_id=old_key_id, new_key_id=new_key_id, reason=reason
        )

    # heads ----------------------------------------------------------------

    async def sign_head(self) -> SignedHead | None:
        """Sign the newest record, unless a head already covers it."""
        async with self._store.transaction() as db:
            async with db.execute(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
            ) as cursor:
                tail = await cursor.fetchone()
            async with db.execute("SELECT MAX(seq) FROM audit_head") as cursor:
                covered = await cursor.fetchone()
            last_signed = covered[0] if covered is not None else None
            if tail is None or (last_signed is not None and last_signed >= tail[0]):
                return None
            head = sign_head(
                seq=int(tail[0]), digest=bytes(tail[1]), at_ms=self._now_ms(), key=self._key
            )
            await db.execute(
                "INSERT INTO audit_head (seq, hash, at_ms, signature, key_id) "
                "VALUES (?, ?, ?, ?, ?)",
                (head.seq, head.hash, head.at_ms, head.signature, head.key_id),
            )
        self._since_head = 0
        self._last_head = time.monotonic()
        log.info("audit_head_signed", seq=head.seq, hash=head.hash.hex(), key_id=head.key_id)
        return head

    # the writer -----------------------------------------------------------

    def _summarise(self, now_ms: int) -> None:
        """Queue a summary for every refusal window that ended with refusals held back."""
        for (source, reason), count in self._throttle.expire(now_ms):
            self.note("refusals_suppressed", reason=reason, source=source, suppressed=count)

    async def _flush(self) -> None:
        """Write the queued records in one transaction (removed only once committed)."""
        if not self._queue and not self.dropped:
            return
        batch = list(self._queue)[:500]
        dropped = self.dropped
        async with self._store.transaction() as db:
            for item in batch:
                await self.append_in(db, item.event, **item.fields)
            if dropped:
                await self.append_in(db, "audit_records_dropped", dropped=dropped)
        for _ in batch:
            self._queue.popleft()
        self.dropped -= dropped

    def _head_due(self) -> bool:
        if self._since_head >= self.settings.head_every_records:
            return True
        waited = time.monotonic() - self._last_head
        return self._since_head > 0 and waited >= self.settings.head_every_seconds

    async def _run(self) -> None:
        tick = min(self.settings.head_every_seconds, self.settings.refusal_window_seconds)
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self._summarise(self._now_ms())
                await self._flush()
                if self._head_due():
                    await self.sign_head()
            except KakehashiError as exc:  # a full disk, say: one line a try, no traceback
                log.error(
                    "audit_write_failed", code=exc.code, error=str(exc), queued=len(self._queue)
                )
            except Exception:  # the log must keep going; the queue is kept for the next try
                log.exception("audit_write_failed")
                if not self._stopping:
                    await asyncio.sleep(1.0)


# --- reading (the CLI, read-only) ------------------------------------------------------------


def _connect_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ConfigError(
            f"no node database at {path}",
            code="no_database",
            hint="check --home; `kakehashi init` creates the node's home",
        )
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path} to read: {exc}", code="database_error") from exc
    try:
        db.execute("PRAGMA query_only=ON")
    except sqlite3.Error as exc:
        db.close()
        raise StorageError(f"cannot open {path} to read: {exc}", code="database_error") from exc
    return db


def _records_query(
    db: sqlite3.Connection, where: str = "", params: tuple[Any, ...] = ()
) -> list[AuditRecord | Unreadable]:
    rows = db.execute(
        f"SELECT seq, at_ms, event, fields, prev, hash FROM audit {where}",  # noqa: S608
        params,
    ).fetchall()
    return [
        record_from_row(
            int(seq),
            at_ms,
            event,
            bytes(fields) if isinstance(fields, bytes | memoryview) else fields,
            bytes(prev) if isinstance(prev, bytes | memoryview) else prev,
            bytes(digest) if isinstance(digest, bytes | memoryview) else digest,
        )
        for seq, at_ms, event, fields, prev, digest in rows
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSnapshot:
    """Everything in the log at one moment."""

    records: list[AuditRecord | Unreadable]
    heads: list[SignedHead]
    unreadable_heads: list[int]
    """Seqs of head rows that do not even form a head."""


def read_log(path: Path) -> AuditSnapshot:
    """Every record and head, read in one transaction (a consistent snapshot)."""
    db = _connect_read_only(path)
    try:
        db.execute("BEGIN")
        records = _records_query(db, "ORDER BY seq")
        heads: list[SignedHead] = []
        unreadable: list[int] = []
        for seq, digest, at_ms, signature, key_id in db.execute(
            "SELECT seq, hash, at_ms, signature, key_id FROM audit_head ORDER BY seq"
        ):
            head = head_from_row(int(seq), digest, at_ms, signature, key_id)
            if head is None:
                unreadable.append(int(seq))
            else:
                heads.append(head)
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _reading_failed(path, exc) from exc
    finally:
        db.close()
    return AuditSnapshot(records=records, heads=heads, unreadable_heads=unreadable)


def read_records(
    path: Path, *, since_ms: int | None = None, event: str | None = None, limit: int = 100
) -> list[AuditRecord | Unreadable]:
    """The newest `limit` records (oldest first), from `since_ms` on, of one `event` if given."""
    clauses: list[str] = []
    params: list[Any] = []
    if since_ms is not None:
        clauses.append("at_ms >= ?")
        params.append(since_ms)
    if event is not None:
        clauses.append("event = ?")
        params.append(event)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    db = _connect_read_only(path)
    try:
        records = _records_query(db, f"{where} ORDER BY seq DESC LIMIT ?", (*params, limit))
    except sqlite3.Error as exc:
        raise _reading_failed(path, exc) from exc
    finally:
        db.close()
    return list(reversed(records))


def _reading_failed(path: Path, exc: sqlite3.Error) -> StorageError:
    if "no such table" in str(exc):
        return StorageError(
            f"{path} has no audit log yet",
            code="no_audit_log",
            hint="start the node once (`kakehashi run`) so its database is brought up to date",
        )
    return StorageError(f"cannot read the audit log in {path}: {exc}", code="database_error")


def node_public_keys(home: Home) -> list[bytes]:
    """The node's signing public keys: its key file's, then every key its roster entry
    publishes (older keys verify heads signed before a rotation).

    The key file is read when this account can (the node's own account can); the roster
    covers an operator who may read the database but not the keys.
    """
    keys: list[bytes] = []
    with contextlib.suppress(OSError, ConfigError):
        keys.append(SigningKey.from_pem(home.signing_key.read_bytes()).public_raw)
    db = _connect_read_only(home.database)
    try:
        row = db.execute("SELECT signed FROM roster ORDER BY version DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        db.close()
    if row is not None:
        try:
            signed = SignedRoster.from_bytes(bytes(row[0]))
            verify_roster(signed, signed.roster.federation_key)
            me = signed.roster.member(load_config(home).node_id)
        except KakehashiError:
            me = None
        if me is not None:
            keys.extend(k.public_key for k in me.signing_keys if k.public_key not in keys)
    if not keys:
        raise ConfigError(
            "cannot find this node's public signing key (no readable key file, no roster)",
            code="no_signing_key",
            hint=f"run as the account that runs the node, so {home.signing_key} is readable",
        )
    return keys


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """What `verify_log` found."""

    records: int
    """Records in the log."""
    last_seq: int
    """Seq of the newest record (0 if none)."""
    last_signed_seq: int | None
    """Seq named by the newest head whose signature verifies, if any."""
    problems: list[Problem]
    """Everything wrong, each naming its record; empty if intact."""

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def unsigned(self) -> int:
        """Records after the newest signed head (protected by the chain only, for now)."""
        return max(0, self.last_seq - (self.last_signed_seq or 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "records": self.records,
            "last_seq": self.last_seq,
            "last_signed_seq": self.last_signed_seq,
            "unsigned_records": self.unsigned,
            "problems": [problem.to_json() for problem in self.problems],
        }


def verify_log(home: Home) -> AuditReport:
    """Check the whole log in `home`'s database with the node's own public keys."""
    keys = node_public_keys(home)
    snapshot = read_log(home.database)
    problems = verify_chain(snapshot.records, snapshot.heads, keys[0], previous_keys=keys[1:])
    problems += [
        Problem(
            kind=ProblemKind.HEAD_BAD_SIGNATURE,
            seq=seq,
            detail="the signed head naming it is not a well-formed head",
        )
        for seq in snapshot.unreadable_heads
    ]
    bad_heads = {p.seq for p in problems if p.kind is ProblemKind.HEAD_BAD_SIGNATURE}
    signed = [head.seq for head in snapshot.heads if head.seq not in bad_heads]
    return AuditReport(
        records=len(snapshot.records),
        last_seq=max((r.seq for r in snapshot.records), default=0),
        last_signed_seq=max(signed, default=None),
        problems=sorted(problems, key=lambda p: (p.seq, p.kind.value)),
    )
