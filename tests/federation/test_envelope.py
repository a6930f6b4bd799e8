"""Envelopes: canonical content, per-batch Merkle signatures, strict decoding, refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import federation.envelope as envelope_module
from federation import codec
from federation.envelope import (
    MAX_DEPS,
    MAX_ENVELOPE_BYTES,
    SIGNING_CONTEXT,
    Content,
    Envelope,
    Kind,
    RootCache,
    check_room_id,
    contents_in_series,
    merkle_root,
    peek_id,
    peek_place,
    room_home,
    root_from_path,
    seal_batch,
)
from federation.errors import ProtocolError, TrustError
from federation.identity import check_node_id
from federation.signing import SigningKey, verify_signature

HOME = "mie-pref"
ROOM = "!kaigi2024:mie-pref"
KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32))
OTHER_KEY = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([8]) * 32))
HLC0 = 1_714_521_600_000 << 16


def content(
    seq: int,
    *,
    origin: str = HOME,
    kind: Kind = Kind.MESSAGE,
    body: dict[str, Any] | None = None,
    deps: dict[str, int] | None = None,
    sender: str = "",
) -> Content:
    """A valid content; deps default to the origin's previous envelope and home seq 1."""
    if deps is None:
        deps = {origin: seq - 1} if seq > 1 else {}
        if origin != HOME:
            deps[HOME] = 1
    return Content(
        room=ROOM,
        origin=origin,
        seq=seq,
        kind=kind,
        sender=sender,
        hlc=HLC0 + seq,
        deps=deps,
        key_id=KEY.key_id,
        body={"text": f"hello {seq}"} if body is None else body,
    )


def chain(n: int) -> list[Content]:
    return [content(seq) for seq in range(1, n + 1)]


