"""The roster wire format is pinned by tests/vectors/roster_v1.json.

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
