"""The encrypted backup container: round trips, and every kind of damage refused by its code.

A cheap scrypt cost keeps these fast; the format is the same at any cost (the cost is in
the header).
"""

from __future__ import annotations

import hashlib
import io
import struct
import unicodedata

import pytest

from federation.errors import ConfigError, KakehashiError, TrustError
from gateway.sealed import BackupHeader, KdfParams, SealedWriter, open_sealed

FAST = KdfParams(log2_n=4, r=8, p=1)
CHUNK = 1024
PASSPHRASE = "津市 backup passphrase"


def seal(data: bytes, passphrase: str = PASSPHRASE, *, write_size: int = 333) -> bytes:
    out = io.BytesIO()
    writer = SealedWriter(
        out,
        passphrase,
        node_id="tsu",
        created="2025-04-01T02:00:00+00:00",
        kdf=FAST,
        chunk_size=CHUNK,
    )
    for start in range(0, len(data), write_size):
        writer.write(data[start : start + write_size])
    writer.close()
    return out.getvalue()


def unseal(blob: bytes, passphrase: str = PASSPHRASE, *, read_size: int = 700) -> bytes:
    reader = open_sealed(io.BytesIO(blob), passphrase)
    parts = []
    while part := reader.read(read_size):
        parts.append(part)
    reader.finish()
    return b"".join(parts)


def header_length(blob: bytes) -> int:
    (length,) = struct.unpack(">I", blob[10:14])
    return 14 + length + 64


