"""Backups of a node's home: one encrypted file, made while the node runs.

A backup holds `config.toml`, every file of `keys/` and `certs/` (signing key, TLS
key and certificate, CA certificate; at the authority also the federation key and
the CA key), and a consistent snapshot of `node.db`, as a tar stream sealed with a
passphrase (`sealed`: scrypt, AES-256-GCM in authenticated chunks). The snapshot
uses SQLite's online backup API page by page under one read transaction: in WAL
mode that sees one committed state of the database and never blocks the node's
writer, so the node keeps working while it is taken.

Restoring refuses a home that a node runs on or that is not empty (unless forced,
which moves the old home aside), decrypts and checks everything into a temporary
directory next to the home, and only then moves it in place. It also marks the
database (`restored_at` meta key): on its next start the node catches up with its
peers before it sends anything, so it never reuses a sequence number (see `Node`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from federation.errors import ConfigError, StorageError

from .admin import node_answers
from .config import Home, load_config
from .sealed import (
    CHUNK_SIZE,
    DEFAULT_KDF,
    BackupHeader,
    KdfParams,
    SealedReader,
    SealedWriter,
    corrupt,
    open_sealed,
)

__all__ = [
    "RESTORED_AT",
    "BackupSummary",
    "RestoreSummary",
    "backup_home",
    "restore_home",
]

PASSPHRASE_MIN = 8
RESTORED_AT = "restored_at"
"""Meta key set by a restore; the node clears it once it has caught up with its peers."""
SNAPSHOT_STEP_PAGES = 1024
"""Database pages copied per step of the online backup (16 MiB with the 16 KiB pages of a
database the node made, 4 MiB with the 4 KiB pages of one made before)."""

Progress = Callable[[str, int, int], None]
"""Called with (phase, done, total): 'database' in pages, 'archive' and 'restore' in bytes."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REQUIRED = ("config.toml", "node.db", "keys/signing.key", "keys/tls.key")


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupSummary:
    """What `backup_home` wrote."""

    file: str
    bytes: int
    database_pages: int
    node_id: str
    created: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreSummary:
    """What `restore_home` restored, and where the replaced home went (if forced)."""

    file: str
    bytes: int
    database_pages: int
    node_id: str
    created: str
    home: str
    moved_aside: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def _home_files(home: Home) -> list[tuple[str, Path]]:
    """(name in the archive, path) of config.toml and every key and certificate file."""
    files = [("config.toml", home.config)]
    for directory in (home.keys, home.certs):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            # Leftover temporary files (`.name.xxxx.tmp`) start with a dot and are skipped.
            if path.is_file() and _SAFE_NAME.fullmatch(path.name):
                files.append((f"{directory.name}/{path.name}", path))
    return files


def _snapshot(database: Path, target: Path, progress: Progress) -> int:
    """Copy `database` to `target` with SQLite's online backup; returns the page count.

    The source connection holds one read transaction for the whole copy, so every
    step copies pages of the same committed state (without it, each write of the
    running node would restart the copy). In WAL mode a reader never blocks the
    node's writer; copying in steps keeps each call short and reports progress.
    """
    try:
        source = sqlite3.connect(
            f"{database.absolute().as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=30
        )
        try:
            source.execute("BEGIN")
            source.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the snapshot
            copy = sqlite3.connect(target, isolation_level=None)
            try:
                source.backup(
                    copy,
                    pages=SNAPSHOT_STEP_PAGES,
                    progress=lambda _status, left, total: progress("database", total - left, total),
                )
                pages = int(copy.execute("PRAGMA page_count").fetchone()[0])
            finally:
                copy.close()
            source.execute("COMMIT")
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise StorageError(
            f"cannot copy the database {database}: {exc}", code="backup_database_failed"
        ) from exc
    progress("database", pages, pages)
    return pages


class _Counted:
    """A file read through, reporting the bytes read so far."""

    def __init__(self, file: IO[bytes], report: Callable[[int], None]) -> None:
        self._file = file
        self._report = report

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._report(len(data))
        return data


