"""File bytes on disk, written and read off the event loop.

`BlobWriter` appends to a file and hashes what it writes, on a worker thread of a
caller's executor, so neither the disk nor SHA-256 ever blocks the event loop; the
other helpers read, hash and fsync in ways the file service needs. They raise
`StorageError` (writes) or `OSError` (to be translated by the caller).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from federation.errors import StorageError

__all__ = ["BlobWriter", "MiB", "fsync_directory", "hash_file", "read_range"]

MiB = 1024 * 1024


class BlobWriter:
    """A file written and hashed on a worker thread, one piece at a time.

    The event loop never waits on the disk or on hashing. A cancelled caller cannot leave
    a write racing the close of its descriptor: `abandon` closes only once the write in
    flight, if any, has returned.
    """

    def __init__(
        self,
        fd: int,
        executor: concurrent.futures.Executor,
        *,
        hasher: Any = None,
        size: int = 0,
    ) -> None:
        self._fd = fd
        self._executor = executor
        self._hash = hasher if hasher is not None else hashlib.sha256()
        self._inflight: concurrent.futures.Future[None] | None = None
        self.size = size
        """Bytes written so far (including those there before a resume)."""

    @classmethod
    def create(cls, path: Path, executor: concurrent.futures.Executor) -> BlobWriter:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return cls(fd, executor)

    @classmethod
    async def resume(cls, path: Path, executor: concurrent.futures.Executor) -> BlobWriter:
        """Append to `path` (created if missing), its existing bytes hashed first."""
        loop = asyncio.get_running_loop()
        hasher, size = await loop.run_in_executor(executor, hash_file, path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return cls(fd, executor, hasher=hasher, size=size)

    @property
    def digest(self) -> bytes:
        return bytes(self._hash.digest())

    def _run(self, work: Callable[[], None]) -> asyncio.Future[None]:
        self._inflight = self._executor.submit(work)
        return asyncio.wrap_future(self._inflight)

    async def write(self, data: bytes) -> None:
        def work() -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._hash.update(data)  # releases the GIL for large pieces

        try:
            await self._run(work)
        except OSError as exc:
            raise StorageError(f"cannot write a file: {exc}", code="file_write_failed") from exc
        self.size += len(data)

    async def finish(self) -> None:
        """fsync and close."""
        fd, self._fd = self._fd, -1

        def work() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        try:
            await self._run(work)
        except OSError as exc:
            raise StorageError(f"cannot write a file: {exc}", code="file_write_failed") from exc

    def abandon(self, path: Path | None = None) -> None:
        """Close (and delete `path`, if given) once no write is in flight. Never raises."""

        def close(_: object = None) -> None:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

        if self._inflight is not None and not self._inflight.done():
            self._inflight.add_done_callback(close)
        else:
            close()


def hash_file(path: Path) -> tuple[Any, int]:
    hasher = hashlib.sha256()
    size = 0
    with contextlib.suppress(FileNotFoundError), path.open("rb") as stream:
        while piece := stream.read(MiB):
            hasher.update(piece)
            size += len(piece)
    return hasher, size


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_range(path: Path, start: int, count: int) -> bytes:
    with path.open("rb") as stream:
        stream.seek(start)
        return stream.read(count)