def wire(content_bytes: bytes, signature: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    return codec.encode({"c": content_bytes, "sig": signature, "i": index, "n": size, "p": path})


def rewrap(env: Envelope, **changes: Any) -> bytes:
    """The envelope's wire bytes with some wire fields replaced (c, sig, i, n, p)."""
    fields = {
        "c": env.content_bytes,
        "sig": env.signature,
        "i": env.index,
        "n": env.size,
        "p": list(env.path),
    }
    fields.update(changes)
    return codec.encode(fields)


def protocol_error(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        Envelope.from_bytes(data)
    return info.value


def trust_error(env: Envelope, public_key: bytes = KEY.public_raw) -> TrustError:
    with pytest.raises(TrustError) as info:
        RootCache().verify(env, public_key)
    return info.value


# --- an independent RFC 6962 reference ----------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc6962_root(ids: list[bytes]) -> bytes:
    """MTH(D[n]) exactly as RFC 6962 section 2.1 defines it, recursively."""
    if len(ids) == 1:
        return _h(b"\x00" + ids[0])
    k = _split(len(ids))
    return _h(b"\x01" + rfc6962_root(ids[:k]) + rfc6962_root(ids[k:]))


def rfc6962_path(m: int, ids: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 section 2.1.1, leaf upwards."""
    if len(ids) == 1:
        return []
    k = _split(len(ids))
    if m < k:
        return [*rfc6962_path(m, ids[:k]), rfc6962_root(ids[k:])]
    return [*rfc6962_path(m - k, ids[k:]), rfc6962_root(ids[:k])]


def test_reference_tree_agrees_with_the_rfc_6962_worked_shape_for_three_leaves() -> None:
    # Guard the reference itself: with 3 leaves the root is H(1 || H(1 || l0 || l1) || l2).
    ids = [_h(bytes([i])) for i in range(3)]
    leaves = [_h(b"\x00" + i) for i in ids]
    expected = _h(b"\x01" + _h(b"\x01" + leaves[0] + leaves[1]) + leaves[2])
    assert rfc6962_root(ids) == expected


# --- batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_every_envelope_of_a_batch_verifies_alone_after_a_wire_round_trip(n: int) -> None:
    envelopes = seal_batch(chain(n), KEY)
    assert len(envelopes) == n
    for index, env in enumerate(envelopes):
        received = Envelope.from_bytes(env.to_bytes())
        assert received == env
        assert received.content == env.content
        assert received.id == env.id
        assert (received.index, received.size) == (index, n)
        RootCache().verify(received, KEY.public_raw)  # a fresh cache: no help from siblings


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 17, 31, 33])
def test_merkle_root_and_paths_match_an_independent_rfc_6962_reference(n: int) -> None:
    ids = [_h(b"id" + bytes([i])) for i in range(n)]
    assert merkle_root(ids) == rfc6962_root(ids)
    for m in range(n):
        assert root_from_path(ids[m], m, n, rfc6962_path(m, ids)) == rfc6962_root(ids)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 13, 31, 33, 100])
def test_sealed_batch_signs_the_rfc_6962_root_and_carries_rfc_6962_paths(n: int) -> None:
    envelopes = seal_batch(chain(n), KEY)
    ids = [env.id for env in envelopes]
    root = rfc6962_root(ids)
    verify_signature(KEY.public_raw, envelopes[0].signature, SIGNING_CONTEXT + root)
    for m, env in enumerate(envelopes):
        assert list(env.path) == rfc6962_path(m, ids)
        assert env.root() == root


def test_merkle_root_of_no_ids_is_refused() -> None:
    with pytest.raises(ValueError):
        merkle_root([])


def test_sealing_nothing_gives_no_envelopes() -> None:
    assert seal_batch([], KEY) == []


def test_envelope_id_is_sha256_of_its_canonical_content_bytes() -> None:
    for env in seal_batch(chain(3), KEY):
        assert env.content_bytes == codec.encode(env.content.to_wire())
        assert env.id == hashlib.sha256(env.content_bytes).digest()
        assert Envelope.from_bytes(env.to_bytes()).id == hashlib.sha256(env.content_bytes).digest()


def test_batch_signature_covers_the_context_and_not_the_bare_root() -> None:
    (env,) = seal_batch(chain(1), KEY)
    with pytest.raises(TrustError):
        verify_signature(KEY.public_raw, env.signature, env.root())
    verify_signature(KEY.public_raw, env.signature, SIGNING_CONTEXT + env.root())


# --- refusals: signature and inclusion path -------------------------------------------------


def test_batch_signed_by_another_key_is_refused_as_a_bad_signature() -> None:
    for env in seal_batch(chain(3), OTHER_KEY):
        assert trust_error(env).code == "bad_envelope_signature"


def test_body_byte_changed_inside_a_string_decodes_but_fails_verification() -> None:
    env = seal_batch(chain(2), KEY)[1]
    start = env.content_bytes.index(b"hello 2")
    tampered = bytearray(env.content_bytes)
    tampered[start] = ord("j")  # "jello 2": same length, still canonical msgpack
    received = Envelope.from_bytes(rewrap(env, c=bytes(tampered)))
    assert received.content.body == {"text": "jello 2"}
    assert trust_error(received).code == "bad_envelope_signature"


def test_body_byte_changed_in_a_length_header_is_refused_at_decode() -> None:
    env = seal_batch(chain(2), KEY)[1]
    tampered = bytearray(env.content_bytes)
    assert tampered[0] == 0x8A  # fixmap of the 10 header fields
    tampered[0] = 0x8B  # now claims 11 pairs: the decoder runs out of input
    error = protocol_error(rewrap(env, c=bytes(tampered)))
    assert error.code == "malformed_msgpack"


def test_flipped_byte_in_a_sibling_hash_fails_verification() -> None:
    envelopes = seal_batch(chain(5), KEY)
    for env in envelopes:
        path = list(env.path)
        path[-1] = bytes([path[-1][0] ^ 0x01]) + path[-1][1:]
        received = Envelope.from_bytes(rewrap(env, p=path))
        assert trust_error(received).code == "bad_envelope_signature"


def test_inclusion_path_of_the_wrong_length_is_refused_as_a_bad_path() -> None:
    env = seal_batch(chain(5), KEY)[0]  # index 0 of 5 has a path of 3 hashes
    assert len(env.path) == 3
    for path in (list(env.path[:-1]), [*env.path, bytes(32)], []):
        received = Envelope.from_bytes(rewrap(env, p=path))
        assert trust_error(received).code == "bad_inclusion_path"


def test_lone_envelope_with_a_path_is_refused_as_a_bad_path() -> None:
    (env,) = seal_batch(chain(1), KEY)
    received = Envelope.from_bytes(rewrap(env, p=[bytes(32)]))
    assert trust_error(received).code == "bad_inclusion_path"


@pytest.mark.parametrize(("index", "size"), [(5, 5), (6, 5), (-1, 5), (0, 0)])
def test_index_outside_the_batch_is_refused_as_a_bad_path(index: int, size: int) -> None:
    env = seal_batch(chain(5), KEY)[0]
    received = Envelope.from_bytes(rewrap(env, i=index, n=size))
    assert trust_error(received).code == "bad_inclusion_path"
    with pytest.raises(ProtocolError) as info:
        root_from_path(env.id, index, size, env.path)
    assert info.value.code == "bad_inclusion_path"


def test_envelope_moved_to_another_index_fails_verification() -> None:
    envelopes = seal_batch(chain(4), KEY)
    received = Envelope.from_bytes(rewrap(envelopes[0], i=1))
    assert trust_error(received).code == "bad_envelope_signature"


# --- refusals: size -------------------------------------------------------------------------


def _text_for_wire_size(target: int, contents: list[Content], index: int) -> list[Content]:
    """Replace contents[index]'s text so its sealed wire form is exactly `target` bytes."""

    def with_text(length: int) -> list[Content]:
        changed = list(contents)
        changed[index] = dataclasses.replace(contents[index], body={"text": "a" * length})
        return changed

    probe = 50_000  # str16 and bin16 headers: the size grows one byte per character from here
    measured = len(seal_batch(with_text(probe), KEY)[index].to_bytes())
    return with_text(probe + target - measured)


def test_envelope_of_exactly_the_limit_is_sealed_and_round_trips() -> None:
    contents = _text_for_wire_size(MAX_ENVELOPE_BYTES, chain(1), 0)
    (env,) = seal_batch(contents, KEY)
    data = env.to_bytes()
    assert len(data) == MAX_ENVELOPE_BYTES
    RootCache().verify(Envelope.from_bytes(data), KEY.public_raw)


def test_envelope_one_byte_over_the_limit_is_refused_by_seal_batch_with_413() -> None:
    contents = _text_for_wire_size(MAX_ENVELOPE_BYTES + 1, chain(1), 0)
    with pytest.raises(ProtocolError) as info:
        seal_batch(contents, KEY)
    assert info.value.code == "envelope_too_large"
    assert info.value.status == 413


def test_seal_batch_refuses_an_oversized_envelope_deep_in_a_large_batch() -> None:
    # Index 200 of 300: a 9-hash path and 2- and 3-byte integers for i and n. A size estimate
    # that counts 33 bytes per path hash (bin8 costs 34) let this one through unsealable.
    contents = _text_for_wire_size(MAX_ENVELOPE_BYTES + 1, chain(300), 199)
    with pytest.raises(ProtocolError) as info:
        seal_batch(contents, KEY)
    assert info.value.code == "envelope_too_large"


def test_to_bytes_refuses_an_oversized_envelope_built_by_hand() -> None:
    big = content(1, body={"text": "x" * 30_000})
    env = Envelope(
        content_bytes=big.to_bytes() + b"\x00" * 40_000,  # never decoded: only size matters
        content=big,
        signature=bytes(64),
        index=0,
        size=1,
        path=(),
    )
    with pytest.raises(ProtocolError) as info:
        env.to_bytes()
    assert (info.value.code, info.value.status) == ("envelope_too_large", 413)


def test_from_bytes_refuses_oversized_input_before_decoding() -> None:
    (env,) = seal_batch(chain(1), KEY)
    error = protocol_error(env.to_bytes() + b"\x00" * MAX_ENVELOPE_BYTES)
    assert (error.code, error.status) == ("envelope_too_large", 413)


# --- refusals: malformed wire form -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "malformed_msgpack"),
        (b"\xc1", "malformed_msgpack"),  # the one byte msgpack never uses
        (b"\x85\xa1c", "malformed_msgpack"),  # truncated
        (b"\x93\x01\x02\x03", "malformed_msgpack"),  # an array, not a map
        # The outer map is framing, checked field by field (only content must be canonical):
        (bytes.fromhex("82a16202a16101"), "bad_envelope"),  # {"b": 2, "a": 1}: wrong fields
        (bytes.fromhex("81a163cb3ff0000000000000"), "bad_envelope"),  # {"c": 1.0}
    ],
)
def test_malformed_msgpack_is_refused(data: bytes, code: str) -> None:
    assert protocol_error(data).code == code


def test_truncated_real_envelope_is_refused() -> None:
    (env,) = seal_batch(chain(1), KEY)
    assert protocol_error(env.to_bytes()[:-1]).code == "malformed_msgpack"


def test_wire_map_with_an_extra_or_missing_field_is_refused() -> None:
    (env,) = seal_batch(chain(1), KEY)
    fields = {"c": env.content_bytes, "sig": env.signature, "i": 0, "n": 1, "p": []}
    assert protocol_error(codec.encode({**fields, "x": 1})).code == "bad_envelope"
    del fields["sig"]
    assert protocol_error(codec.encode(fields)).code == "bad_envelope"


@pytest.mark.parametrize(
    "change",
    [
        {"c": "text, not bin"},
        {"sig": "text, not bin"},
        {"i": "0"},
        {"n": "1"},
        {"i": True},
        {"n": True},
        {"p": bytes(32)},
        {"p": [bytes(31)]},
        {"p": ["00" * 32]},
        {"p": [bytes(32)] * 41},
    ],
    ids=repr,
)
def test_wire_field_of_the_wrong_type_is_refused(change: dict[str, Any]) -> None:
    (env,) = seal_batch(chain(1), KEY)
    assert protocol_error(rewrap(env, **change)).code == "bad_envelope"


def _content_map(**changes: Any) -> dict[str, Any]:
    raw = content(2).to_wire()
    raw.update(changes)
    return raw


def _wrap_content(raw: dict[str, Any]) -> bytes:
    return wire(codec.encode(raw), bytes(64), 0, 1, [])


def test_unknown_kind_is_refused_as_unknown_kind() -> None:
    assert protocol_error(_wrap_content(_content_map(kind="teleport"))).code == "unknown_kind"
    assert protocol_error(_wrap_content(_content_map(kind=7))).code == "unknown_kind"


def test_hand_built_content_map_with_a_known_kind_decodes() -> None:
    # The control for the refusals around it: the same construction with valid fields works.
    env = Envelope.from_bytes(_wrap_content(_content_map()))
    assert env.content == content(2)


def test_content_that_is_not_canonical_is_refused() -> None:
    good = codec.encode(_content_map())
    long_form = good.replace(b"\xa3seq\x02", b"\xa3seq\xcc\x02")  # seq 2 as uint8: not shortest
    assert long_form != good
    assert protocol_error(wire(long_form, bytes(64), 0, 1, [])).code == "non_canonical"


def test_header_field_set_other_than_the_expected_one_is_refused() -> None:
    missing = _content_map()
    del missing["kid"]
    assert protocol_error(_wrap_content(missing)).code == "bad_envelope"
    assert protocol_error(_wrap_content(_content_map(extra=1))).code == "bad_envelope"


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"v": True},
        {"seq": "2"},
        {"seq": 0},
        {"hlc": -1},
        {"hlc": "now"},
        {"room": 5},
        {"sender": None},
        {"kid": b"key"},
        {"deps": [["mie-pref", 1]]},
        {"deps": {"mie-pref": 1, "tsu": 0}},
        {"deps": {"mie-pref": 1, "tsu": True}},
        {"body": []},
        {"body": None},
        {"body": "text"},
    ],
    ids=repr,
)
def test_header_field_of_the_wrong_type_or_range_is_refused(change: dict[str, Any]) -> None:
    assert protocol_error(_wrap_content(_content_map(**change))).code == "bad_envelope"


