"""Canonical msgpack: one value, one encoding; strict, bounded decoding."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import codec
from federation.errors import ProtocolError


def refused(data: bytes, limits: codec.Limits = codec.DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data, limits)
    return info.value


def nested_lists(depth: int) -> bytes:
    """`depth` arrays inside each other, innermost empty, written by hand: 91 91 ... 90."""
    return b"\x91" * (depth - 1) + b"\x90"


# --- round trip and canonical form -------------------------------------------------------


def test_value_survives_encode_then_decode() -> None:
    value = {
        "name": "津市",
        "code": "242012",
        "key": bytes(range(32)),
        "version": 7,
        "negative": -129,
        "big": 2**63,
        "flags": [True, False, None],
        "nested": {"z": [], "a": {}},
    }
    assert codec.decode(codec.encode(value)) == value


def test_map_keys_are_sorted_whatever_the_insertion_order() -> None:
    expected = bytes.fromhex("82a16102a16201")  # {"a": 2, "b": 1}, written by hand
    assert codec.encode({"b": 1, "a": 2}) == expected
    assert codec.encode({"a": 2, "b": 1}) == expected


def test_map_keys_sort_by_utf8_bytes_not_by_encoded_length() -> None:
    # "a" < "bb" < "c" < "z" < "é" (0xc3 0xa9) < "津" (0xe6 0xb4 0xa5)
    expected = bytes.fromhex("86a16101a2626202a16303a17a04a2c3a905a3e6b4a506")
    value = {"津": 6, "é": 5, "z": 4, "c": 3, "bb": 2, "a": 1}
    assert codec.encode(value) == expected


def test_nested_maps_are_sorted_too() -> None:
    # {"m": {"a": 1, "b": 2}} written by hand
    assert codec.encode({"m": {"b": 2, "a": 1}}) == bytes.fromhex("81a16d82a16101a16202")


def test_integers_use_their_shortest_form() -> None:
    assert codec.encode(1) == b"\x01"
    assert codec.encode(-1) == b"\xff"
    assert codec.encode(200) == b"\xcc\xc8"
    assert codec.encode(-200) == b"\xd1\xff\x38"
    assert codec.encode(2**32) == bytes.fromhex("cf0000000100000000")


def test_strings_are_str_and_bytes_are_bin() -> None:
    assert codec.encode("a") == b"\xa1a"
    assert codec.encode(b"a") == b"\xc4\x01a"


def test_tuple_encodes_exactly_like_a_list_and_decodes_as_a_list() -> None:
    assert codec.encode((1, "a")) == codec.encode([1, "a"]) == bytes.fromhex("9201a161")
    assert codec.decode(codec.encode((1, "a"))) == [1, "a"]


def test_an_encoding_that_fails_halfway_leaves_nothing_in_the_next_one() -> None:
    # What an encoder wrote before a failure must not lead the next encoding (a frame or
    # a canonical value, which is hashed and signed).
    with pytest.raises(ProtocolError):
        codec.encode_frame({"a": [b"x" * 100, object()]})
    with pytest.raises(ProtocolError):
        codec.encode({"a": "y" * 100, "b": 2**64})
    assert codec.encode_frame({"b": 1}) == b"\x81\xa1b\x01"
    assert codec.encode({"b": 1}) == b"\x81\xa1b\x01"
    assert codec.encode_frame([b"z"]) == msgpack.packb([b"z"], use_bin_type=True)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = bytes.fromhex("82a16102a16201")
    assert codec.decode(bytearray(data)) == {"a": 2, "b": 1}
    assert codec.decode(memoryview(data)) == {"a": 2, "b": 1}


# --- refused on encode --------------------------------------------------------------------


@pytest.mark.parametrize("value", [1.5, [0.0], {"a": float("nan")}], ids=["top", "list", "map"])
def test_float_is_refused_on_encode(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.encode(value)
    assert info.value.code == "non_canonical"


@pytest.mark.parametrize("key", [1, b"a", None, ("a",)], ids=["int", "bytes", "none", "tuple"])
def test_non_string_map_key_is_refused_on_encode(key: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.encode({key: 1})
    assert info.value.code == "non_canonical"


@pytest.mark.parametrize("value", [{1, 2}, bytearray(b"a"), object(), 1j], ids=repr)
def test_other_types_are_refused_on_encode(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.encode(value)
    assert info.value.code == "non_canonical"


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, [2**100]], ids=["2^64", "-2^63-1", "nest"])
def test_integer_outside_msgpack_range_is_refused_on_encode_as_protocol_error(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.encode(value)
    assert info.value.code == "non_canonical"


def test_integers_at_the_edges_of_msgpack_range_encode() -> None:
    assert codec.encode(2**64 - 1) == bytes.fromhex("cf" + "ff" * 8)
    assert codec.encode(-(2**63)) == bytes.fromhex("d3" + "80" + "00" * 7)


def test_value_nesting_deeper_than_64_is_refused_on_encode() -> None:
    value: list[Any] = []
    for _ in range(70):
        value = [value]
    with pytest.raises(ProtocolError) as info:
        codec.encode(value)
    assert info.value.code == "too_deep"


# --- refused on decode --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "cb3ff8000000000000",  # float64 1.5
        "ca3fc00000",  # float32 1.5
        "91cb3ff8000000000000",  # [1.5]
        "81a161cb3ff8000000000000",  # {"a": 1.5}
    ],
)
def test_float_is_refused_on_decode(data: str) -> None:
    assert refused(bytes.fromhex(data)).code == "non_canonical"


def test_bytes_map_key_is_refused_on_decode() -> None:
    assert refused(bytes.fromhex("81c4016101")).code == "non_canonical"  # {b"a": 1}


def test_integer_map_key_is_refused_on_decode() -> None:
    refused(bytes.fromhex("8101a161"))  # {1: "a"}


def test_unsorted_keys_made_by_plain_msgpack_are_refused_as_non_canonical() -> None:
    data = msgpack.packb(OrderedDict([("b", 1), ("a", 2)]))
    assert data == bytes.fromhex("82a16201a16102")  # the writer really kept the order
    assert refused(data).code == "non_canonical"


def test_duplicate_map_key_is_refused_as_non_canonical() -> None:
    assert refused(bytes.fromhex("82a16101a16102")).code == "non_canonical"  # {"a":1, "a":2}


@pytest.mark.parametrize(
    "data",
    [
        "cd0001",  # uint16 1 (1 fits in a fixint)
        "cc05",  # uint8 5
        "d000",  # int8 0
        "d1ff80",  # int16 -128 (fits in int8)
        "ce000000ff",  # uint32 255
        "d90161",  # str8 "a" (fits in fixstr)
        "dc000101",  # array16 [1] (fits in fixarray)
        "de0001a16101",  # map16 {"a": 1} (fits in fixmap)
    ],
)
def test_long_form_encoding_is_refused_as_non_canonical(data: str) -> None:
    assert refused(bytes.fromhex(data)).code == "non_canonical"


def test_extension_type_is_refused_on_decode() -> None:
    refused(bytes.fromhex("d40105"))  # fixext1, type 1
    refused(bytes.fromhex("c70005"))  # ext8 of length 0 (slips past max_ext_len=0)
    refused(bytes.fromhex("d6ff00000000"))  # timestamp 32


def test_input_larger_than_the_limit_is_refused_as_too_large_with_status_413() -> None:
    data = codec.encode(b"x" * (codec.DEFAULT_LIMITS.max_bytes + 1))
    error = refused(data)
    assert error.code == "too_large"
    assert error.status == 413


def test_input_exactly_at_the_size_limit_is_accepted() -> None:
    data = codec.encode(b"x" * 100)
    assert codec.decode(data, codec.Limits(max_bytes=len(data))) == b"x" * 100
    assert refused(data, codec.Limits(max_bytes=len(data) - 1)).code == "too_large"


def test_nesting_up_to_the_depth_limit_is_accepted_and_one_more_is_refused() -> None:
    limit = codec.DEFAULT_LIMITS.max_depth
    codec.decode(nested_lists(limit))
    assert refused(nested_lists(limit + 1)).code == "too_deep"


def test_maps_count_toward_the_depth_limit() -> None:
    limits = codec.Limits(max_depth=2)
    assert codec.decode(bytes.fromhex("81a16180"), limits) == {"a": {}}
    refused(bytes.fromhex("81a16181a16180"), limits)  # {"a": {"a": {}}}


def test_hostile_nesting_far_beyond_the_limit_is_refused_without_crashing() -> None:
    refused(nested_lists(100_000), codec.Limits(max_bytes=200_000))


def test_string_longer_than_the_limit_is_refused() -> None:
    limits = codec.Limits(max_str=3)
    assert codec.decode(codec.encode("abc"), limits) == "abc"
    refused(codec.encode("abcd"), limits)


def test_string_limit_counts_utf8_bytes() -> None:
    limits = codec.Limits(max_str=3)
    assert codec.decode(codec.encode("津"), limits) == "津"  # 3 bytes
    refused(codec.encode("津a"), limits)


def test_binary_longer_than_the_limit_is_refused() -> None:
    limits = codec.Limits(max_bin=3)
    assert codec.decode(codec.encode(b"abc"), limits) == b"abc"
    refused(codec.encode(b"abcd"), limits)


def test_array_longer_than_the_limit_is_refused() -> None:
    limits = codec.Limits(max_array=3)
    assert codec.decode(codec.encode([1, 2, 3]), limits) == [1, 2, 3]
    refused(codec.encode([1, 2, 3, 4]), limits)


def test_map_larger_than_the_limit_is_refused() -> None:
    limits = codec.Limits(max_map=2)
    assert codec.decode(codec.encode({"a": 1, "b": 2}), limits) == {"a": 1, "b": 2}
    refused(codec.encode({"a": 1, "b": 2, "c": 3}), limits)


def test_empty_input_is_refused_as_malformed() -> None:
    assert refused(b"").code == "malformed_msgpack"


def test_truncated_input_is_refused_as_malformed() -> None:
    assert refused(codec.encode({"a": "hello"})[:-1]).code == "malformed_msgpack"


def test_trailing_bytes_after_the_value_are_refused_as_malformed() -> None:
    assert refused(codec.encode({"a": 1}) + b"\x00").code == "malformed_msgpack"


def test_reserved_byte_0xc1_is_refused_as_malformed() -> None:
    assert refused(b"\xc1").code == "malformed_msgpack"


def test_invalid_utf8_in_a_string_is_refused_as_malformed() -> None:
    assert refused(b"\xa2\xff\xfe").code == "malformed_msgpack"


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(ProtocolError):
        codec.decode("82a16102a16201")  # type: ignore[arg-type]


def test_decode_map_refuses_a_top_level_that_is_not_a_map() -> None:
    assert codec.decode_map(codec.encode({"a": 1})) == {"a": 1}
    with pytest.raises(ProtocolError) as info:
        codec.decode_map(codec.encode([1]))
    assert info.value.code == "malformed_msgpack"


# --- properties --------------------------------------------------------------------------

# No example database: the suite must not write outside tests/ (and stays reproducible).
NO_DB = settings(database=None, deadline=None)
DECODE_CODES = {"malformed_msgpack", "non_canonical", "too_large", "too_deep"}


@settings(NO_DB, max_examples=400)
@given(st.binary(max_size=2000))
def test_decoding_arbitrary_bytes_raises_nothing_but_protocol_error(data: bytes) -> None:
    try:
        value = codec.decode(data)
    except ProtocolError as exc:
        assert exc.code in DECODE_CODES
    else:
        # Whatever decodes is canonical: it is exactly the encoding of what it decoded to.
        assert codec.encode(value) == data


def _as_decoded(value: Any) -> Any:
    """What decode returns for an encoded `value`: tuples come back as lists."""
    if isinstance(value, list | tuple):
        return [_as_decoded(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_decoded(item) for key, item in value.items()}
    return value


msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.none() | st.booleans() | msgpack_ints | st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
DEEP = codec.Limits(max_depth=64)


@settings(NO_DB, max_examples=100)
@given(values)
def test_encode_decode_encode_is_stable_and_decode_returns_an_equal_value(value: Any) -> None:
    data = codec.encode(value)
    decoded = codec.decode(data, DEEP)
    assert decoded == _as_decoded(value)
    assert codec.encode(decoded) == data


@settings(NO_DB, max_examples=300)
@given(values)
def test_encoding_gives_the_bytes_of_the_msgpack_reference_packer(value: Any) -> None:
    # The canonical form is msgpack's shortest form; the encoder that writes it here is
    # not msgpack's own, so every encoding is held to what msgpack's packer writes.
    assert codec.encode(value) == msgpack.packb(codec.canonical(value), use_bin_type=True)


@pytest.mark.parametrize("size", [0, 15, 16, 31, 32, 255, 256, 65_535, 65_536])
def test_every_length_form_is_the_one_the_msgpack_reference_packer_writes(size: int) -> None:
    for value in (
        "a" * size,
        b"b" * size,
        [0] * size,
        {f"{k:06}": 0 for k in range(min(size, 65_536))},
    ):
        assert codec.encode(value) == msgpack.packb(value, use_bin_type=True)
        assert codec.encode_frame(value) == msgpack.packb(value, use_bin_type=True)


@settings(NO_DB, max_examples=50)
@given(st.dictionaries(st.text(max_size=8), scalars, min_size=2, max_size=8), st.randoms())
def test_map_encoding_does_not_depend_on_insertion_order(value: dict[str, Any], rnd: Any) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert codec.encode(dict(items)) == codec.encode(value)


@settings(NO_DB, max_examples=100)
@given(values, st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_corrupting_one_byte_of_a_valid_encoding_raises_nothing_but_protocol_error(
    value: Any, position: int, xor: int
) -> None:
    data = bytearray(codec.encode(value))
    data[position % len(data)] ^= xor
    try:
        decoded = codec.decode(bytes(data), DEEP)
    except ProtocolError as exc:
        assert exc.code in DECODE_CODES
    else:
        assert codec.encode(decoded) == bytes(data)


@settings(NO_DB, max_examples=50)
@given(st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1))
def test_encoding_an_out_of_range_integer_raises_protocol_error(value: int) -> None:
    with pytest.raises(ProtocolError):
        codec.encode(value)
