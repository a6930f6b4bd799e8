"""Write roster_v1.json and envelope_v1.json: fixed documents, their bytes and signatures.

roster_v1.json holds a fixed roster, its canonical bytes, its signature and key id.
envelope_v1.json holds a fixed batch of three envelopes signed together (a room's
creation, a message and a reaction to it): each one's wire bytes and id, and the batch
root and signature.

The files pin the roster and envelope wire formats. `tests/federation/test_vectors.py` rebuilds the
same roster with today's code and requires identical bytes, so any change to the
encoding fails the suite until it is made deliberately: change the code, run

    PYTHONPATH=. python tests/vectors/make_vectors.py

from the repository root, and review the diff of roster_v1.json (every node in a
federation must be upgraded together when these bytes change).

Everything here is fixed: the keys come from constant 32-byte seeds, the times and
fingerprints are constants. Ed25519 signatures are deterministic, so the signature
is reproducible too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.envelope import Content, Envelope, Kind, seal_batch
from federation.roster import (
    Endpoint,
    MemberStatus,
    PublishedKey,
    Roster,
    RosterEntry,
    SignedRoster,
    sign_roster,
)
from federation.signing import SigningKey

VECTOR_FILE = Path(__file__).with_name("roster_v1.json")
ENVELOPE_VECTOR_FILE = Path(__file__).with_name("envelope_v1.json")

FEDERATION_SEED = bytes(range(32))
ISSUED_AT = 1_714_521_600  # 2024-05-01T00:00:00Z
JOINED_AT = 1_711_929_600  # 2024-04-01T00:00:00Z


def federation_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(FEDERATION_SEED))


def member_public_key(seed_byte: int) -> bytes:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed_byte]) * 32)).public_raw


def build_roster() -> Roster:
    """The fixed roster: an authority, an active city, a suspended town with a rotated key."""
    members = (
        RosterEntry(
            node_id="kihoku",
            name="紀北町",
            code="245437",
            endpoints=(Endpoint(segment="lgwan", url="https://kihoku.lgwan.example:8443"),),
            signing_keys=(
                PublishedKey(
                    public_key=member_public_key(3),
                    not_before=JOINED_AT,
                    not_after=JOINED_AT + 86_400,
                ),
                PublishedKey(public_key=member_public_key(4), not_before=JOINED_AT + 3_600),
            ),
            tls_fingerprint=bytes.fromhex("33" * 32),
            status=MemberStatus.SUSPENDED,
            status_reason="証明書の更新待ち",
            status_since=ISSUED_AT - 60,
            joined_at=JOINED_AT,
        ),
        RosterEntry(
            node_id="mie-pref",
            name="三重県",
            code="240001",
            endpoints=(
                Endpoint(segment="internet", url="https://mie-pref.example.jp"),
                Endpoint(segment="lgwan", url="https://mie-pref.lgwan.example:8443"),
            ),
            signing_keys=(PublishedKey(public_key=member_public_key(1), not_before=JOINED_AT),),
            tls_fingerprint=bytes.fromhex("11" * 32),
            relay=True,
            joined_at=JOINED_AT,
        ),
        RosterEntry(
            node_id="tsu",
            name="津市",
            code="242012",
            endpoints=(Endpoint(segment="lgwan", url="https://tsu.lgwan.example:8443"),),
            signing_keys=(PublishedKey(public_key=member_public_key(2), not_before=JOINED_AT),),
            tls_fingerprint=bytes.fromhex("22" * 32),
            joined_at=JOINED_AT,
        ),
    )
    return Roster(
        federation_id="mie-renkei-7f3a",
        federation_name="三重県 市町連携",
        version=1,
        issued_at=ISSUED_AT,
        authority="mie-pref",
        federation_key=federation_key().public_raw,
        ca_fingerprint=bytes.fromhex("c0" * 32),
        members=members,
    )


def build_signed_roster() -> SignedRoster:
    return sign_roster(build_roster(), federation_key())


def vectors() -> dict[str, str]:
    signed = build_signed_roster()
    return {
        "description": "Roster version 1 of a fixed federation; see make_vectors.py",
        "federation_seed_hex": FEDERATION_SEED.hex(),
        "federation_public_key_hex": federation_key().public_raw.hex(),
        "key_id": signed.key_id,
        "body_hex": signed.body.hex(),
        "signature_hex": signed.signature.hex(),
        "signed_roster_hex": signed.to_bytes().hex(),
    }


ENVELOPE_ROOM = "!bousai2024:mie-pref"
ENVELOPE_HLC = ISSUED_AT * 1000 << 16  # (unix ms << 16) | counter


def envelope_key() -> SigningKey:
    """mie-pref's node signing key (the key published for it in the roster above)."""
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32))


def build_envelope_contents() -> list[Content]:
    """Home seq 1-3 of a fixed room: its creation, a message, and a reaction to the message."""
    kid = envelope_key().key_id
    creation = Content(
        room=ENVELOPE_ROOM,
        origin="mie-pref",
        seq=1,
        kind=Kind.STATE,
        sender="",
        hlc=ENVELOPE_HLC,
        deps={},
        key_id=kid,
        body={
            "name": "防災連絡室",
            "add_nodes": ["tsu"],
            "set_users": {"tanaka@mie-pref": "admin", "suzuki@tsu": "member"},
        },
    )
    message = Content(
        room=ENVELOPE_ROOM,
        origin="mie-pref",
        seq=2,
        kind=Kind.MESSAGE,
        sender="tanaka@mie-pref",
        hlc=ENVELOPE_HLC + 1,
        deps={"mie-pref": 1},
        key_id=kid,
        body={"text": "台風10号の接近に伴い、避難所を開設しました。", "format": "plain"},
    )
    reaction = Content(
        room=ENVELOPE_ROOM,
        origin="mie-pref",
        seq=3,
        kind=Kind.REACTION,
        sender="tanaka@mie-pref",
        hlc=(ENVELOPE_HLC + (1500 << 16)),  # 1.5 s later
        deps={"mie-pref": 2},
        key_id=kid,
        body={"target": hashlib.sha256(message.to_bytes()).digest(), "emoji": "👍"},
    )
    return [creation, message, reaction]


def build_envelopes() -> list[Envelope]:
    return seal_batch(build_envelope_contents(), envelope_key())


def envelope_vectors() -> dict[str, object]:
    envelopes = build_envelopes()
    return {
        "description": "A batch of three envelopes signed together; see make_vectors.py",
        "origin_seed_hex": (bytes([1]) * 32).hex(),
        "origin_public_key_hex": envelope_key().public_raw.hex(),
        "key_id": envelope_key().key_id,
        "root_hex": envelopes[0].root().hex(),
        "signature_hex": envelopes[0].signature.hex(),
        "envelopes": [
            {
                "id_hex": envelope.id.hex(),
                "content_hex": envelope.content_bytes.hex(),
                "wire_hex": envelope.to_bytes().hex(),
            }
            for envelope in envelopes
        ],
    }


def main() -> None:
    VECTOR_FILE.write_text(
        json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {VECTOR_FILE}")
    ENVELOPE_VECTOR_FILE.write_text(
        json.dumps(envelope_vectors(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {ENVELOPE_VECTOR_FILE}")


if __name__ == "__main__":
    main()