def test_content_with_a_non_map_body_is_refused_at_construction() -> None:
    with pytest.raises(ProtocolError) as info:
        content(1, body=[])  # type: ignore[arg-type]
    assert info.value.code == "bad_envelope"


_ODD_VALUES = st.sampled_from(
    [None, True, False, -1, 0, 1, 2, 3, 2**53 - 1, 2**53, 2**64 - 1, 2**64, "", "2", b"x", [], {}]
)
_HEADER_CHANGES = st.dictionaries(
    st.sampled_from(["v", "seq", "hlc", "room", "origin", "sender", "kid", "kind", "deps", "body"]),
    st.one_of(
        _ODD_VALUES,
        st.sampled_from(["tsu", HOME, "ise", "Not A Node", ROOM, "!x:tsu", "message", "state"]),
        st.dictionaries(
            st.sampled_from(["tsu", HOME, "ise", "Not A Node"]), _ODD_VALUES, max_size=3
        ),
    ),
    max_size=4,
)


@settings(max_examples=400, deadline=None, database=None)
@given(changes=_HEADER_CHANGES)
def test_fast_header_decoding_accepts_only_what_the_checked_path_accepts(
    changes: dict[str, Any],
) -> None:
    raw = _content_map(**changes)
    try:
        checked: Content | None = Content._from_header_checked(raw)
    except ProtocolError:
        checked = None
    fast = envelope_module._header_fast(raw)
    if fast is not None:
        assert checked is not None
        for field in dataclasses.fields(Content):
            assert getattr(fast, field.name) == getattr(checked, field.name)
            assert type(getattr(fast, field.name)) is type(getattr(checked, field.name))


