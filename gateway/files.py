"""Files shared in rooms: content-addressed storage, the index of who shared what, serving.

Layout under `HOME/files/` (directories 0700, files 0600):

    ab/cdef…        a complete file, named by its SHA-256 in hex (the first two digits
                    are a directory, so no directory holds more than 1/256 of them)
    incoming/       uploads being received, under random names
    partial/<hex>   fetches from peers in progress (`gateway.filefetch`)

Invariants:

- A file under its hash was hashed as it was written, fsynced, then renamed into place
  (and its directory fsynced): nothing is ever written under a final name, so a file
  there is whole and is what its name says (unless the disk itself changes it).
- An upload is streamed: read in pieces, hashed and written on a worker thread, never
  held whole in memory. It is refused before anything is stored when its declared
  length is over the limit, and aborted, its temporary file deleted, as soon as the
  bytes received pass the limit. Uploads interrupted by a restart cannot be resumed
  (the client sends again): `incoming/` is emptied at start.
- `file` and `file_ref` rows are written in the very transaction that accepts the
  message naming the file (`RoomService.write_with`), so the index never disagrees
  with the rooms: a file is referenced in a room exactly when an accepted message
  there names it.
- A peer is served a file only if it is a member node (now) of a room in which an
  accepted message references it; anyone else gets 403 `file_not_shared`.

Fetching remote files and verifying them is `gateway.filefetch`; writing and reading
bytes off the event loop is `gateway.blobs`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from federation.causal import hlc_to_ms
from federation.envelope import Envelope, Kind, check_room_id
from federation.errors import ProtocolError, StorageError, TrustError
from federation.files import SNIFF_BYTES, FileRef, check_file_refs, sniff
from federation.rooms import Role, RoomKind

from .blobs import BlobWriter, MiB, fsync_directory, read_range
from .transport import MSGPACK, error_body

if TYPE_CHECKING:
    from .filefetch import Fetcher
    from .rooms import RoomService
    from .store import Statements, Store

__all__ = [
    "FileSettings",
    "FileState",
    "FileStore",
    "Incoming",
    "SharedFile",
    "StoredFile",
    "file_too_large",
    "parse_sha256",
]

log = structlog.get_logger("kakehashi.files")


class FileState(StrEnum):
    """Where a file's bytes stand at this node."""

    LOCAL = "local"
    """Uploaded here: the bytes were hashed as they arrived."""
    REMOTE_PENDING = "remote-pending"
    """Referenced by a message from another node; not (or not wholly) fetched yet."""
    COMPLETE = "complete"
    """Fetched from a peer and verified against its SHA-256."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FileSettings:
    """Limits and sizes of the file service."""

    max_upload_bytes: int = 100 * MiB
    """Largest upload ([files] max_upload_mb)."""
    chunk_bytes: int = 4 * MiB
    """Bytes asked of a peer per Range request when fetching."""
    fetch_depth: int = 3
    """Range requests in flight per fetch (the next ones travel while one is written)."""
    range_timeout: float = 120.0
    """Seconds a peer may take to send one range (4 MiB take 17 s at 2 Mbit/s)."""
    write_bytes: int = 1 * MiB
    """An upload is written to disk in pieces of about this size."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredFile:
    """A file this node knows of."""

    sha256: bytes
    size: int
    mime: str
    """Sniffed here once the bytes are here; the announced type while pending."""
    state: FileState
    stored_at: int | None
    """Unix ms at which the bytes became complete here."""

    @property
    def available(self) -> bool:
        return self.state is not FileState.REMOTE_PENDING


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedFile:
    """One message's reference to a file, with where the file's bytes stand here."""

    envelope_id: bytes
    sha256: bytes
    room: str
    name: str
    mime: str
    size: int
    uploader: str
    """The user who posted it (`login@node`), or the origin node if none."""
    origin: str
    uploaded_at: int
    """Unix ms (the message's timestamp)."""
    state: FileState

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256.hex(),
            "name": self.name,
            "size": self.size,
            "mime": self.mime,
            "room": self.room,
            "uploader": self.uploader,
            "origin": self.origin,
            "uploaded_at": self.uploaded_at,
            "envelope_id": self.envelope_id.hex(),
            "state": self.state.value,
        }


def parse_sha256(text: str) -> bytes:
    """A file id from a URL: 64 lowercase hex digits; `ProtocolError` bad_file_id."""
    if len(text) != 64 or text.strip("0123456789abcdef"):
        raise ProtocolError(
            "a file id is the SHA-256 of its content, 64 lowercase hex digits",
            code="bad_file_id",
        )
    return bytes.fromhex(text)


