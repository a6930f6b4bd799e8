"""Files shared in rooms between real nodes: uploaded on one, fetched lazily over mutual TLS
by another, verified by SHA-256, refused to anyone outside the room.

Each node's file routes (`gateway.api_files.file_routes`) are served by a small aiohttp
app on 127.0.0.1 in the test, since the staff API application mounts them elsewhere;
staff log in through the node's own `Accounts`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from federation.errors import ProtocolError, TrustError
from gateway.api_files import file_routes
from gateway.files import FileState
from gateway.local import free_port
from gateway.node import Node

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
NAME = "令和6年 浸水被害 写真一覧.pdf"


class Api:
    """A node's file routes on 127.0.0.1, and one staff user's token for them."""

    def __init__(self, node: Node, runner: web.AppRunner, port: int, token: str) -> None:
        self.node = node
        self.runner = runner
        self.url = f"http://127.0.0.1:{port}"
        self.token = token

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}


Serve = Callable[[Node, str], Awaitable[Api]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(node: Node, login: str) -> Api:
        issued = await node.accounts.add_user(login, display_name="職員 " + login)
        assert issued.initial_password is not None
        tokens = await node.accounts.login(login, issued.initial_password)
        app = web.Application()
        app.add_routes(file_routes(node))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return Api(node, runner, port, tokens.access_token)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
    yield session
    await session.close()


async def towns(cluster: Cluster) -> tuple[Node, Node, Node, str]:
    """mie-pref (authority, not in the room), tsu (the room's home) and ise; the room has
    tanaka@tsu and sato@ise as members."""
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    ise = await cluster.member("ise", "伊勢市", "242039")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {3})
    room = await tsu.rooms.create("浸水対策", nodes=["ise"])
    await tsu.rooms.change(room, {"set_users": {"tanaka@tsu": "member", "sato@ise": "member"}})
    await eventually(
        lambda: (state := ise.rooms.state(room)) is not None and "sato@ise" in state.users
    )
    return mie, tsu, ise, room


def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` a MiB at a time; returns their SHA-256 (hex)."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            piece = os.urandom(min(MiB, left))
            digest.update(piece)
            out.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def disposition(name: str) -> str:
    return f"attachment; filename*=UTF-8''{quote(name)}"


async def upload(
    http: aiohttp.ClientSession, api: Api, room: str, path: Path, name: str = NAME, **extra: Any
) -> tuple[int, dict[str, Any]]:
    with path.open("rb") as body:
        async with http.post(
            f"{api.url}/api/v1/rooms/{quote(room)}/files",
            data=body,
            headers=api.headers(**{"Content-Disposition": disposition(name)}),
            **extra,
        ) as response:
            return response.status, await response.json()


async def download(
    http: aiohttp.ClientSession, api: Api, sha256: str, into: Path
) -> tuple[int, str, dict[str, str]]:
    """GET the file into `into` in pieces; (status, SHA-256 of what came, headers)."""
    digest = hashlib.sha256()
    async with http.get(f"{api.url}/api/v1/files/{sha256}", headers=api.headers()) as response:
        with into.open("wb") as out:
            async for piece in response.content.iter_chunked(MiB):
                digest.update(piece)
                out.write(piece)
        return response.status, digest.hexdigest(), dict(response.headers)


async def error_of(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    return str(body["error"])


def knows(node: Node, sha256: str) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: the message sharing the file was accepted at `node`."""

    async def check() -> bool:
        return await node.files.file(bytes.fromhex(sha256)) is not None

    return check


def stored_files(node: Node) -> list[Path]:
    """Every file under the node's files/ directory, in-progress ones included."""
    return sorted(p for p in node.home.files.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- tests


async def test_a_50_mb_file_uploaded_on_tsu_downloads_byte_identical_on_ise_in_chunks(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu, at_ise = await serve(tsu, "tanaka"), await serve(ise, "sato")
    size = 50 * MiB
    source = tmp_path / "upload.bin"
    with source.open("wb") as out:
        out.write(b"%PDF-1.7\n")  # so the type comes from the content
    expected = hashlib.sha256(b"%PDF-1.7\n")
    with source.open("ab") as out:
        left = size - 9
        while left:
            piece = os.urandom(min(MiB, left))
            expected.update(piece)
            out.write(piece)
            left -= len(piece)
    sha256 = expected.hexdigest()

    status, shared = await upload(http, at_tsu, room, source)
    assert status == 201, shared
    assert shared["sha256"] == sha256 and shared["size"] == size
    assert shared["mime"] == "application/pdf" and shared["name"] == NAME
    assert shared["uploader"] == "tanaka@tsu" and shared["state"] == "local"
    assert tsu.files.path(bytes.fromhex(sha256)).stat().st_size == size

    # ise learns of the file from the message; it holds no byte of it yet (lazy).
    async def listed_at_ise() -> bool:
        async with http.get(
            f"{at_ise.url}/api/v1/rooms/{quote(room)}/files", headers=at_ise.headers()
        ) as response:
            files = (await response.json())["files"]
        return [f["sha256"] for f in files] == [sha256]

    await eventually(listed_at_ise, timeout=30)
    # The message sharing it named its sender for the other towns.
    await eventually(lambda: ise.names.get("tanaka@tsu") == "職員 tanaka")
    stored = await ise.files.file(bytes.fromhex(sha256))
    assert stored is not None and stored.state is FileState.REMOTE_PENDING
    assert stored_files(ise) == []

    status, got, headers = await download(http, at_ise, sha256, tmp_path / "download.bin")
    assert status == 200
    assert got == sha256
    assert headers["Content-Type"] == "application/pdf"
    assert f"filename*=UTF-8''{quote(NAME, safe='')}" in headers["Content-Disposition"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Fetched over the federation in 4 MiB ranges, each served by tsu once.
    chunks = -(-size // (4 * MiB))
    assert ise.files.fetcher is not None
    assert ise.files.fetcher.fetched_requests == chunks == tsu.files.served_requests
    assert tsu.files.served_bytes == size
    stored = await ise.files.file(bytes.fromhex(sha256))
    assert stored is not None and stored.state is FileState.COMPLETE
    assert stored.mime == "application/pdf"  # sniffed again at ise
    assert stored_files(ise) == [ise.files.path(bytes.fromhex(sha256))]

    # A second download is served from ise's own copy.
    status, again, _ = await download(http, at_ise, sha256, tmp_path / "again.bin")
    assert (status, again) == (200, sha256)
    assert tsu.files.served_requests == chunks


async def test_an_upload_over_the_limit_is_refused_before_anything_is_stored(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, _, room = await towns(cluster)
    at_tsu = await serve(tsu, "tanaka")
    tsu.files.with_settings(max_upload_bytes=1 * MiB)
    source = tmp_path / "big.bin"
    random_file(source, 3 * MiB)
    before = await tsu.rooms.store.counts()

    # Declared length over the limit, client waiting for 100-continue: refused before
    # it sends a byte.
    status, answer = await upload(http, at_tsu, room, source, expect100=True)
    assert (status, answer["error"]) == (413, "file_too_large")
    assert "max_upload_mb" in answer["hint"]

    # The same by hand: 10 GB announced, no byte of it sent; the first answer is the 413
    # (not "100 Continue").
    reader, writer = await asyncio.open_connection("127.0.0.1", int(at_tsu.url.rsplit(":", 1)[1]))
    writer.write(
        (
            f"POST /api/v1/rooms/{quote(room)}/files HTTP/1.1\r\nHost: tsu\r\n"
            f"Authorization: Bearer {at_tsu.token}\r\n"
            f"Content-Disposition: {disposition('huge.bin')}\r\n"
            f"Content-Length: {10 * 1024**3}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    first = await asyncio.wait_for(reader.readline(), timeout=30)
    writer.close()
    assert first.startswith(b"HTTP/1.1 413"), first

    # Declared length over the limit, body sent at once: refused from the header.
    status, answer = await upload(http, at_tsu, room, source)
    assert (status, answer["error"]) == (413, "file_too_large")

    # No length declared (chunked): aborted once the bytes pass the limit.
    async def stream() -> AsyncIterator[bytes]:
        with source.open("rb") as body:
            while piece := body.read(256 * 1024):
                yield piece

    try:
        async with http.post(
            f"{at_tsu.url}/api/v1/rooms/{quote(room)}/files",
            data=stream(),
            headers=at_tsu.headers(**{"Content-Disposition": disposition("big.bin")}),
        ) as response:
            assert response.status == 413
            assert await error_of(response) == "file_too_large"
    except aiohttp.ClientError:
        pass  # the server may close before the client finished sending; either way refused

    assert stored_files(tsu) == []  # no file, no temporary file
    assert await tsu.rooms.store.counts() == before  # no message
    assert await tsu.files.in_room(room) == []


async def test_a_node_not_in_the_room_gets_403_from_the_federation_route(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    mie, tsu, ise, room = await towns(cluster)
    at_tsu = await serve(tsu, "tanaka")
    source = tmp_path / "notice.txt"
    source.write_bytes("避難勧告のお知らせ\n".encode() * 1000)
    status, shared = await upload(http, at_tsu, room, source, name="お知らせ.txt")
    assert status == 201
    path = f"/files/{shared['sha256']}"

    entry = mie.roster.member("tsu")
    assert entry is not None
    with pytest.raises(TrustError) as refused:
        await mie.client.request(entry, "GET", path, headers={"Range": "bytes=0-99"})
    assert refused.value.code == "file_not_shared"
    assert tsu.refusals["file_not_shared"] == 1

    # A member node gets the range it asks for.
    await eventually(knows(ise, shared["sha256"]))
    entry = ise.roster.member("tsu")
    assert entry is not None
    answer = await ise.client.request(entry, "GET", path, headers={"Range": "bytes=0-99"})
    assert answer.status == 206 and answer.body == source.read_bytes()[:100]
    assert answer.headers["Content-Range"] == f"bytes 0-99/{source.stat().st_size}"

    # An unknown file is refused to a member node too: nothing references it.
    with pytest.raises(TrustError):
        await ise.client.request(entry, "GET", "/files/" + "0" * 64)


async def test_a_holder_serving_wrong_bytes_is_refused_file_hash_mismatch_and_nothing_kept(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu, at_ise = await serve(tsu, "tanaka"), await serve(ise, "sato")
    source = tmp_path / "photo.jpg"
    random_file(source, 6 * MiB)
    status, shared = await upload(http, at_tsu, room, source, name="被害写真.jpg")
    assert status == 201
    sha256 = bytes.fromhex(shared["sha256"])
    # The test double: tsu's stored copy changes on its disk after the upload.
    with tsu.files.path(sha256).open("r+b") as blob:
        blob.seek(5 * MiB)
        blob.write(b"\x00" * 16)
    await eventually(knows(ise, sha256.hex()))

    with capture_logs() as logs:
        async with http.get(
            f"{at_ise.url}/api/v1/files/{sha256.hex()}", headers=at_ise.headers()
        ) as response:
            assert response.status == 502
            assert await error_of(response) == "file_hash_mismatch"
    mismatches = [e for e in logs if e["event"] == "file_hash_mismatch"]
    assert [(e["holder"], e["sha256"]) for e in mismatches] == [("tsu", sha256.hex())]
    assert stored_files(ise) == []  # the wrong bytes are gone, partial data included
    stored = await ise.files.file(sha256)
    assert stored is not None and stored.state is FileState.REMOTE_PENDING


async def test_after_a_holder_sends_wrong_bytes_the_next_holder_serves_the_file(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    mie, tsu, ise, room = await towns(cluster)
    await tsu.rooms.invite(room, "mie-pref")
    await tsu.rooms.change(room, {"set_users": {"kato@mie-pref": "member"}})
    await eventually(
        lambda: all(
            (state := node.rooms.state(room)) is not None and "kato@mie-pref" in state.users
            for node in (mie, ise)
        )
    )
    at_tsu, at_ise, at_mie = (
        await serve(tsu, "tanaka"),
        await serve(ise, "sato"),
        await serve(mie, "kato"),
    )
    source = tmp_path / "table.xlsx"
    sha256_hex = random_file(source, 5 * MiB)
    status, _ = await upload(http, at_tsu, room, source, name="避難所一覧.xlsx")
    assert status == 201
    await eventually(knows(mie, sha256_hex))
    await eventually(knows(ise, sha256_hex))
    # mie-pref fetches a good copy first; then tsu's copy is damaged.
    status, got, _ = await download(http, at_mie, sha256_hex, tmp_path / "at-mie.bin")
    assert (status, got) == (200, sha256_hex)
    with tsu.files.path(bytes.fromhex(sha256_hex)).open("r+b") as blob:
        blob.write(b"broken")

    with capture_logs() as logs:
        status, got, _ = await download(http, at_ise, sha256_hex, tmp_path / "at-ise.bin")
    assert (status, got) == (200, sha256_hex)
    events = [(e["event"], e.get("holder", e.get("source"))) for e in logs]
    assert ("file_hash_mismatch", "tsu") in events  # the origin is asked first
    assert ("file_fetched", "mie-pref") in events


async def test_a_user_not_in_the_room_cannot_upload_list_or_download(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu = await serve(tsu, "tanaka")
    outsider_tsu = await serve(tsu, "suzuki")  # a user of tsu, not in the room
    outsider_ise = await serve(ise, "ito")  # a user of ise, not in the room
    source = tmp_path / "memo.txt"
    source.write_bytes("内部メモ\n".encode())
    status, shared = await upload(http, at_tsu, room, source, name="メモ.txt")
    assert status == 201
    await eventually(knows(ise, shared["sha256"]))

    status, answer = await upload(http, outsider_tsu, room, source, name="x.txt")
    assert (status, answer["error"]) == (403, "not_a_room_member")
    for api in (outsider_tsu, outsider_ise):
        async with http.get(
            f"{api.url}/api/v1/files/{shared['sha256']}", headers=api.headers()
        ) as response:
            assert response.status == 403
            assert await error_of(response) == "not_a_room_member"
        async with http.get(
            f"{api.url}/api/v1/rooms/{quote(room)}/files", headers=api.headers()
        ) as response:
            assert response.status == 403
    assert len(await tsu.files.in_room(room)) == 1  # the refused upload shared nothing
    assert stored_files(ise) == []  # and the refused download fetched nothing

    # Without a valid token: 401, whatever the room.
    async with http.get(f"{at_tsu.url}/api/v1/files/{shared['sha256']}") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(
        f"{at_tsu.url}/api/v1/files/{shared['sha256']}",
        headers={"Authorization": "Bearer not-a-token"},
    ) as response:
        assert response.status == 401


async def test_an_interrupted_fetch_resumes_after_a_restart_where_it_stopped(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu = await serve(tsu, "tanaka")
    size = 8 * MiB
    source = tmp_path / "map.png"
    sha256_hex = random_file(source, size)
    sha256 = bytes.fromhex(sha256_hex)
    status, _ = await upload(http, at_tsu, room, source, name="浸水想定区域図.png")
    assert status == 201
    await eventually(knows(ise, sha256_hex))
    ise.files.with_settings(chunk_bytes=256 * 1024)

    # tsu serves four ranges, then holds the fifth until ise has stopped.
    original = tsu.files.serve_peer
    calls = 0
    gate = asyncio.Event()

    async def gated(request: web.Request, peer: str) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls > 4:
            await gate.wait()
            raise web.HTTPServiceUnavailable()
        return await original(request, peer)

    tsu.files.serve_peer = gated  # type: ignore[method-assign]
    assert ise.files.fetcher is not None
    fetch = asyncio.create_task(ise.files.fetcher.ensure(sha256))
    partial = ise.home.files / "partial" / sha256_hex
    # Ranges are asked for ahead, but written in order: four reach the disk, no more.
    await eventually(lambda: calls >= 5, timeout=30)
    await eventually(lambda: partial.is_file() and partial.stat().st_size == 4 * 256 * 1024)
    await cluster.stop("ise")
    with pytest.raises(asyncio.CancelledError):
        await fetch
    gate.set()
    assert partial.stat().st_size == 4 * 256 * 1024

    tsu.files.serve_peer = original  # type: ignore[method-assign]
    await eventually(lambda: tsu.files.served_requests == 4)
    tsu.files.served_bytes = 0
    ise = await cluster.start("ise")  # resumes in the background, from byte 1 MiB

    async def complete() -> bool:
        stored = await ise.files.file(sha256)
        return stored is not None and stored.state is FileState.COMPLETE

    await eventually(complete, timeout=60)
    assert tsu.files.served_bytes == size - 4 * 256 * 1024  # nothing asked for twice
    assert not partial.exists()
    at_ise = await serve(ise, "sato")
    status, got, _ = await download(http, at_ise, sha256_hex, tmp_path / "resumed.bin")
    assert (status, got) == (200, sha256_hex)


async def test_an_unreachable_origin_is_refused_file_unavailable_and_fetched_later(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu, at_ise = await serve(tsu, "tanaka"), await serve(ise, "sato")
    source = tmp_path / "a.txt"
    source.write_bytes(b"shared text\n" * 100)
    status, shared = await upload(http, at_tsu, room, source, name="a.txt")
    assert status == 201
    await eventually(knows(ise, shared["sha256"]))
    await cluster.stop("tsu")
    async with http.get(
        f"{at_ise.url}/api/v1/files/{shared['sha256']}", headers=at_ise.headers()
    ) as response:
        assert response.status == 503
        assert await error_of(response) == "file_unavailable"
    await cluster.start("tsu")
    status, got, _ = await download(http, at_ise, shared["sha256"], tmp_path / "later.txt")
    assert (status, got) == (200, shared["sha256"])


async def test_a_file_lost_from_the_origins_disk_is_fetched_back_from_a_node_with_a_copy(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu, at_ise = await serve(tsu, "tanaka"), await serve(ise, "sato")
    source = tmp_path / "budget.xlsx"
    sha256_hex = random_file(source, 2 * MiB)
    status, _ = await upload(http, at_tsu, room, source, name="予算.xlsx")
    assert status == 201
    await eventually(knows(ise, sha256_hex))
    status, got, _ = await download(http, at_ise, sha256_hex, tmp_path / "at-ise.bin")
    assert (status, got) == (200, sha256_hex)
    tsu.files.path(bytes.fromhex(sha256_hex)).unlink()  # e.g. a home restored from a backup

    status, got, _ = await download(http, at_tsu, sha256_hex, tmp_path / "back.bin")
    assert (status, got) == (200, sha256_hex)
    stored = await tsu.files.file(bytes.fromhex(sha256_hex))
    assert stored is not None and stored.state is FileState.COMPLETE


async def test_the_federation_route_serves_single_ranges_up_to_16_mib_and_whole_files(
    cluster: Cluster, serve: Serve, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, tsu, ise, room = await towns(cluster)
    at_tsu = await serve(tsu, "tanaka")
    tsu.files.with_settings(max_upload_bytes=64 * MiB)
    source = tmp_path / "big.bin"
    size = 17 * MiB + 5
    random_file(source, size)
    status, shared = await upload(http, at_tsu, room, source, name="big.bin")
    assert status == 201
    await eventually(knows(ise, shared["sha256"]))
    entry = ise.roster.member("tsu")
    assert entry is not None
    path = f"/files/{shared['sha256']}"

    whole = await ise.client.request(entry, "GET", path)
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == shared["sha256"]
    tail = await ise.client.request(entry, "GET", path, headers={"Range": f"bytes={size - 5}-"})
    assert tail.status == 206 and tail.body == whole.body[-5:]
    assert tail.headers["Content-Range"] == f"bytes {size - 5}-{size - 1}/{size}"
    for wanted in ("bytes=0-99,200-299", "bytes=-100", f"bytes={size}-", f"bytes=0-{16 * MiB}"):
        with pytest.raises(ProtocolError) as refused:
            await ise.client.request(entry, "GET", path, headers={"Range": wanted})
        assert refused.value.status == 416, wanted
