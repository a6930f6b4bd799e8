"""The encrypted container of a backup: a passphrase, a header, then sealed chunks.

Layout, version 1 (integers big-endian):

    magic    8 bytes   b"KKHBAK\\r\\n"
    version  2 bytes   1
    length   4 bytes   of the header
    header   JSON      format, cipher, kdf {name, log2_n, r, p}, salt (hex),
                       chunk_size, node_id, created (ISO 8601, UTC)
    check    32 bytes  HMAC-SHA256(check key, magic..header)
    digest   32 bytes  SHA-256(magic..check)
    chunks   each: final flag (1 byte, 1 on the last chunk only), length (4 bytes),
             AES-256-GCM ciphertext of `chunk_size` bytes (the last: 0 to chunk_size)

scrypt(passphrase, salt) gives a master key; HKDF-SHA256 splits it into the
encryption key and the check key. Chunk i is sealed with nonce i(8) || 0(3) ||
flag(1) and associated data digest || i || flag. So: a damaged header fails the
digest (`backup_corrupt`); a wrong passphrase fails the check (`bad_passphrase`);
a changed, moved, swapped or dropped chunk fails to decrypt, a file cut at a chunk
boundary lacks its final chunk, and bytes after the final chunk are refused (all
`backup_corrupt`). Someone who rewrites the header and its digest without the
passphrase fails the check. The salt is fresh per file, so a key (and every nonce
under it) serves one file only. One chunk at a time is held in memory, so a
database of any size streams through.

scrypt rather than Argon2id: `cryptography` has Argon2id only from version 44,
and scrypt's memory hardness is what matters against guessing a stolen file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from federation.errors import ConfigError, TrustError

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_KDF",
    "BackupHeader",
    "KdfParams",
    "SealedReader",
    "SealedWriter",
    "corrupt",
    "open_sealed",
]

MAGIC = b"KKHBAK\r\n"  # \r\n: a copy that mangled line endings fails at once
FORMAT_VERSION = 1
CHUNK_SIZE = 1 << 20
MIN_CHUNK, MAX_CHUNK = 1024, 16 << 20
MAX_HEADER = 64 * 1024
TAG = 16

_HEADER = struct.Struct(">8sHI")
_FRAME = struct.Struct(">BI")


def corrupt(message: str) -> TrustError:
    """`TrustError` `backup_corrupt`: the file is damaged, truncated or was altered."""
    return TrustError(
        message,
        code="backup_corrupt",
        hint="the file is damaged or was altered; use another copy of the backup",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class KdfParams:
    """scrypt cost: 2**log2_n iterations, block size r, parallelism p."""

    log2_n: int = 17
    """128 MiB of memory with r = 8; about half a second on one core."""
    r: int = 8
    p: int = 1

    def check(self) -> None:
        memory = 128 * self.r * (1 << self.log2_n) if 1 <= self.log2_n <= 30 else 1 << 62
        if not (1 <= self.r <= 32 and 1 <= self.p <= 16 and memory <= 1 << 30):
            raise corrupt("the backup's key derivation parameters are out of range")


DEFAULT_KDF = KdfParams()


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupHeader:
    """What the unencrypted (but authenticated) header of a backup says."""

    node_id: str
    """The node the backup was made of."""
    created: str
    """When, ISO 8601 in UTC."""
    chunk_size: int
    """Plaintext bytes per chunk (the last chunk may hold fewer)."""
    kdf: KdfParams
    """scrypt parameters used to derive the key."""
    salt: bytes
    """Random salt of the key derivation, fresh per file."""

    def to_bytes(self) -> bytes:
        document = {
            "format": FORMAT_VERSION,
            "cipher": "aes-256-gcm",
            "kdf": {"name": "scrypt", **asdict(self.kdf)},
            "salt": self.salt.hex(),
            "chunk_size": self.chunk_size,
            "node_id": self.node_id,
            "created": self.created,
        }
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        return _HEADER.pack(MAGIC, FORMAT_VERSION, len(body)) + body

    @classmethod
    def from_json(cls, body: bytes) -> BackupHeader:
        try:
            document = json.loads(body)
            kdf = document["kdf"]
            if document["format"] != FORMAT_VERSION or document["cipher"] != "aes-256-gcm":
                raise ValueError("format or cipher")
            if kdf["name"] != "scrypt":
                raise ValueError("kdf")
            params = KdfParams(log2_n=kdf["log2_n"], r=kdf["r"], p=kdf["p"])
            header = cls(
                node_id=document["node_id"],
                created=document["created"],
                chunk_size=document["chunk_size"],
                kdf=params,
                salt=bytes.fromhex(document["salt"]),
            )
            if not all(isinstance(v, int) for v in (params.log2_n, params.r, params.p)):
                raise ValueError("kdf parameters")
            if not isinstance(header.node_id, str) or not isinstance(header.created, str):
                raise ValueError("node_id or created")
            if not isinstance(header.chunk_size, int) or not 16 <= len(header.salt) <= 64:
                raise ValueError("chunk_size or salt")
        except (ValueError, KeyError, TypeError) as exc:
            raise corrupt(f"the backup's header is not valid ({exc})") from exc
        if not MIN_CHUNK <= header.chunk_size <= MAX_CHUNK:
            raise corrupt("the backup's chunk size is out of range")
        params.check()
        return header


def _keys(passphrase: str, header: BackupHeader) -> tuple[bytes, bytes]:
    """(encryption key, check key) from the passphrase and the header's salt."""
    # NFC: the same passphrase typed on another system may arrive decomposed.
    secret = unicodedata.normalize("NFC", passphrase).encode()
    kdf = header.kdf
    master = Scrypt(salt=header.salt, length=32, n=1 << kdf.log2_n, r=kdf.r, p=kdf.p).derive(secret)
    both = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=None, info=b"kakehashi backup v1"
    ).derive(master)
    return both[:32], both[32:]


