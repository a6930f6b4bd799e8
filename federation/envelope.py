"""Envelopes: the immutable, signed unit that crosses between nodes.

An envelope has a *content* (header fields and a kind-specific body) encoded as
canonical msgpack. Its id is SHA-256 of those content bytes, so a duplicate is
recognised by id wherever it comes from.

Signing is per batch: the origin builds a Merkle tree over the ids of a batch
(RFC 6962 shape: leaf hash = H(0x00 || id), node = H(0x01 || left || right)),
signs the root once, and every envelope carries the root signature and its own
inclusion path. A receiver checks one Ed25519 signature per batch (cached by
root) and a few hashes per envelope; any node can verify any envelope alone, so
relays and catch-up can serve single envelopes. A lone envelope is a batch of one.

The signature covers `SIGNING_CONTEXT || root`, so a batch signature can never be
mistaken for a signature over anything else the same key signs (rosters, tokens).

Invariants:
- `Envelope.content` is exactly the bytes that were hashed; decoding never
  re-encodes before hashing (`from_bytes` keeps the received content bytes,
  after checking they are canonical).
- At most `MAX_ENVELOPE_BYTES` on the wire; larger ones are refused.
- No floats anywhere (codec refuses them); timestamps are integers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from . import codec
from .errors import ProtocolError, TrustError
from .identity import CHECKED_NODE_IDS as _CHECKED_NODE_IDS
from .identity import check_node_id
from .signing import SigningKey, verify_signature

__all__ = [
    "ENVELOPE_LIMITS",
    "ENVELOPE_VERSION",
    "MAX_ENVELOPE_BYTES",
    "Content",
    "Envelope",
    "Kind",
    "RootCache",
    "Screened",
    "check_room_id",
    "complete_batches",
    "contents_in_series",
    "merkle_root",
    "peek_id",
    "peek_place",
    "room_home",
    "root_from_path",
    "screen",
    "seal_batch",
    "verify_batch",
]

ENVELOPE_VERSION = 1
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_DEPS = 512
"""Origins in one room's causal frontier (every origin that has sent in the room, also
nodes removed since): twice `federation.rooms.MAX_ROOM_NODES`, so that a room at its
largest still has room for the nodes that left it. Each costs an envelope about 40 bytes."""
MAX_PATH = 40  # a batch of up to 2**40 envelopes; far beyond any real batch
SIGNING_CONTEXT = b"kakehashi/envelope-batch/v1\x00"
_CONTENT_FIELDS = (
    "room",
    "origin",
    "seq",
    "kind",
    "sender",
    "hlc",
    "deps",
    "key_id",
    "body",
    "version",
)
_ENVELOPE_FIELDS = ("content_bytes", "content", "signature", "index", "size", "path", "id", "wire")
_FRAME_KEYS = frozenset({"c", "sig", "i", "n", "p"})
_CONTENT_KEYS = ["body", "deps", "hlc", "kid", "kind", "origin", "room", "sender", "seq", "v"]
_HEADER_FIELDS = frozenset(_CONTENT_KEYS)
ENVELOPE_LIMITS = codec.Limits(
    max_bytes=MAX_ENVELOPE_BYTES,
    max_depth=12,
    max_str=MAX_ENVELOPE_BYTES,  # a 32 Ki-character text can take up to 96 KiB of UTF-8
    max_bin=MAX_ENVELOPE_BYTES,
)


class Kind(StrEnum):
    """What an envelope does; each kind's body schema is in schemas/envelope-bodies/."""

    STATE = "state"
    """Room state change (name, topic, members, roles), only from the room's home node."""
    STATE_REQUEST = "state-request"
    """A member node asks the home node for a state change."""
    MESSAGE = "message"
    """A message from a staff member or a bot."""
    EDIT = "edit"
    """Replaces the text of an earlier message by the same sender."""
    REDACT = "redact"
    """Withdraws an earlier envelope's content."""
    REACTION = "reaction"
    """An emoji reaction to an earlier envelope."""
    RECEIPT = "receipt"
    """既読: the sender has read up to an envelope."""


_KINDS: dict[str, Kind] = {kind.value: kind for kind in Kind}


