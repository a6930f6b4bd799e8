"""Invitation tokens and the join lifecycle.

An invitation is a JWT signed with EdDSA by the federation key. It tells the
joining node everything it needs to reach and authenticate the authority before
it trusts anything: the authority's endpoints, the SHA-256 fingerprint of the
federation CA to pin on the first TLS connection, and the id of the federation
key that signs the roster it will receive. It names the one node id it admits,
expires, and carries a random nonce that makes it single-use.

Strategy: the token is a compact JWS (RFC 7515/7519) with exactly one algorithm,
EdDSA over Ed25519, made and checked here with `cryptography`. A header naming any
other algorithm, or carrying anything but alg, kid and typ, is refused, so
there is no algorithm to confuse. Time is passed in (`now`); no clock is read.
(PyJWT would do the same job, but importing it loads its JWKS client and with it
urllib, socket and ssl, which this pure package must not load; the tests check
that PyJWT and this module accept each other's tokens.) Single use is a
property of the authority's stored invitation, driven by the `JOIN_TABLE` state
machine: the first join request binds the invitation to the joiner's keys; a
retry with the same keys (a lost response, or polling while an operator decides)
gets the same answer; anyone else presenting the token is refused as reuse.
Expiry applies to the first use only, so an operator may approve a pending join
after the token's expiry without making the town start over.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from . import codec
from .errors import ProtocolError, TrustError
from .identity import check_federation_id, check_municipality_code, check_node_id, key_id
from .roster import Endpoint
from .signing import SigningKey, verify_signature

__all__ = [
    "JOIN_AUDIENCE",
    "JOIN_TABLE",
    "Approval",
    "Invitation",
    "JoinEffect",
    "JoinInput",
    "JoinReply",
    "JoinRequest",
    "JoinState",
    "JoinStatus",
    "check_not_expired",
    "issue_invitation",
    "join_transition",
    "new_nonce",
    "parse_duration",
    "read_invitation",
    "verify_invitation",
]

JOIN_AUDIENCE = "kakehashi-join"
MAX_TOKEN_LENGTH = 4096
# Tokens are checked against the authority's clock; allow modest skew on expiry.
CLOCK_LEEWAY_SECONDS = 60


class Approval(StrEnum):
    """Whether a join is admitted at once or waits for an operator."""

    AUTO = "auto"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True, kw_only=True)
class Invitation:
    """The claims of an invitation token."""

    federation_id: str
    """Federation the token admits to."""
    node_id: str
    """The one node id the token admits."""
    authority_endpoints: tuple[str, ...]
    """https URLs of the authority's federation API, tried in order."""
    ca_fingerprint: bytes
    """SHA-256 of the federation CA certificate (DER), pinned on first contact."""
    federation_key_id: str
    """Id of the federation key that signs the roster and this token."""
    nonce: str
    """Random single-use id of this invitation."""
    issued_at: int
    """Unix seconds."""
    expires_at: int
    """Unix seconds after which a first use is refused."""
    approval: Approval = Approval.AUTO
    """auto: admitted at once; manual: waits for `peer approve`."""
    relay: bool = False
    """Whether the node joins as a relay between segments."""

    def __post_init__(self) -> None:
        check_federation_id(self.federation_id)
        check_node_id(self.node_id)
        if not self.authority_endpoints or not all(
            isinstance(url, str) and url.startswith("https://") for url in self.authority_endpoints
        ):
            raise ProtocolError("invitation needs at least one https:// endpoint", code="bad_token")
        if len(self.ca_fingerprint) != 32:
            raise ProtocolError("invitation CA fingerprint must be 32 bytes", code="bad_token")
        if not re.fullmatch(r"[0-9a-f]{16}", self.federation_key_id):
            raise ProtocolError("invitation federation key id is malformed", code="bad_token")
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", self.nonce):
            raise ProtocolError("invitation nonce is malformed", code="bad_token")
        if self.expires_at <= self.issued_at:
            raise ProtocolError("invitation expires before it is issued", code="bad_token")
        object.__setattr__(self, "approval", Approval(self.approval))

    def to_claims(self) -> dict[str, Any]:
        return {
            "iss": self.federation_id,
            "aud": JOIN_AUDIENCE,
            "sub": self.node_id,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "jti": self.nonce,
            "endpoints": list(self.authority_endpoints),
            "ca": self.ca_fingerprint.hex(),
            "fk": self.federation_key_id,
            "approval": self.approval.value,
            "relay": self.relay,
        }

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> Invitation:
        try:
            return cls(
                federation_id=claims["iss"],
                node_id=claims["sub"],
                authority_endpoints=tuple(claims["endpoints"]),
                ca_fingerprint=bytes.fromhex(claims["ca"]),
                federation_key_id=claims["fk"],
                nonce=claims["jti"],
                issued_at=int(claims["iat"]),
                expires_at=int(claims["exp"]),
                approval=Approval(claims.get("approval", "auto")),
                relay=bool(claims.get("relay", False)),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"invitation token is incomplete: {exc}", code="bad_token") from exc