def _same_values(fast: Any, checked: Any, names: list[str]) -> None:
    """Every named field equal and of the same type; maps and lists compared as their
    canonical bytes, where True and 1 differ."""
    for name in names:
        a, b = getattr(fast, name), getattr(checked, name)
        assert type(a) is type(b), name
        if isinstance(a, dict | list):
            assert codec.encode(a) == codec.encode(b), name
        else:
            assert a == b, name


def _outcome(decode: Any, data: bytes) -> Any:
    try:
        return decode(data)
    except ProtocolError as exc:
        return exc


def _mutated(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """`data` with each edit applied: (position, kind, byte): 0 replaces, 1 inserts, 2 deletes."""
    out = bytearray(data)
    for position, kind, value in edits:
        at = position % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] = value
        elif kind == 1:
            out.insert(at, value)
        elif at < len(out):
            del out[at]
    return bytes(out)


_BODY_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.floats(allow_nan=False),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=12,
)
_EDITS = st.lists(
    st.tuples(st.integers(0, 2**16), st.integers(0, 2), st.integers(0, 255)), max_size=3
)


def _raw_content(header: dict[str, Any], sort_keys: bool) -> bytes:
    """Content bytes packed by plain msgpack: the body as given (floats, int keys, any key
    order), so that the decoders meet what no node would seal."""
    raw = _content_map(**header)
    if sort_keys:
        raw = dict(sorted(raw.items()))
    return msgpack.packb(raw, use_bin_type=True)


@settings(max_examples=500, deadline=None, database=None)
@given(
    body=st.one_of(st.dictionaries(st.text(max_size=6), _BODY_VALUES, max_size=4), _BODY_VALUES),
    deps=st.sampled_from(
        [{}, {HOME: 1}, {"tsu": 1, HOME: 1}, {HOME: 1, "tsu": 1}, {HOME: True}, {"Bad": 1, HOME: 1}]
    ),
    kind=st.sampled_from(["message", "reaction", "teleport"]),
    origin=st.sampled_from([HOME, "tsu", "Bad"]),
    seq=st.integers(1, 3),
    sort_keys=st.booleans(),
    edits=_EDITS,
)
def test_msgspec_content_decoding_accepts_only_what_the_msgpack_path_accepts(
    body: Any,
    deps: Any,
    kind: str,
    origin: str,
    seq: int,
    sort_keys: bool,
    edits: list[tuple[int, int, int]],
) -> None:
    header = {"body": body, "deps": deps, "kind": kind, "origin": origin, "seq": seq}
    data = _mutated(_raw_content(header, sort_keys), edits)
    checked = _outcome(Content._from_bytes_checked, data)
    fast = envelope_module._content_fast(data)
    if fast is not None:
        assert isinstance(checked, Content), checked
        _same_values(fast, checked, [field.name for field in dataclasses.fields(Content)])


