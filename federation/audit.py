"""The node's audit log as values: hash-chained records, signed heads, and their verification.

A record says that something happened to the node's trust relationships (a join
admitted, a member suspended, a roster version adopted, a peer refused) at a time,
with a few named fields. Records form one chain: record `seq` holds the hash of
record `seq - 1` (`prev`; 32 zero bytes for the first), and its own hash is
SHA-256 of the canonical msgpack of (seq, at_ms, event, fields, prev). So an
edited, removed or moved record breaks the chain where it happened.

The end of the chain is protected by **signed heads**: from time to time the node
signs (seq, hash, at_ms) of its newest record with its Ed25519 signing key. A
head that names a record which is no longer there reveals a truncation; a head
whose hash differs from the record at its seq reveals a rewrite that was
re-chained to hide itself. Records after the newest head are protected by the
chain only (their truncation cannot be seen), which is why the node signs a head
every few records, every minute and when it stops.

`verify_chain` is pure: it takes the records as stored, the heads and the node's
public key, and returns typed `Problem`s, each naming the record (seq) it is
about. No clock, no I/O; `gateway.audit` reads and writes the rows.

Fields never hold secrets: field names that suggest one (token, secret,
password, private key) are refused, and string values that look like a bearer
token (a JWT) or a PEM block are redacted before they are hashed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from . import codec
from .errors import ProtocolError, TrustError
from .signing import SigningKey, public_key_id, verify_signature

__all__ = [
    "HEAD_SIGNING_CONTEXT",
    "ZERO_HASH",
    "AuditRecord",
    "FieldValue",
    "Problem",
    "ProblemKind",
    "SignedHead",
    "Throttle",
    "Unreadable",
    "head_from_row",
    "head_message",
    "make_fields",
    "record_from_row",
    "record_hash",
    "redact",
    "seal_record",
    "sign_head",
    "verify_chain",
    "verify_head",
]

ZERO_HASH = bytes(32)
"""The `prev` of the first record."""
HEAD_SIGNING_CONTEXT = b"kakehashi/audit-head/v1\x00"
"""Prefix of every signed head, so a head signature is never valid for anything else the
node key signs (envelope batches use their own context)."""

Scalar = None | bool | int | str
FieldValue = Scalar | tuple[Scalar, ...]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SECRET_NAME = re.compile(r"token|secret|password|passphrase|private|credential|^key$|^nonce$")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.DOTALL)
REDACTED = "[redacted]"
MAX_FIELDS = 32
MAX_TEXT = 1024
MAX_LIST = 256
_RELABEL_SEARCH_LIMIT = 64
"""At most this many mismatching records are tried against each other's positions when
telling a moved record from an edited one (quadratic; beyond it, they are all 'edited')."""


def redact(text: str) -> str:
    """`text` with anything that looks like a bearer token (JWT) or a PEM block removed."""
    return _PEM.sub(REDACTED, _JWT.sub(REDACTED, text))


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ProtocolError(
            f"audit {what} {name!r} is not a snake_case name", code="bad_audit_record"
        )
    return name


def _scalar(name: str, value: object) -> Scalar:
    if value is None or type(value) is bool or type(value) is int:
        return value
    if type(value) is str:
        return redact(value)[:MAX_TEXT]
    raise ProtocolError(
        f"audit field {name!r} has a {type(value).__name__} value; "
        "use a string, integer, boolean, null or a list of those",
        code="bad_audit_record",
    )


def make_fields(fields: Mapping[str, object]) -> tuple[tuple[str, FieldValue], ...]:
    """Checked, immutable fields in canonical order; `ProtocolError` for a name or value
    that cannot be audited (and for a name that suggests a secret)."""
    if len(fields) > MAX_FIELDS:
        raise ProtocolError(f"more than {MAX_FIELDS} audit fields", code="bad_audit_record")
    checked: list[tuple[str, FieldValue]] = []
    for name, value in fields.items():
        _check_name(name, "field name")
        if _SECRET_NAME.search(name):
            raise ProtocolError(
                f"audit field {name!r} looks like a secret; secrets are never audited",
                code="secret_in_audit",
            )
        if isinstance(value, list | tuple):
            checked.append((name, tuple(_scalar(name, item) for item in value[:MAX_LIST])))
        else:
            checked.append((name, _scalar(name, value)))
    return tuple(sorted(checked))


def _fields_map(fields: tuple[tuple[str, FieldValue], ...]) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value for name, value in fields}


def record_hash(
    *,
    seq: int,
    at_ms: int,
    event: str,
    fields: tuple[tuple[str, FieldValue], ...],
    prev: bytes,
) -> bytes:
    """SHA-256 of the canonical msgpack of (seq, at_ms, event, fields, prev)."""
    content = codec.encode(
        {"seq": seq, "at_ms": at_ms, "event": event, "fields": _fields_map(fields), "prev": prev}
    )
    return hashlib.sha256(content).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One entry of the audit log, as stored (its hash is not checked here: see `verify_chain`)."""

    seq: int
    """Position in the chain, from 1, without gaps."""
    at_ms: int
    """Unix milliseconds when it happened."""
    event: str
    """What happened, snake_case (`join_admitted`, `peer_refused`)."""
    fields: tuple[tuple[str, FieldValue], ...]
    """Details as (name, value) pairs sorted by name; lists are tuples."""
    prev: bytes
    """Hash of the previous record (`ZERO_HASH` for the first)."""
    hash: bytes
    """Hash of this record as written."""

    def __post_init__(self) -> None:
        if type(self.seq) is not int or self.seq < 1:
            raise ProtocolError(f"audit seq {self.seq!r} is not >= 1", code="bad_audit_record")
        if type(self.at_ms) is not int or self.at_ms < 0:
            raise ProtocolError(f"audit time {self.at_ms!r} is not valid", code="bad_audit_record")
        _check_name(self.event, "event")
        for name in ("prev", "hash"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != 32:
                raise ProtocolError(f"audit {name} is not 32 bytes", code="bad_audit_record")
        names = [name for name, _ in self.fields]
        if names != sorted(set(names)):
            raise ProtocolError("audit fields must be sorted and unique", code="bad_audit_record")

    @property
    def field_map(self) -> dict[str, Any]:
        """The fields as a plain dict (lists for tuples), e.g. for JSON."""
        return _fields_map(self.fields)

    def fields_bytes(self) -> bytes:
        """The stored form of the fields: a canonical msgpack map."""
        return codec.encode(self.field_map)

    def computed_hash(self, seq: int | None = None) -> bytes:
        """The hash this content should have (at `seq`, if given, instead of its own)."""
        return record_hash(
            seq=self.seq if seq is None else seq,
            at_ms=self.at_ms,
            event=self.event,
            fields=self.fields,
            prev=self.prev,
        )


def seal_record(
    *, seq: int, at_ms: int, event: str, fields: Mapping[str, object], prev: bytes
) -> AuditRecord:
    """A new record following the one whose hash is `prev`, with its hash computed."""
    checked = make_fields(fields)
    digest = record_hash(seq=seq, at_ms=at_ms, event=event, fields=checked, prev=prev)
    return AuditRecord(seq=seq, at_ms=at_ms, event=event, fields=checked, prev=prev, hash=digest)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unreadable:
    """A stored row that is not a well-formed record (so it was changed outside the node)."""

    seq: int
    """The row's seq."""
    reason: str
    """What is wrong with it."""


def record_from_row(
    seq: int, at_ms: object, event: object, fields: object, prev: object, digest: object
) -> AuditRecord | Unreadable:
    """A record from its stored columns, or `Unreadable` saying why it is not one."""
    try:
        if not isinstance(fields, bytes):
            raise ProtocolError("fields are not a msgpack blob", code="bad_audit_record")
        raw = codec.decode_map(fields)
        items: list[tuple[str, FieldValue]] = []
        for name, value in raw.items():
            if isinstance(value, list):
                items.append((name, tuple(value)))
            elif value is None or isinstance(value, bool | int | str):
                items.append((name, value))
            else:
                raise ProtocolError(f"field {name!r} holds a nested value", code="bad_audit_record")
        return AuditRecord(
            seq=seq,
            at_ms=at_ms,  # type: ignore[arg-type]
            event=event,  # type: ignore[arg-type]
            fields=tuple(items),
            prev=prev,  # type: ignore[arg-type]
            hash=digest,  # type: ignore[arg-type]
        )
    except ProtocolError as exc:
        return Unreadable(seq=seq, reason=str(exc))


# --- signed heads --------------------------------------------------------------------------


def head_message(seq: int, digest: bytes, at_ms: int) -> bytes:
    """The bytes a head's signature covers."""
    return HEAD_SIGNING_CONTEXT + codec.encode({"seq": seq, "hash": digest, "at_ms": at_ms})


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedHead:
    """The node's signature over the newest record at some moment."""

    seq: int
    """Seq of the record it covers."""
    hash: bytes
    """Hash of that record."""
    at_ms: int
    """Unix milliseconds when it was signed."""
    key_id: str
    """Key id of the node signing key that signed it."""
    signature: bytes
    """Ed25519 signature over `head_message(seq, hash, at_ms)`."""

    def __post_init__(self) -> None:
        if type(self.seq) is not int or self.seq < 1 or type(self.at_ms) is not int:
            raise ProtocolError("audit head seq or time is not valid", code="bad_audit_head")
        if type(self.hash) is not bytes or len(self.hash) != 32:
            raise ProtocolError("audit head hash is not 32 bytes", code="bad_audit_head")
        if type(self.signature) is not bytes or type(self.key_id) is not str:
            raise ProtocolError("audit head signature is not valid", code="bad_audit_head")


def sign_head(*, seq: int, digest: bytes, at_ms: int, key: SigningKey) -> SignedHead:
    """Sign (seq, hash, at_ms) of the newest record."""
    signature = key.sign(head_message(seq, digest, at_ms))
    return SignedHead(seq=seq, hash=digest, at_ms=at_ms, key_id=key.key_id, signature=signature)


def verify_head(head: SignedHead, public_keys: Iterable[bytes]) -> None:
    """`TrustError` unless one of `public_keys` (the one named by its key id) signed `head`."""
    keys = {public_key_id(key): key for key in public_keys}
    key = keys.get(head.key_id)
    if key is None:
        raise TrustError(
            f"signed by key {head.key_id}, which is not this node's ({', '.join(sorted(keys))})",
            code="unknown_key",
        )
    verify_signature(key, head.signature, head_message(head.seq, head.hash, head.at_ms))


def head_from_row(
    seq: int, digest: object, at_ms: object, signature: object, key_id: object
) -> SignedHead | None:
    """A head from its stored columns; None if they do not even form one."""
    try:
        return SignedHead(
            seq=seq,
            hash=digest,  # type: ignore[arg-type]
            at_ms=at_ms,  # type: ignore[arg-type]
            signature=signature,  # type: ignore[arg-type]
            key_id=key_id,  # type: ignore[arg-type]
        )
    except ProtocolError:
        return None


# --- verification --------------------------------------------------------------------------


class ProblemKind(StrEnum):
    """What is wrong with the log, at one record."""

    EDITED = "edited"
    """The record's content does not match its hash, or the next record links to another
    version of it (changed, then its hash recomputed)."""
    REMOVED = "removed"
    """Records are missing from the middle or the start of the chain."""
    REORDERED = "reordered"
    """The record is not where it was written (its seq was changed, or it is stored out of
    order)."""
    DUPLICATED = "duplicated"
    """Two records claim the same seq."""
    HEAD_MISMATCH = "head_mismatch"
    """A signed head names this seq with another hash: the records up to it were rewritten."""
    HEAD_BAD_SIGNATURE = "head_bad_signature"
    """A head's signature does not verify with the node's key."""
    TRUNCATED = "truncated"
    """Records at the end are missing although a signed head names them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One finding of `verify_chain`."""

    kind: ProblemKind
    """What is wrong."""
    seq: int
    """The record it is about (for a removal or truncation: the first missing one)."""
    detail: str
    """A sentence for the operator."""

    def describe(self) -> str:
        return f"record {self.seq}: {self.kind.value}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "seq": self.seq, "detail": self.detail}


def _ranges(start: int, end: int, skip: set[int]) -> list[tuple[int, int]]:
    """The runs of [start, end] without the seqs in `skip`."""
    runs: list[tuple[int, int]] = []
    current = start
    for point in sorted(p for p in skip if start <= p <= end):
        if point > current:
            runs.append((current, point - 1))
        current = point + 1
    if current <= end:
        runs.append((current, end))
    return runs


def _span(first: int, last: int) -> str:
    return f"record {first} is" if first == last else f"records {first}-{last} are"


class _Findings:
    """Problems found so far, and the seqs they name (checks after them skip those)."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.flagged: set[int] = set()

    def report(self, kind: ProblemKind, seq: int, detail: str) -> None:
        self.problems.append(Problem(kind=kind, seq=seq, detail=detail))
        self.flagged.add(seq)


def _in_seq_order(
    records: Sequence[AuditRecord | Unreadable], found: _Findings
) -> dict[int, AuditRecord | Unreadable]:
    """The records by seq; names those stored out of place and seqs stored twice."""
    given = [record.seq for record in records]
    expected = sorted(given)
    if given != expected:
        for at, (seq, should) in enumerate(zip(given, expected, strict=True)):
            if seq != should:
                found.report(
                    ProblemKind.REORDERED,
                    seq,
                    f"stored at position {at + 1}, where record {should} belongs",
                )
    by_seq: dict[int, AuditRecord | Unreadable] = {}
    for record in sorted(records, key=lambda r: r.seq):
        if record.seq in by_seq:
            found.report(ProblemKind.DUPLICATED, record.seq, "two records are stored with this seq")
            kept = by_seq[record.seq]
            if isinstance(kept, AuditRecord) and kept.computed_hash() == kept.hash:
                continue
        by_seq[record.seq] = record
    return by_seq


def _check_contents(
    by_seq: dict[int, AuditRecord | Unreadable], found: _Findings
) -> dict[int, int]:
    """Names records whose content does not match their hash; returns where moved records
    are now -> the seq they were written at.

    A record whose seq was changed still matches its hash at the seq it was written with:
    one of the other mismatching places, or the one after the record its `prev` names.
    """
    mismatched = [
        r for r in by_seq.values() if isinstance(r, AuditRecord) and r.computed_hash() != r.hash
    ]
    hash_at = {r.hash: r.seq for r in by_seq.values() if isinstance(r, AuditRecord)}
    moved: dict[int, int] = {}
    if len(mismatched) <= _RELABEL_SEARCH_LIMIT:
        places = {r.seq for r in mismatched}
        for record in mismatched:
            linked = 1 if record.prev == ZERO_HASH else hash_at.get(record.prev, -1) + 1
            for place in sorted(places | {linked}):
                if (
                    place >= 1
                    and place != record.seq
                    and record.computed_hash(place) == record.hash
                ):
                    moved[record.seq] = place
                    break
    for row in by_seq.values():
        if isinstance(row, Unreadable):
            found.report(ProblemKind.EDITED, row.seq, f"not a well-formed record ({row.reason})")
    for record in mismatched:
        original = by_seq.get(moved.get(record.seq, 0))
        if isinstance(original, AuditRecord) and original.hash == record.hash:
            found.report(
                ProblemKind.DUPLICATED,
                record.seq,
                f"a copy of record {original.seq} stored under another seq",
            )
        elif record.seq in moved:
            found.report(
                ProblemKind.REORDERED,
                record.seq,
                f"holds record {moved[record.seq]}, written at seq {moved[record.seq]} "
                "(its seq was changed)",
            )
        else:
            found.report(ProblemKind.EDITED, record.seq, "its content does not match its hash")
    return moved


def _check_gaps(seqs: Iterable[int], moved: dict[int, int], found: _Findings) -> None:
    """Names missing records (from the start or the middle), unless a moved record is one.

    A moved record counts at the seq it was written at, not where it is now.
    """
    accounted = set(moved.values())
    previous = 0
    for seq in sorted(set(seqs) - moved.keys() | accounted):
        if seq > previous + 1:
            for first, last in _ranges(previous + 1, seq - 1, accounted):
                found.report(ProblemKind.REMOVED, first, f"{_span(first, last)} missing")
        previous = seq


def _valid_heads(
    heads: Sequence[SignedHead], keys: list[bytes], found: _Findings
) -> list[SignedHead]:
    """Heads whose signature verifies, by seq; names the others."""
    valid = []
    for head in sorted(heads, key=lambda h: h.seq):
        try:
            verify_head(head, keys)
        except TrustError as exc:
            found.problems.append(
                Problem(
                    kind=ProblemKind.HEAD_BAD_SIGNATURE,
                    seq=head.seq,
                    detail=f"the signed head naming it does not verify: {exc}",
                )
            )
            continue
        valid.append(head)
    return valid


def _check_links_and_heads(
    by_seq: dict[int, AuditRecord | Unreadable], heads: list[SignedHead], found: _Findings
) -> None:
    """Names records that the next record (or a signed head) knows by another hash.

    A broken link between k-1 and k means one of them was changed and re-hashed. When k's
    outgoing link (to k+1, or to a signed head) is broken too, one change to k explains
    both; otherwise k-1 was changed.
    """
    sound = {
        r.seq: r
        for r in by_seq.values()
        if isinstance(r, AuditRecord) and r.seq not in found.flagged
    }
    broken_in = set()
    for seq, record in sound.items():
        before = sound.get(seq - 1)
        expected = ZERO_HASH if seq == 1 else None if before is None else before.hash
        if expected is not None and record.prev != expected:
            broken_in.add(seq)
    head_differs = {h.seq for h in heads if h.seq in sound and sound[h.seq].hash != h.hash}
    explained: set[int] = set()
    for seq in sorted(broken_in):
        if seq in explained:
            continue  # the change to the record before it broke this link too
        if seq + 1 in broken_in or seq in head_differs or seq == 1:
            detail = (
                "it links to a record before it"
                if seq == 1
                else f"its link to record {seq - 1} was changed and its hash recomputed"
            )
            found.report(ProblemKind.EDITED, seq, detail)
            explained.add(seq + 1)
        else:
            found.report(
                ProblemKind.EDITED,
                seq - 1,
                f"record {seq} links to another version of it (it was changed and its hash "
                f"recomputed, or record {seq}'s link was changed)",
            )
    intact_before = 0
    for head in heads:
        named = by_seq.get(head.seq)
        if not isinstance(named, AuditRecord):
            continue  # missing (named as removed or truncated) or unreadable (named as edited)
        if named.hash == head.hash:
            intact_before = max(intact_before, head.seq)
        elif head.seq not in found.flagged:
            found.report(
                ProblemKind.HEAD_MISMATCH,
                head.seq,
                "differs from the head signed for it: records "
                f"{intact_before + 1}-{head.seq} were rewritten and re-chained",
            )


def verify_chain(
    records: Sequence[AuditRecord | Unreadable],
    heads: Sequence[SignedHead],
    public_key: bytes,
    *,
    previous_keys: Iterable[bytes] = (),
) -> list[Problem]:
    """Every problem of the log, each naming its record; empty if the log is intact.

    `records` in stored order; `heads` in any order; `public_key` is the node's signing
    key (`previous_keys` its earlier ones, for heads signed before a key rotation).
    """
    found = _Findings()
    by_seq = _in_seq_order(records, found)
    moved = _check_contents(by_seq, found)
    _check_gaps(by_seq, moved, found)
    valid = _valid_heads(heads, [public_key, *previous_keys], found)
    _check_links_and_heads(by_seq, valid, found)
    last_seq = max(by_seq, default=0)
    beyond = [head.seq for head in valid if head.seq > last_seq]
    if beyond:
        found.report(
            ProblemKind.TRUNCATED,
            last_seq + 1,
            f"{_span(last_seq + 1, max(beyond))} missing from the end, "
            f"though a signed head names record {max(beyond)}",
        )
    return sorted(found.problems, key=lambda p: (p.seq, p.kind.value))


# --- rate limiting of noisy events ---------------------------------------------------------


@dataclass(slots=True)
class _Window:
    opened_ms: int
    held: int = 0


class Throttle:
    """At most one record per key (e.g. (remote, reason)) per window, counting the rest.

    `admit` says whether to write a record now and how many were held back since the
    last one (to carry in it). `expire` ends the windows that are over and returns the
    counts still held, so they are written as a summary rather than lost, and memory
    stays bounded. Past `max_keys` distinct keys, new ones share one overflow key per
    reason, so a flood from many addresses cannot grow either the memory or the log
    without bound.
    """

    OVERFLOW = "(many)"

    def __init__(self, *, window_ms: int = 60_000, max_keys: int = 256) -> None:
        self._window_ms = window_ms
        self._max_keys = max_keys
        self._windows: dict[tuple[str, str], _Window] = {}

    def key(self, who: str, reason: str) -> tuple[str, str]:
        """The key a refusal by `who` for `reason` is counted under."""
        key = (who, reason)
        if key not in self._windows and len(self._windows) >= self._max_keys:
            return (self.OVERFLOW, reason)
        return key

    def admit(self, key: tuple[str, str], now_ms: int) -> int | None:
        """None: hold this one back (counted). An int: record it now, carrying that count."""
        window = self._windows.get(key)
        if window is not None and now_ms - window.opened_ms < self._window_ms:
            window.held += 1
            return None
        self._windows[key] = _Window(opened_ms=now_ms)
        return 0 if window is None else window.held

    def expire(self, now_ms: int) -> list[tuple[tuple[str, str], int]]:
        """End the windows that are over; the (key, count) of those that held some back."""
        over = [
            key
            for key, window in self._windows.items()
            if now_ms - window.opened_ms >= self._window_ms
        ]
        held = []
        for key in over:
            window = self._windows.pop(key)
            if window.held:
                held.append((key, window.held))
        return held

    def __len__(self) -> int:
        return len(self._windows)