def new_nonce() -> str:
    """A fresh random nonce (URL-safe, 128 bits)."""
    return secrets.token_urlsafe(16)


def parse_duration(text: str) -> int:
    """Seconds in '90s', '30m', '72h', '7d' or '2w'."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*([smhdw])\s*", text)
    if not match:
        raise ProtocolError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 72h, 7d, 30m",
            code="bad_duration",
        )
    number, unit = int(match.group(1)), match.group(2)
    seconds = number * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    if seconds <= 0:
        raise ProtocolError("duration must be positive", code="bad_duration")
    return seconds


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding: the one spelling `_b64encode` produces."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _json_part(text: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(text))
    except RecursionError as exc:  # hostile nesting: "[[[[..." fits easily in a token
        raise ValueError("a token part nests too deeply") from exc
    if not isinstance(value, dict):
        raise ValueError("a token part is not a JSON object")
    return value


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Header, claims, signing input and signature of a compact JWS; ValueError if malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("a token has three dot-separated parts")
    header, claims = _json_part(parts[0]), _json_part(parts[1])
    if header.get("alg") != "EdDSA" or not set(header) <= {"alg", "kid", "typ"}:
        raise ValueError("only EdDSA tokens without extra header fields are accepted")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), _b64decode(parts[2])


def issue_invitation(invitation: Invitation, key: SigningKey) -> str:
    """Sign `invitation` as a compact JWT (EdDSA) with the federation key."""
    if key.key_id != invitation.federation_key_id:
        raise TrustError("invitation must be signed by the key it names", code="bad_token")
    header = {"alg": "EdDSA", "kid": key.key_id, "typ": "JWT"}
    encoded = [
        _b64encode(json.dumps(part, separators=(",", ":"), sort_keys=True).encode())
        for part in (header, invitation.to_claims())
    ]
    signing_input = ".".join(encoded).encode("ascii")
    return f"{signing_input.decode('ascii')}.{_b64encode(key.sign(signing_input))}"


def _check_shape(token: object) -> str:
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
        raise ProtocolError("invitation token is missing or too long", code="bad_token")
    return token.strip()


def read_invitation(token: str) -> Invitation:
    """Read the claims WITHOUT verifying the signature.

    Only for the joining node, which cannot yet verify: it pins the CA
    fingerprint and federation key id found here, and everything it receives
    later must match them.
    """
    token = _check_shape(token)
    try:
        _, claims, _, _ = _split(token)
    except ValueError as exc:
        raise ProtocolError(
            "this is not a Kakehashi invitation token (it does not decode)", code="bad_token"
        ) from exc
    return Invitation.from_claims(claims)


def verify_invitation(
    token: str, federation_key: bytes, *, now: int, federation_id: str, node_id: str | None = None
) -> Invitation:
    """Verify signature, audience and federation; with `node_id`, that it is the invited node.

    Expiry is reported through `Invitation.expires_at` and checked by
    `check_not_expired`, because it applies to the first use only.
    """
    token = _check_shape(token)
    if len(federation_key) != 32:
        raise TrustError(
            "the federation key to check the token with is malformed", code="bad_token"
        )
    try:
        _, claims, signing_input, signature = _split(token)
    except ValueError as exc:
        raise TrustError(f"invitation token is not valid: {exc}", code="bad_token") from exc
    try:
        verify_signature(federation_key, signature, signing_input)
    except TrustError as exc:
        raise TrustError(
            "invitation token signature is not valid (forged or altered)", code="token_forged"
        ) from exc
    audience = claims.get("aud")
    if audience != JOIN_AUDIENCE and not (isinstance(audience, list) and JOIN_AUDIENCE in audience):
        raise TrustError("token is not an invitation to join", code="bad_token")
    invitation = Invitation.from_claims(claims)
    if invitation.federation_id != federation_id or invitation.federation_key_id != key_id(
        federation_key
    ):
        raise TrustError("invitation token is for another federation", code="token_forged")
    if node_id is not None and invitation.node_id != node_id:
        raise TrustError(
            f"invitation is for node {invitation.node_id!r}, not {node_id!r}",
            code="token_wrong_node",
            hint=f"init this node with --node-id {invitation.node_id}, or ask for a new token",
        )
    return invitation


def check_not_expired(invitation: Invitation, now: int) -> None:
    """`TrustError` if a first use at `now` is past the expiry (with a minute of leeway)."""
    if now > invitation.expires_at + CLOCK_LEEWAY_SECONDS:
        raise TrustError(
            f"invitation for {invitation.node_id!r} has expired",
            code="token_expired",
            hint=f"ask the authority for a new one: kakehashi peer invite {invitation.node_id}",
        )


class JoinState(StrEnum):
    """Where an issued invitation stands at the authority."""

    ISSUED = "issued"
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"


class JoinInput(Enum):
    """What happened to an invitation."""

    REQUEST_AUTO = "first join request, auto approval"
    REQUEST_MANUAL = "first join request, manual approval"
    REQUEST_SAME_KEYS = "repeated request by the node that first used the token"
    REQUEST_OTHER_KEYS = "request with the token by someone else"
    APPROVE = "operator approves"
    DENY = "operator denies"


class JoinEffect(Enum):
    """What the authority does in response."""

    ADMIT = "add the node to the roster and deliver its certificate"
    HOLD = "record the request; answer 'waiting for approval'"
    DELIVER = "answer with the certificate and roster issued before"
    REFUSE_REUSED = "refuse: the token was already used"
    REFUSE_DENIED = "refuse: an operator denied the join"
    NOTE_DENIED = "record the denial"


JOIN_TABLE: dict[tuple[JoinState, JoinInput], tuple[JoinEffect, JoinState]] = {
    (JoinState.ISSUED, JoinInput.REQUEST_AUTO): (JoinEffect.ADMIT, JoinState.APPROVED),
    (JoinState.ISSUED, JoinInput.REQUEST_MANUAL): (JoinEffect.HOLD, JoinState.PENDING),
    (JoinState.PENDING, JoinInput.REQUEST_SAME_KEYS): (JoinEffect.HOLD, JoinState.PENDING),
    (JoinState.PENDING, JoinInput.REQUEST_OTHER_KEYS): (
        JoinEffect.REFUSE_REUSED,
        JoinState.PENDING,
    ),
    (JoinState.PENDING, JoinInput.APPROVE): (JoinEffect.ADMIT, JoinState.APPROVED),
    (JoinState.PENDING, JoinInput.DENY): (JoinEffect.NOTE_DENIED, JoinState.DENIED),
    (JoinState.APPROVED, JoinInput.REQUEST_SAME_KEYS): (JoinEffect.DELIVER, JoinState.APPROVED),
    (JoinState.APPROVED, JoinInput.REQUEST_OTHER_KEYS): (
        JoinEffect.REFUSE_REUSED,
        JoinState.APPROVED,
    ),
    (JoinState.DENIED, JoinInput.REQUEST_SAME_KEYS): (JoinEffect.REFUSE_DENIED, JoinState.DENIED),
    (JoinState.DENIED, JoinInput.REQUEST_OTHER_KEYS): (JoinEffect.REFUSE_REUSED, JoinState.DENIED),
}


def join_transition(state: JoinState, event: JoinInput) -> tuple[JoinEffect, JoinState]:
    """Look up the table; a pair that is not in it is an error, never a silent no-op."""
    try:
        return JOIN_TABLE[(state, event)]
    except KeyError:
        raise ProtocolError(
            f"cannot {event.value!r} when the invitation is {state.value}",
            code="invalid_join_transition",
            status=409,
        ) from None


JOIN_LIMITS = codec.Limits(max_bytes=1024 * 1024, max_bin=1024 * 1024, max_str=16 * 1024)


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinRequest:
    """What a joining node sends the authority (over TLS, authenticated by the token)."""

    token: str
    """The invitation token."""
    name: str
    """Display name of the joining node."""
    code: str | None
    """Its local government code, if any."""
    endpoints: tuple[Endpoint, ...]
    """Its federation API endpoint per segment."""
    signing_key: bytes
    """Its raw Ed25519 public signing key."""
    csr_pem: bytes
    """PEM certificate signing request for its TLS key, CN = node id."""

    def __post_init__(self) -> None:
        _check_shape(self.token)
        if self.code is not None:
            check_municipality_code(self.code)
        if not isinstance(self.name, str) or not self.name or len(self.name) > 200:
            raise ProtocolError("display name must be 1-200 characters", code="bad_join_request")
        if not isinstance(self.signing_key, bytes) or len(self.signing_key) != 32:
            raise ProtocolError("signing key must be 32 bytes", code="bad_join_request")
        if not isinstance(self.csr_pem, bytes) or not self.csr_pem.startswith(
            b"-----BEGIN CERTIFICATE REQUEST-----"
        ):
            raise ProtocolError("csr must be PEM", code="bad_join_request")

    def to_bytes(self) -> bytes:
        return codec.encode(
            {
                "token": self.token,
                "name": self.name,
                "code": self.code,
                "endpoints": [e.to_wire() for e in self.endpoints],
                "signing_key": self.signing_key,
                "csr": self.csr_pem,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> JoinRequest:
        raw = codec.decode_map(data, JOIN_LIMITS)
        try:
            return cls(
                token=raw["token"],
                name=raw["name"],
                code=raw["code"],
                endpoints=tuple(Endpoint.from_wire(e) for e in raw["endpoints"]),
                signing_key=raw["signing_key"],
                csr_pem=raw["csr"],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(
                f"join request is incomplete: {exc}", code="bad_join_request"
            ) from exc


class JoinStatus(StrEnum):
    """The authority's answer to a join request."""

    ADMITTED = "admitted"
    PENDING = "pending"


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinReply:
    """The authority's answer: admitted with certificate, CA and roster; or pending."""

    status: JoinStatus
    """admitted or pending."""
    certificate_pem: bytes = b""
    """The node's TLS certificate, issued by the federation CA (when admitted)."""
    ca_pem: bytes = b""
    """The federation CA certificate (when admitted)."""
    roster: bytes = b""
    """The signed roster that includes the node (when admitted)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", JoinStatus(self.status))
        if not all(isinstance(v, bytes) for v in (self.certificate_pem, self.ca_pem, self.roster)):
            raise ProtocolError("certificate, CA and roster must be bytes", code="bad_join_reply")
        if self.status is JoinStatus.ADMITTED and not (
            self.certificate_pem and self.ca_pem and self.roster
        ):
            raise ProtocolError(
                "an admitted join must carry certificate, CA and roster", code="bad_join_reply"
            )

    def to_bytes(self) -> bytes:
        return codec.encode(
            {
                "status": self.status.value,
                "certificate": self.certificate_pem,
                "ca": self.ca_pem,
                "roster": self.roster,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> JoinReply:
        raw = codec.decode_map(data, JOIN_LIMITS)
        try:
            return cls(
                status=JoinStatus(raw["status"]),
                certificate_pem=raw["certificate"],
                ca_pem=raw["ca"],
                roster=raw["roster"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"join reply is incomplete: {exc}", code="bad_join_reply") from exc