@settings(max_examples=300, deadline=None, database=None)
@given(n=st.integers(1, 9), pick=st.integers(0, 8), edits=_EDITS)
def test_msgspec_envelope_decoding_accepts_only_what_the_msgpack_path_accepts(
    n: int, pick: int, edits: list[tuple[int, int, int]]
) -> None:
    sealed = seal_batch(chain(n), KEY)[pick % n]
    data = _mutated(sealed.to_bytes(), edits)
    checked = _outcome(Envelope._from_bytes_checked, data)
    fast = envelope_module._envelope_fast(data)
    if fast is not None:
        assert isinstance(checked, Envelope), checked
        _same_values(fast, checked, [field.name for field in dataclasses.fields(Envelope)])
        _same_values(
            fast.content, checked.content, [field.name for field in dataclasses.fields(Content)]
        )
    if not edits:
        assert fast is not None  # what nodes seal takes the fast path


@pytest.mark.parametrize(
    "raw",
    [
        # All else canonical (keys in order), so that only the count or depth is wrong.
        _content_map(body={f"{k:03}": 0 for k in range(257)}),  # more pairs than unpack allows
        _content_map(body={"list": [0] * 4097}),  # more items than unpack allows
        _content_map(body={"a": [[[[[[[[[[[[0]]]]]]]]]]]]}),  # deeper than the body may be
        _content_map(deps=dict(sorted({HOME: 1, **{f"n{k:03}": 1 for k in range(256)}}.items()))),
    ],
    ids=["map-pairs", "list-items", "depth", "deps-pairs"],
)
def test_what_msgpack_refuses_for_its_counts_is_not_taken_by_the_fast_path(
    raw: dict[str, Any],
) -> None:
    for name in raw["deps"]:
        check_node_id(name)  # known ids: only the counts can refuse it
    data = msgpack.packb(dict(sorted(raw.items())), use_bin_type=True)
    assert envelope_module._content_fast(data) is None
    with pytest.raises(ProtocolError):
        Content.from_bytes(data)


def test_a_frame_with_a_repeated_key_is_left_to_the_msgpack_path() -> None:
    (env,) = seal_batch(chain(1), KEY)
    good = env.to_bytes()
    assert good[0] == 0x85  # a map of five pairs
    repeated = b"\x86" + good[1:] + msgpack.packb("i") + msgpack.packb(0)
    assert envelope_module._envelope_fast(repeated) is None
    assert Envelope.from_bytes(repeated).content == env.content  # as msgpack reads it
    # What screening accepted is rebuilt the same, repeated key and all.
    decoded = Envelope.from_bytes(repeated)
    rebuilt = Envelope.from_screened(repeated, decoded.id)
    _same_values(rebuilt, decoded, [field.name for field in dataclasses.fields(Envelope)])
    # More pairs than msgpack reads in a map, each key repeated: refused, not read.
    many = b"\xde\x01\x2c" + good[1:] + (msgpack.packb("i") + msgpack.packb(0)) * 295
    assert envelope_module._envelope_fast(many) is None
    assert protocol_error(many).code == "malformed_msgpack"


class _Level(enum.IntEnum):
    HIGH = 3


class _Tag(enum.StrEnum):
    NOTICE = "notice"


_ENCODABLE_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**64), max_value=2**65),  # a few beyond msgpack's range
        st.text(max_size=10),
        st.binary(max_size=10),
        st.just(_Level.HIGH),
        st.just(_Tag.NOTICE),
        st.just(1.5),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.just(_Tag.NOTICE)), inner, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None, database=None)
@given(
    body=st.dictionaries(
        st.one_of(st.text(max_size=6), st.just(_Tag.NOTICE), st.integers(0, 2)),
        _ENCODABLE_VALUES,
        max_size=4,
    ),
    deps=st.sampled_from([{HOME: 1}, {"tsu": 1, HOME: 1}, {HOME: 1, "ise": 2, "tsu": 1}]),
)
def test_content_bytes_are_the_canonical_encoding_of_its_wire_map(
    body: dict[Any, Any], deps: dict[str, int]
) -> None:
    made = content(2, body=body, deps={**deps, HOME: 1})
    expected = _outcome(codec.encode, made.to_wire())
    got = _outcome(lambda _: made.to_bytes(), b"")
    if isinstance(expected, ProtocolError):
        assert isinstance(got, ProtocolError)
        assert got.code == expected.code == "non_canonical"
    else:
        assert got == expected


def test_a_decoded_envelope_has_every_field_of_the_sealed_one() -> None:
    assert envelope_module._header_fast(_content_map()) is not None  # the path taken below
    for sealed in seal_batch(chain(5), KEY):
        decoded = Envelope.from_bytes(sealed.to_bytes())
        for field in dataclasses.fields(Envelope):
            assert getattr(decoded, field.name) == getattr(sealed, field.name), field.name
        for field in dataclasses.fields(Content):
            assert getattr(decoded.content, field.name) == getattr(sealed.content, field.name)


# --- a node's own contents, made in series ----------------------------------------------------


