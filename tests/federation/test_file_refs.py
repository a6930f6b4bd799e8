"""File references and content sniffing: types come from the bytes, never from the name."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import pytest

from federation import codec
from federation.errors import ProtocolError
from federation.files import SNIFF_BYTES, FileRef, check_file_refs, sniff

SHA = bytes(range(32))


def ref(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"sha256": SHA, "size": 10, "name": "報告書.pdf"}
    body["mime"] = "application/pdf"
    body.update(changes)
    return body


def test_a_reference_survives_its_msgpack_round_trip() -> None:
    original = FileRef.from_body(ref())
    decoded = codec.decode_map(codec.encode(original.to_body()))
    assert FileRef.from_body(decoded) == original


@pytest.mark.parametrize(
    "body",
    [
        ref(sha256=SHA.hex()),
        ref(size=-1),
        ref(size=True),
        ref(name=""),
        ref(name="a/b.pdf"),
        ref(name="a\\b.pdf"),
        ref(name="改行\n.pdf"),
        ref(name="x" * 256),
        ref(mime="application/PDF"),
        ref(mime="pdf"),
        {**ref(), "extra": 1},
        {k: v for k, v in ref().items() if k != "size"},
    ],
    ids=repr,
)
def test_a_reference_breaking_a_rule_is_bad_body(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        FileRef.from_body(body)
    assert caught.value.code == "bad_body"


def test_files_holds_at_most_32_references() -> None:
    assert len(check_file_refs([ref()] * 32)) == 32
    with pytest.raises(ProtocolError):
        check_file_refs([ref()] * 33)
    with pytest.raises(ProtocolError):
        check_file_refs({"a": ref()})


def _zip(entries: list[tuple[str, bytes]], *, stored_first: bool = False) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for index, (name, data) in enumerate(entries):
            compress = zipfile.ZIP_STORED if stored_first and index == 0 else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=compress)
    return out.getvalue()


XLSX = _zip(
    [
        ("[Content_Types].xml", b"<Types/>" * 50),
        ("_rels/.rels", b"<Relationships/>"),
        ("xl/workbook.xml", b"<workbook/>"),
    ]
)
DOCX = _zip([("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w:document/>")])
ODS = _zip(
    [("mimetype", b"application/vnd.oasis.opendocument.spreadsheet"), ("content.xml", b"<x/>")],
    stored_first=True,
)
PLAIN_ZIP = _zip([("readme.txt", b"hello")])
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)
SJIS_CSV = "氏名,所属\n田中,防災課\n".encode("cp932")


@pytest.mark.parametrize(
    ("head", "name", "expected"),
    [
        (b"%PDF-1.7\n...", "notice.pdf", "application/pdf"),
        (b"%PDF-1.7\n...", "写真.jpg", "application/pdf"),  # the name does not decide
        (b"\x89PNG\r\n\x1a\n" + bytes(20), "x", "image/png"),
        (b"\xff\xd8\xff\xe0" + bytes(20), "浸水.png", "image/jpeg"),
        (b"GIF89a" + bytes(10), "", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "", "image/webp"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(8), "IMG_0001.HEIC", "image/heic"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(8), "", "video/mp4"),
        (XLSX, "予算.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        (XLSX, "予算.zip", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        (DOCX, "a.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        (ODS, "a.ods", "application/vnd.oasis.opendocument.spreadsheet"),
        (PLAIN_ZIP, "a.xlsx", "application/zip"),  # a zip named .xlsx is still a zip
        (OLE2, "古い台帳.xls", "application/vnd.ms-excel"),
        (OLE2, "古い文書.doc", "application/msword"),
        (OLE2, "x.pdf", "application/x-ole-storage"),
        ("避難所一覧\n第一小学校\n".encode(), "list.txt", "text/plain"),
        ("氏名,所属\n田中,防災課\n".encode(), "名簿.csv", "text/csv"),
        (SJIS_CSV, "名簿.csv", "text/csv"),  # Excel's CSV in Japan is Shift_JIS
        (b"<!DOCTYPE html><html><script>", "invoice.pdf", "text/html"),
        (b"<?xml version='1.0'?><svg xmlns='x'>", "map.png", "image/svg+xml"),
        (b"MZ\x90\x00" + bytes(60), "報告書.pdf", "application/octet-stream"),
        (b"", "empty.txt", "application/octet-stream"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_type_comes_from_the_content(head: bytes, name: str, expected: str) -> None:
    assert sniff(head[:SNIFF_BYTES], name) == expected


def test_random_bytes_are_octet_stream_whatever_the_name() -> None:
    data = os.urandom(SNIFF_BYTES)
    for name in ("a.pdf", "a.csv", "a.txt", "a.xlsx"):
        assert sniff(data, name) == "application/octet-stream"


def test_utf8_text_cut_inside_a_character_at_the_sniff_limit_is_still_text() -> None:
    text = ("あ" * SNIFF_BYTES).encode()[:SNIFF_BYTES]
    assert sniff(text, "a.txt") == "text/plain"