def _leaf(envelope_id: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + envelope_id).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(ids: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the RFC 6962 tree over `ids` (at least one), leaves first, root last."""
    if not ids:
        raise ValueError("a batch has at least one envelope")
    level = [_leaf(i) for i in ids]
    levels = [level]
    while len(level) > 1:
        # Pairs left to right; an odd last node is promoted unchanged (RFC 6962 shape).
        nxt = [_node(level[k], level[k + 1]) for k in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(ids: Sequence[bytes]) -> bytes:
    """Root of the RFC 6962 tree over `ids` (at least one)."""
    return _levels(ids)[-1][0]


def _paths(levels: Sequence[Sequence[bytes]]) -> list[tuple[bytes, ...]]:
    """Inclusion path (sibling hashes, leaf upwards) of every leaf of a built tree; a node
    promoted without a sibling adds nothing (as `root_from_path` walks it).

    Built from the root down: a node's path is its sibling, then its parent's path, so
    each level costs one tuple per node instead of a walk up the tree per leaf."""
    paths: list[tuple[bytes, ...]] = [()]  # the root's
    for level in reversed(levels[:-1]):
        width = len(level)
        above = paths
        paths = [
            (level[node ^ 1], *above[node >> 1]) if node ^ 1 < width else above[node >> 1]
            for node in range(width)
        ]
    return paths


def root_from_path(envelope_id: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """Recompute the root from a leaf, its index, the batch size and its path; ProtocolError if
    the path has the wrong length for that position."""
    if not 0 <= index < size:
        raise ProtocolError("inclusion index outside the batch", code="bad_inclusion_path")
    digest = _leaf(envelope_id)
    position, width, used = index, size, 0
    while width > 1:
        sibling = position ^ 1
        if sibling < width:
            if used >= len(path):
                raise ProtocolError("inclusion path too short", code="bad_inclusion_path")
            digest = _node(path[used], digest) if position & 1 else _node(digest, path[used])
            used += 1
        # else: the last node of an odd level is promoted without a sibling.
        position //= 2
        width = (width + 1) // 2
    if used != len(path):
        raise ProtocolError("inclusion path too long", code="bad_inclusion_path")
    return digest


@dataclass(frozen=True, slots=True, kw_only=True)
class Content:
    """The signed part of an envelope: header and body."""

    room: str
    """Room id, `!<random>:<home node>`."""
    origin: str
    """Node that made and signed the envelope."""
    seq: int
    """Per origin per room, from 1, without gaps."""
    kind: Kind
    """What the envelope does."""
    sender: str
    """`user@node` of the person or bot who sent it; empty for the node itself."""
    hlc: int
    """Hybrid logical clock: (unix milliseconds << 16) | logical counter."""
    deps: dict[str, int]
    """Causal dependencies as a sparse vector clock: origin -> the seq of that origin's
    envelope this one follows (everything before it from that origin too). Always
    names the origin's own previous envelope (seq - 1, when seq > 1) and the room's
    home node (whose seq fixes the room state the envelope is judged under)."""
    key_id: str
    """Id of the origin's signing key that signed the batch."""
    body: dict[str, Any] = field(default_factory=dict)
    """Kind-specific map (schemas/envelope-bodies/KIND.schema.json)."""
    version: int = ENVELOPE_VERSION
    """Envelope format version."""

    def __post_init__(self) -> None:
        if type(self.kind) is not Kind:
            object.__setattr__(self, "kind", Kind(self.kind))
        check_node_id(self.origin)
        check_room_id(self.room)
        if self.version != ENVELOPE_VERSION:
            raise ProtocolError(f"unsupported envelope version {self.version}", code="bad_envelope")
        if not 1 <= self.seq < 2**53:
            raise ProtocolError("seq must be a positive integer", code="bad_envelope")
        if not 0 <= self.hlc < 2**64:
            raise ProtocolError("hlc must be a 64-bit unsigned integer", code="bad_envelope")
        if not isinstance(self.body, dict):
            raise ProtocolError("envelope body must be a map", code="bad_envelope")
        if not isinstance(self.deps, dict) or len(self.deps) > MAX_DEPS:
            raise ProtocolError(f"at most {MAX_DEPS} dependencies", code="bad_envelope")
        for origin, seq in self.deps.items():
            check_node_id(origin)
            if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < 2**53:
                raise ProtocolError(
                    "dependency seq must be a positive integer", code="bad_envelope"
                )
        own = self.deps.get(self.origin)
        if (self.seq == 1 and own is not None) or (self.seq > 1 and own != self.seq - 1):
            raise ProtocolError(
                "an envelope must depend on its origin's previous envelope and no other of its own",
                code="bad_envelope",
            )
        home = room_home(self.room)
        if (self.origin != home or self.seq > 1) and home not in self.deps:
            raise ProtocolError(
                "an envelope must name the room state it follows", code="bad_envelope"
            )

    @property
    def sender_node(self) -> str:
        """The node part of `sender` (empty if none)."""
        return self.sender.rpartition("@")[2] if self.sender else ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "room": self.room,
            "origin": self.origin,
            "seq": self.seq,
            "kind": self.kind.value,
            "sender": self.sender,
            "hlc": self.hlc,
            "deps": self.deps,
            "kid": self.key_id,
            "body": self.body,
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes that are hashed into the id and signed through the batch root."""
        # Hot path: the encoder writes every map with its keys sorted (the header's, the
        # dependencies', the body's). A flat body of plain values with string keys (a
        # message's text) is canonical as it is; any other goes through the generic
        # canonical form, which refuses what cannot be encoded (floats, other types).
        body = self.body
        try:
            "".join(body)  # C-speed proof that every key is a str
            flat = codec.SCALARS.issuperset(map(type, body.values()))
        except TypeError:
            flat = False
        if not flat:
            body = codec.canonical(body)
        try:
            return _SORTED_ENCODER.encode(
                {
                    "body": body,
                    "deps": self.deps,
                    "hlc": self.hlc,
                    "kid": self.key_id,
                    "kind": self.kind.value,
                    "origin": self.origin,
                    "room": self.room,
                    "sender": self.sender,
                    "seq": self.seq,
                    "v": self.version,
                }
            )
        except (OverflowError, TypeError, ValueError) as exc:
            raise ProtocolError(f"cannot encode content: {exc}", code="non_canonical") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> Content:
        """Decode signed content: through msgspec when it proves the content canonical and
        valid (`_content_fast`), else through msgpack (`_from_bytes_checked`)."""
        if len(data) <= ENVELOPE_LIMITS.max_bytes:
            fast = _content_fast(data)
            if fast is not None:
                return fast
        return cls._from_bytes_checked(data)

    @classmethod
    def _from_bytes_checked(cls, data: bytes) -> Content:
        """`from_bytes` through msgpack, with the exact reason when it is refused: the
        header's fixed structure checked field by field, the free-form body by the generic
        shape walk, then the bytes must be canonical."""
        raw = codec.unpack(data, ENVELOPE_LIMITS)
        if type(raw) is not dict:
            raise ProtocolError("expected a map at the top level", code="malformed_msgpack")
        keys = list(raw)
        if keys != _CONTENT_KEYS:
            if sorted(keys, key=str) == _CONTENT_KEYS:
                raise ProtocolError("header keys out of canonical order", code="non_canonical")
            raise ProtocolError(
                "envelope header fields are not the expected set", code="bad_envelope"
            )
        deps, body = raw["deps"], raw["body"]
        if type(deps) is dict:
            codec.check_keys(deps)
        codec.check_shape(body, ENVELOPE_LIMITS.max_depth - 1)
        content = cls._from_header(raw)
        codec.require_canonical(raw, data)
        return content

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Content:
        if set(raw) != _HEADER_FIELDS:
            raise ProtocolError(
                "envelope header fields are not the expected set", code="bad_envelope"
            )
        return cls._from_header(raw)

    @classmethod
    def _from_header(cls, raw: dict[str, Any]) -> Content:
        """From a map with exactly the header fields (checked by the caller)."""
        return _header_fast(raw) or cls._from_header_checked(raw)

    @classmethod
    def _from_header_checked(cls, raw: dict[str, Any]) -> Content:
        """The field-by-field path: any header the fast path does not take, with the
        exact reason when it is refused."""
        kind = _KINDS.get(raw["kind"]) if isinstance(raw["kind"], str) else None
        if kind is None:
            raise ProtocolError(f"unknown envelope kind {raw['kind']!r}", code="unknown_kind")
        deps = raw["deps"]
        if not isinstance(deps, dict):
            raise ProtocolError("deps must be a map of origin to seq", code="bad_envelope")
        for name in ("v", "seq", "hlc"):
            if type(raw[name]) is not int:  # exactly int: not bool, as msgpack decodes them
                raise ProtocolError(
                    f"envelope field {name!r} must be an integer", code="bad_envelope"
                )
        for name in ("room", "origin", "sender", "kid"):
            if not isinstance(raw[name], str):
                raise ProtocolError(
                    f"envelope field {name!r} must be a string", code="bad_envelope"
                )
        return cls(
            version=raw["v"],
            room=raw["room"],
            origin=raw["origin"],
            seq=raw["seq"],
            kind=kind,
            sender=raw["sender"],
            hlc=raw["hlc"],
            deps=deps,
            key_id=raw["kid"],
            body=raw["body"],
        )


_new = object.__new__
_sha256 = hashlib.sha256
_SEQ_LIMIT = 2**53
_HLC_LIMIT = 2**64
_MAX_MAP = ENVELOPE_LIMITS.max_map


def _header_fast(raw: dict[str, Any]) -> Content | None:
    """The common case of decoding, at a fraction of the cost: a header every field of
    which passes the checks of `Content.__post_init__` in their cheapest form, with node
    and room ids already proven valid once (the caches of `check_node_id` and
    `check_room_id`). None for anything else, which then takes the checked path:
    this accepts nothing that path would refuse."""
    kind = _KINDS.get(raw["kind"]) if type(raw["kind"]) is str else None
    deps, body = raw["deps"], raw["body"]
    version, seq, hlc = raw["v"], raw["seq"], raw["hlc"]
    room, origin, sender, kid = raw["room"], raw["origin"], raw["sender"], raw["kid"]
    if (
        kind is None
        or type(deps) is not dict
        or type(body) is not dict
        or type(version) is not int
        or type(seq) is not int
        or type(hlc) is not int
        or type(sender) is not str
        or type(kid) is not str
        or type(origin) is not str
        or type(room) is not str
        or version != ENVELOPE_VERSION
        or not 1 <= seq < _SEQ_LIMIT
        or not 0 <= hlc < _HLC_LIMIT
        or len(deps) > MAX_DEPS
        or origin not in _CHECKED_NODE_IDS
        or room not in _VALID_ROOMS
    ):
        return None
    for dep_origin, dep_seq in deps.items():
        if (
            dep_origin not in _CHECKED_NODE_IDS
            or type(dep_seq) is not int
            or not 1 <= dep_seq < _SEQ_LIMIT
        ):
            return None
    if not _follows_the_dependency_rules(room, origin, seq, deps):
        return None
    return _content_filled(room, origin, seq, kind, sender, hlc, deps, kid, body, version)


def _follows_the_dependency_rules(room: str, origin: str, seq: int, deps: dict[str, int]) -> bool:
    """The rules `Content.__post_init__` refuses with its own messages: an envelope names
    its origin's previous one and no other of its own, and the room's home node."""
    own = deps.get(origin)
    if (seq == 1 and own is not None) or (seq > 1 and own != seq - 1):
        return False
    home = room.rpartition(":")[2]
    return (origin == home and seq == 1) or home in deps


# Decoding through msgspec: the common case at a third of the cost -------------------------
#
# `msgspec` decodes msgpack into typed structures in C: the header's field types, the
# path's hash lengths and the framing's field set are checked as it reads, where the
# msgpack path builds dicts and checks them in Python. It is the fast path only: it
# accepts exactly the bytes it can prove the msgpack path accepts, with the same values,
# and gives None for anything else, which then takes that path for its exact refusal.
# The proof: the bytes must be the canonical encoding of what was decoded (re-encoded
# with sorted keys, byte for byte: no repeated, unknown or out-of-order key, no long
# form), and the body must pass `check_shape` with the counts `unpack` enforces. The
# string and binary limits cannot bind: no value is longer than the whole envelope.


_Seq = Annotated[int, msgspec.Meta(ge=1, lt=_SEQ_LIMIT)]


class _Header(msgspec.Struct, forbid_unknown_fields=True):
    """Signed content as msgspec decodes it, with the checks of `Content.__post_init__`
    that are about one field's type and range; fields in canonical (sorted) order."""

    body: dict[str, Any]
    deps: Annotated[dict[str, _Seq], msgspec.Meta(max_length=min(MAX_DEPS, _MAX_MAP))]
    hlc: Annotated[int, msgspec.Meta(ge=0)]  # and below 2**64, as msgpack's largest
    kid: str
    kind: str
    origin: str
    room: str
    sender: str
    seq: _Seq
    v: Literal[1]


assert ENVELOPE_VERSION == 1, "_Header.v names the version this node reads"


_Hash = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class _Frame(msgspec.Struct, forbid_unknown_fields=True):
    """An envelope's framing as msgspec decodes it; fields in canonical order."""

    c: bytes
    i: int
    n: int
    p: Annotated[list[_Hash], msgspec.Meta(max_length=MAX_PATH)]
    sig: bytes


_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_FRAME_DECODER = msgspec.msgpack.Decoder(_Frame)
_SORTED_ENCODER = msgspec.msgpack.Encoder(order="sorted")
_MSGSPEC_ERRORS = (msgspec.MsgspecError, RecursionError, TypeError, ValueError, OverflowError)
assert ENVELOPE_LIMITS.max_str >= MAX_ENVELOPE_BYTES, "no string limit for the fast path to miss"
assert ENVELOPE_LIMITS.max_bin >= MAX_ENVELOPE_BYTES, "no binary limit for the fast path to miss"


def _content_fast(data: bytes) -> Content | None:
    """`Content.from_bytes` of canonical content that passes every check, or None."""
    try:
        header = _HEADER_DECODER.decode(data)
        body = header.body
        # A flat body (a message's text, a receipt's target) is shaped right as it is: its
        # keys are strings (the decoder's type) in order (the encoding below).
        if len(body) > _MAX_MAP or not codec.SCALARS.issuperset(map(type, body.values())):
            codec.check_shape(body, ENVELOPE_LIMITS.max_depth - 1, ENVELOPE_LIMITS)
        if _SORTED_ENCODER.encode(header) != data:
            return None
    except (ProtocolError, *_MSGSPEC_ERRORS):
        return None
    # What `_header_fast` checks beyond what the decoder did.
    kind = _KINDS.get(header.kind)
    room, origin, seq, deps = header.room, header.origin, header.seq, header.deps
    if (
        kind is None
        or origin not in _CHECKED_NODE_IDS
        or room not in _VALID_ROOMS
        or not _CHECKED_NODE_IDS.issuperset(deps)
        or not _follows_the_dependency_rules(room, origin, seq, deps)
    ):
        return None
    return _content_filled(
        room, origin, seq, kind, header.sender, header.hlc, deps, header.kid, body, header.v
    )


def _envelope_fast(data: bytes) -> Envelope | None:
    """`Envelope.from_bytes` of a canonical envelope that passes every check (not larger
    than the limit: the caller checked), or None."""
    # A map of five pairs (0x85) that has the five fields has each once: msgpack reads
    # the same values from it. The framing need not be canonical (only the content is
    # hashed), so nothing more is asked of it than of the msgpack path.
    if data[:1] != b"\x85":
        return None
    try:
        frame = _FRAME_DECODER.decode(data)
    except _MSGSPEC_ERRORS:
        return None
    content_bytes = frame.c
    content = _content_fast(content_bytes)
    if content is None:
        return None
    return _filled(
        _new(Envelope),
        content_bytes,
        content,
        frame.sig,
        frame.i,
        frame.n,
        tuple(frame.p),
        _sha256(content_bytes).digest(),
        data,
    )


_VALID_ROOMS: set[str] = set()


def check_room_id(room: object) -> str:
    """A room id is `!<random>:<home node id>`."""
    if type(room) is str and room in _VALID_ROOMS:
        return room
    if not isinstance(room, str) or not room.startswith("!") or ":" not in room or len(room) > 100:
        raise ProtocolError(f"invalid room id {room!r}", code="bad_room_id")
    local, _, home = room[1:].partition(":")
    if not local or not local.isascii() or not local.replace("-", "").replace("_", "").isalnum():
        raise ProtocolError(f"invalid room id {room!r}", code="bad_room_id")
    check_node_id(home)
    if len(_VALID_ROOMS) < 65536:
        _VALID_ROOMS.add(room)
    return room


def room_home(room: str) -> str:
    """The home node of a room id."""
    return room.rpartition(":")[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """An envelope as it travels: content bytes plus the batch signature and inclusion path."""

    content_bytes: bytes
    """Canonical content, exactly as hashed."""
    content: Content = field(compare=False)
    """Decoded content (derived from `content_bytes`)."""
    signature: bytes
    """Ed25519 signature of SIGNING_CONTEXT || batch root, by the origin."""
    index: int
    """Position of this envelope in its signing batch."""
    size: int
    """Number of envelopes in the signing batch."""
    path: tuple[bytes, ...]
    """Sibling hashes from the leaf up to the root."""
    id: bytes = field(compare=False, default=b"")
    """SHA-256 of `content_bytes` (derived)."""
    wire: bytes = field(compare=False, default=b"", repr=False)
    """The encoded envelope, when known (as received, or once encoded)."""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", hashlib.sha256(self.content_bytes).digest())

    def to_bytes(self) -> bytes:
        """The wire encoding (computed once; the received bytes when decoded from the wire)."""
        if self.wire:
            return self.wire
        # Keys in canonical order and only bytes and ints inside: the framing encoder
        # writes exactly what the canonical one would, without walking every path hash.
        data = codec.encode_frame(
            {
                "c": self.content_bytes,
                "i": self.index,
                "n": self.size,
                "p": list(self.path),
                "sig": self.signature,
            }
        )
        if len(data) > MAX_ENVELOPE_BYTES:
            raise ProtocolError(
                f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}",
                code="envelope_too_large",
                status=413,
            )
        object.__setattr__(self, "wire", data)
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Decode and check the form (not the signature: see `verify`)."""
        if len(data) > MAX_ENVELOPE_BYTES:
            raise ProtocolError(
                f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}",
                code="envelope_too_large",
                status=413,
            )
        fast = _envelope_fast(data)
        if fast is not None:
            return fast
        return cls._from_bytes_checked(data)

    @classmethod
    def _from_bytes_checked(cls, data: bytes) -> Envelope:
        """`from_bytes` through msgpack, with the exact reason when it is refused."""
        # The outer map is framing: only the content bytes are hashed and signed, and
        # those are checked for canonical form below.
        raw = codec.unpack(data, ENVELOPE_LIMITS)  # every field's type is checked right here
        if type(raw) is not dict:
            raise ProtocolError("expected a map at the top level", code="malformed_msgpack")
        if raw.keys() != _FRAME_KEYS:
            raise ProtocolError("envelope must have exactly c, sig, i, n, p", code="bad_envelope")
        content_bytes, signature, path = raw["c"], raw["sig"], raw["p"]
        index, size = raw["i"], raw["n"]
        if type(content_bytes) is not bytes or type(signature) is not bytes:
            raise ProtocolError("envelope content and signature must be bytes", code="bad_envelope")
        if type(index) is not int or type(size) is not int:  # exactly int: not bool
            raise ProtocolError("envelope index and size must be integers", code="bad_envelope")
        if type(path) is not list or len(path) > MAX_PATH:
            raise ProtocolError(
                "inclusion path must be a list of 32-byte hashes", code="bad_envelope"
            )
        for step in path:
            if type(step) is not bytes or len(step) != 32:
                raise ProtocolError(
                    "inclusion path must be a list of 32-byte hashes", code="bad_envelope"
                )
        content = Content.from_bytes(content_bytes)
        return _filled(
            _new(cls),
            content_bytes,
            content,
            signature,
            index,
            size,
            tuple(path),
            _sha256(content_bytes).digest(),
            data,
        )

    @classmethod
    def from_screened(cls, data: bytes, envelope_id: bytes) -> Envelope:
        """Rebuild the envelope `screen` accepted from exactly these bytes, with the id it
        gave, without checking it again: the same bytes decode to the same values.

        For a node that has another process screen large batches: this costs a third of
        `from_bytes`. Anything else must use `from_bytes`."""
        frame = _FRAME_DECODER.decode(data)
        header = _HEADER_DECODER.decode(frame.c)
        content = _content_filled(
            header.room,
            header.origin,
            header.seq,
            _KINDS[header.kind],
            header.sender,
            header.hlc,
            header.deps,
            header.kid,
            header.body,
            header.v,
        )
        envelope: Envelope = _new(cls)
        _set_content_bytes(envelope, frame.c)
        _set_content(envelope, content)
        _set_signature(envelope, frame.sig)
        _set_index(envelope, frame.i)
        _set_size(envelope, frame.n)
        _set_path(envelope, tuple(frame.p))
        _set_id(envelope, envelope_id)
        _set_wire(envelope, data)
        return envelope

    def root(self) -> bytes:
        """The batch root this envelope's path leads to."""
        return root_from_path(self.id, self.index, self.size, self.path)


assert set(_CONTENT_FIELDS) == {f.name for f in fields(Content)}
assert set(_ENVELOPE_FIELDS) == {f.name for f in fields(Envelope)}
# The decoders fill a new, still empty frozen instance through its slots' own setters:
# they have just made the checks of `__init__`, and this costs half of what
# `object.__setattr__` does per field, once per field of every received envelope.
(
    _set_room,
    _set_origin,
    _set_seq,
    _set_kind,
    _set_sender,
    _set_hlc,
    _set_deps,
    _set_key_id,
    _set_body,
    _set_version,
) = (Content.__dict__[name].__set__ for name in _CONTENT_FIELDS)
(
    _set_content_bytes,
    _set_content,
    _set_signature,
    _set_index,
    _set_size,
    _set_path,
    _set_id,
    _set_wire,
) = (Envelope.__dict__[name].__set__ for name in _ENVELOPE_FIELDS)


def _content_filled(
    room: str,
    origin: str,
    seq: int,
    kind: Kind,
    sender: str,
    hlc: int,
    deps: dict[str, int],
    key_id: str,
    body: dict[str, Any],
    version: int,
) -> Content:
    """A new content given its fields, checked by the caller (as `_filled` for an
    envelope): what `__init__` does, less its keyword handling, `object.__setattr__` per
    field and `__post_init__`."""
    content: Content = _new(Content)
    _set_room(content, room)
    _set_origin(content, origin)
    _set_seq(content, seq)
    _set_kind(content, kind)
    _set_sender(content, sender)
    _set_hlc(content, hlc)
    _set_deps(content, deps)
    _set_key_id(content, key_id)
    _set_body(content, body)
    _set_version(content, version)
    return content


def _filled(
    envelope: Envelope,
    content_bytes: bytes,
    content: Content,
    signature: bytes,
    index: int,
    size: int,
    path: tuple[bytes, ...],
    envelope_id: bytes,
    wire: bytes = b"",
) -> Envelope:
    """A new, still empty envelope given its fields, checked or computed by the caller:
    what the frozen dataclass's `__init__` does, less its keyword handling and one
    `object.__setattr__` per field. Runs once per envelope sealed or received."""
    _set_content_bytes(envelope, content_bytes)
    _set_content(envelope, content)
    _set_signature(envelope, signature)
    _set_index(envelope, index)
    _set_size(envelope, size)
    _set_path(envelope, path)
    _set_id(envelope, envelope_id)
    _set_wire(envelope, wire)
    return envelope


def contents_in_series(
    *,
    room: str,
    origin: str,
    key_id: str,
    first_seq: int,
    others: dict[str, int],
    hlcs: Sequence[int],
    items: Sequence[tuple[Kind, dict[str, Any], str]],
) -> list[Content]:
    """New contents of one origin in one room, as a node makes a batch of its own: `items`
    (kind, body, sender) in order, with seqs from `first_seq` on and the timestamps
    `hlcs`; each depends on the one before it and on `others` (the room's vector without
    `origin`, the same for all). `ProtocolError` exactly as `Content` would raise it.

    The first content is checked by `Content.__post_init__`. What the next ones share
    with it (room, origin, key id, the dependencies on other origins) was checked then,
    and their own dependency is on the one before, so only their own fields are checked
    again before they are filled in through the slots' setters: half of what `Content`
    costs, once per message a node sends. Anything that does not pass those few checks
    is made by `Content` itself, which gives the reason."""
    if len(hlcs) != len(items):
        raise ValueError("one timestamp per item")
    made: list[Content] = []
    fast = len(others) < MAX_DEPS and origin not in others
    for offset, ((kind, body, sender), hlc) in enumerate(zip(items, hlcs, strict=True)):
        seq = first_seq + offset
        deps = dict(others)
        if seq > 1:
            deps[origin] = seq - 1
        if (
            not made
            or not fast
            or type(kind) is not Kind
            or type(body) is not dict
            or type(sender) is not str
            or type(seq) is not int
            or type(hlc) is not int
            or not 1 < seq < _SEQ_LIMIT
            or not 0 <= hlc < _HLC_LIMIT
        ):
            made.append(
                Content(
                    room=room,
                    origin=origin,
                    seq=seq,
                    kind=kind,
                    sender=sender,
                    hlc=hlc,
                    deps=deps,
                    key_id=key_id,
                    body=body,
                )
            )
            continue
        made.append(
            _content_filled(
                room, origin, seq, kind, sender, hlc, deps, key_id, body, ENVELOPE_VERSION
            )
        )
    return made


Screened = bytes | tuple[str, str, int]
"""What `screen` says of one encoded envelope: its id, or why it is refused
(code, message, HTTP status)."""


def screen(wires: Sequence[bytes]) -> list[Screened]:
    """Check encoded envelopes exactly as `Envelope.from_bytes` does, and say of each its
    id or its refusal: plain values, for a helper process to send back (see
    `Envelope.from_screened`). Signatures are not checked here (they need the roster)."""
    verdicts: list[Screened] = []
    for wire in wires:
        try:
            verdicts.append(Envelope.from_bytes(wire).id)
        except ProtocolError as exc:
            verdicts.append((exc.code, str(exc), exc.status))
    return verdicts


class _Place(msgspec.Struct):
    """The fields of signed content that say where an envelope belongs (the others are
    skipped unread)."""

    room: str
    origin: str
    seq: int


_PLACE_DECODER = msgspec.msgpack.Decoder(_Place)


def _peek_content(wire: bytes) -> bytes | None:
    """The content bytes of an encoded envelope, read without any check, or None."""
    try:
        return _FRAME_DECODER.decode(wire).c  # the common framing, read fast
    except _MSGSPEC_ERRORS:
        pass
    try:
        content = codec.unpack(wire, ENVELOPE_LIMITS)["c"]
    except (ProtocolError, TypeError, KeyError, IndexError):
        return None
    return content if type(content) is bytes else None


def peek_place(wire: bytes) -> tuple[str, str, int] | None:
    """(room, origin, seq) an encoded envelope claims, read without any check, or None if
    it cannot be read that far. Only for dropping what is already held before paying for
    a full decode: nothing read here may be trusted for anything else."""
    content = _peek_content(wire)
    if content is None:
        return None
    try:
        place = _PLACE_DECODER.decode(content)
    except _MSGSPEC_ERRORS:
        pass
    else:
        return place.room, place.origin, place.seq
    try:
        fields = codec.unpack(content, ENVELOPE_LIMITS)
        room, origin, seq = fields["room"], fields["origin"], fields["seq"]
    except (ProtocolError, TypeError, KeyError, IndexError):
        return None
    if type(room) is not str or type(origin) is not str or type(seq) is not int:
        return None
    return room, origin, seq


def peek_id(wire: bytes) -> bytes | None:
    """The id an encoded envelope would have (SHA-256 of its content bytes), read without
    any check, or None if it cannot be read that far. Only for telling a repeat of an
    envelope held from a different envelope claiming the same place (`peek_place`)."""
    content = _peek_content(wire)
    return None if content is None else _sha256(content).digest()


class RootCache:
    """Remembers batch roots whose signature verified, so a batch costs one Ed25519 verify.

    Bounded: the oldest entries are dropped first. A hit proves that `key` signed
    `root`, which is all the signature would prove again.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._verified: dict[tuple[bytes, bytes, bytes], None] = {}

    def verify(self, envelope: Envelope, public_key: bytes) -> None:
        """`TrustError` unless the envelope's path leads to a root `public_key` signed."""
        try:
            root = envelope.root()
        except ProtocolError as exc:
            raise TrustError(
                f"inclusion path is invalid: {exc}", code="bad_inclusion_path"
            ) from exc
        self.verify_root(root, envelope.signature, public_key)

    def verify_root(self, root: bytes, signature: bytes, public_key: bytes) -> None:
        """`TrustError` unless `public_key` signed `root` (remembered once it did)."""
        cache_key = (public_key, root, signature)
        if cache_key in self._verified:
            return
        try:
            verify_signature(public_key, signature, SIGNING_CONTEXT + root)
        except TrustError as exc:
            raise TrustError(
                "envelope signature does not verify (forged, or content or path altered)",
                code="bad_envelope_signature",
            ) from exc
        if len(self._verified) >= self._capacity:
            self._verified.pop(next(iter(self._verified)))
        self._verified[cache_key] = None


def complete_batches(envelopes: Sequence[Envelope]) -> tuple[list[list[Envelope]], list[Envelope]]:
    """Split envelopes into whole signing batches (every index once, in order) and the rest.

    A whole batch can be checked with one tree build (about two hashes per
    envelope) instead of one path walk per envelope (about log2(n) hashes each).
    """
    groups: dict[tuple[bytes, int], list[Envelope]] = {}
    for envelope in envelopes:
        groups.setdefault((envelope.signature, envelope.size), []).append(envelope)
    whole: list[list[Envelope]] = []
    rest: list[Envelope] = []
    for (_, size), group in groups.items():
        if len(group) == size and all(e.index == i for i, e in enumerate(group)):
            whole.append(group)
        else:
            rest.extend(group)
    return whole, rest


def verify_batch(cache: RootCache, batch: Sequence[Envelope], public_key: bytes) -> list[bytes]:
    """Check a whole signing batch at once; returns the ids whose carried path is wrong.

    The root is rebuilt from all ids and its signature checked (once, cached); each
    envelope's carried inclusion path must then equal the one the tree gives, so a
    tampered path is still found without walking it. `TrustError` if the signature
    does not verify for the rebuilt root (the whole batch is then refused).
    """
    levels = _levels([envelope.id for envelope in batch])
    cache.verify_root(levels[-1][0], batch[0].signature, public_key)
    paths = _paths(levels)
    return [e.id for e, path in zip(batch, paths, strict=True) if e.path != path]


def seal_batch(contents: Sequence[Content], key: SigningKey) -> list[Envelope]:
    """Sign a batch of contents with one signature over their Merkle root."""
    if not contents:
        return []
    encoded = [content.to_bytes() for content in contents]
    ids = [hashlib.sha256(data).digest() for data in encoded]
    levels = _levels(ids)
    signature = key.sign(SIGNING_CONTEXT + levels[-1][0])
    paths = _paths(levels)
    size = len(contents)
    envelopes = [
        _filled(_new(Envelope), data, content, signature, index, size, paths[index], ids[index])
        for index, (data, content) in enumerate(zip(encoded, contents, strict=True))
    ]
    for envelope in envelopes:
        # Wire size = content + signature + path + a few bytes of framing; refuse before sending.
        # Upper bound: each path hash is bin8 (34 bytes); keys, headers and two ints <= 41 bytes.
        if len(envelope.content_bytes) + 64 + 34 * len(envelope.path) + 48 > MAX_ENVELOPE_BYTES:
            envelope.to_bytes()  # exact check; raises envelope_too_large
    return envelopes
