"""File figures: a file uploaded to one node process, fetched by another over mutual TLS.

- file_transfer_mbps: two node processes A and B on loopback, each serving its file
  routes (`gateway.api_files`, plain HTTP on 127.0.0.1, like the staff API behind
  its TLS listener). A file of random bytes (`Sizes.file_mb` MiB) is uploaded to A
  and shared in a room with B; then a user of B downloads it. B holds none of it
  yet, so it fetches it from A over the federation API (mutual TLS 1.3, Range
  requests of 4 MiB, each appended and hashed on a worker thread), checks the
  SHA-256, moves it into place and only then answers. The figure is the file's
  size over the time from B's download request to B's response headers, i.e. the
  fetch alone (the local copy to the client afterwards is reported on the side).
- file_upload_mbps: the upload to A (streamed, hashed and written as it arrives,
  fsynced, message posted), size over time to the 201 answer.

Baseline (same run, this process, one core): what a node must do at least to every
byte it keeps: read it, SHA-256 it, write it to a new file and fsync, in 1 MiB
pieces. MB here are 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from cluster import Cluster, CpuMeter, NodeFailed, Worker
from common import progress, result
from flow import Baselines, Profiler, Sizes, workdir

A, B = "mie-pref", "tsu"
MiB = 1024 * 1024
MB = 1_000_000


def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            piece = os.urandom(min(MiB, left))
            digest.update(piece)
            out.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def _disk_baseline(source: Path, target: Path) -> float:
    """MB/s of read + SHA-256 + write + fsync of `source` into a new file, one core."""
    started = time.perf_counter()
    digest = hashlib.sha256()
    with source.open("rb") as stream, target.open("wb") as out:
        while piece := stream.read(MiB):
            digest.update(piece)
            out.write(piece)
        out.flush()
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return source.stat().st_size / MB / elapsed


def _url(worker: Worker, path: str) -> str:
    assert worker.api_port is not None
    return f"http://127.0.0.1:{worker.api_port}{path}"


async def _transfer(
    a: Worker, b: Worker, room: str, source: Path, sha256: str, prof: Profiler
) -> tuple[float, float, float]:
    """(upload seconds, fetch seconds, whole download seconds)."""
    size = source.stat().st_size
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def post(worker: Worker, path: str, body: dict[str, Any]) -> dict[str, Any]:
            async with http.post(_url(worker, path), json=body) as response:
                if response.status >= 300:
                    raise NodeFailed(f"{path}: HTTP {response.status} {await response.text()}")
                answer: dict[str, Any] = await response.json()
                return answer

        auth_a = {
            "Authorization": "Bearer " + (await post(a, "/bench/user", {"login": "b"}))["token"]
        }
        auth_b = {
            "Authorization": "Bearer " + (await post(b, "/bench/user", {"login": "b"}))["token"]
        }
        await post(a, "/bench/room-users", {"room": room, "users": [f"b@{A}", f"b@{B}"]})

        async def files_at_b() -> list[dict[str, Any]] | None:
            async with http.get(_url(b, f"/api/v1/rooms/{quote(room)}/files"), headers=auth_b) as r:
                return list((await r.json())["files"]) if r.status == 200 else None

        deadline = time.monotonic() + 60
        while await files_at_b() is None:
            if time.monotonic() > deadline:
                raise NodeFailed(f"the room's users never reached {B}")
            await asyncio.sleep(0.05)

        progress(f"file: uploading {size / MiB:.0f} MiB to {A}")
        headers = {**auth_a, "Content-Disposition": "attachment; filename*=UTF-8''bench.bin"}
        started = time.perf_counter()
        with source.open("rb") as body:
            async with http.post(
                _url(a, f"/api/v1/rooms/{quote(room)}/files"), data=body, headers=headers
            ) as response:
                shared = await response.json()
                if response.status != 201 or shared["sha256"] != sha256:
                    raise NodeFailed(f"upload: HTTP {response.status} {shared}")
        uploaded = time.perf_counter() - started

        deadline = time.monotonic() + 60
        while not (await files_at_b() or []):
            if time.monotonic() > deadline:
                raise NodeFailed(f"the file's message never reached {B}")
            await asyncio.sleep(0.02)

        progress(f"file: downloading it at {B} (fetched from {A} over mutual TLS first)")
        meter = CpuMeter([a, b])
        spies = prof.attach("file_transfer_mbps", [a, b], size / MB / 10)
        digest = hashlib.sha256()
        started = time.perf_counter()
        async with http.get(_url(b, f"/api/v1/files/{sha256}"), headers=auth_b) as response:
            fetched = time.perf_counter() - started
            if response.status != 200:
                raise NodeFailed(f"download: HTTP {response.status} {await response.text()}")
            async for piece in response.content.iter_chunked(MiB):
                digest.update(piece)
        whole = time.perf_counter() - started
        meter.report("file fetch and download")
        prof.finish("file_transfer_mbps", spies)
        if digest.hexdigest() != sha256:
            raise NodeFailed("the downloaded file differs from the uploaded one")
        return uploaded, fetched, whole


def file_transfer(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    size = sizes.file_mb * MiB
    with workdir() as tmp:
        root = Path(tmp)
        source = root / "file.bin"
        progress(f"file: writing {sizes.file_mb} MiB of random bytes")
        sha256 = _random_file(source, size)
        reference = _disk_baseline(source, root / "copy.bin")
        progress(f"baseline: read + SHA-256 + write + fsync {reference:,.0f} MB/s on one core")
        cluster = Cluster(root / "nodes", api=True)
        progress(f"forming a federation of 2 node processes ({A}, {B}) with file routes")
        cluster.form(A, [B])
        room = cluster.create_room(A, [B])
        try:
            a, b = cluster.workers[A], cluster.workers[B]
            uploaded, fetched, whole = asyncio.run(_transfer(a, b, room, source, sha256, prof))
        finally:
            cluster.stop_all()
    progress(
        f"file: upload {uploaded:.2f}s ({size / MB / uploaded:,.0f} MB/s), fetch "
        f"{fetched:.2f}s ({size / MB / fetched:,.0f} MB/s), download with the local copy "
        f"{whole:.2f}s ({size / MB / whole:,.0f} MB/s)"
    )
    return [
        result("file_transfer_mbps", size / MB / fetched, "MB/s", reference),
        result("file_upload_mbps", size / MB / uploaded, "MB/s", reference),
    ]


FIGURES = {"file_transfer": (("file_transfer_mbps", "file_upload_mbps"), file_transfer)}