def _series_by_hand(
    origin: str, first_seq: int, others: dict[str, int], items: list[tuple[Any, Any, Any]]
) -> list[Content]:
    """What `contents_in_series` must equal: one `Content` each, fully checked."""
    made = []
    for offset, (kind, body, sender) in enumerate(items):
        seq = first_seq + offset
        deps = dict(others)
        if seq > 1:
            deps[origin] = seq - 1
        made.append(
            Content(
                room=ROOM,
                origin=origin,
                seq=seq,
                kind=kind,
                sender=sender,
                hlc=HLC0 + offset,
                deps=deps,
                key_id=KEY.key_id,
                body=body,
            )
        )
    return made


def _series(
    origin: str, first_seq: int, others: dict[str, int], items: list[tuple[Any, Any, Any]]
) -> list[Content]:
    return contents_in_series(
        room=ROOM,
        origin=origin,
        key_id=KEY.key_id,
        first_seq=first_seq,
        others=others,
        hlcs=[HLC0 + offset for offset in range(len(items))],
        items=items,
    )


_SERIES_ITEMS = st.lists(
    st.tuples(
        st.sampled_from([Kind.MESSAGE, Kind.REACTION, Kind.RECEIPT, "message", "nonsense"]),
        st.one_of(
            st.fixed_dictionaries({"text": st.text(max_size=8)}),
            st.just([]),  # not a map
        ),
        st.sampled_from(["", "sato@tsu", "ito@mie-pref"]),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    origin=st.sampled_from([HOME, "tsu"]),
    first_seq=st.sampled_from([1, 2, 7, 2**53 - 3]),
    others=st.sampled_from([{}, {HOME: 1}, {HOME: 4, "ise": 9}, {"ise": 2}, {HOME: 0}]),
    items=_SERIES_ITEMS,
)
def test_contents_made_in_series_equal_contents_made_one_by_one(
    origin: str,
    first_seq: int,
    others: dict[str, int],
    items: list[tuple[Any, Any, Any]],
) -> None:
    # The same contents, field for field and type for type, or the same refusal.
    try:
        expected: list[Content] | ProtocolError = _series_by_hand(
            origin, first_seq, {o: s for o, s in others.items() if o != origin}, items
        )
    except (ProtocolError, ValueError) as exc:
        expected = exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc))
    try:
        made: list[Content] | ProtocolError = _series(
            origin, first_seq, {o: s for o, s in others.items() if o != origin}, items
        )
    except (ProtocolError, ValueError) as exc:
        made = exc if isinstance(exc, ProtocolError) else ProtocolError(str(exc))
    if isinstance(expected, ProtocolError):
        assert isinstance(made, ProtocolError)
        assert (made.code, str(made)) == (expected.code, str(expected))
        return
    assert isinstance(made, list)
    assert len(made) == len(expected)
    for mine, theirs in zip(made, expected, strict=True):
        assert mine == theirs
        for field in dataclasses.fields(Content):
            assert type(getattr(mine, field.name)) is type(getattr(theirs, field.name))
        assert mine.to_bytes() == theirs.to_bytes()


def test_contents_in_series_refuse_the_same_beyond_the_largest_seq() -> None:
    items = [(Kind.MESSAGE, {"text": "a"}, ""), (Kind.MESSAGE, {"text": "b"}, "")]
    with pytest.raises(ProtocolError, match="seq must be a positive integer"):
        _series(HOME, 2**53 - 1, {}, items)
    assert [c.seq for c in _series(HOME, 2**53 - 2, {}, items)] == [2**53 - 2, 2**53 - 1]


def test_contents_in_series_need_one_timestamp_per_item() -> None:
    with pytest.raises(ValueError, match="one timestamp per item"):
        contents_in_series(
            room=ROOM,
            origin=HOME,
            key_id=KEY.key_id,
            first_seq=1,
            others={},
            hlcs=[HLC0],
            items=[(Kind.MESSAGE, {"text": "a"}, ""), (Kind.MESSAGE, {"text": "b"}, "")],
        )


# --- dependency rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "origin", "deps"),
    [
        (2, HOME, {}),  # seq > 1 without its own previous envelope
        (3, HOME, {HOME: 1}),  # own dependency is not seq - 1
        (3, HOME, {HOME: 3}),  # depends on itself
        (1, HOME, {HOME: 1}),  # a first envelope cannot depend on its own origin
        (1, "tsu", {}),  # not the home node, and no home dependency
        (2, "tsu", {"tsu": 1}),  # own previous named, home missing
        (1, "tsu", {"tsu": 1, HOME: 1}),
    ],
)
def test_dependency_rules_are_enforced(seq: int, origin: str, deps: dict[str, int]) -> None:
    with pytest.raises(ProtocolError) as info:
        content(seq, origin=origin, deps=deps)
    assert info.value.code == "bad_envelope"
    raw = content(1).to_wire()
    raw.update(seq=seq, origin=origin, deps=deps)
    assert protocol_error(_wrap_content(raw)).code == "bad_envelope"


