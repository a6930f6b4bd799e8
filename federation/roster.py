"""The roster: the signed list of every member of a federation.

The roster is the single source of trust. A node accepts a peer's TLS
certificate only if its SHA-256 fingerprint is the one the roster publishes for
that node id, and only while that node's status is `active`. The authority signs
each version with the federation key; every node keeps the newest version it
has verified.

Invariants:
- The signed bytes are the canonical encoding of the roster document, kept as
  received (`SignedRoster.body`); nothing is re-encoded before verifying.
- Versions strictly increase. An update with a version equal to or lower than
  the one held is refused (`roster_rollback`), so a captured old roster cannot
  resurrect a revoked member.
- An update must be signed by the federation key of the roster held. A roster
  may name a new federation key: that is how the authority key is rotated (the
  new key is announced in a roster signed by the old one).
- Members are sorted by node id and unique; each has at least one signing key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from . import codec
from .errors import ProtocolError, TrustError
from .identity import (
    check_federation_id,
    check_municipality_code,
    check_node_id,
    check_segment_name,
    key_id,
)
from .signing import SigningKey, verify_signature

__all__ = [
    "ROSTER_LIMITS",
    "Endpoint",
    "MemberStatus",
    "PublishedKey",
    "Roster",
    "RosterChange",
    "RosterEntry",
    "SignedRoster",
    "check_update",
    "key_proof_message",
    "rotation_chain",
    "sign_roster",
    "verify_roster",
    "with_certificate",
    "with_signing_key",
]

ROSTER_FORMAT = 1

# A roster of a few hundred members with several keys each stays far below this.
ROSTER_LIMITS = codec.Limits(
    max_bytes=1024 * 1024, max_depth=8, max_str=4096, max_bin=1024 * 1024, max_array=10_000
)


class MemberStatus(StrEnum):
    """Whether a member may exchange with the others."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


