"""Files shared in rooms: the reference a message carries, and what a file's bytes are.

A file travels by reference. A `message` envelope's body lists `files`, each a
`FileRef` {sha256, size, name, mime}; the bytes stay at the node they were
uploaded to and are fetched in chunks by the nodes whose staff open them. The
origin signs the envelope that names the hash, so a copy from any node that
holds the file is as good as the original once its SHA-256 matches: fetchers
verify before they keep anything.

Invariants of a reference (the same rules as the `files` items of
`schemas/envelope-bodies/message.schema.json`): `sha256` is 32 bytes, `size` an
integer 0..2^53-1, `name` 1-255 characters without control characters or path
separators (it is shown, never used as a path), `mime` a lowercase `type/subtype`
of at most 127 characters.

Media types are read from the content (`sniff`), never taken from the name: a
`.pdf` that is really an HTML page is `text/html`. The name only chooses between
types the content cannot tell apart (an OLE2 container as `.xls` or `.doc`; a
text file as CSV or plain text); it never makes content something it is not.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

__all__ = [
    "MAX_FILES_PER_MESSAGE",
    "MAX_FILE_NAME",
    "MAX_FILE_SIZE",
    "SNIFF_BYTES",
    "FileRef",
    "check_file_refs",
    "sniff",
]

MAX_FILES_PER_MESSAGE = 32
MAX_FILE_NAME = 255
MAX_FILE_SIZE = 2**53 - 1  # JSON-safe integer; far beyond any upload limit
MAX_MIME = 127
SNIFF_BYTES = 64 * 1024
"""How much of a file's start `sniff` looks at (ZIP entry names may lie a little in)."""

_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
_REF_FIELDS = frozenset({"sha256", "size", "name", "mime"})


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, code="bad_body")


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRef:
    """A file a message shares: its hash, size, original name and media type."""

    sha256: bytes
    """SHA-256 of the file's bytes (32 bytes)."""
    size: int
    """Length in bytes."""
    name: str
    """The name it was uploaded under (for display and downloads only)."""
    mime: str
    """Media type sniffed from the content by the uploading node."""

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise _bad("a file reference's sha256 must be 32 bytes")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= MAX_FILE_SIZE
        ):
            raise _bad(f"a file reference's size must be an integer 0-{MAX_FILE_SIZE}")
        if (
            not isinstance(self.name, str)
            or not 1 <= len(self.name) <= MAX_FILE_NAME
            or _BAD_NAME.search(self.name)
        ):
            raise _bad(
                f"a file name must be 1-{MAX_FILE_NAME} characters, without control "
                "characters, '/' or '\\'"
            )
        if (
            not isinstance(self.mime, str)
            or len(self.mime) > MAX_MIME
            or not _MIME.fullmatch(self.mime)
        ):
            raise _bad("a file's mime must be a lowercase type/subtype of at most 127 characters")

    @classmethod
    def from_body(cls, value: object) -> FileRef:
        """A reference from its msgpack map; `ProtocolError` bad_body if it breaks a rule."""
        if not isinstance(value, Mapping) or set(value) != _REF_FIELDS:
            raise _bad("a file reference is a map of exactly sha256, size, name and mime")
        return cls(
            sha256=value["sha256"], size=value["size"], name=value["name"], mime=value["mime"]
        )

    def to_body(self) -> dict[str, Any]:
        """The msgpack map a message body carries."""
        return {"mime": self.mime, "name": self.name, "sha256": self.sha256, "size": self.size}


def check_file_refs(value: object) -> tuple[FileRef, ...]:
    """The `files` of a message body; `ProtocolError` bad_body unless it is a list of at most
    `MAX_FILES_PER_MESSAGE` valid references."""
    if not isinstance(value, list) or len(value) > MAX_FILES_PER_MESSAGE:
        raise _bad(f"files must be a list of at most {MAX_FILES_PER_MESSAGE} file references")
    return tuple(FileRef.from_body(item) for item in value)


# --- sniffing --------------------------------------------------------------------------------

_OOXML = {
    b"xl/": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    b"word/": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    b"ppt/": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}
_OLE2_BY_EXTENSION = {
    "xls": "application/vnd.ms-excel",
    "doc": "application/msword",
    "ppt": "application/vnd.ms-powerpoint",
    "msg": "application/vnd.ms-outlook",
}
_TEXT_BY_EXTENSION = {"csv": "text/csv", "tsv": "text/tab-separated-values"}
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"\x1f\x8b", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"{\\rtf", "application/rtf"),
    (b"ID3", "audio/mpeg"),
    (b"OggS", "application/ogg"),
    (b"\x1a\x45\xdf\xa3", "video/webm"),
)
_FTYP_BRANDS = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heif",
    b"msf1": "image/heif",
    b"avif": "image/avif",
    b"qt  ": "video/quicktime",
    b"M4A ": "audio/mp4",
}


def _extension(name: str) -> str:
    stem, dot, extension = name.rpartition(".")
    return extension.lower() if dot and stem else ""


def _zip_type(head: bytes) -> str:
    """OOXML (Excel, Word, PowerPoint) or OpenDocument from the local entry names in `head`."""
    position = 0
    while position + 30 <= len(head) and head.startswith(b"PK\x03\x04", position):
        flags, _, _, _, _, compressed, _, name_length, extra_length = struct.unpack_from(
            "<HHHHIIIHH", head, position + 6
        )
        name = head[position + 30 : position + 30 + name_length]
        if name == b"mimetype" and compressed < 128:  # OpenDocument: stored first, uncompressed
            start = position + 30 + name_length + extra_length
            declared = head[start : start + compressed]
            if declared.startswith(b"application/vnd.oasis.opendocument."):
                text = declared.decode("ascii", "replace")
                if _MIME.fullmatch(text):
                    return text
        for prefix, mime in _OOXML.items():
            if name.startswith(prefix):
                return mime
        if flags & 0x08:
            break  # sizes follow the data: the next entry cannot be found from here
        position += 30 + name_length + extra_length + compressed
    return "application/zip"


def _text_type(head: bytes, extension: str) -> str | None:
    """A text type if `head` reads as text (UTF-8, UTF-16 with BOM, or Shift_JIS, the
    encoding Japanese Excel saves CSV in), else None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        kind = "plain"
    else:
        if b"\x00" in head:
            return None
        sample = head[:-4] if len(head) == SNIFF_BYTES else head  # a character may be cut
        for encoding in ("utf-8", "cp932"):
            try:
                text = sample.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        else:
            return None
        if any(ord(c) < 32 and c not in "\t\n\r\f\x1b" for c in text):
            return None
        opening = text.lstrip("\ufeff \t\r\n")[:512].lower()
        if opening.startswith(("<!doctype html", "<html", "<head", "<body", "<script")):
            return "text/html"
        if opening.startswith("<svg") or (opening.startswith("<?xml") and "<svg" in opening):
            return "image/svg+xml"
        if opening.startswith("<?xml"):
            return "application/xml"
        kind = "plain"
    return _TEXT_BY_EXTENSION.get(extension, f"text/{kind}")


def sniff(head: bytes, name: str = "") -> str:
    """The media type of a file from its first bytes (up to `SNIFF_BYTES`).

    The name refines only within what the content allows (see the module docstring);
    unrecognised binary content is `application/octet-stream`.
    """
    extension = _extension(name)
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return _FTYP_BRANDS.get(brand, "video/mp4")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_type(head)
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return _OLE2_BY_EXTENSION.get(extension, "application/x-ole-storage")
    if not head:
        return "application/octet-stream"
    return _text_type(head, extension) or "application/octet-stream"