def file_too_large(limit: int) -> ProtocolError:
    return ProtocolError(
        f"the file is larger than this node accepts ({limit // MiB} MiB)",
        code="file_too_large",
        status=413,
        hint="the node's operator sets the limit: [files] max_upload_mb in config.toml",
    )


@dataclass(frozen=True, slots=True)
class Incoming:
    """An upload received whole into `incoming/`, not yet in place."""

    path: Path
    sha256: bytes
    size: int
    mime: str


MAX_RANGE = 16 * MiB
"""Largest range a peer may ask for in one request."""
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _single_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a `Range: bytes=first-[last]` header (last capped at the end of
    the file); None without one. Other forms (several ranges, suffixes) are not served."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        raise ProtocolError(
            "only a single Range bytes=first-last is served", code="bad_range", status=416
        )
    first = int(match[1])
    last = size - 1 if not match[2] else min(int(match[2]), size - 1)
    if last < first and first < size:
        raise ProtocolError("the range ends before it starts", code="bad_range", status=416)
    return first, last


# --- the store ------------------------------------------------------------------------------


class FileStore:
    """The node's shared files: storage under `root`, the index in the node's database."""

    def __init__(
        self,
        *,
        root: Path,
        store: Store,
        rooms: RoomService,
        node_id: str,
        settings: FileSettings,
        clock: Callable[[], float],
    ) -> None:
        self.root = root
        self.settings = settings
        self.node_id = node_id
        self._store = store
        self._rooms = rooms
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="kakehashi-files"
        )
        self._place_lock = asyncio.Lock()
        self.fetcher: Fetcher | None = None
        self.served_requests = 0
        """Federation requests for file bytes answered (for tests and metrics)."""
        self.served_bytes = 0
        """Bytes those requests asked for."""

    @property
    def executor(self) -> concurrent.futures.Executor:
        return self._executor

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def partial(self) -> Path:
        return self.root / "partial"

    def path(self, sha256: bytes) -> Path:
        """Where the complete file with this hash lives."""
        text = sha256.hex()
        return self.root / text[:2] / text[2:]

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the directories; forget uploads a previous run did not finish."""
        for directory in (self.root, self.incoming, self.partial):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        if self.fetcher is not None:
            await self.fetcher.start()

    async def stop(self) -> None:
        if self.fetcher is not None:
            await self.fetcher.stop()
        # Writes in flight finish on their own (and close their descriptors); queued
        # ones are dropped.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # the index -----------------------------------------------------------------------

    def index(self, envelopes: Sequence[Envelope]) -> Statements:
        """For the transaction accepting `envelopes`: the files their messages reference."""
        files: list[tuple[Any, ...]] = []
        refs: list[tuple[Any, ...]] = []
        now = self._now_ms()
        for envelope in envelopes:
            content = envelope.content
            if content.kind is not Kind.MESSAGE or "files" not in content.body:
                continue
            for position, ref in enumerate(check_file_refs(content.body["files"])):
                here = content.origin == self.node_id and self.path(ref.sha256).is_file()
                state = FileState.LOCAL if here else FileState.REMOTE_PENDING
                files.append((ref.sha256, ref.size, ref.mime, state.value, now if here else None))
                refs.append(
                    (
                        envelope.id,
                        position,
                        ref.sha256,
                        content.room,
                        ref.name,
                        ref.mime,
                        content.sender or content.origin,
                        content.origin,
                        hlc_to_ms(content.hlc),
                    )
                )
        # A file known as pending becomes local when staff here upload the same bytes.
        return [
            (
                "INSERT INTO file (sha256, size, mime, state, stored_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO UPDATE SET state = excluded.state, "
                "mime = excluded.mime, stored_at = excluded.stored_at "
                "WHERE file.state = 'remote-pending' AND excluded.state = 'local'",
                files,
            ),
            (
                "INSERT INTO file_ref (envelope_id, position, sha256, room_id, name, mime, "
                "uploader, origin, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                refs,
            ),
        ]

    async def file(self, sha256: bytes) -> StoredFile | None:
        row = await self._store.read_one(
            "SELECT size, mime, state, stored_at FROM file WHERE sha256 = ?", (sha256,)
        )
        if row is None:
            return None
        return StoredFile(
            sha256=sha256, size=row[0], mime=row[1], state=FileState(row[2]), stored_at=row[3]
        )

    async def pending(self) -> list[StoredFile]:
        """Files referenced here whose bytes are not (wholly) here."""
        rows = await self._store.read_all(
            "SELECT sha256, size, mime, stored_at FROM file WHERE state = ?",
            (FileState.REMOTE_PENDING.value,),
        )
        return [
            StoredFile(
                sha256=bytes(r[0]),
                size=r[1],
                mime=r[2],
                state=FileState.REMOTE_PENDING,
                stored_at=r[3],
            )
            for r in rows
        ]

    async def mark_complete(self, sha256: bytes, mime: str) -> None:
        """The bytes were fetched and verified: the file is complete here."""
        async with self._store.transaction() as db:
            await db.execute(
                "UPDATE file SET state = ?, mime = ?, stored_at = ? WHERE sha256 = ? AND state = ?",
                (
                    FileState.COMPLETE.value,
                    mime,
                    self._now_ms(),
                    sha256,
                    FileState.REMOTE_PENDING.value,
                ),
            )

    async def mark_missing(self, sha256: bytes) -> None:
        """The bytes are gone from disk (a home restored from a backup, a damaged disk):
        the file is pending again, to be fetched back from a node that holds it."""
        async with self._store.transaction() as db:
            await db.execute(
                "UPDATE file SET state = ?, stored_at = NULL WHERE sha256 = ?",
                (FileState.REMOTE_PENDING.value, sha256),
            )

    _SHARED = (
        "SELECT r.envelope_id, r.sha256, r.room_id, r.name, r.mime, f.size, r.uploader, "
        "r.origin, r.uploaded_at, f.state FROM file_ref r JOIN file f ON f.sha256 = r.sha256 "
    )

    @staticmethod
    def _shared(row: Sequence[Any]) -> SharedFile:
        return SharedFile(
            envelope_id=bytes(row[0]),
            sha256=bytes(row[1]),
            room=row[2],
            name=row[3],
            mime=row[4],
            size=row[5],
            uploader=row[6],
            origin=row[7],
            uploaded_at=row[8],
            state=FileState(row[9]),
        )

    async def in_room(self, room: str, limit: int = 1000) -> list[SharedFile]:
        """The files shared in `room`, newest first."""
        rows = await self._store.read_all(
            self._SHARED + "WHERE r.room_id = ? ORDER BY r.uploaded_at DESC, r.envelope_id LIMIT ?",
            (room, limit),
        )
        return [self._shared(row) for row in rows]

    async def references(self, sha256: bytes) -> list[SharedFile]:
        """Every accepted message's reference to this file, oldest first."""
        rows = await self._store.read_all(
            self._SHARED + "WHERE r.sha256 = ? ORDER BY r.uploaded_at, r.envelope_id", (sha256,)
        )
        return [self._shared(row) for row in rows]

    async def shared_with_node(self, sha256: bytes, node: str) -> bool:
        """Is `node` a member node of a room in which a message references this file?"""
        for ref in await self.references(sha256):
            state = self._rooms.state(ref.room)
            if state is not None and node in state.nodes:
                return True
        return False

    # uploads -------------------------------------------------------------------------

    def check_can_post(self, room: str, user: str) -> None:
        """Refuse (before any byte is read) a user who may not post a file in `room`."""
        check_room_id(room)
        state = self._rooms.state(room)
        if state is None:
            raise ProtocolError(f"this node knows no room {room}", code="unknown_room", status=404)
        if self.node_id not in state.nodes:
            raise TrustError(f"this node is not a member of {room}", code="not_a_member")
        if user not in state.users:
            raise TrustError(f"{user} is not a member of {room}", code="not_a_room_member")
        if state.kind is RoomKind.ANNOUNCEMENT and state.role(user) is not Role.ADMIN:
            raise TrustError(
                f"only room admins post in the announcement room {room}",
                code="not_allowed_to_post",
            )
        self._rooms.require_caught_up()

    async def receive(
        self, body: AsyncIterable[bytes], *, declared_size: int | None, name: str = ""
    ) -> Incoming:
        """Stream an upload into `incoming/`, hashing as it is written; enforce the limit."""
        limit = self.settings.max_upload_bytes
        if declared_size is not None and declared_size > limit:
            raise file_too_large(limit)
        path = self.incoming / secrets.token_hex(16)
        try:
            writer = BlobWriter.create(path, self._executor)
        except OSError as exc:
            raise StorageError(f"cannot store an upload: {exc}", code="file_write_failed") from exc
        head = bytearray()
        pending = bytearray()
        total = 0
        try:
            async for piece in body:
                total += len(piece)
                if total > limit:
                    raise file_too_large(limit)
                if len(head) < SNIFF_BYTES:
                    head += piece[: SNIFF_BYTES - len(head)]
                pending += piece
                if len(pending) >= self.settings.write_bytes:
                    await writer.write(bytes(pending))
                    pending.clear()
            if pending:
                await writer.write(bytes(pending))
            await writer.finish()
        except BaseException:
            writer.abandon(path)
            raise
        return Incoming(path=path, sha256=writer.digest, size=total, mime=sniff(bytes(head), name))

    async def _place(self, incoming: Incoming) -> bool:
        """Move a received upload under its hash. True if the bytes were not here before."""
        final = self.path(incoming.sha256)
        loop = asyncio.get_running_loop()

        def work() -> bool:
            if final.is_file():
                incoming.path.unlink()
                return False
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(incoming.path, final)
            fsync_directory(final.parent)
            return True

        try:
            return await loop.run_in_executor(self._executor, work)
        except OSError as exc:
            with contextlib.suppress(OSError):
                incoming.path.unlink()
            raise StorageError(f"cannot store an upload: {exc}", code="file_write_failed") from exc

    async def place_fetched(self, partial: Path, sha256: bytes) -> None:
        """Move verified fetched bytes under their hash."""
        final = self.path(sha256)
        loop = asyncio.get_running_loop()

        def work() -> None:
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(partial, final)
            fsync_directory(final.parent)

        async with self._place_lock:
            await loop.run_in_executor(self._executor, work)

    async def upload(
        self,
        *,
        room: str,
        user: str,
        name: str,
        body: AsyncIterable[bytes],
        declared_size: int | None,
        text: str | None = None,
        sender_name: str | None = None,
    ) -> SharedFile:
        """Store an upload and post the message that shares it in `room`, from `user`
        (whose display name, for other nodes, is `sender_name`).

        The message's text is `text`, else the file's name. If the message cannot be
        posted, bytes this upload brought are deleted again.
        """
        self.check_can_post(room, user)
        incoming = await self.receive(body, declared_size=declared_size, name=name)
        ref = FileRef(sha256=incoming.sha256, size=incoming.size, name=name, mime=incoming.mime)
        message: dict[str, Any] = {"text": text or name, "files": [ref.to_body()]}
        if sender_name is not None:
            message["name"] = sender_name
        # Placing and posting under one lock: a failed post may delete the bytes it placed
        # only while no other upload of the same bytes is between its placing and posting.
        async with self._place_lock:
            created = await self._place(incoming)
            try:
                envelope_id = await self._rooms.post(room, Kind.MESSAGE, message, sender=user)
            except BaseException:
                if created and await self.file(incoming.sha256) is None:
                    with contextlib.suppress(OSError):
                        self.path(incoming.sha256).unlink()
                raise
        log.info(
            "file_uploaded",
            room=room,
            user=user,
            sha256=ref.sha256.hex(),
            size=ref.size,
            mime=ref.mime,
            new=created,
        )
        stored = await self.file(ref.sha256)
        return SharedFile(
            envelope_id=envelope_id,
            sha256=ref.sha256,
            room=room,
            name=name,
            mime=ref.mime,
            size=ref.size,
            uploader=user,
            origin=self.node_id,
            uploaded_at=self._now_ms(),
            state=stored.state if stored is not None else FileState.LOCAL,
        )

    # serving -------------------------------------------------------------------------

    async def serve_peer(self, request: web.Request, peer: str) -> web.StreamResponse:
        """`GET /federation/v1/files/{sha256}`: the bytes, to a member node of a room that
        shares the file (403 `file_not_shared` to any other; 404 `file_not_here` if the bytes
        are not here). With `Range: bytes=first-last` (at most `MAX_RANGE` bytes) the range
        (206), else the whole file, streamed."""
        sha256 = parse_sha256(request.match_info["sha256"])
        if not await self.shared_with_node(sha256, peer):
            raise TrustError(
                f"{peer} is not a member of any room that shares this file",
                code="file_not_shared",
            )
        stored = await self.file(sha256)
        path = self.path(sha256)
        if stored is None or not stored.available or not path.is_file():
            return web.Response(
                status=404,
                body=error_body("file_not_here", "this node does not hold that file"),
                content_type=MSGPACK,
            )
        wanted = _single_range(request.headers.get("Range"), stored.size)
        self.served_requests += 1
        if wanted is None:  # the whole file, streamed
            self.served_bytes += stored.size
            return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        start, end = wanted
        if start >= stored.size or end - start + 1 > MAX_RANGE:
            return web.Response(
                status=416,
                body=error_body(
                    "bad_range", f"ranges are single, inside the file, up to {MAX_RANGE} bytes"
                ),
                content_type=MSGPACK,
                headers={"Content-Range": f"bytes */{stored.size}"},
            )
        # One read on a worker thread and one write: a range is at most a few MiB, and
        # streaming it in small pieces costs the event loop more than the memory saves.
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self._executor, read_range, path, start, end + 1 - start)
        self.served_bytes += len(data)
        return web.Response(
            status=206,
            body=data,
            content_type="application/octet-stream",
            headers={"Content-Range": f"bytes {start}-{start + len(data) - 1}/{stored.size}"},
        )

    def with_settings(self, **changes: Any) -> None:
        """Change settings (tests and benchmarks)."""
        self.settings = replace(self.settings, **changes)