@pytest.mark.parametrize(
    ("seq", "origin", "deps"),
    [
        (1, HOME, {}),
        (2, HOME, {HOME: 1}),
        (1, "tsu", {HOME: 1}),
        (4, "tsu", {"tsu": 3, HOME: 9, "ise": 2}),
    ],
)
def test_dependencies_that_follow_the_rules_are_accepted(
    seq: int, origin: str, deps: dict[str, int]
) -> None:
    assert content(seq, origin=origin, deps=deps).deps == deps


def test_too_many_dependencies_are_refused() -> None:
    deps = {f"n{i:03d}": 1 for i in range(MAX_DEPS)} | {HOME: 1}
    with pytest.raises(ProtocolError) as info:
        content(1, origin="tsu", deps=deps)
    assert info.value.code == "bad_envelope"


def test_an_envelope_can_depend_on_every_node_of_the_largest_prefecture() -> None:
    # A Hokkaido-wide room where every town has posted: 179 towns and the prefecture.
    deps = {f"town-{n:03d}": n for n in range(1, 179)} | {HOME: 7}
    made = content(1, origin="tsu", deps=deps)
    [sealed] = seal_batch([made], KEY)
    decoded = Envelope.from_bytes(sealed.to_bytes())
    assert decoded.content.deps == deps
    assert len(sealed.to_bytes()) < 16 * 1024


def test_dependency_on_an_invalid_node_id_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        content(1, origin="tsu", deps={HOME: 1, "Not A Node": 1})
    assert info.value.code == "bad_node_id"


# --- room ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "home"),
    [("!abc:tsu", "tsu"), ("!a-b_c9:mie-pref", "mie-pref"), ("!x:ab", "ab")],
)
def test_valid_room_ids_are_accepted_and_name_their_home(room: str, home: str) -> None:
    assert check_room_id(room) == room
    assert room_home(room) == home


