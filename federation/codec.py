"""Canonical msgpack: the only encoding of anything that is signed or hashed.

Invariants:
- One value has exactly one encoding. Maps are written with their keys sorted by
  their encoded bytes, integers in their shortest form (msgpack does that),
  strings as UTF-8 `str`, bytes as `bin`. Floats, extension types and non-string
  map keys are refused: a float has several encodings and rounding, and a signed
  field must not depend on either.
- Decoding is strict and bounded: total size, nesting depth, and the length of
  every string, binary, array and map are capped before anything is allocated
  (msgpack's own limits) or walked (our depth check). Finally the input must be
  the canonical encoding of what it decodes to, so a duplicate map key, an
  unsorted map or a long-form integer is refused rather than silently accepted
  with two possible hashes.
- Every failure is a `ProtocolError` with code `malformed_msgpack`,
  `non_canonical` or `too_large`; nothing else escapes `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

from .errors import ProtocolError

__all__ = [
    "DEFAULT_LIMITS",
    "SCALARS",
    "Limits",
    "canonical",
    "check_keys",
    "check_shape",
    "decode",
    "decode_map",
    "encode",
    "encode_frame",
    "require_canonical",
    "unpack",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Upper bounds a decoder enforces on untrusted input."""

    max_bytes: int = 64 * 1024
    """Total size of the encoded input."""
    max_depth: int = 16
    """Nesting depth of arrays and maps."""
    max_str: int = 16 * 1024
    """Length in bytes of one string."""
    max_bin: int = 64 * 1024
    """Length of one binary value."""
    max_array: int = 4096
    """Items in one array."""
    max_map: int = 256
    """Pairs in one map."""


DEFAULT_LIMITS = Limits()


_PLAIN = frozenset({str, int, bytes, bool, type(None)})


def _canonical(value: Any, depth: int) -> Any:
    """Return `value` with every map rebuilt in canonical key order; refuse what is not allowed.

    Hot path of every envelope and roster encoding, so it dispatches on exact types
    first. Sorting `str` keys sorts by code point, which is the order of their UTF-8
    bytes, i.e. the canonical order.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if depth > 64:
        raise ProtocolError("value nests too deeply to encode", code="too_deep")
    if kind is dict:
        try:
            "".join(value)  # C-speed proof that every key is a str (or a subclass of it)
        except TypeError:
            for key in value:
                if not isinstance(key, str):
                    raise ProtocolError(
                        f"map key {key!r} is not a string", code="non_canonical"
                    ) from None
        # Distinct str keys: sorting the items never compares two values. A plain value
        # is kept as it is without a call (a message body is one or a few strings).
        return {
            str(key) if type(key) is not str else key: (
                item if type(item) in _PLAIN else _canonical(item, depth + 1)
            )
            for key, item in sorted(value.items())
        }
    if kind is list or kind is tuple:
        return [_canonical(item, depth + 1) for item in value]
    # Subclasses (StrEnum, IntEnum, ...) are written as their base type.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, dict | list | tuple):
        return _canonical(dict(value) if isinstance(value, dict) else list(value), depth)
    raise ProtocolError(
        f"type {type(value).__name__} cannot be encoded canonically", code="non_canonical"
    )


def canonical(value: Any) -> Any:
    """`value` with every map in canonical key order (for callers that pack it themselves)."""
    return _canonical(value, 0)


_ENCODER = msgspec.msgpack.Encoder()


def _pack(value: Any) -> bytes:
    """The msgpack encoding of a plain value (None, bool, int, str, bytes, list, dict), maps
    in the order given: the bytes `msgpack.packb(value, use_bin_type=True)` gives (the
    shortest form of every length and integer; tests/federation/test_codec.py holds the
    two to each other), written by msgspec's encoder at half the cost. Callers pass plain
    values only: `_canonical` makes them, framing is built of them, and decoding gives
    nothing else (msgspec would also write types that msgpack refuses)."""
    return _ENCODER.encode(value)


def encode_frame(value: Any) -> bytes:
    """Encode transport framing that is never hashed or signed (maps must already be sorted)."""
    try:
        return _pack(value)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode frame: {exc}", code="non_canonical") from exc


def encode(value: Any) -> bytes:
    """Encode `value` canonically: None, bool, int, str, bytes, list/tuple, str-keyed dict."""
    try:
        return _pack(_canonical(value, 0))
    except OverflowError as exc:
        raise ProtocolError(
            f"integer outside msgpack's range: {exc}", code="non_canonical"
        ) from exc


SCALARS = frozenset({type(None), bool, int, str, bytes})
"""The types of the values that are not lists or maps `check_shape` allows."""


def _refuse_kind(kind: type) -> None:
    what = "floats are" if kind is float else f"{kind.__name__} values are"
    raise ProtocolError(f"{what} not allowed", code="non_canonical")


def check_keys(item: dict[Any, Any]) -> None:
    """A map's keys must be strings in strictly increasing code point (= UTF-8 byte) order."""
    keys = list(item)
    try:
        "".join(keys)  # C-speed proof that every key is a str
    except TypeError:
        raise ProtocolError("map keys must be strings", code="non_canonical") from None
    if keys != sorted(keys):
        raise ProtocolError("map keys are not in canonical order", code="non_canonical")