def _nonce_and_aad(digest: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    position = struct.pack(">Q", index) + (b"\x01" if final else b"\x00")
    return position[:8] + b"\x00\x00\x00" + position[8:], digest + position


class SealedWriter:
    """Encrypts what is written to it into `dest`, one chunk at a time; `close` seals the
    last chunk (which may be empty: every file ends with exactly one final chunk)."""

    def __init__(
        self,
        dest: IO[bytes],
        passphrase: str,
        *,
        node_id: str,
        created: str,
        kdf: KdfParams = DEFAULT_KDF,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be {MIN_CHUNK}-{MAX_CHUNK}")
        self.header = BackupHeader(
            node_id=node_id, created=created, chunk_size=chunk_size, kdf=kdf, salt=os.urandom(16)
        )
        key, check_key = _keys(passphrase, self.header)
        prefix = self.header.to_bytes()
        check = hmac.digest(check_key, prefix, "sha256")
        self._digest = hashlib.sha256(prefix + check).digest()
        dest.write(prefix + check + self._digest)
        self._dest = dest
        self._aead = AESGCM(key)
        self._index = 0
        self._pending = bytearray()
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed SealedWriter")
        self._pending += data
        size = self.header.chunk_size
        # A full chunk stays pending until more follows: only `close` knows which is last.
        while len(self._pending) > size:
            self._seal(bytes(self._pending[:size]), final=False)
            del self._pending[:size]
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._seal(bytes(self._pending), final=True)
            self._pending.clear()
            self._closed = True

    def _seal(self, plaintext: bytes, *, final: bool) -> None:
        nonce, aad = _nonce_and_aad(self._digest, self._index, final)
        sealed = self._aead.encrypt(nonce, plaintext, aad)
        self._dest.write(_FRAME.pack(int(final), len(sealed)) + sealed)
        self._index += 1


class SealedReader:
    """Decrypts a backup's chunks in order as they are read; see `open_sealed`."""

    def __init__(
        self,
        source: IO[bytes],
        header: BackupHeader,
        key: bytes,
        digest: bytes,
        consumed: int,
        on_read: Callable[[int], None] | None,
    ) -> None:
        self.header = header
        self._source = source
        self._aead = AESGCM(key)
        self._digest = digest
        self._index = 0
        self._buffer = b""
        self._offset = 0
        self._final_seen = False
        self._consumed = consumed
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        """Up to `size` plaintext bytes (all that is left if negative); b'' at the end."""
        parts: list[bytes] = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0:
            if self._offset >= len(self._buffer):
                if self._final_seen:
                    break
                self._buffer, self._offset = self._open_chunk(), 0
                continue
            part = self._buffer[self._offset : self._offset + wanted]
            self._offset += len(part)
            wanted -= len(part)
            parts.append(part)
        return b"".join(parts)

    def finish(self) -> None:
        """Read and check the rest: every chunk up to the final one, and nothing after it."""
        while self.read(1 << 20):
            pass
        if self._source.read(1):
            raise corrupt("the backup has data after its last chunk")

    def _exact(self, count: int) -> bytes:
        data = self._source.read(count)
        if len(data) != count:
            raise corrupt(f"the backup is truncated (chunk {self._index} is incomplete)")
        return data

    def _open_chunk(self) -> bytes:
        head = self._source.read(_FRAME.size)
        if not head:
            raise corrupt(f"the backup is truncated (it ends after chunk {self._index - 1})")
        flag, length = _FRAME.unpack(head + self._exact(_FRAME.size - len(head)))
        size = self.header.chunk_size
        if (
            flag not in (0, 1)
            or not TAG <= length <= size + TAG
            or (flag == 0 and length != size + TAG)
        ):
            raise corrupt(f"chunk {self._index} of the backup has a damaged frame")
        nonce, aad = _nonce_and_aad(self._digest, self._index, flag == 1)
        try:
            plaintext = self._aead.decrypt(nonce, self._exact(length), aad)
        except InvalidTag as exc:
            raise corrupt(
                f"chunk {self._index} of the backup is damaged, altered or out of order"
            ) from exc
        self._index += 1
        self._final_seen = flag == 1
        self._consumed += _FRAME.size + length
        if self._on_read is not None:
            self._on_read(self._consumed)
        return plaintext


def open_sealed(
    source: IO[bytes], passphrase: str, *, on_read: Callable[[int], None] | None = None
) -> SealedReader:
    """Check a backup's header and passphrase; the reader then decrypts the chunks.

    `TrustError` `backup_corrupt` if the header is damaged, `bad_passphrase` if the
    passphrase is not the one the backup was made with. `on_read` gets the bytes of
    the file consumed so far, after each chunk.
    """
    prefix = source.read(_HEADER.size)
    if len(prefix) != _HEADER.size or prefix[:8] != MAGIC:
        raise TrustError(
            "this file is not a Kakehashi backup",
            code="backup_corrupt",
            hint="give the file `kakehashi backup` wrote",
        )
    _, version, length = _HEADER.unpack(prefix)
    if version != FORMAT_VERSION:
        raise ConfigError(
            f"this backup has format version {version}; this Kakehashi reads version "
            f"{FORMAT_VERSION}",
            code="backup_unsupported",
            hint="restore it with the Kakehashi version that made it",
        )
    if length > MAX_HEADER:
        raise corrupt("the backup's header is damaged (impossible length)")
    rest = source.read(length + 64)
    if len(rest) != length + 64:
        raise corrupt("the backup is truncated (it ends inside its header)")
    body, check, digest = rest[:length], rest[length : length + 32], rest[length + 32 :]
    if not hmac.compare_digest(hashlib.sha256(prefix + body + check).digest(), digest):
        raise corrupt("the backup's header is damaged or was altered")
    header = BackupHeader.from_json(body)
    key, check_key = _keys(passphrase, header)
    if not hmac.compare_digest(hmac.digest(check_key, prefix + body, "sha256"), check):
        raise TrustError(
            "wrong passphrase for this backup",
            code="bad_passphrase",
            hint="use the passphrase given when the backup was made (it is not stored anywhere)",
        )
    return SealedReader(source, header, key, digest, _HEADER.size + length + 64, on_read)
