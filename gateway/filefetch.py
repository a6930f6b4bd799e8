"""Fetching files shared from other nodes: lazily, in chunks, verified, resumable.

A remote file is fetched when a user of this node first downloads it, not when the
message announcing it arrives: staff open a small part of what prefecture-wide rooms
share, and a town's disk should not hold every file of every room. The first download
waits for the fetch (the bytes are served only once verified); concurrent downloads
of the same file share one fetch (single flight).

Strategy, per file:

- Holders, in order: the origin nodes of the messages that reference it (oldest first),
  then the other member nodes of those rooms, this node excepted; only active members
  reached directly (files are not relayed across segments).
- From a holder: Range requests of `chunk_bytes` over the mutual-TLS federation API,
  `fetch_depth` of them in flight, each appended in order to `partial/<sha256>` and
  hashed on a worker thread. A holder that is
  unreachable, refuses, does not hold the file (404) or answers a range badly is
  skipped; the bytes already received stay and the next holder continues after them.
- When the length is reached the SHA-256 is checked: a match moves the bytes into
  place (`complete`); a mismatch deletes them, is logged (`file_hash_mismatch`, with the
  holder) and the next holder starts afresh. If every holder failed and one sent wrong
  bytes, the download is refused `file_hash_mismatch`; otherwise `file_unavailable`.
  Any holder will do because the origin signed the message naming the hash.
- A file whose bytes vanished from this node's disk (a home restored from a backup,
  which holds no files; a damaged disk) is pending again and fetched the same way
  from a node that holds a copy, the origin's own uploads included.
- A fetch interrupted by a stop keeps its partial bytes; at the next start, fetches
  with partial bytes resume in the background (their existing bytes are re-hashed,
  then the next range is asked for).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from federation.errors import KakehashiError, ProtocolError, TransportError
from federation.files import SNIFF_BYTES, sniff
from federation.roster import Roster

from .blobs import BlobWriter, hash_file
from .files import FileStore, StoredFile
from .tasks import cancel_all

if TYPE_CHECKING:
    from .rooms import RoomService
    from .transport import PeerClient, PeerResponse

__all__ = ["Fetcher"]

log = structlog.get_logger("kakehashi.files")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _HashMismatch(Exception):
    """The bytes a holder sent do not have the file's SHA-256 (deleted already)."""


