"""Staff credentials after login: short-lived access tokens and opaque refresh tokens.

- An **access token** is a JWT (RFC 7519) signed with EdDSA by the node's token
  key, valid 15 minutes. Claims: `iss` (the node id), `aud` (`kakehashi-client`),
  `sub` (`login@node`), `role`, `iat`, `exp`, `jti` (random), `sid` (the login
  session it belongs to). Only EdDSA is accepted, so there is no algorithm to
  confuse, and the header must name the node's key id.
- The **token key** is an Ed25519 key of its own (`HOME/keys/token.key`, mode
  0600), not the envelope signing key: it never leaves the node and can be
  replaced without the federation noticing. It is created on first use.
- A **refresh token** is 32 random bytes (base64url). The node keeps only its
  SHA-256: the token is random, so a slow hash would add nothing, and a stolen
  database yields no usable token.

Time is always passed in (`now`): PyJWT's own expiry check reads the process
clock, so it is switched off and expiry is judged here against the node's clock.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from federation.errors import TrustError
from federation.signing import SigningKey

from .staff import StaffRole
from .tls import write_secret_file

__all__ = [
    "ACCESS_AUDIENCE",
    "AccessClaims",
    "AuthError",
    "TokenKey",
    "new_refresh_token",
    "new_session_id",
    "refresh_token_hash",
]

ACCESS_AUDIENCE = "kakehashi-client"
MAX_TOKEN_LENGTH = 4096
ISSUED_AT_LEEWAY = 60
"""Seconds an `iat` may lie ahead of the node clock (the clock may be stepped by NTP)."""


class AuthError(TrustError):
    """A login, refresh or access token was refused.

    `code` is one of bad_credentials, bad_token, token_expired, user_disabled,
    session_revoked, too_many_attempts; `status` is the HTTP status an API answers
    with, and `retry_after` the seconds to wait (too_many_attempts only).
    """

    default_code = "bad_token"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        hint: str | None = None,
        status: int = 401,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.status = status
        self.retry_after = retry_after


def _bad_token(why: str) -> AuthError:
    return AuthError(f"access token refused: {why}", code="bad_token")


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessClaims:
    """What an access token says."""

    issuer: str
    """Node id of the node that issued it (and alone accepts it)."""
    user_id: str
    """`login@node`."""
    role: StaffRole
    """The user's role when the token was issued."""
    issued_at: int
    """Unix seconds."""
    expires_at: int
    """Unix seconds from which the token is refused."""
    token_id: str
    """Random id (`jti`)."""
    session_id: str
    """The login session (`sid`); revoking the session refuses the token."""

    def to_json(self) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "aud": ACCESS_AUDIENCE,
            "sub": self.user_id,
            "role": self.role.value,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "jti": self.token_id,
            "sid": self.session_id,
        }


class TokenKey:
    """The node's access-token key."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self._public = key.private.public_key()

    @classmethod
    def load_or_create(cls, path: Path) -> TokenKey:
        """The key at `path`, made (mode 0600) if there is none yet."""
        if not path.exists():
            key = SigningKey.generate()
            write_secret_file(path, key.to_pem())
            return cls(key)
        try:
            return cls(SigningKey.from_pem(path.read_bytes()))
        except OSError as exc:
            raise TrustError(f"cannot read the token key {path}: {exc}", code="bad_key") from exc

    @property
    def key_id(self) -> str:
        return self._key.key_id

    def issue(self, claims: AccessClaims) -> str:
        """The signed compact JWT carrying `claims`."""
        return jwt.encode(
            claims.to_json(),
            self._key.private,
            algorithm="EdDSA",
            headers={"kid": self.key_id, "typ": "at+jwt"},
        )

    def verify(self, token: str, *, issuer: str, now: float) -> AccessClaims:
        """The claims of `token` if this key signed it for `issuer` and it has not expired
        at `now`; `AuthError` bad_token or token_expired otherwise."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise _bad_token("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise _bad_token("malformed") from exc
        if header.get("alg") != "EdDSA" or header.get("kid") != self.key_id:
            raise _bad_token("not signed by this node's token key")
        try:
            raw = jwt.decode(
                token,
                self._public,
                algorithms=["EdDSA"],
                audience=ACCESS_AUDIENCE,
                issuer=issuer,
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iss", "aud", "sub", "role", "iat", "exp", "jti", "sid"],
                },
            )
        except jwt.InvalidTokenError as exc:
            raise _bad_token(str(exc)) from exc
        try:
            claims = AccessClaims(
                issuer=str(raw["iss"]),
                user_id=str(raw["sub"]),
                role=StaffRole(raw["role"]),
                issued_at=_integer(raw["iat"]),
                expires_at=_integer(raw["exp"]),
                token_id=str(raw["jti"]),
                session_id=str(raw["sid"]),
            )
        except (TypeError, ValueError) as exc:
            raise _bad_token("malformed claims") from exc
        if claims.issued_at > now + ISSUED_AT_LEEWAY:
            raise _bad_token("issued in the future")
        if now >= claims.expires_at:
            raise AuthError(
                "access token expired", code="token_expired", hint="refresh it, or log in again"
            )
        return claims


def _integer(value: object) -> int:
    if type(value) is not int:
        raise TypeError("expected an integer")
    return value


def new_refresh_token() -> str:
    """32 random bytes, base64url without padding."""
    return secrets.token_urlsafe(32)


def refresh_token_hash(token: str) -> bytes:
    """What the node stores and looks up for a refresh token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_session_id() -> str:
    """Random id of a login session (the family of its refresh tokens)."""
    return secrets.token_urlsafe(16)