def check_shape(value: Any, max_depth: int, counts: Limits | None = None) -> None:
    """Allow only None, bool, int, str, bytes, lists and maps with sorted string keys, nested
    at most `max_depth`; with `counts`, also at most its `max_map` pairs in a map and
    `max_array` items in a list (for values decoded by other than `unpack`, which
    enforces those as it reads).

    Iterative, so hostile nesting cannot exhaust the Python stack. Floats have
    several encodings and extension types have meanings we do not define. (A
    repeated key cannot survive decoding into a dict; the canonical re-pack catches it.)
    """
    kind = type(value)
    if kind is not dict and kind is not list:
        if kind not in SCALARS:
            _refuse_kind(kind)
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(f"nesting deeper than {max_depth}", code="too_deep")
        if type(item) is dict:
            if counts is not None and len(item) > counts.max_map:
                raise ProtocolError(f"more than {counts.max_map} pairs in a map", code="too_large")
            check_keys(item)
            children = item.values()
        else:
            if counts is not None and len(item) > counts.max_array:
                raise ProtocolError(
                    f"more than {counts.max_array} items in a list", code="too_large"
                )
            children = item
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind not in SCALARS:
                _refuse_kind(kind)


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Only the bounded C-level decode, no shape or canonical checks.

    For callers that check a fixed structure themselves (the envelope's framing and
    header); everything else uses `decode`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("expected bytes", code="malformed_msgpack")
    if len(data) > limits.max_bytes:
        raise ProtocolError(
            f"{len(data)} bytes exceeds the limit of {limits.max_bytes}",
            code="too_large",
            status=413,
        )
    if not data:
        raise ProtocolError("empty input", code="malformed_msgpack")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,  # check_keys refuses non-string keys with a clear reason
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
            timestamp=0,
        )
    except Exception as exc:  # msgpack raises a dozen unrelated types; all mean "malformed"
        raise ProtocolError(f"malformed msgpack: {exc}", code="malformed_msgpack") from exc


def require_canonical(value: Any, data: bytes) -> None:
    """`ProtocolError` unless `data` is the canonical encoding of `value` (as decoded from it).

    Maps were checked to be in canonical order and dicts keep that order, so packing
    them again as they are must give back the input byte for byte, unless a length or
    integer used a longer form than needed, a key was repeated, or an extension slipped in.
    """
    try:
        repacked = _pack(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"not canonical: {exc}", code="non_canonical") from exc
    if repacked != data:
        raise ProtocolError(
            "not the canonical encoding (a length or number in a longer form than needed)",
            code="non_canonical",
        )


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, *, canonical: bool = True) -> Any:
    """Decode msgpack from an untrusted source, enforcing `limits`.

    With `canonical` (the default), the input must also be the canonical encoding
    of what it decodes to: required for anything hashed or signed. Transport
    framing (a batch's list of envelopes, an answer) is neither, so it may skip
    the byte-for-byte check; map keys must still be sorted strings.
    """
    value = unpack(data, limits)
    check_shape(value, limits.max_depth)
    if canonical:
        require_canonical(value, bytes(data))
    return value


def decode_map(
    data: bytes, limits: Limits = DEFAULT_LIMITS, *, canonical: bool = True
) -> dict[str, Any]:
    """Decode and require a map at the top level."""
    value = decode(data, limits, canonical=canonical)
    if not isinstance(value, dict):
        raise ProtocolError("expected a map at the top level", code="malformed_msgpack")
    return value