@pytest.mark.parametrize(
    ("room", "code"),
    [
        ("abc:tsu", "bad_room_id"),  # no "!"
        ("!abc", "bad_room_id"),  # no home
        ("!:tsu", "bad_room_id"),  # empty local part
        ("!---:tsu", "bad_room_id"),  # no letter or digit
        ("!a b:tsu", "bad_room_id"),
        ("!a.b:tsu", "bad_room_id"),
        ("!部屋:tsu", "bad_room_id"),  # letters, but not ASCII (the schema allows ASCII only)
        ("!ａｂｃ:tsu", "bad_room_id"),  # full-width
        ("!" + "a" * 96 + ":tsu", "bad_room_id"),  # 101 characters
        (5, "bad_room_id"),
        (None, "bad_room_id"),
        ("!abc:Tsu", "bad_node_id"),
        ("!abc:tsu:ise", "bad_node_id"),
        ("!abc:t", "bad_node_id"),
        ("!abc:mie--pref", "bad_node_id"),
    ],
)
def test_invalid_room_ids_are_refused(room: object, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        check_room_id(room)
    assert info.value.code == code


def test_room_id_of_exactly_100_characters_is_accepted() -> None:
    room = "!" + "a" * 95 + ":tsu"
    assert len(room) == 100
    assert check_room_id(room) == room


def test_content_in_an_invalid_room_is_refused() -> None:
    raw = _content_map(room="kaigi:mie-pref")
    assert protocol_error(_wrap_content(raw)).code == "bad_room_id"


# --- the root cache -------------------------------------------------------------------------


@pytest.fixture
def ed25519_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Count the Ed25519 verifications RootCache performs (the messages it verified)."""
    calls: list[bytes] = []
    real = envelope_module.verify_signature

    def counting(public_key: bytes, signature: bytes, message: bytes) -> None:
        calls.append(message)
        real(public_key, signature, message)

    monkeypatch.setattr(envelope_module, "verify_signature", counting)
    return calls


def test_root_cache_verifies_a_batch_signature_once(ed25519_calls: list[bytes]) -> None:
    envelopes = seal_batch(chain(5), KEY)
    cache = RootCache()
    for env in envelopes:
        cache.verify(env, KEY.public_raw)
    assert len(ed25519_calls) == 1
    for env in envelopes:
        cache.verify(Envelope.from_bytes(env.to_bytes()), KEY.public_raw)
    assert len(ed25519_calls) == 1
    RootCache().verify(envelopes[0], KEY.public_raw)  # another cache knows nothing
    assert len(ed25519_calls) == 2


def test_root_cache_does_not_vouch_for_another_key_or_signature(
    ed25519_calls: list[bytes],
) -> None:
    env = seal_batch(chain(2), KEY)[0]
    cache = RootCache()
    cache.verify(env, KEY.public_raw)
    with pytest.raises(TrustError):
        cache.verify(env, OTHER_KEY.public_raw)
    forged = dataclasses.replace(env, signature=bytes(64))
    with pytest.raises(TrustError):
        cache.verify(forged, KEY.public_raw)
    assert len(ed25519_calls) == 3


def test_root_cache_does_not_remember_a_failed_verification(ed25519_calls: list[bytes]) -> None:
    env = seal_batch(chain(1), OTHER_KEY)[0]
    cache = RootCache()
    for _ in range(2):
        with pytest.raises(TrustError):
            cache.verify(env, KEY.public_raw)
    assert len(ed25519_calls) == 2


def test_root_cache_drops_its_oldest_entry_beyond_capacity(ed25519_calls: list[bytes]) -> None:
    batches = [seal_batch([content(1, body={"text": str(i)})], KEY)[0] for i in range(3)]
    cache = RootCache(capacity=2)
    for env in batches:
        cache.verify(env, KEY.public_raw)
    cache.verify(batches[2], KEY.public_raw)  # still cached
    assert len(ed25519_calls) == 3
    cache.verify(batches[0], KEY.public_raw)  # evicted: verified again
    assert len(ed25519_calls) == 4


# --- fuzzing ---------------------------------------------------------------------------------

_SAMPLE = seal_batch(chain(3), KEY)[2].to_bytes()


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=512))
def test_decoding_random_bytes_raises_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        Envelope.from_bytes(data)


@settings(max_examples=200, deadline=None, database=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.integers(1, len(_SAMPLE)),
)
def test_decoding_a_mutated_envelope_raises_only_protocol_error(
    edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_SAMPLE)
    for position, value in edits:
        data[position] = value
    # Peeking at its place never raises either: it reads a place or gives None.
    place = peek_place(bytes(data[:cut]))
    assert place is None or (type(place[0]) is str and type(place[2]) is int)
    peeked = peek_id(bytes(data[:cut]))
    assert peeked is None or len(peeked) == 32
    try:
        env = Envelope.from_bytes(bytes(data[:cut]))
    except ProtocolError:
        return
    try:
        RootCache().verify(env, KEY.public_raw)
    except TrustError:
        return
    assert env.to_bytes() == _SAMPLE  # whatever decodes and verifies is the original


def test_long_japanese_message_that_fits_the_envelope_is_decoded_by_the_receiver() -> None:
    # 17,000 kanji: within the 32 Ki-character text limit and, at 51,000 bytes of UTF-8,
    # within 64 KiB on the wire. A receiver that capped strings at 48 KiB refused it.
    (env,) = seal_batch([content(1, body={"text": "津" * 17_000})], KEY)
    received = Envelope.from_bytes(env.to_bytes())
    assert received.content.body["text"] == "津" * 17_000
    RootCache().verify(received, KEY.public_raw)


def test_content_header_keys_out_of_canonical_order_are_non_canonical() -> None:
    (env,) = seal_batch(chain(1), KEY)
    header = msgpack.unpackb(env.content_bytes, raw=False)
    reordered = msgpack.packb(dict(reversed(list(header.items()))), use_bin_type=True)
    assert reordered != env.content_bytes
    assert protocol_error(wire(reordered, bytes(64), 0, 1, [])).code == "non_canonical"


def test_float_inside_the_signed_body_is_non_canonical() -> None:
    (env,) = seal_batch(chain(1), KEY)
    header = msgpack.unpackb(env.content_bytes, raw=False)
    header["body"] = {"text": "x", "weight": 1.5}
    tampered = msgpack.packb(header, use_bin_type=True)
    assert protocol_error(wire(tampered, bytes(64), 0, 1, [])).code == "non_canonical"


# --- peeking at an envelope's place ----------------------------------------------------------


def test_peek_place_reads_room_origin_and_seq_without_decoding_the_rest() -> None:
    sealed = seal_batch([content(1), content(1, origin="tsu")], KEY)
    assert [peek_place(e.to_bytes()) for e in sealed] == [(ROOM, HOME, 1), (ROOM, "tsu", 1)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"sig": b"x"}),
        msgpack.packb({"c": "not bytes"}),
        msgpack.packb({"c": msgpack.packb([1])}),
        msgpack.packb({"c": msgpack.packb({"room": ROOM, "origin": HOME})}),
        msgpack.packb({"c": msgpack.packb({"room": ROOM, "origin": HOME, "seq": "1"})}),
        msgpack.packb({"c": msgpack.packb({"room": 5, "origin": HOME, "seq": 1})}),
        msgpack.packb({"c": msgpack.packb({"room": ROOM, "origin": HOME, "seq": True})}),
    ],
)
def test_peek_place_gives_none_for_what_it_cannot_read(data: bytes) -> None:
    assert peek_place(data) is None


def test_peek_id_reads_the_id_the_full_decode_gives() -> None:
    sealed = seal_batch([content(1), content(2, body={"text": "別の本文"})], KEY)
    assert [peek_id(e.to_bytes()) for e in sealed] == [e.id for e in sealed]
    assert sealed[0].id != sealed[1].id


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb(7),
        msgpack.packb({"sig": b"x"}),
        msgpack.packb({"c": "not bytes"}),
    ],
)
def test_peek_id_gives_none_for_what_it_cannot_read(data: bytes) -> None:
    assert peek_id(data) is None


@pytest.mark.parametrize("n", [1, 2, 3, 200, 300])
def test_the_wire_framing_is_the_canonical_encoding_of_its_fields(n: int) -> None:
    contents = [content(seq) for seq in range(1, n + 1)]
    for env in seal_batch(contents, KEY)[-2:]:
        fields = {
            "c": env.content_bytes,
            "sig": env.signature,
            "i": env.index,
            "n": env.size,
            "p": list(env.path),
        }
        assert env.to_bytes() == codec.encode(fields)
        assert Envelope.from_bytes(env.to_bytes()) == env
