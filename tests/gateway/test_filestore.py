"""The file store's streamed uploads (hash, limit, sniffing) and the API's name handling.

Uploads go through `FileStore.receive` with async generators standing in for request
bodies, so the tests see exactly how much of a body was read and what was on disk
meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from federation.errors import ProtocolError
from gateway.api_files import content_disposition, file_name_from
from gateway.blobs import BlobWriter
from gateway.files import FileSettings, FileStore, parse_sha256
from gateway.store import Store

MiB = 1024 * 1024


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[FileStore]:
    store = Store(tmp_path / "node.db")
    await store.open()
    service = FileStore(
        root=tmp_path / "files",
        store=store,
        rooms=None,  # type: ignore[arg-type]  # receive() needs no rooms
        node_id="tsu",
        settings=FileSettings(max_upload_bytes=4 * MiB),
        clock=time.time,
    )
    await service.start()
    yield service
    await service.stop()
    await store.close()


def leftovers(files: FileStore) -> list[Path]:
    return sorted(p for p in files.root.rglob("*") if p.is_file())


async def pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_an_upload_is_hashed_and_written_as_it_streams(files: FileStore) -> None:
    data = os.urandom(3 * MiB + 123)
    seen_on_disk: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            # What reached the disk before this piece was handed over.
            seen_on_disk.append(sum(p.stat().st_size for p in files.incoming.iterdir()))
            yield data[start : start + 256 * 1024]

    incoming = await files.receive(body(), declared_size=len(data), name="x.bin")
    assert incoming.sha256 == hashlib.sha256(data).digest()
    assert incoming.size == len(data)
    assert incoming.path.read_bytes() == data
    assert incoming.mime == "application/octet-stream"
    # Written in pieces of about 1 MiB while the body was still arriving, not at the end.
    assert max(seen_on_disk) >= 2 * MiB
    assert incoming.path.stat().st_mode & 0o777 == 0o600


async def test_an_upload_declaring_a_length_over_the_limit_is_refused_before_reading(
    files: FileStore,
) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield b"x"

    with pytest.raises(ProtocolError) as refused:
        await files.receive(body(), declared_size=4 * MiB + 1)
    assert (refused.value.code, refused.value.status) == ("file_too_large", 413)
    assert pulled == 0
    assert leftovers(files) == []


async def test_a_streamed_upload_is_aborted_once_past_the_limit_and_leaves_no_temp_file(
    files: FileStore,
) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):  # 25 MiB offered, no length declared
            pulled += 256 * 1024
            yield os.urandom(256 * 1024)

    with pytest.raises(ProtocolError) as refused:
        await files.receive(body(), declared_size=None)
    assert refused.value.code == "file_too_large"
    assert pulled == 4 * MiB + 256 * 1024  # stopped at the first piece past 4 MiB
    assert leftovers(files) == []


async def test_a_failing_body_leaves_no_temp_file(files: FileStore) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield os.urandom(2 * MiB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await files.receive(body(), declared_size=None)
    assert leftovers(files) == []


async def test_an_upload_at_exactly_the_limit_is_taken(files: FileStore) -> None:
    data = os.urandom(4 * MiB)
    incoming = await files.receive(pieces(data), declared_size=None)
    assert incoming.size == 4 * MiB


@pytest.mark.parametrize(
    ("head", "name", "mime"),
    [
        (b"%PDF-1.4\n", "写真.jpg", "application/pdf"),
        (b"\xff\xd8\xff\xe0JFIF", "report.pdf", "image/jpeg"),
        ("氏名,所属\n".encode("cp932"), "名簿.csv", "text/csv"),
        (b"<html><script>alert(1)</script>", "invoice.pdf", "text/html"),
    ],
)
async def test_the_type_of_an_upload_is_sniffed_from_its_bytes_not_its_name(
    files: FileStore, head: bytes, name: str, mime: str
) -> None:
    incoming = await files.receive(pieces(head + b"\n" * 10), declared_size=None, name=name)
    assert incoming.mime == mime


async def test_a_stored_file_is_placed_under_its_hash(files: FileStore) -> None:
    data = b"hello " * 1000
    incoming = await files.receive(pieces(data), declared_size=len(data))
    assert await files._place(incoming) is True
    digest = hashlib.sha256(data).hexdigest()
    assert files.path(incoming.sha256) == files.root / digest[:2] / digest[2:]
    assert files.path(incoming.sha256).read_bytes() == data
    assert list(files.incoming.iterdir()) == []
    again = await files.receive(pieces(data), declared_size=len(data))
    assert await files._place(again) is False  # the same bytes are kept once
    assert list(files.incoming.iterdir()) == []


async def test_interrupted_uploads_are_forgotten_at_start(files: FileStore) -> None:
    (files.incoming / "left-by-a-crash").write_bytes(b"partial")
    await files.start()
    assert list(files.incoming.iterdir()) == []


async def test_a_resumed_writer_hashes_what_was_there_and_appends(
    files: FileStore, tmp_path: Path
) -> None:
    path = tmp_path / "partial"
    path.write_bytes(b"first half, ")
    writer = await BlobWriter.resume(path, files.executor)
    assert writer.size == 12
    await writer.write(b"second half")
    await writer.finish()
    assert path.read_bytes() == b"first half, second half"
    assert writer.digest == hashlib.sha256(b"first half, second half").digest()


# --- the API's names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (f"attachment; filename*=UTF-8''{quote('浸水 写真.jpg')}", "浸水 写真.jpg"),
        ('attachment; filename="report.pdf"', "report.pdf"),
        (f"attachment; filename=\"x.pdf\"; filename*=utf-8''{quote('報告.pdf')}", "報告.pdf"),
        ('attachment; filename="C:\\\\fakepath\\\\台帳.xlsx"', "台帳.xlsx"),
        (f"attachment; filename*=UTF-8''{quote('../../etc/passwd')}", "passwd"),
        # macOS sends decomposed kana (ハ + combining voiced mark): stored composed.
        ("attachment; filename*=UTF-8''" + quote("ハ\u309aス.txt"), "パス.txt"),
        ("attachment; filename*=UTF-8''" + quote("a\tb\x00.txt"), "ab.txt"),
    ],
)
def test_the_upload_name_comes_from_content_disposition_cleaned(header: str, name: str) -> None:
    assert file_name_from(header) == name


@pytest.mark.parametrize(
    "header", [None, "", "attachment", 'attachment; filename=""', "attachment; filename=../"]
)
def test_an_upload_without_a_name_is_refused(header: str | None) -> None:
    with pytest.raises(ProtocolError) as refused:
        file_name_from(header)
    assert refused.value.code == "missing_file_name"


def test_a_long_name_is_shortened_keeping_its_extension() -> None:
    name = file_name_from(f"attachment; filename*=UTF-8''{quote('長' * 300 + '.xlsx')}")
    assert len(name) == 255 and name.endswith("長.xlsx")


def test_content_disposition_carries_a_japanese_name_per_rfc_5987() -> None:
    header = content_disposition("令和6年度 予算(案).xlsx")
    assert header.startswith('attachment; filename="')
    assert "filename*=UTF-8''" + quote("令和6年度 予算(案).xlsx", safe="") in header
    assert header.isascii()
    assert file_name_from(header) == "令和6年度 予算(案).xlsx"  # reads back the same


def test_a_file_id_is_64_lowercase_hex_digits() -> None:
    assert parse_sha256("ab" * 32) == bytes([0xAB]) * 32
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32, "../" + "a" * 61):
        with pytest.raises(ProtocolError):
            parse_sha256(bad)