def _require(mapping: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = mapping.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(
            f"roster field {name!r} is missing or of the wrong type", code="bad_roster"
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where a node listens on one network segment."""

    segment: str
    """Segment name, e.g. 'lgwan' or 'internet'."""
    url: str
    """https URL of the federation API on that segment."""

    def __post_init__(self) -> None:
        check_segment_name(self.segment)
        if not self.url.startswith("https://") or len(self.url) > 512:
            raise ProtocolError(
                f"endpoint {self.url!r} must be an https:// URL", code="bad_endpoint"
            )

    def to_wire(self) -> dict[str, Any]:
        return {"segment": self.segment, "url": self.url}

    @classmethod
    def from_wire(cls, raw: Any) -> Endpoint:
        if not isinstance(raw, dict):
            raise ProtocolError("endpoint must be a map", code="bad_roster")
        return cls(segment=_require(raw, "segment", str), url=_require(raw, "url", str))


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedKey:
    """A signing key of a member with the window in which it may sign."""

    public_key: bytes
    """Raw 32-byte Ed25519 public key."""
    not_before: int
    """Unix seconds from which signatures by this key are valid."""
    not_after: int | None = None
    """Unix seconds after which they are not; None while the key is current."""

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise ProtocolError("signing key must be 32 bytes", code="bad_roster")
        if self.not_after is not None and self.not_after < self.not_before:
            raise ProtocolError("signing key window ends before it starts", code="bad_roster")

    @property
    def key_id(self) -> str:
        """Key id (first 16 hex of SHA-256 of the raw key)."""
        return key_id(self.public_key)

    def valid_at(self, when: int) -> bool:
        """Whether a signature made at `when` falls in this key's window."""
        return self.not_before <= when and (self.not_after is None or when <= self.not_after)

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.public_key, "not_before": self.not_before, "not_after": self.not_after}

    @classmethod
    def from_wire(cls, raw: Any) -> PublishedKey:
        if not isinstance(raw, dict):
            raise ProtocolError("signing key must be a map", code="bad_roster")
        not_after = raw.get("not_after")
        if not_after is not None and (
            not isinstance(not_after, int) or isinstance(not_after, bool)
        ):
            raise ProtocolError("roster field 'not_after' must be an integer", code="bad_roster")
        return cls(
            public_key=_require(raw, "key", bytes),
            not_before=_require(raw, "not_before", int),
            not_after=not_after,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RosterEntry:
    """One member of the federation as the roster publishes it."""

    node_id: str
    """Short lowercase label, e.g. 'tsu'."""
    name: str
    """Display name, e.g. '津市'."""
    code: str | None
    """6-digit local government code, where there is one."""
    endpoints: tuple[Endpoint, ...]
    """Federation API endpoint per network segment, sorted by segment."""
    signing_keys: tuple[PublishedKey, ...]
    """Signing keys with validity windows, oldest first."""
    tls_fingerprint: bytes
    """SHA-256 of the DER of the node's current TLS certificate."""
    status: MemberStatus = MemberStatus.ACTIVE
    """active, suspended or revoked."""
    status_reason: str = ""
    """Why the status was last changed (operator's words)."""
    status_since: int = 0
    """Unix seconds of the last status change."""
    relay: bool = False
    """Whether the node relays envelopes between segments."""
    joined_at: int = 0
    """Unix seconds when the node joined."""
    previous_tls_fingerprint: bytes | None = None
    """The certificate being replaced by a rotation, still accepted until
    `previous_tls_until` so connections open during the switch keep working."""
    previous_tls_until: int = 0
    """Unix seconds until which the previous certificate is accepted."""

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if self.code is not None:
            check_municipality_code(self.code)
        if not self.name or len(self.name) > 200:
            raise ProtocolError("member display name must be 1-200 characters", code="bad_roster")
        if len(self.tls_fingerprint) != 32:
            raise ProtocolError("TLS fingerprint must be 32 bytes", code="bad_roster")
        if not self.signing_keys:
            raise ProtocolError(f"member {self.node_id} has no signing key", code="bad_roster")
        segments = [endpoint.segment for endpoint in self.endpoints]
        if segments != sorted(set(segments)):
            raise ProtocolError("endpoints must be unique and sorted by segment", code="bad_roster")
        if self.previous_tls_fingerprint is not None and (
            len(self.previous_tls_fingerprint) != 32
            or self.previous_tls_fingerprint == self.tls_fingerprint
        ):
            raise ProtocolError(
                "previous TLS fingerprint must be 32 bytes and differ from the current",
                code="bad_roster",
            )
        object.__setattr__(self, "status", MemberStatus(self.status))

    def certificates(self, now: int) -> tuple[bytes, ...]:
        """Fingerprints of the TLS certificates this member may present at `now`:
        the current one, and during a rotation's overlap the one it replaces."""
        if self.previous_tls_fingerprint is not None and now <= self.previous_tls_until:
            return (self.tls_fingerprint, self.previous_tls_fingerprint)
        return (self.tls_fingerprint,)

    @property
    def active(self) -> bool:
        """Whether the member may connect and be accepted."""
        return self.status is MemberStatus.ACTIVE

    @property
    def segments(self) -> tuple[str, ...]:
        """Names of the segments the member sits on."""
        return tuple(endpoint.segment for endpoint in self.endpoints)

    def endpoint(self, segment: str) -> Endpoint | None:
        """The endpoint on `segment`, if the member sits on it."""
        return next((e for e in self.endpoints if e.segment == segment), None)

    def signing_key(self, kid: str) -> PublishedKey | None:
        """The published key with id `kid`, if any."""
        return next((k for k in self.signing_keys if k.key_id == kid), None)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "node_id": self.node_id,
            "name": self.name,
            "code": self.code,
            "endpoints": [endpoint.to_wire() for endpoint in self.endpoints],
            "signing_keys": [key.to_wire() for key in self.signing_keys],
            "tls_fingerprint": self.tls_fingerprint,
            "status": self.status.value,
            "status_reason": self.status_reason,
            "status_since": self.status_since,
            "relay": self.relay,
            "joined_at": self.joined_at,
        }
        if self.previous_tls_fingerprint is not None:
            # Present only during a rotation, so rosters without one encode as before.
            wire["previous_tls"] = {
                "fingerprint": self.previous_tls_fingerprint,
                "until": self.previous_tls_until,
            }
        return wire

    @classmethod
    def from_wire(cls, raw: Any) -> RosterEntry:
        if not isinstance(raw, dict):
            raise ProtocolError("roster member must be a map", code="bad_roster")
        code = raw.get("code")
        if code is not None and not isinstance(code, str):
            raise ProtocolError("roster field 'code' must be a string", code="bad_roster")
        status = _require(raw, "status", str)
        if status not in MemberStatus.__members__.values():
            raise ProtocolError(f"unknown member status {status!r}", code="bad_roster")
        previous = raw.get("previous_tls")
        if previous is not None and not isinstance(previous, dict):
            raise ProtocolError("roster field 'previous_tls' must be a map", code="bad_roster")
        return cls(
            node_id=_require(raw, "node_id", str),
            name=_require(raw, "name", str),
            code=code,
            endpoints=tuple(Endpoint.from_wire(e) for e in _require(raw, "endpoints", list)),
            signing_keys=tuple(
                PublishedKey.from_wire(k) for k in _require(raw, "signing_keys", list)
            ),
            tls_fingerprint=_require(raw, "tls_fingerprint", bytes),
            status=MemberStatus(status),
            status_reason=_require(raw, "status_reason", str),
            status_since=_require(raw, "status_since", int),
            relay=_require(raw, "relay", bool),
            joined_at=_require(raw, "joined_at", int),
            previous_tls_fingerprint=None
            if previous is None
            else _require(previous, "fingerprint", bytes),
            previous_tls_until=0 if previous is None else _require(previous, "until", int),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Roster:
    """A version of the federation's member list (unsigned document)."""

    federation_id: str
    """Id of the federation, made at creation."""
    federation_name: str
    """Display name, e.g. '三重県 市町連携'."""
    version: int
    """Strictly increasing from 1."""
    issued_at: int
    """Unix seconds when the authority issued this version."""
    authority: str
    """Node id of the federation authority."""
    federation_key: bytes
    """Raw Ed25519 public key that signs the next roster version."""
    ca_fingerprint: bytes
    """SHA-256 of the DER of the federation CA certificate."""
    members: tuple[RosterEntry, ...] = field(default=())
    """Every member, sorted by node id."""
    _by_id: dict[str, RosterEntry] = field(init=False, repr=False, compare=False)
    _by_fingerprint: dict[bytes, RosterEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Indexes for the per-request and per-envelope lookups (derived, not compared).
        object.__setattr__(self, "_by_id", {m.node_id: m for m in self.members})
        by_fingerprint = {
            m.previous_tls_fingerprint: m
            for m in self.members
            if m.previous_tls_fingerprint is not None
        }
        by_fingerprint.update({m.tls_fingerprint: m for m in self.members})
        object.__setattr__(self, "_by_fingerprint", by_fingerprint)
        check_federation_id(self.federation_id)
        check_node_id(self.authority)
        if self.version < 1:
            raise ProtocolError("roster version must be at least 1", code="bad_roster")
        if len(self.federation_key) != 32 or len(self.ca_fingerprint) != 32:
            raise ProtocolError(
                "federation key and CA fingerprint must be 32 bytes", code="bad_roster"
            )
        ids = [member.node_id for member in self.members]
        if ids != sorted(set(ids)):
            raise ProtocolError("members must be unique and sorted by node id", code="bad_roster")
        if self.authority not in ids:
            raise ProtocolError("the authority must be a member", code="bad_roster")

    def member(self, node_id: str) -> RosterEntry | None:
        """The entry for `node_id`, if it is a member (whatever its status)."""
        return self._by_id.get(node_id)

    def revoked(self, node_id: str) -> bool:
        """Whether `node_id` is a member revoked for good: nothing is sent to it any more."""
        entry = self._by_id.get(node_id)
        return entry is not None and entry.status is MemberStatus.REVOKED

    def active_member(self, node_id: str) -> RosterEntry:
        """The entry for `node_id`, or `TrustError` if unknown, suspended or revoked."""
        entry = self.member(node_id)
        if entry is None:
            raise TrustError(
                f"node {node_id!r} is not a member of the federation", code="unknown_peer"
            )
        if entry.status is MemberStatus.SUSPENDED:
            raise TrustError(f"node {node_id!r} is suspended", code="peer_suspended")
        if entry.status is MemberStatus.REVOKED:
            raise TrustError(f"node {node_id!r} is revoked", code="peer_revoked")
        return entry

    def by_fingerprint(self, fingerprint: bytes) -> RosterEntry | None:
        """The member whose current TLS certificate, or the one a rotation is replacing,
        has this fingerprint (check `RosterEntry.certificates(now)` for the overlap)."""
        return self._by_fingerprint.get(fingerprint)

    def next_version(self, *, issued_at: int, members: Iterable[RosterEntry]) -> Roster:
        """The next version with `members` (any order), issued at `issued_at`."""
        return replace(
            self,
            version=self.version + 1,
            issued_at=issued_at,
            members=tuple(sorted(members, key=lambda m: m.node_id)),
        )

    def with_member(self, entry: RosterEntry, *, issued_at: int) -> Roster:
        """The next version with `entry` added, or replacing the member of the same id."""
        others = [m for m in self.members if m.node_id != entry.node_id]
        return self.next_version(issued_at=issued_at, members=[*others, entry])

    def to_wire(self) -> dict[str, Any]:
        return {
            "format": ROSTER_FORMAT,
            "federation_id": self.federation_id,
            "federation_name": self.federation_name,
            "version": self.version,
            "issued_at": self.issued_at,
            "authority": self.authority,
            "federation_key": self.federation_key,
            "ca_fingerprint": self.ca_fingerprint,
            "members": [member.to_wire() for member in self.members],
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes that the authority signs."""
        return codec.encode(self.to_wire())

    @classmethod
    def from_bytes(cls, data: bytes) -> Roster:
        raw = codec.decode_map(data, ROSTER_LIMITS)
        if isinstance(raw.get("format"), bool) or raw.get("format") != ROSTER_FORMAT:
            raise ProtocolError(
                f"unsupported roster format {raw.get('format')!r}", code="bad_roster"
            )
        return cls(
            federation_id=_require(raw, "federation_id", str),
            federation_name=_require(raw, "federation_name", str),
            version=_require(raw, "version", int),
            issued_at=_require(raw, "issued_at", int),
            authority=_require(raw, "authority", str),
            federation_key=_require(raw, "federation_key", bytes),
            ca_fingerprint=_require(raw, "ca_fingerprint", bytes),
            members=tuple(RosterEntry.from_wire(m) for m in _require(raw, "members", list)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedRoster:
    """A roster as it travels: the exact signed bytes, the signature and the signer's key id."""

    body: bytes
    """Canonical encoding of the roster document, exactly as signed."""
    signature: bytes
    """Ed25519 signature over `body` by the federation key."""
    key_id: str
    """Id of the key that signed."""
    roster: Roster = field(compare=False)
    """The decoded document (derived from `body`)."""

    @property
    def version(self) -> int:
        return self.roster.version

    def to_bytes(self) -> bytes:
        return codec.encode({"body": self.body, "sig": self.signature, "kid": self.key_id})

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRoster:
        """Parse without verifying; call `verify_roster` or `check_update` before trusting."""
        raw = codec.decode_map(data, ROSTER_LIMITS)
        if set(raw) != {"body", "sig", "kid"}:
            raise ProtocolError("signed roster must have exactly body, sig, kid", code="bad_roster")
        body = _require(raw, "body", bytes)
        return cls(
            body=body,
            signature=_require(raw, "sig", bytes),
            key_id=_require(raw, "kid", str),
            roster=Roster.from_bytes(body),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RosterChange:
    """What an accepted roster update changed, for logs and for the node to act on."""

    previous_version: int
    """Version held before."""
    version: int
    """Version now held."""
    joined: tuple[str, ...]
    """Node ids that are new members."""
    status_changed: tuple[str, ...]
    """Node ids whose status changed."""
    rekeyed: tuple[str, ...]
    """Node ids whose TLS certificate, signing keys or endpoints changed."""


def sign_roster(roster: Roster, key: SigningKey) -> SignedRoster:
    """Sign `roster` with the federation key. The key must be the one the previous version named."""
    body = roster.to_bytes()
    return SignedRoster(body=body, signature=key.sign(body), key_id=key.key_id, roster=roster)


def verify_roster(signed: SignedRoster, trusted_key: bytes) -> Roster:
    """Return the roster if `trusted_key` signed it; `TrustError` otherwise."""
    if key_id(trusted_key) != signed.key_id:
        raise TrustError(
            f"roster signed by key {signed.key_id}, expected federation key {key_id(trusted_key)}",
            code="bad_roster_signature",
        )
    try:
        verify_signature(trusted_key, signed.signature, signed.body)
    except TrustError as exc:
        raise TrustError("roster signature does not verify", code="bad_roster_signature") from exc
    return signed.roster


def check_update(current: Roster, candidate: SignedRoster) -> RosterChange:
    """Decide whether `candidate` may replace `current`; `TrustError` says why not."""
    new = candidate.roster
    if new.federation_id != current.federation_id:
        raise TrustError(
            f"roster is for federation {new.federation_id}, not {current.federation_id}",
            code="wrong_federation",
        )
    verify_roster(candidate, current.federation_key)
    if new.version <= current.version:
        raise TrustError(
            f"roster version {new.version} is not newer than the held version {current.version}",
            code="roster_rollback",
        )
    before = {m.node_id: m for m in current.members}
    joined = tuple(m.node_id for m in new.members if m.node_id not in before)
    status_changed = tuple(
        m.node_id
        for m in new.members
        if m.node_id in before and before[m.node_id].status != m.status
    )
    rekeyed = tuple(
        m.node_id
        for m in new.members
        if m.node_id in before
        and (
            before[m.node_id].tls_fingerprint != m.tls_fingerprint
            or before[m.node_id].signing_keys != m.signing_keys
            or before[m.node_id].endpoints != m.endpoints
        )
    )
    return RosterChange(
        previous_version=current.version,
        version=new.version,
        joined=joined,
        status_changed=status_changed,
        rekeyed=rekeyed,
    )


# key lifecycle ----------------------------------------------------------------


def with_certificate(
    entry: RosterEntry, fingerprint: bytes, *, now: int, overlap: int
) -> RosterEntry:
    """`entry` after a certificate rotation: `fingerprint` is current, the replaced one
    stays accepted for `overlap` seconds (connections open during the switch go on)."""
    if fingerprint == entry.tls_fingerprint:
        raise TrustError("the new certificate is the current one", code="same_certificate")
    return replace(
        entry,
        tls_fingerprint=fingerprint,
        previous_tls_fingerprint=entry.tls_fingerprint,
        previous_tls_until=now + overlap,
    )


def with_signing_key(
    entry: RosterEntry, public_key: bytes, *, now: int, overlap: int
) -> RosterEntry:
    """`entry` with a new current signing key from `now`; every key still open gets
    `now + overlap` as its end, so envelopes it signed before then keep verifying
    (their windows are kept: old history verifies forever)."""
    if any(key.public_key == public_key for key in entry.signing_keys):
        raise TrustError("this signing key was published before", code="key_reused")
    closed = tuple(
        key if key.not_after is not None else replace(key, not_after=now + overlap)
        for key in entry.signing_keys
    )
    return replace(
        entry, signing_keys=(*closed, PublishedKey(public_key=public_key, not_before=now))
    )


def key_proof_message(federation_id: str, node_id: str, public_key: bytes) -> bytes:
    """What a node signs with a new signing key to prove it holds it."""
    return codec.encode(
        {"federation": federation_id, "node": node_id, "purpose": "signing-key", "key": public_key}
    )


def rotation_chain(held: Roster, rosters: Iterable[SignedRoster]) -> list[SignedRoster]:
    """From stored roster versions (any order), the ones a node holding `held` needs to
    reach the newest when the federation key changed meanwhile: each version that
    names a new federation key (signed by the key before it), then the newest."""
    ordered = sorted((r for r in rosters if r.version > held.version), key=lambda r: r.version)
    chain: list[SignedRoster] = []
    key = held.federation_key
    for signed in ordered:
        if signed.roster.federation_key != key:
            chain.append(signed)
            key = signed.roster.federation_key
    if ordered and (not chain or chain[-1] is not ordered[-1]):
        chain.append(ordered[-1])
    return chain