def backup_home(
    home: Home,
    file: Path,
    passphrase: str,
    *,
    now: float | None = None,
    progress: Progress = _no_progress,
    kdf: KdfParams = DEFAULT_KDF,
    chunk_size: int = CHUNK_SIZE,
) -> BackupSummary:
    """Write an encrypted backup of `home` to `file` (mode 0600), running node or not."""
    home.require_initialised()
    config = load_config(home)
    if len(passphrase) < PASSPHRASE_MIN:
        raise ConfigError(
            f"the passphrase must have at least {PASSPHRASE_MIN} characters",
            code="weak_passphrase",
            hint="the backup holds the node's private keys: choose a long passphrase",
        )
    if not home.database.is_file():
        raise ConfigError(f"{home.database} does not exist", code="not_initialised")
    target = file.absolute()
    if target.is_dir() or not target.parent.is_dir():
        raise ConfigError(
            f"cannot write the backup to {target}",
            code="bad_backup_path",
            hint="give a file name in an existing directory",
        )
    created = datetime.fromtimestamp(time.time() if now is None else now, UTC).isoformat(
        timespec="seconds"
    )
    files = _home_files(home)
    tmp: Path | None = None
    try:
        # The plain snapshot lives briefly inside the home (mode 0700), never beside the
        # backup file, which may sit on a share.
        with tempfile.TemporaryDirectory(dir=home.root, prefix=".backup-") as scratch:
            snapshot = Path(scratch) / "node.db"
            pages = _snapshot(home.database, snapshot, progress)
            members = [(name, path.read_bytes()) for name, path in files]
            total = sum(len(data) for _, data in members) + snapshot.stat().st_size
            done = 0

            def advance(count: int) -> None:
                nonlocal done
                done += count
                progress("archive", done, total)

            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            tmp = Path(name)  # mkstemp creates it with mode 0600
            with os.fdopen(fd, "wb") as raw:
                writer = SealedWriter(
                    raw,
                    passphrase,
                    node_id=config.node_id,
                    created=created,
                    kdf=kdf,
                    chunk_size=chunk_size,
                )
                with tarfile.open(
                    fileobj=cast(IO[bytes], writer), mode="w|", format=tarfile.PAX_FORMAT
                ) as tar:
                    for member, data in members:
                        _add(tar, member, len(data), _Counted(io.BytesIO(data), advance))
                    with snapshot.open("rb") as db:
                        _add(tar, "node.db", snapshot.stat().st_size, _Counted(db, advance))
                writer.close()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
            tmp = None
        _fsync_dir(target.parent)
    except OSError as exc:
        raise StorageError(
            f"cannot write the backup {target}: {exc.strerror or exc}", code="backup_write_failed"
        ) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return BackupSummary(
        file=str(target),
        bytes=target.stat().st_size,
        database_pages=pages,
        node_id=config.node_id,
        created=created,
    )