def frames(blob: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every chunk frame."""
    offset, found = header_length(blob), []
    while offset < len(blob):
        (length,) = struct.unpack(">I", blob[offset + 1 : offset + 5])
        found.append((offset, 5 + length))
        offset += 5 + length
    return found


def refused(blob: bytes, passphrase: str = PASSPHRASE) -> KakehashiError:
    with pytest.raises(KakehashiError) as caught:
        unseal(blob, passphrase)
    return caught.value


DATA = bytes(range(256)) * 13  # 3,328 bytes: three full chunks and a partial one


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5, 10 * CHUNK + 17]
)
def test_round_trip_of_any_size_including_empty_and_exact_multiples_of_the_chunk(
    size: int,
) -> None:
    data = (DATA * 4)[:size]
    blob = seal(data)
    assert unseal(blob) == data
    assert unseal(blob, read_size=1) == data  # reads smaller than a chunk
    assert unseal(blob, read_size=5 * CHUNK) == data  # and spanning several
    # Exactly one final chunk, even for empty data and exact multiples of the chunk size.
    assert len(frames(blob)) == max(1, -(-size // CHUNK))
    assert [blob[offset] for offset, _ in frames(blob)][-1] == 1
    assert all(blob[offset] == 0 for offset, _ in frames(blob)[:-1])


def test_plaintext_does_not_appear_in_the_file_and_the_header_tells_node_and_time() -> None:
    secret = b"-----BEGIN PRIVATE KEY----- secret material" * 10
    blob = seal(secret)
    assert b"PRIVATE KEY" not in blob
    reader = open_sealed(io.BytesIO(blob), PASSPHRASE)
    assert reader.header.node_id == "tsu"
    assert reader.header.created == "2025-04-01T02:00:00+00:00"
    assert reader.header.kdf == FAST


def test_two_backups_of_the_same_data_differ_entirely_fresh_salt() -> None:
    first, second = seal(DATA), seal(DATA)
    assert first[header_length(first) :] != second[header_length(second) :]


def test_wrong_passphrase_is_refused_as_bad_passphrase() -> None:
    error = refused(seal(DATA), "another passphrase")
    assert isinstance(error, TrustError)
    assert error.code == "bad_passphrase"
    assert "passphrase" in str(error) and error.hint


def test_passphrase_in_another_unicode_normal_form_opens_the_backup() -> None:
    composed = "パスワード です"
    decomposed = unicodedata.normalize("NFD", composed)  # as some systems send it
    assert composed != decomposed
    assert unseal(seal(DATA, composed), decomposed) == DATA


def test_a_flipped_byte_anywhere_in_any_chunk_is_refused_as_corrupt() -> None:
    blob = seal(DATA)
    start = header_length(blob)
    assert len(frames(blob)) == 4
    for offset in range(start, len(blob)):  # flag, length, ciphertext and tag of each chunk
        damaged = bytearray(blob)
        damaged[offset] ^= 0x01
        error = refused(bytes(damaged))
        assert error.code == "backup_corrupt", offset


def test_a_flipped_byte_anywhere_in_the_header_is_refused() -> None:
    blob = seal(DATA)
    for offset in range(header_length(blob)):
        damaged = bytearray(blob)
        damaged[offset] ^= 0x01
        error = refused(bytes(damaged))
        # Bytes 8-9 are the format version: a changed one reads as a format this
        # version does not know; anything else is damage.
        expected = "backup_unsupported" if offset in (8, 9) else "backup_corrupt"
        assert error.code == expected, offset


def test_an_unknown_format_version_says_so() -> None:
    blob = bytearray(seal(DATA))
    blob[8:10] = struct.pack(">H", 2)
    error = refused(bytes(blob))
    assert isinstance(error, ConfigError) and error.code == "backup_unsupported"
    assert "version 2" in str(error)


def test_a_header_rewritten_without_the_passphrase_is_refused() -> None:
    """Someone who edits the node id and recomputes the digest cannot recompute the
    passphrase check: refused, and nothing decrypted."""
    blob = seal(DATA)
    length = header_length(blob) - 64 - 14
    body = blob[14 : 14 + length].replace(b'"tsu"', b'"ise"')
    prefix = blob[:10] + struct.pack(">I", len(body)) + body
    check = blob[14 + length : 14 + length + 32]
    digest = hashlib.sha256(prefix + check).digest()
    forged = prefix + check + digest + blob[header_length(blob) :]
    assert refused(forged).code == "bad_passphrase"


def test_a_truncated_file_is_refused_as_corrupt_at_every_length() -> None:
    blob = seal(DATA)
    boundaries = {offset for offset, _ in frames(blob)}
    for length in sorted(set(range(0, len(blob), 5)) | boundaries):
        error = refused(blob[:length])
        assert error.code == "backup_corrupt", length
    # Cut exactly before the final chunk: every remaining chunk decrypts, yet refused.
    last, _ = frames(blob)[-1]
    assert "truncated" in str(refused(blob[:last]))


def test_reordered_dropped_duplicated_or_appended_chunks_are_refused() -> None:
    blob = seal(DATA)
    head = blob[: header_length(blob)]
    chunks = [blob[offset : offset + size] for offset, size in frames(blob)]
    variants = {
        "swap first two": [chunks[1], chunks[0], *chunks[2:]],
        "final moved first": [chunks[3], *chunks[:3]],
        "middle dropped": [chunks[0], chunks[2], chunks[3]],
        "chunk repeated": [chunks[0], chunks[0], *chunks[1:]],
        "final repeated": [*chunks, chunks[3]],
    }
    for name, order in variants.items():
        error = refused(head + b"".join(order))
        assert error.code == "backup_corrupt", name
    assert refused(blob + b"\x00").code == "backup_corrupt"


def test_a_chunk_from_another_backup_with_the_same_passphrase_is_refused() -> None:
    first, second = seal(DATA), seal(DATA)
    offset, size = frames(first)[1]
    other_offset, _ = frames(second)[1]
    spliced = first[:offset] + second[other_offset : other_offset + size] + first[offset + size :]
    assert refused(spliced).code == "backup_corrupt"


def test_a_file_that_is_not_a_backup_is_refused_as_corrupt() -> None:
    assert refused(b"SQLite format 3\x00" + bytes(100)).code == "backup_corrupt"
    assert refused(b"").code == "backup_corrupt"


def test_out_of_range_key_derivation_cost_is_refused_before_deriving() -> None:
    """A crafted header must not make the reader allocate gigabytes."""
    header = BackupHeader(
        node_id="tsu",
        created="2025-04-01T00:00:00+00:00",
        chunk_size=CHUNK,
        kdf=KdfParams(log2_n=30, r=8, p=1),
        salt=bytes(16),
    )
    prefix = header.to_bytes()
    check = bytes(32)
    blob = prefix + check + hashlib.sha256(prefix + check).digest()
    error = refused(blob)
    assert error.code == "backup_corrupt" and "out of range" in str(error)
