"""The JSON Schemas in schemas/ describe exactly what the code puts on the wire."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import pytest

from federation import codec
from federation.invites import (
    Approval,
    Invitation,
    JoinReply,
    JoinRequest,
    JoinStatus,
    issue_invitation,
)
from federation.roster import Endpoint, PublishedKey, Roster, RosterEntry, sign_roster
from federation.signing import SigningKey
from gateway.stream import answer_frame, request_frame
from gateway.transport import error_body

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def as_json(value: Any) -> Any:
    """msgpack values as the schemas describe them: bin becomes lowercase hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


def validate(name: str, wire: bytes) -> dict[str, Any]:
    document = as_json(codec.decode_map(wire, codec.Limits(max_bytes=1 << 20, max_bin=1 << 20)))
    jsonschema.validate(document, schema(name), cls=jsonschema.Draft202012Validator)
    return document


@pytest.fixture
def federation_key() -> SigningKey:
    return SigningKey.generate()


def roster(federation_key: SigningKey) -> Roster:
    member = RosterEntry(
        node_id="tsu",
        name="津市",
        code="242012",
        endpoints=(Endpoint(segment="lgwan", url="https://10.20.0.2:8443"),),
        signing_keys=(PublishedKey(public_key=SigningKey.generate().public_raw, not_before=1),),
        tls_fingerprint=bytes(range(32)),
        joined_at=1,
        previous_tls_fingerprint=bytes(range(1, 33)),  # a certificate rotation in progress
        previous_tls_until=1_790_086_400,
    )
    authority = RosterEntry(
        node_id="mie-pref",
        name="三重県",
        code="240001",
        endpoints=(Endpoint(segment="lgwan", url="https://10.20.0.1:8443"),),
        signing_keys=(PublishedKey(public_key=SigningKey.generate().public_raw, not_before=1),),
        tls_fingerprint=bytes(32),
        relay=True,
    )
    return Roster(
        federation_id="mie-pref-00aa11bb",
        federation_name="三重県 市町連携",
        version=2,
        issued_at=1_790_000_000,
        authority="mie-pref",
        federation_key=federation_key.public_raw,
        ca_fingerprint=bytes(range(32, 64)),
        members=(authority, member),
    )


def test_roster_and_signed_roster_match_their_schemas(federation_key: SigningKey) -> None:
    signed = sign_roster(roster(federation_key), federation_key)
    outer = validate("signed-roster", signed.to_bytes())
    assert outer["kid"] == federation_key.key_id
    body = validate("roster", signed.body)
    assert [m["node_id"] for m in body["members"]] == ["mie-pref", "tsu"]
    assert "previous_tls" in body["members"][1] and "previous_tls" not in body["members"][0]


def test_roster_schema_rejects_an_unknown_member_status(federation_key: SigningKey) -> None:
    document = as_json(codec.decode_map(roster(federation_key).to_bytes()))
    document["members"][1]["status"] = "gone"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema("roster"), cls=jsonschema.Draft202012Validator)


def test_invitation_claims_match_their_schema(federation_key: SigningKey) -> None:
    invitation = Invitation(
        federation_id="mie-pref-00aa11bb",
        node_id="tsu",
        authority_endpoints=("https://10.20.0.1:8443",),
        ca_fingerprint=bytes(32),
        federation_key_id=federation_key.key_id,
        nonce="abcdefghijklmnop",
        issued_at=100,
        expires_at=200,
        approval=Approval.MANUAL,
    )
    token = issue_invitation(invitation, federation_key)
    claims = jwt.decode(token, options={"verify_signature": False})
    jsonschema.validate(claims, schema("invitation"), cls=jsonschema.Draft202012Validator)
    assert jwt.get_unverified_header(token)["kid"] == federation_key.key_id


def test_join_messages_and_refusals_match_their_schemas(federation_key: SigningKey) -> None:
    request = JoinRequest(
        token="a.b.c",
        name="津市",
        code="242012",
        endpoints=(Endpoint(segment="lgwan", url="https://10.20.0.2:8443"),),
        signing_key=bytes(32),
        csr_pem=b"-----BEGIN CERTIFICATE REQUEST-----\nx\n-----END CERTIFICATE REQUEST-----\n",
    )
    validate("join-request", request.to_bytes())
    validate("join-reply", JoinReply(status=JoinStatus.PENDING).to_bytes())
    admitted = JoinReply(status=JoinStatus.ADMITTED, certificate_pem=b"c", ca_pem=b"a", roster=b"r")
    validate("join-reply", admitted.to_bytes())
    refusal = validate("error", error_body("token_reused", "already used", None))
    assert refusal["error"] == "token_reused"


def test_stream_frames_match_their_schema() -> None:
    batch = codec.encode_frame({"envelopes": [b"\x01\x02"]})
    request = validate("stream-frame", request_frame(7, "/envelopes", batch, 3))
    assert (request["id"], request["path"], request["roster"]) == (7, "/envelopes", 3)
    assert bytes.fromhex(request["body"]) == batch
    refusal = error_body("peer_suspended", "tsu is suspended", None)
    answer = validate("stream-frame", answer_frame(7, 403, refusal, 4))
    assert (answer["id"], answer["status"], answer["roster"]) == (7, 403, 4)
    validate("error", bytes.fromhex(answer["body"]))
    with pytest.raises(jsonschema.ValidationError):  # a frame is one or the other, whole
        validate("stream-frame", codec.encode_frame({"body": b"", "id": 7, "roster": 4}))