def _check_range(response: PeerResponse, start: int, end: int, size: int) -> None:
    """The answer is exactly bytes start..end of a file of `size` bytes."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
    total = None if match is None or match[3] == "*" else int(match[3])
    if (
        response.status != 206
        or match is None
        or (int(match[1]), int(match[2])) != (start, end)
        or total not in (None, size)
        or len(response.body) != end - start + 1
    ):
        raise ProtocolError(
            f"asked for bytes {start}-{end} of {size}, the holder answered HTTP "
            f"{response.status} {response.headers.get('Content-Range')!r} with "
            f"{len(response.body)} bytes",
            code="bad_file_range",
        )


class Fetcher:
    """Fetches remote files into a `FileStore` (owned by it: started and stopped with it)."""

    def __init__(
        self,
        *,
        files: FileStore,
        rooms: RoomService,
        client: PeerClient,
        roster: Callable[[], Roster],
        direct: Callable[[], frozenset[str]],
    ) -> None:
        self._files = files
        self._rooms = rooms
        self._client = client
        self._roster = roster
        self._direct = direct
        self._tasks: dict[bytes, asyncio.Task[None]] = {}
        self.fetched_requests = 0
        """Range requests answered by holders (for tests and metrics)."""
        self.fetched_bytes = 0
        files.fetcher = self

    async def start(self) -> None:
        """Resume, in the background, the fetches a previous run left partial bytes of."""
        partial = {path.name: path for path in self._files.partial.iterdir()}
        for stored in await self._files.pending():
            if partial.pop(stored.sha256.hex(), None) is not None:
                log.info("file_fetch_resumed", sha256=stored.sha256.hex())
                self._spawn(stored.sha256)
        for leftover in partial.values():  # of files no longer pending: nothing to resume
            leftover.unlink(missing_ok=True)

    async def stop(self) -> None:
        await cancel_all(list(self._tasks.values()))
        self._tasks.clear()

    async def ensure(self, sha256: bytes) -> StoredFile:
        """The file, its bytes here: fetched first if they are not (shared with any other
        caller fetching it). `ProtocolError` unknown_file, file_hash_mismatch;
        `TransportError` file_unavailable."""
        stored = await self._files.file(sha256)
        if stored is None:
            raise ProtocolError("no message here shares that file", code="unknown_file", status=404)
        if stored.available and self._files.path(sha256).is_file():
            return stored
        # Shielded: a client that gives up does not cancel the fetch others may wait on.
        await asyncio.shield(self._spawn(sha256))
        stored = await self._files.file(sha256)
        assert stored is not None and stored.available
        return stored

    def _spawn(self, sha256: bytes) -> asyncio.Task[None]:
        task = self._tasks.get(sha256)
        if task is None or task.done():
            task = asyncio.create_task(self._fetch(sha256), name=f"fetch-{sha256.hex()[:12]}")
            self._tasks[sha256] = task
            task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        for sha256, held in list(self._tasks.items()):
            if held is task:
                del self._tasks[sha256]
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, KakehashiError):
            log.error("file_fetch_crashed", task=task.get_name(), error=repr(error))

    async def holders(self, sha256: bytes) -> list[str]:
        """Nodes that may hold the file, origins first; only active, directly reached ones."""
        references = await self._files.references(sha256)
        order: list[str] = []
        for ref in references:
            if ref.origin not in order:
                order.append(ref.origin)
        for ref in references:
            state = self._rooms.state(ref.room)
            for node in sorted(state.nodes) if state is not None else ():
                if node not in order:
                    order.append(node)
        direct = self._direct()
        roster = self._roster()
        return [
            node
            for node in order
            if node != self._files.node_id
            and node in direct
            and (entry := roster.member(node)) is not None
            and entry.active
        ]

    async def _fetch(self, sha256: bytes) -> None:
        stored = await self._files.file(sha256)
        final = self._files.path(sha256)
        if stored is None or (stored.available and final.is_file()):
            return
        if stored.available:
            log.warning("file_missing", sha256=sha256.hex(), state=stored.state.value)
            await self._files.mark_missing(sha256)
        loop = asyncio.get_running_loop()
        if final.is_file():
            # Bytes already in place (an upload of the same file whose message never
            # committed): kept if they are what their name says.
            hasher, size = await loop.run_in_executor(self._files.executor, hash_file, final)
            if hasher.digest() == sha256 and size == stored.size:
                await self._complete(sha256, "here already")
                return
            final.unlink(missing_ok=True)
        holders = await self.holders(sha256)
        mismatch = False
        failures: list[str] = []
        for holder in holders:
            try:
                await self._fetch_from(holder, stored)
            except _HashMismatch:
                mismatch = True
                continue
            except KakehashiError as exc:
                log.info("file_fetch_failed", sha256=sha256.hex(), holder=holder, code=exc.code)
                failures.append(f"{holder}: {exc.code}")
                continue
            await self._complete(sha256, holder)
            return
        if mismatch:
            raise ProtocolError(
                "the file's bytes from its holders do not match its SHA-256; nothing was kept",
                code="file_hash_mismatch",
                status=502,
                hint="the holder's copy is damaged or altered; its operator should check "
                "the node's disk",
            )
        raise TransportError(
            "no member node could send the file"
            + (f" ({'; '.join(failures)})" if failures else " (none is reachable)"),
            code="file_unavailable",
            hint="retry when the node that shared it is reachable",
        )

    async def _fetch_from(self, holder: str, stored: StoredFile) -> None:
        entry = self._roster().member(holder)
        if entry is None:
            raise TransportError(f"{holder} is not in the roster", code="unknown_peer")
        sha256, size = stored.sha256, stored.size
        partial = self._files.partial / sha256.hex()
        chunk = self._files.settings.chunk_bytes
        depth = max(1, self._files.settings.fetch_depth)
        path = f"/files/{sha256.hex()}"

        async def get(start: int, end: int) -> PeerResponse:
            response = await self._client.request(
                entry,
                "GET",
                path,
                headers={"Range": f"bytes={start}-{end}"},
                time_limit=self._files.settings.range_timeout,
            )
            _check_range(response, start, end, size)
            return response

        writer = await BlobWriter.resume(partial, self._files.executor)
        resumed_at = writer.size
        # Ranges are asked for ahead (up to `depth` in flight) but written strictly in
        # order, so the partial file is always a prefix of the file: what a resume needs.
        ahead: deque[asyncio.Task[PeerResponse]] = deque()
        next_start = writer.size
        try:
            while writer.size < size:
                while len(ahead) < depth and next_start < size:
                    end = min(size, next_start + chunk) - 1
                    ahead.append(asyncio.create_task(get(next_start, end)))
                    next_start = end + 1
                response = await ahead.popleft()
                await writer.write(response.body)
                self.fetched_requests += 1
                self.fetched_bytes += len(response.body)
            await writer.finish()
        except BaseException:
            writer.abandon()  # the bytes so far stay for the next holder or the next run
            raise
        finally:
            await cancel_all(list(ahead))
        if writer.digest != sha256 or writer.size != size:
            partial.unlink(missing_ok=True)
            log.warning(
                "file_hash_mismatch",
                sha256=sha256.hex(),
                holder=holder,
                got=writer.digest.hex(),
                size=writer.size,
                resumed_at=resumed_at,
            )
            raise _HashMismatch
        await self._files.place_fetched(partial, sha256)

    async def _complete(self, sha256: bytes, source: str) -> None:
        references = await self._files.references(sha256)
        name = references[0].name if references else ""
        loop = asyncio.get_running_loop()
        head = await loop.run_in_executor(self._files.executor, self._head, sha256)
        await self._files.mark_complete(sha256, sniff(head, name))
        log.info("file_fetched", sha256=sha256.hex(), source=source)

    def _head(self, sha256: bytes) -> bytes:
        with self._files.path(sha256).open("rb") as stream:
            return stream.read(SNIFF_BYTES)
