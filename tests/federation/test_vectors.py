"""The roster and envelope wire formats are pinned by tests/vectors/roster_v1.json and
tests/vectors/envelope_v1.json.

If one of these tests fails, the bytes a node signs or sends have changed. That is
only acceptable as a deliberate, coordinated format change: regenerate the file with
tests/vectors/make_vectors.py and review its diff.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from federation import codec
from federation.envelope import SIGNING_CONTEXT, Envelope, Kind, RootCache, merkle_root
from federation.roster import Roster, SignedRoster, verify_roster
from federation.signing import verify_signature

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"


def _load_maker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kakehashi_make_vectors", VECTORS_DIR / "make_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()


@pytest.fixture(scope="module")
def stored() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS_DIR / "roster_v1.json").read_text("utf-8"))
    return data


def test_roster_built_today_encodes_to_exactly_the_stored_body(stored: dict[str, Any]) -> None:
    assert maker.build_roster().to_bytes().hex() == stored["body_hex"]


def test_signing_the_roster_today_yields_exactly_the_stored_signature(
    stored: dict[str, Any],
) -> None:
    signed = maker.build_signed_roster()
    assert signed.signature.hex() == stored["signature_hex"]
    assert signed.key_id == stored["key_id"]


def test_stored_signature_verifies_over_the_stored_body(stored: dict[str, Any]) -> None:
    public = bytes.fromhex(stored["federation_public_key_hex"])
    verify_signature(
        public, bytes.fromhex(stored["signature_hex"]), bytes.fromhex(stored["body_hex"])
    )


def test_stored_key_matches_the_stored_seed_and_key_id(stored: dict[str, Any]) -> None:
    assert bytes.fromhex(stored["federation_seed_hex"]) == maker.FEDERATION_SEED
    public = bytes.fromhex(stored["federation_public_key_hex"])
    assert maker.federation_key().public_raw == public
    assert stored["key_id"] == hashlib.sha256(public).hexdigest()[:16]


def test_stored_signed_roster_parses_verifies_and_decodes_to_the_built_roster(
    stored: dict[str, Any],
) -> None:
    signed = SignedRoster.from_bytes(bytes.fromhex(stored["signed_roster_hex"]))
    assert signed.body.hex() == stored["body_hex"]
    roster = verify_roster(signed, bytes.fromhex(stored["federation_public_key_hex"]))
    assert roster == maker.build_roster()
    assert maker.build_signed_roster().to_bytes().hex() == stored["signed_roster_hex"]


def test_stored_body_decodes_and_reencodes_to_itself(stored: dict[str, Any]) -> None:
    body = bytes.fromhex(stored["body_hex"])
    assert Roster.from_bytes(body).to_bytes() == body


def test_stored_body_starts_with_a_nine_key_map_whose_first_key_is_authority(
    stored: dict[str, Any],
) -> None:
    # Written by hand: fixmap(9), fixstr(9) "authority", fixstr(8) "mie-pref".
    expected = bytes.fromhex("89a9" + b"authority".hex() + "a8" + b"mie-pref".hex())
    assert bytes.fromhex(stored["body_hex"]).startswith(expected)


# --- envelopes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_envelopes() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS_DIR / "envelope_v1.json").read_text("utf-8"))
    return data


def test_envelope_batch_built_today_encodes_to_exactly_the_stored_bytes(
    stored_envelopes: dict[str, Any],
) -> None:
    built = maker.build_envelopes()
    stored = stored_envelopes["envelopes"]
    assert len(built) == len(stored) == 3
    for envelope, entry in zip(built, stored, strict=True):
        assert envelope.content_bytes.hex() == entry["content_hex"]
        assert envelope.to_bytes().hex() == entry["wire_hex"]
        assert envelope.id.hex() == entry["id_hex"]
    assert built[0].signature.hex() == stored_envelopes["signature_hex"]
    assert built[0].root().hex() == stored_envelopes["root_hex"]


def test_stored_envelopes_verify_alone_with_the_stored_public_key(
    stored_envelopes: dict[str, Any],
) -> None:
    public = bytes.fromhex(stored_envelopes["origin_public_key_hex"])
    for entry in stored_envelopes["envelopes"]:
        envelope = Envelope.from_bytes(bytes.fromhex(entry["wire_hex"]))
        RootCache().verify(envelope, public)
        assert envelope.id.hex() == entry["id_hex"]
        assert envelope.to_bytes().hex() == entry["wire_hex"]


def test_stored_envelope_ids_hash_their_content_into_the_signed_root(
    stored_envelopes: dict[str, Any],
) -> None:
    entries = stored_envelopes["envelopes"]
    contents = [bytes.fromhex(entry["content_hex"]) for entry in entries]
    ids = [hashlib.sha256(content).digest() for content in contents]
    assert [i.hex() for i in ids] == [entry["id_hex"] for entry in entries]
    root = merkle_root(ids)
    assert root.hex() == stored_envelopes["root_hex"]
    verify_signature(
        bytes.fromhex(stored_envelopes["origin_public_key_hex"]),
        bytes.fromhex(stored_envelopes["signature_hex"]),
        SIGNING_CONTEXT + root,
    )


def test_stored_envelope_key_matches_its_seed_and_the_roster_entry_of_mie_pref(
    stored_envelopes: dict[str, Any], stored: dict[str, Any]
) -> None:
    public = bytes.fromhex(stored_envelopes["origin_public_key_hex"])
    assert bytes.fromhex(stored_envelopes["origin_seed_hex"]) == bytes([1]) * 32
    assert maker.envelope_key().public_raw == public
    assert stored_envelopes["key_id"] == hashlib.sha256(public).hexdigest()[:16]
    roster = Roster.from_bytes(bytes.fromhex(stored["body_hex"]))
    (mie,) = [m for m in roster.members if m.node_id == "mie-pref"]
    assert mie.signing_keys[0].public_key == public


def test_stored_envelopes_decode_to_the_built_contents(stored_envelopes: dict[str, Any]) -> None:
    decoded = [
        Envelope.from_bytes(bytes.fromhex(entry["wire_hex"])).content
        for entry in stored_envelopes["envelopes"]
    ]
    assert decoded == maker.build_envelope_contents()
    assert [c.kind for c in decoded] == [Kind.STATE, Kind.MESSAGE, Kind.REACTION]
    assert decoded[2].body["target"].hex() == stored_envelopes["envelopes"][1]["id_hex"]


def test_stored_envelope_wire_and_content_start_as_written_by_hand(
    stored_envelopes: dict[str, Any],
) -> None:
    entry = stored_envelopes["envelopes"][0]
    # fixmap(5), fixstr(1) "c", bin8 of the content: keys c < i < n < p < sig.
    assert entry["wire_hex"].startswith("85a163c4")
    # fixmap(10), fixstr(4) "body": the header keys sorted, body first, v last.
    content = bytes.fromhex(entry["content_hex"])
    assert content.startswith(bytes.fromhex("8aa4" + b"body".hex()))
    header = ["body", "deps", "hlc", "kid", "kind", "origin", "room", "sender", "seq", "v"]
    assert list(codec.decode_map(content)) == header