def _add(tar: tarfile.TarFile, name: str, size: int, source: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644 if name.startswith("certs/") else 0o600
    info.mtime = int(time.time())
    tar.addfile(info, source)


def _fsync_dir(path: Path) -> None:
    # Some filesystems cannot fsync a directory; the data is written either way.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# restore --------------------------------------------------------------------------


def _target_state(home: Home, force: bool) -> str:
    """'missing', 'empty' or 'occupied' (forced); `ConfigError` if restoring is refused."""
    root = home.root
    if not root.exists() and not root.is_symlink():
        return "missing"
    if not root.is_dir():
        raise ConfigError(f"{root} exists and is not a directory", code="home_not_empty")
    if node_answers(home.admin_socket):
        raise ConfigError(
            f"a node is running on {root}",
            code="already_running",
            hint="stop the node before restoring over its home",
        )
    if not any(root.iterdir()):
        return "empty"
    if not force:
        raise ConfigError(
            f"{root} is not empty",
            code="home_not_empty",
            hint="restore into a new or empty directory, or add --force to move this home "
            f"aside (to {root.name}.before-restore-TIME) and restore in its place",
        )
    return "occupied"


def _allowed(name: str) -> bool:
    if name in ("config.toml", "node.db"):
        return True
    directory, _, file = name.partition("/")
    return directory in ("keys", "certs") and _SAFE_NAME.fullmatch(file) is not None


def _extract(reader: SealedReader, scratch: Path) -> None:
    """Write every member to `scratch` with its mode (keys 0600); nothing outside it."""
    for directory in ("keys", "certs"):
        (scratch / directory).mkdir(mode=0o700)
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r|") as tar:
            for member in tar:
                name = member.name
                # Names are checked against a fixed pattern and written with O_EXCL, so
                # no entry can reach outside the scratch directory or appear twice.
                if not member.isreg() or not _allowed(name) or name in seen:
                    raise corrupt(f"unexpected entry {name!r} in the backup")
                seen.add(name)
                mode = 0o644 if name.startswith("certs/") else 0o600
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                fd = os.open(scratch / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as out:
                    os.fchmod(out.fileno(), mode)  # umask may have narrowed it
                    shutil.copyfileobj(data, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
    except tarfile.TarError as exc:
        raise corrupt(f"the backup's archive is not valid: {exc}") from exc
    reader.finish()
    missing = [name for name in _REQUIRED if name not in seen]
    if missing:
        raise corrupt(f"the backup lacks {', '.join(missing)}")


def _check_and_mark(scratch: Path, header: BackupHeader, now: float) -> int:
    """Check the restored config and database; flag the database as restored. Page count."""
    config = load_config(Home(scratch))
    if config.node_id != header.node_id:
        raise corrupt(
            f"the backup's header names node {header.node_id}, its config {config.node_id}"
        )
    database = scratch / "node.db"
    marked = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").encode()
    try:
        db = sqlite3.connect(f"{database.as_uri()}?mode=rw", uri=True, isolation_level=None)
        try:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise corrupt(f"the database in the backup fails its check: {verdict}")
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (RESTORED_AT, marked),
            )
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise corrupt(f"the database in the backup cannot be used: {exc}") from exc
    return pages


def _move_in(scratch: Path, home: Home, state: str, now: float) -> Path | None:
    """Put the checked `scratch` in place of the home; returns where the old home went."""
    root = home.root
    aside = None
    if state == "occupied":
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = root.with_name(f"{root.name}.before-restore-{stamp}")
        if aside.exists():
            raise ConfigError(f"{aside} already exists", code="home_not_empty")
        os.rename(root, aside)
        os.rename(scratch, root)
    elif state == "empty":
        try:
            root.rmdir()
        except OSError:  # a mount point, say: move the entries into it instead
            for entry in scratch.iterdir():
                os.rename(entry, root / entry.name)
            scratch.rmdir()
        else:
            os.rename(scratch, root)
    else:
        os.rename(scratch, root)
    os.chmod(root, 0o700)
    _fsync_dir(root.parent)
    return aside


def restore_home(
    file: Path,
    home: Home,
    passphrase: str,
    *,
    force: bool = False,
    now: float | None = None,
    progress: Progress = _no_progress,
) -> RestoreSummary:
    """Restore the backup `file` into `home`, which must be missing or empty (or `force`).

    Nothing final is written before the whole file has been decrypted and checked.
    """
    source = file.absolute()
    if not source.is_file():
        raise ConfigError(f"no backup file at {source}", code="backup_not_found")
    if not passphrase:
        raise ConfigError("an empty passphrase cannot open a backup", code="bad_passphrase")
    moment = time.time() if now is None else now
    state = _target_state(home, force)
    size = source.stat().st_size
    scratch: Path | None = None
    try:
        home.root.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as raw:
            reader = open_sealed(raw, passphrase, on_read=lambda n: progress("restore", n, size))
            scratch = Path(tempfile.mkdtemp(dir=home.root.parent, prefix=f".{home.root.name}."))
            _extract(reader, scratch)
        pages = _check_and_mark(scratch, reader.header, moment)
        _fsync_dir(scratch / "keys")
        _fsync_dir(scratch / "certs")
        _fsync_dir(scratch)
        _target_state(home, force)  # again: a node may have started meanwhile
        aside = _move_in(scratch, home, state, moment)
        scratch = None
    except OSError as exc:
        raise StorageError(
            f"cannot restore into {home.root}: {exc.strerror or exc}", code="restore_failed"
        ) from exc
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return RestoreSummary(
        file=str(source),
        bytes=size,
        database_pages=pages,
        node_id=reader.header.node_id,
        created=reader.header.created,
        home=str(home.root),
        moved_aside=None if aside is None else str(aside),
    )
