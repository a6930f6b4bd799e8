"""Invitation tokens, the join state machine, and the join messages."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import codec
from federation.errors import ProtocolError, TrustError
from federation.invites import (
    CLOCK_LEEWAY_SECONDS,
    JOIN_AUDIENCE,
    JOIN_TABLE,
    Approval,
    Invitation,
    JoinEffect,
    JoinInput,
    JoinReply,
    JoinRequest,
    JoinState,
    JoinStatus,
    check_not_expired,
    issue_invitation,
    join_transition,
    new_nonce,
    parse_duration,
    read_invitation,
    verify_invitation,
)
from federation.roster import Endpoint
from federation.signing import SigningKey

FEDERATION_ID = "mie-renkei-7f3a"
ISSUED = 1_700_000_000
EXPIRES = ISSUED + 72 * 3600


def signing_key(seed: int) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


FEDERATION_KEY = signing_key(100)
OTHER_KEY = signing_key(101)


def invitation(**overrides: Any) -> Invitation:
    fields: dict[str, Any] = {
        "federation_id": FEDERATION_ID,
        "node_id": "ise",
        "authority_endpoints": ("https://mie-pref.lgwan.example.lg.jp:8443",),
        "ca_fingerprint": bytes(range(32)),
        "federation_key_id": FEDERATION_KEY.key_id,
        "nonce": "n0nce-AAAAAAAAAAAAAAAA",
        "issued_at": ISSUED,
        "expires_at": EXPIRES,
    }
    fields.update(overrides)
    return Invitation(**fields)


def token_for(inv: Invitation | None = None) -> str:
    return issue_invitation(inv or invitation(), FEDERATION_KEY)


def verify(token: str, **overrides: Any) -> Invitation:
    arguments: dict[str, Any] = {
        "federation_key": FEDERATION_KEY.public_raw,
        "now": ISSUED + 10,
        "federation_id": FEDERATION_ID,
    }
    arguments.update(overrides)
    key = arguments.pop("federation_key")
    return verify_invitation(token, key, **arguments)


def refused_token(token: str, **overrides: Any) -> TrustError:
    with pytest.raises(TrustError) as info:
        verify(token, **overrides)
    return info.value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- issuing and verifying ----------------------------------------------------------------


def test_issued_invitation_verifies_to_the_same_claims() -> None:
    inv = invitation(approval=Approval.MANUAL, relay=True)
    assert verify(token_for(inv), node_id="ise") == inv


def test_token_is_an_eddsa_jwt_for_the_join_audience_naming_its_key() -> None:
    token = token_for()
    header = json.loads(unb64url(token.split(".")[0]))
    claims = json.loads(unb64url(token.split(".")[1]))
    assert header["alg"] == "EdDSA"
    assert header["kid"] == FEDERATION_KEY.key_id
    assert claims["aud"] == JOIN_AUDIENCE
    assert claims["sub"] == "ise"
    assert claims["iss"] == FEDERATION_ID
    assert claims["ca"] == bytes(range(32)).hex()


def test_invitation_must_be_issued_with_the_key_it_names() -> None:
    with pytest.raises(TrustError) as info:
        issue_invitation(invitation(), OTHER_KEY)
    assert info.value.code == "bad_token"


def test_token_verified_with_another_federation_key_is_refused_as_forged() -> None:
    assert refused_token(token_for(), federation_key=OTHER_KEY.public_raw).code == "token_forged"


def test_token_signed_by_another_key_is_refused_as_forged() -> None:
    # Someone with their own key mints a token naming the real federation key id.
    forged = jwt.encode(invitation().to_claims(), OTHER_KEY.private, algorithm="EdDSA")
    assert refused_token(forged).code == "token_forged"


def test_token_with_an_edited_payload_is_refused_as_forged() -> None:
    header, payload, signature = token_for().split(".")
    claims = json.loads(unb64url(payload))
    claims["sub"] = "kuwana"
    edited = ".".join([header, b64url(json.dumps(claims).encode()), signature])
    assert read_invitation(edited).node_id == "kuwana"  # the edit really took
    assert refused_token(edited).code == "token_forged"


def test_token_with_a_truncated_signature_is_refused() -> None:
    token = token_for()
    refused_token(token[:-4])


def test_unsigned_token_is_refused() -> None:
    unsigned = jwt.encode(invitation().to_claims(), None, algorithm="none")
    assert refused_token(unsigned).code == "bad_token"


def test_hmac_token_keyed_with_the_public_key_is_refused() -> None:
    # The classic algorithm-confusion attack: HS256 with the (public) verification key.
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(invitation().to_claims()).encode())
    mac = hmac.new(FEDERATION_KEY.public_raw, f"{header}.{payload}".encode(), hashlib.sha256)
    token = f"{header}.{payload}.{b64url(mac.digest())}"
    refused_token(token)


def test_token_for_another_audience_is_refused() -> None:
    claims = {**invitation().to_claims(), "aud": "something-else"}
    token = jwt.encode(claims, FEDERATION_KEY.private, algorithm="EdDSA")
    assert refused_token(token).code == "bad_token"


def test_token_for_another_federation_is_refused_as_forged() -> None:
    assert refused_token(token_for(), federation_id="aichi-renkei-0b1c").code == "token_forged"


def test_token_naming_another_federation_key_id_is_refused_as_forged() -> None:
    claims = {**invitation().to_claims(), "fk": OTHER_KEY.key_id}
    token = jwt.encode(claims, FEDERATION_KEY.private, algorithm="EdDSA")
    assert refused_token(token).code == "token_forged"


def test_token_for_another_node_is_refused_as_wrong_node_with_a_hint() -> None:
    error = refused_token(token_for(), node_id="kuwana")
    assert error.code == "token_wrong_node"
    assert error.hint is not None
    assert "--node-id ise" in error.hint


def test_malformed_federation_key_is_refused_as_bad_token() -> None:
    assert refused_token(token_for(), federation_key=b"\x01" * 31).code == "bad_token"


def test_verification_does_not_check_expiry() -> None:
    # Expiry applies to the first use only and is checked by check_not_expired.
    assert verify(token_for(), now=EXPIRES + 10 * 86400) == invitation()


def test_verification_tolerates_surrounding_whitespace() -> None:
    assert verify(f"  {token_for()}\n") == invitation()


# --- expiry -------------------------------------------------------------------------------


def test_first_use_before_expiry_is_allowed() -> None:
    check_not_expired(invitation(), ISSUED)
    check_not_expired(invitation(), EXPIRES)


def test_first_use_within_the_clock_leeway_after_expiry_is_allowed() -> None:
    assert CLOCK_LEEWAY_SECONDS == 60
    check_not_expired(invitation(), EXPIRES + 60)


def test_first_use_past_expiry_and_leeway_is_refused_as_expired() -> None:
    with pytest.raises(TrustError) as info:
        check_not_expired(invitation(), EXPIRES + 61)
    assert info.value.code == "token_expired"
    assert info.value.hint is not None
    assert "peer invite ise" in info.value.hint


# --- reading without verifying ------------------------------------------------------------


def test_read_invitation_returns_the_claims_without_a_key() -> None:
    assert read_invitation(token_for()) == invitation()


@pytest.mark.parametrize(
    "token",
    ["garbage", "a.b.c", "", "   ", "x" * 5000, "eyJhbGciOiJFZERTQSJ9.e30.AAAA"],
    ids=["word", "three-parts", "empty", "blank", "too-long", "empty-claims"],
)
def test_read_invitation_on_garbage_raises_protocol_error_bad_token(token: str) -> None:
    with pytest.raises(ProtocolError) as info:
        read_invitation(token)
    assert info.value.code == "bad_token"


def test_read_invitation_refuses_a_non_string() -> None:
    with pytest.raises(ProtocolError) as info:
        read_invitation(b"a.b.c")  # type: ignore[arg-type]
    assert info.value.code == "bad_token"


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"ca": "zz"}, "bad_token"),
        ({"ca": "00" * 31}, "bad_token"),
        ({"endpoints": ["http://insecure.example"]}, "bad_token"),
        ({"endpoints": []}, "bad_token"),
        ({"endpoints": 5}, "bad_token"),
        ({"jti": "short"}, "bad_token"),
        ({"fk": "NOT-HEX-KEY-ID!!"}, "bad_token"),
        ({"exp": ISSUED}, "bad_token"),
        ({"approval": "sometimes"}, "bad_token"),
        ({"sub": "Not_A_Node"}, "bad_node_id"),
        ({"iss": "Not A Federation"}, "bad_federation_id"),
    ],
    ids=repr,
)
def test_read_invitation_refuses_invalid_claims(claims: dict[str, Any], code: str) -> None:
    # Signed by PyJWT: the claims, not the encoding, are what is wrong.
    token = jwt.encode(
        {**invitation().to_claims(), **claims}, Ed25519PrivateKey.generate(), algorithm="EdDSA"
    )
    with pytest.raises(ProtocolError) as info:
        read_invitation(token)
    assert info.value.code == code


def test_new_nonce_is_a_valid_and_fresh_invitation_nonce() -> None:
    first, second = new_nonce(), new_nonce()
    assert first != second
    assert invitation(nonce=first).nonce == first


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("72h", 72 * 60 * 60),
        ("7d", 7 * 24 * 60 * 60),
        ("30m", 30 * 60),
        ("2w", 14 * 24 * 60 * 60),
        ("90s", 90),
        (" 12 h ", 12 * 60 * 60),
    ],
)
def test_duration_is_parsed_to_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_72_hours_is_259200_seconds() -> None:
    assert parse_duration("72h") == 259200


@pytest.mark.parametrize(
    "text", ["", "72", "h", "0h", "-1h", "1.5h", "72H", "7 days", "1y", "1234567s", "1h30m"]
)
def test_malformed_duration_is_refused(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_duration(text)
    assert info.value.code == "bad_duration"


# --- the join state machine ---------------------------------------------------------------

ALL_PAIRS = [(state, event) for state in JoinState for event in JoinInput]


@pytest.mark.parametrize(
    ("state", "event"), ALL_PAIRS, ids=[f"{s.value}-{e.name}" for s, e in ALL_PAIRS]
)
def test_every_state_and_input_pair_is_either_in_the_table_or_refused(
    state: JoinState, event: JoinInput
) -> None:
    if (state, event) in JOIN_TABLE:
        assert join_transition(state, event) == JOIN_TABLE[(state, event)]
    else:
        with pytest.raises(ProtocolError) as info:
            join_transition(state, event)
        assert info.value.code == "invalid_join_transition"
        assert info.value.status == 409


def test_first_use_inputs_apply_only_to_a_fresh_invitation() -> None:
    first_use = {JoinInput.REQUEST_AUTO, JoinInput.REQUEST_MANUAL}
    states = {state for state, event in JOIN_TABLE if event in first_use}
    assert states == {JoinState.ISSUED}


def test_operator_decisions_apply_only_to_a_pending_join() -> None:
    decisions = {JoinInput.APPROVE, JoinInput.DENY}
    states = {state for state, event in JOIN_TABLE if event in decisions}
    assert states == {JoinState.PENDING}


def test_no_transition_leaves_approved_or_denied() -> None:
    for (state, _), (_, target) in JOIN_TABLE.items():
        if state in {JoinState.APPROVED, JoinState.DENIED}:
            assert target == state


def test_only_the_first_user_of_a_used_invitation_is_answered() -> None:
    for state in (JoinState.PENDING, JoinState.APPROVED, JoinState.DENIED):
        effect, _ = join_transition(state, JoinInput.REQUEST_OTHER_KEYS)
        assert effect is JoinEffect.REFUSE_REUSED


def run(*events: JoinInput) -> tuple[list[JoinEffect], JoinState]:
    state = JoinState.ISSUED
    effects = []
    for event in events:
        effect, state = join_transition(state, event)
        effects.append(effect)
    return effects, state


def test_auto_approval_request_admits_at_once() -> None:
    assert run(JoinInput.REQUEST_AUTO) == ([JoinEffect.ADMIT], JoinState.APPROVED)


def test_retry_after_admission_redelivers_the_same_answer() -> None:
    effects, state = run(JoinInput.REQUEST_AUTO, JoinInput.REQUEST_SAME_KEYS)
    assert effects == [JoinEffect.ADMIT, JoinEffect.DELIVER]
    assert state is JoinState.APPROVED


def test_manual_request_is_held_until_an_operator_approves_then_admitted() -> None:
    effects, state = run(
        JoinInput.REQUEST_MANUAL,
        JoinInput.REQUEST_SAME_KEYS,
        JoinInput.APPROVE,
        JoinInput.REQUEST_SAME_KEYS,
    )
    assert effects == [JoinEffect.HOLD, JoinEffect.HOLD, JoinEffect.ADMIT, JoinEffect.DELIVER]
    assert state is JoinState.APPROVED


def test_second_request_with_other_keys_after_admission_is_refused_as_reused() -> None:
    effects, state = run(JoinInput.REQUEST_AUTO, JoinInput.REQUEST_OTHER_KEYS)
    assert effects == [JoinEffect.ADMIT, JoinEffect.REFUSE_REUSED]
    assert state is JoinState.APPROVED


def test_request_with_other_keys_while_pending_is_refused_as_reused() -> None:
    effects, state = run(JoinInput.REQUEST_MANUAL, JoinInput.REQUEST_OTHER_KEYS)
    assert effects == [JoinEffect.HOLD, JoinEffect.REFUSE_REUSED]
    assert state is JoinState.PENDING


def test_denied_join_retried_with_the_same_keys_is_refused_as_denied() -> None:
    effects, state = run(JoinInput.REQUEST_MANUAL, JoinInput.DENY, JoinInput.REQUEST_SAME_KEYS)
    assert effects == [JoinEffect.HOLD, JoinEffect.NOTE_DENIED, JoinEffect.REFUSE_DENIED]
    assert state is JoinState.DENIED


def test_invitation_cannot_be_used_as_a_first_request_twice() -> None:
    with pytest.raises(ProtocolError) as info:
        run(JoinInput.REQUEST_AUTO, JoinInput.REQUEST_AUTO)
    assert info.value.code == "invalid_join_transition"


def test_denied_join_cannot_be_approved_afterwards() -> None:
    with pytest.raises(ProtocolError) as info:
        run(JoinInput.REQUEST_MANUAL, JoinInput.DENY, JoinInput.APPROVE)
    assert info.value.code == "invalid_join_transition"


# --- join messages ------------------------------------------------------------------------

CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nMIGb\n-----END CERTIFICATE REQUEST-----\n"


def join_request(**overrides: Any) -> JoinRequest:
    fields: dict[str, Any] = {
        "token": token_for(),
        "name": "伊勢市",
        "code": "242039",
        "endpoints": (Endpoint(segment="lgwan", url="https://ise.lgwan.example.lg.jp:8443"),),
        "signing_key": signing_key(5).public_raw,
        "csr_pem": CSR,
    }
    fields.update(overrides)
    return JoinRequest(**fields)


def join_request_wire(**changes: Any) -> dict[str, Any]:
    request = join_request()
    wire: dict[str, Any] = {
        "token": request.token,
        "name": request.name,
        "code": request.code,
        "endpoints": [e.to_wire() for e in request.endpoints],
        "signing_key": request.signing_key,
        "csr": request.csr_pem,
    }
    wire.update(changes)
    return wire


def test_join_request_round_trips_through_bytes() -> None:
    request = join_request()
    assert JoinRequest.from_bytes(request.to_bytes()) == request


def test_join_request_without_a_code_round_trips() -> None:
    request = join_request(code=None)
    assert JoinRequest.from_bytes(request.to_bytes()) == request


def test_join_request_bytes_match_the_documented_fields() -> None:
    assert join_request().to_bytes() == codec.encode(join_request_wire())


@pytest.mark.parametrize("missing", sorted(join_request_wire()))
def test_join_request_missing_a_field_is_refused(missing: str) -> None:
    wire = join_request_wire()
    del wire[missing]
    with pytest.raises(ProtocolError):
        JoinRequest.from_bytes(codec.encode(wire))


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "伊勢市".encode()},
        {"name": ""},
        {"signing_key": "k" * 32},
        {"signing_key": b"k" * 31},
        {"csr": CSR.decode()},
        {"csr": b"-----BEGIN CERTIFICATE-----\n"},
        {"code": "242038"},
        {"code": 242039},
        {"token": ""},
        {"endpoints": [{"segment": "lgwan", "url": "http://ise"}]},
        {"endpoints": "https://ise"},
    ],
    ids=repr,
)
def test_join_request_with_a_bad_field_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        JoinRequest.from_bytes(codec.encode(join_request_wire(**changes)))


def test_join_request_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(ProtocolError):
        JoinRequest.from_bytes(codec.encode(["token"]))


def admitted_reply() -> JoinReply:
    return JoinReply(
        status=JoinStatus.ADMITTED,
        certificate_pem=b"-----BEGIN CERTIFICATE-----\nleaf\n",
        ca_pem=b"-----BEGIN CERTIFICATE-----\nca\n",
        roster=b"\x83signed roster",
    )


def test_admitted_join_reply_round_trips_through_bytes() -> None:
    reply = admitted_reply()
    assert JoinReply.from_bytes(reply.to_bytes()) == reply


def test_pending_join_reply_round_trips_with_nothing_attached() -> None:
    reply = JoinReply(status=JoinStatus.PENDING)
    decoded = JoinReply.from_bytes(reply.to_bytes())
    assert decoded == reply
    assert decoded.status is JoinStatus.PENDING


def test_admitted_reply_without_certificate_ca_or_roster_is_refused() -> None:
    for field in ("certificate_pem", "ca_pem", "roster"):
        with pytest.raises(ProtocolError) as info:
            replace(admitted_reply(), **{field: b""})
        assert info.value.code == "bad_join_reply"


def reply_wire(**changes: Any) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "status": "admitted",
        "certificate": b"cert",
        "ca": b"ca",
        "roster": b"roster",
    }
    wire.update(changes)
    return wire


@pytest.mark.parametrize("missing", sorted(reply_wire()))
def test_join_reply_missing_a_field_is_refused(missing: str) -> None:
    wire = reply_wire()
    del wire[missing]
    with pytest.raises(ProtocolError) as info:
        JoinReply.from_bytes(codec.encode(wire))
    assert info.value.code == "bad_join_reply"


@pytest.mark.parametrize(
    "changes",
    [{"status": "maybe"}, {"certificate": "cert"}, {"ca": 5}, {"roster": [1]}],
    ids=repr,
)
def test_join_reply_with_a_bad_field_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        JoinReply.from_bytes(codec.encode(reply_wire(**changes)))
    assert info.value.code == "bad_join_reply"


# --- properties ---------------------------------------------------------------------------

NO_DB = settings(database=None, deadline=None)


def signed_token(payload: bytes) -> str:
    """A correctly signed EdDSA token whose payload is exactly `payload` (JSON or not)."""
    header = b64url(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64url(payload)}"
    return f"{signing_input}.{b64url(FEDERATION_KEY.sign(signing_input.encode()))}"


def test_signed_token_helper_makes_tokens_that_verify() -> None:
    payload = json.dumps(invitation().to_claims()).encode()
    assert verify(signed_token(payload)) == invitation()


def test_infinite_timestamp_is_refused_as_bad_token() -> None:
    claims = json.dumps(invitation().to_claims()).replace(f'"iat": {ISSUED}', '"iat": 1e400')
    assert "1e400" in claims
    token = signed_token(claims.encode())
    with pytest.raises(ProtocolError) as info:
        read_invitation(token)
    assert info.value.code == "bad_token"
    with pytest.raises(ProtocolError) as info:
        verify(token)
    assert info.value.code == "bad_token"


@pytest.mark.parametrize("payload", [b"[" * 1500, b'{"":[' * 550], ids=["array", "object"])
def test_deeply_nested_token_payload_is_refused_not_crashed(payload: bytes) -> None:
    token = signed_token(payload)
    assert len(token) <= 4096  # fits in a token; must be refused as malformed
    with pytest.raises(ProtocolError) as info:
        read_invitation(token)
    assert info.value.code == "bad_token"
    with pytest.raises(TrustError) as trust:
        verify(token)
    assert trust.value.code == "bad_token"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["https://x", "auto", "manual", "ise", "00" * 32, "0123456789abcdef"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
CLAIM_NAMES = sorted(invitation().to_claims())


@settings(NO_DB, max_examples=100)
@given(st.dictionaries(st.sampled_from(CLAIM_NAMES), json_values, min_size=1, max_size=3))
def test_signed_token_with_any_claims_changed_raises_only_kakehashi_errors(
    changes: dict[str, Any],
) -> None:
    claims = json.dumps({**invitation().to_claims(), **changes}, allow_nan=True)
    token = signed_token(claims.encode())
    with contextlib.suppress(ProtocolError):
        read_invitation(token)
    with contextlib.suppress(ProtocolError, TrustError):
        verify(token, node_id="ise")


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=5,
)


@settings(NO_DB, max_examples=100)
@given(
    st.dictionaries(st.sampled_from(sorted(join_request_wire())), msgpack_values, max_size=3),
    st.sets(st.sampled_from(sorted(join_request_wire())), max_size=2),
)
def test_join_request_with_fields_changed_or_removed_raises_only_protocol_error(
    changes: dict[str, Any], removed: set[str]
) -> None:
    wire = join_request_wire(**changes)
    for name in removed:
        del wire[name]
    try:
        request = JoinRequest.from_bytes(codec.encode(wire))
    except ProtocolError:
        return
    # Whatever is accepted is well formed: it re-encodes and reads back as itself.
    assert JoinRequest.from_bytes(request.to_bytes()) == request


@settings(NO_DB, max_examples=60)
@given(
    st.dictionaries(st.sampled_from(sorted(reply_wire())), msgpack_values, max_size=3),
    st.sets(st.sampled_from(sorted(reply_wire())), max_size=2),
)
def test_join_reply_with_fields_changed_or_removed_raises_only_protocol_error(
    changes: dict[str, Any], removed: set[str]
) -> None:
    wire = reply_wire(**changes)
    for name in removed:
        del wire[name]
    try:
        reply = JoinReply.from_bytes(codec.encode(wire))
    except ProtocolError:
        return
    # Whatever is accepted is well formed: it re-encodes and reads back as itself.
    assert JoinReply.from_bytes(reply.to_bytes()) == reply


@settings(NO_DB, max_examples=200)
@given(st.binary(max_size=500))
def test_arbitrary_bytes_as_join_messages_raise_only_protocol_error(data: bytes) -> None:
    for parse in (JoinRequest.from_bytes, JoinReply.from_bytes):
        with contextlib.suppress(ProtocolError):
            parse(data)


# --- interoperability with PyJWT ----------------------------------------------------------


def test_pyjwt_verifies_a_token_issued_here() -> None:
    key = FEDERATION_KEY
    token = issue_invitation(invitation(), key)
    claims = jwt.decode(
        token,
        key.private.public_key(),
        algorithms=["EdDSA"],
        audience="kakehashi-join",
        options={"verify_exp": False},
    )
    assert claims["sub"] == invitation().node_id
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": key.key_id, "typ": "JWT"}


def test_a_token_signed_by_pyjwt_with_the_federation_key_verifies_here() -> None:
    key = FEDERATION_KEY
    claims = invitation().to_claims()
    token = jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.key_id})
    assert (
        verify_invitation(
            token,
            key.public_raw,
            now=ISSUED,
            federation_id=invitation().federation_id,
        ).nonce
        == invitation().nonce
    )


@pytest.mark.parametrize("algorithm", ["none", "HS256"])
def test_tokens_with_another_algorithm_are_refused_even_with_valid_claims(algorithm: str) -> None:
    key = FEDERATION_KEY
    claims = invitation().to_claims()
    secret = None if algorithm == "none" else key.public_raw.hex()
    token = jwt.encode(claims, secret, algorithm=algorithm)
    with pytest.raises(TrustError) as info:
        verify_invitation(
            token, key.public_raw, now=ISSUED, federation_id=invitation().federation_id
        )
    assert info.value.code == "bad_token"
