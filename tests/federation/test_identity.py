"""Node ids, local government codes and key ids."""

from __future__ import annotations

import hashlib

import pytest

from federation.errors import ProtocolError
from federation.identity import (
    check_federation_id,
    check_municipality_code,
    check_node_id,
    check_segment_name,
    key_id,
    municipality_check_digit,
)

# --- node ids -----------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["tsu", "mie-pref", "a1", "yokkaichi", "ab", "a" * 32])
def test_valid_node_id_is_returned_unchanged(node_id: str) -> None:
    assert check_node_id(node_id) == node_id


@pytest.mark.parametrize(
    "node_id",
    [
        "T",  # uppercase and too short
        "Tsu",  # uppercase
        "tsu-",  # ends with '-'
        "-tsu",  # starts with '-'
        "1tsu",  # starts with a digit
        "a",  # too short
        "a" * 33,  # too long
        "ts_u",  # underscore
        "ts--u",  # double hyphen
        "ts u",  # space
        "tsu\n",  # trailing newline ($ would match before it)
        "津",  # not ASCII
        "",
    ],
)
def test_malformed_node_id_is_refused_as_bad_node_id(node_id: str) -> None:
    with pytest.raises(ProtocolError) as info:
        check_node_id(node_id)
    assert info.value.code == "bad_node_id"


@pytest.mark.parametrize("node_id", [None, 42, b"tsu", ["tsu"]], ids=repr)
def test_node_id_that_is_not_a_string_is_refused_as_bad_node_id(node_id: object) -> None:
    with pytest.raises(ProtocolError) as info:
        check_node_id(node_id)
    assert info.value.code == "bad_node_id"


def test_federation_id_with_random_suffix_is_accepted_and_junk_refused() -> None:
    assert check_federation_id("mie-renkei-7f3a") == "mie-renkei-7f3a"
    for bad in ["Mie", "m", "mie-", "mie_renkei", "mie-renkei\n", "a" * 65, 7]:
        with pytest.raises(ProtocolError) as info:
            check_federation_id(bad)
        assert info.value.code == "bad_federation_id"


def test_segment_names_are_lowercase_labels() -> None:
    assert check_segment_name("lgwan") == "lgwan"
    assert check_segment_name("internet") == "internet"
    for bad in ["LGWAN", "", "1net", "lg wan", "lgwan\n", None]:
        with pytest.raises(ProtocolError) as info:
            check_segment_name(bad)
        assert info.value.code == "bad_segment"


# --- local government codes ---------------------------------------------------------------

# Real codes from the 総務省 list of 全国地方公共団体コード.
REAL_CODES = {
    "240001": "三重県",
    "242012": "津市",
    "242021": "四日市市",  # remainder 0: 11 - 0 = 11, check digit 1
    "242039": "伊勢市",
    "242047": "松阪市",
    "130001": "東京都",
    "131130": "渋谷区",  # remainder 1: 11 - 1 = 10, check digit 0
    "011002": "札幌市",
}


@pytest.mark.parametrize("code", sorted(REAL_CODES), ids=lambda c: f"{c}-{REAL_CODES[c]}")
def test_real_local_government_code_is_accepted(code: str) -> None:
    assert check_municipality_code(code) == code


@pytest.mark.parametrize("code", sorted(REAL_CODES), ids=lambda c: f"{c}-{REAL_CODES[c]}")
def test_check_digit_of_real_code_matches_its_last_digit(code: str) -> None:
    assert municipality_check_digit(code[:5]) == int(code[5])


@pytest.mark.parametrize("code", sorted(REAL_CODES))
def test_real_code_with_any_other_last_digit_is_refused(code: str) -> None:
    for digit in "0123456789":
        if digit == code[5]:
            continue
        with pytest.raises(ProtocolError) as info:
            check_municipality_code(code[:5] + digit)
        assert info.value.code == "bad_municipality_code"


def test_wrong_check_digit_message_names_the_correct_code() -> None:
    with pytest.raises(ProtocolError) as info:
        check_municipality_code("242013")  # Tsu is 242012
    assert info.value.code == "bad_municipality_code"
    assert "expected 242012" in str(info.value)


@pytest.mark.parametrize(
    "code",
    ["24201", "2420120", "24201a", "", " 242012", "242012\n", "２４２０１２", 242012, None],
    ids=repr,
)
def test_code_that_is_not_six_ascii_digits_is_refused(code: object) -> None:
    with pytest.raises(ProtocolError) as info:
        check_municipality_code(code)
    assert info.value.code == "bad_municipality_code"


# --- key ids ------------------------------------------------------------------------------


def test_key_id_is_the_first_16_hex_characters_of_sha256_of_the_raw_key() -> None:
    raw = bytes(range(32))
    assert key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]
    # the same digest, written out independently (sha256 of bytes 0..31)
    assert key_id(raw) == "630dcd2966c43366"


def test_different_keys_have_different_key_ids() -> None:
    assert key_id(b"\x00" * 32) != key_id(b"\x00" * 31 + b"\x01")
