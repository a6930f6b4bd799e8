"""Tests for gateway.tokens: access-token claims and expiry by a given clock, the token key file."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import jwt
import pytest

from federation.signing import SigningKey
from gateway.staff import StaffRole
from gateway.tokens import (
    ACCESS_AUDIENCE,
    AccessClaims,
    AuthError,
    TokenKey,
    new_refresh_token,
    refresh_token_hash,
)

NOW = 1_750_000_000


def _claims(**changes: object) -> AccessClaims:
    values: dict[str, object] = {
        "issuer": "tsu",
        "user_id": "tanaka@tsu",
        "role": StaffRole.ROOM_ADMIN,
        "issued_at": NOW,
        "expires_at": NOW + 900,
        "token_id": "j" * 22,
        "session_id": "s" * 22,
    }
    values.update(changes)
    return AccessClaims(**values)  # type: ignore[arg-type]


def _refused(key: TokenKey, token: str, *, now: float = NOW, issuer: str = "tsu") -> AuthError:
    with pytest.raises(AuthError) as refused:
        key.verify(token, issuer=issuer, now=now)
    return refused.value


def _segment(part: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


@pytest.fixture
def key() -> TokenKey:
    return TokenKey(SigningKey.generate())


def test_access_token_carries_the_claims_and_an_eddsa_header(key: TokenKey) -> None:
    token = key.issue(_claims())
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": key.key_id, "typ": "at+jwt"}
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw == {
        "iss": "tsu",
        "aud": ACCESS_AUDIENCE,
        "sub": "tanaka@tsu",
        "role": "room_admin",
        "iat": NOW,
        "exp": NOW + 900,
        "jti": "j" * 22,
        "sid": "s" * 22,
    }
    assert key.verify(token, issuer="tsu", now=NOW) == _claims()


def test_access_token_valid_until_one_second_before_exp_then_expired(key: TokenKey) -> None:
    token = key.issue(_claims())
    assert key.verify(token, issuer="tsu", now=NOW + 899.9).user_id == "tanaka@tsu"
    refused = _refused(key, token, now=NOW + 900)
    assert refused.code == "token_expired" and refused.status == 401


def test_expiry_is_judged_by_the_given_clock_not_the_process_clock(key: TokenKey) -> None:
    """A token from 2020 verifies at a 2020 `now`; PyJWT's own check would refuse it."""
    old = _claims(issued_at=1_600_000_000, expires_at=1_600_000_900)
    assert key.verify(key.issue(old), issuer="tsu", now=1_600_000_100) == old


def test_token_issued_in_the_future_is_refused(key: TokenKey) -> None:
    token = key.issue(_claims(issued_at=NOW + 120, expires_at=NOW + 1000))
    assert _refused(key, token).code == "bad_token"


def test_token_of_another_key_or_another_node_is_refused(key: TokenKey) -> None:
    other = TokenKey(SigningKey.generate())
    assert _refused(key, other.issue(_claims())).code == "bad_token"
    assert _refused(key, key.issue(_claims()), issuer="yokkaichi").code == "bad_token"


def test_tampered_payload_is_refused(key: TokenKey) -> None:
    header, _, signature = key.issue(_claims()).split(".")
    forged = _claims(role=StaffRole.NODE_ADMIN).to_json()
    assert _refused(key, f"{header}.{_segment(forged)}.{signature}").code == "bad_token"


def test_alg_none_and_hmac_tokens_are_refused(key: TokenKey) -> None:
    payload = _segment(_claims().to_json())
    none = f"{_segment({'alg': 'none', 'kid': key.key_id})}.{payload}."
    assert _refused(key, none).code == "bad_token"
    hmac = jwt.encode(
        _claims().to_json(), "secret" * 8, algorithm="HS256", headers={"kid": key.key_id}
    )
    assert _refused(key, hmac).code == "bad_token"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 5000])
def test_malformed_tokens_are_refused(key: TokenKey, token: str) -> None:
    assert _refused(key, token).code == "bad_token"


def test_token_missing_a_claim_is_refused(key: TokenKey) -> None:
    claims = _claims().to_json()
    del claims["sid"]
    token = jwt.encode(claims, key._key.private, algorithm="EdDSA", headers={"kid": key.key_id})
    assert _refused(key, token).code == "bad_token"


def test_token_key_is_created_on_first_use_with_mode_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    first = TokenKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = TokenKey.load_or_create(path)
    assert again.key_id == first.key_id
    token = first.issue(_claims())
    assert again.verify(token, issuer="tsu", now=NOW).user_id == "tanaka@tsu"


def test_refresh_tokens_are_32_random_bytes_stored_as_sha256() -> None:
    tokens = {new_refresh_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert len(refresh_token_hash(token)) == 32 and refresh_token_hash(token) != token.encode()
