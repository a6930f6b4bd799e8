"""The roster: the signed member list, its wire form, and the rules for accepting an update."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import codec
from federation.errors import KakehashiError, ProtocolError, TrustError
from federation.roster import (
    Endpoint,
    MemberStatus,
    PublishedKey,
    Roster,
    RosterEntry,
    SignedRoster,
    check_update,
    key_proof_message,
    rotation_chain,
    sign_roster,
    verify_roster,
    with_certificate,
    with_signing_key,
)
from federation.signing import SigningKey, verify_signature

FEDERATION_ID = "mie-renkei-7f3a"
T0 = 1_700_000_000  # 2023-11-14, a fixed instant; nothing here reads the clock


def signing_key(seed: int) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


def public_key(seed: int) -> bytes:
    return signing_key(seed).public_raw


FEDERATION_KEY = signing_key(100)
OTHER_KEY = signing_key(101)


def fingerprint(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def member(
    node_id: str,
    *,
    seed: int,
    name: str | None = None,
    code: str | None = None,
    status: MemberStatus = MemberStatus.ACTIVE,
    certificate: str | None = None,
    segments: Iterable[str] = ("lgwan",),
    keys: tuple[PublishedKey, ...] | None = None,
    relay: bool = False,
) -> RosterEntry:
    return RosterEntry(
        node_id=node_id,
        name=name or node_id,
        code=code,
        endpoints=tuple(
            Endpoint(segment=s, url=f"https://{node_id}.{s}.example.lg.jp:8443")
            for s in sorted(segments)
        ),
        signing_keys=keys or (PublishedKey(public_key=public_key(seed), not_before=T0),),
        tls_fingerprint=fingerprint(certificate or f"{node_id}-cert-1"),
        status=status,
        status_since=T0,
        relay=relay,
        joined_at=T0,
    )


def founding_members() -> list[RosterEntry]:
    return [
        member(
            "mie-pref",
            seed=1,
            name="三重県",
            code="240001",
            segments=("internet", "lgwan"),
            relay=True,
        ),
        member("tsu", seed=2, name="津市", code="242012"),
        member("yokkaichi", seed=3, name="四日市市", code="242021"),
        member("matsusaka", seed=4, name="松阪市", code="242047"),
    ]


def make_roster(
    version: int = 1,
    members: Iterable[RosterEntry] | None = None,
    *,
    federation_id: str = FEDERATION_ID,
    federation_key: SigningKey = FEDERATION_KEY,
) -> Roster:
    return Roster(
        federation_id=federation_id,
        federation_name="三重県 市町連携",
        version=version,
        issued_at=T0 + version,
        authority="mie-pref",
        federation_key=federation_key.public_raw,
        ca_fingerprint=fingerprint("federation-ca"),
        members=tuple(
            sorted(founding_members() if members is None else members, key=lambda m: m.node_id)
        ),
    )


def refused_update(current: Roster, candidate: SignedRoster) -> TrustError:
    with pytest.raises(TrustError) as info:
        check_update(current, candidate)
    return info.value


# --- signing and the wire form ------------------------------------------------------------


def test_roster_signed_by_the_federation_key_verifies() -> None:
    roster = make_roster()
    signed = sign_roster(roster, FEDERATION_KEY)
    assert signed.key_id == hashlib.sha256(FEDERATION_KEY.public_raw).hexdigest()[:16]
    assert signed.body == roster.to_bytes()
    assert verify_roster(signed, FEDERATION_KEY.public_raw) == roster


def test_roster_signed_by_another_key_is_refused_as_bad_roster_signature() -> None:
    signed = sign_roster(make_roster(), OTHER_KEY)
    with pytest.raises(TrustError) as info:
        verify_roster(signed, FEDERATION_KEY.public_raw)
    assert info.value.code == "bad_roster_signature"


def test_forged_signature_claiming_the_trusted_key_id_is_refused_as_bad_roster_signature() -> None:
    roster = make_roster()
    body = roster.to_bytes()
    forged = SignedRoster(
        body=body, signature=OTHER_KEY.sign(body), key_id=FEDERATION_KEY.key_id, roster=roster
    )
    with pytest.raises(TrustError) as info:
        verify_roster(forged, FEDERATION_KEY.public_raw)
    assert info.value.code == "bad_roster_signature"


def test_signed_roster_wire_round_trip_preserves_body_bytes_exactly() -> None:
    signed = sign_roster(make_roster(), FEDERATION_KEY)
    parsed = SignedRoster.from_bytes(signed.to_bytes())
    assert parsed.body == signed.body
    assert parsed.signature == signed.signature
    assert parsed.key_id == signed.key_id
    assert parsed.roster == signed.roster
    assert parsed.version == 1
    assert verify_roster(parsed, FEDERATION_KEY.public_raw) == make_roster()


def test_roster_document_round_trips_through_its_canonical_bytes() -> None:
    roster = make_roster(members=[*founding_members(), member("ise", seed=5, code="242039")])
    assert Roster.from_bytes(roster.to_bytes()) == roster


def test_roster_document_keeps_statuses_windows_and_japanese_names() -> None:
    old_key = PublishedKey(public_key=signing_key(7).public_raw, not_before=T0, not_after=T0 + 99)
    new_key = PublishedKey(public_key=signing_key(8).public_raw, not_before=T0 + 50)
    members = [
        *founding_members(),
        member("ise", seed=5, name="伊勢市", status=MemberStatus.REVOKED, keys=(old_key, new_key)),
    ]
    decoded = Roster.from_bytes(make_roster(members=members).to_bytes())
    ise = decoded.member("ise")
    assert ise is not None
    assert ise.name == "伊勢市"
    assert ise.status is MemberStatus.REVOKED
    assert ise.signing_keys == (old_key, new_key)
    assert ise.code is None


# --- check_update -------------------------------------------------------------------------


def test_next_version_is_accepted_and_reports_joined_status_changed_and_rekeyed() -> None:
    current = make_roster(1)
    by_id = {m.node_id: m for m in founding_members()}
    updated = [
        by_id["mie-pref"],  # unchanged
        replace(by_id["tsu"], status=MemberStatus.SUSPENDED, status_reason="audit"),
        replace(by_id["yokkaichi"], tls_fingerprint=fingerprint("yokkaichi-cert-2")),
        member("matsusaka", seed=4, name="松阪市", code="242047", segments=("internet", "lgwan")),
        member("ise", seed=5, name="伊勢市", code="242039"),
    ]
    candidate = sign_roster(make_roster(2, updated), FEDERATION_KEY)

    change = check_update(current, candidate)

    assert change.previous_version == 1
    assert change.version == 2
    assert change.joined == ("ise",)
    assert change.status_changed == ("tsu",)
    assert change.rekeyed == ("matsusaka", "yokkaichi")


def test_new_signing_key_counts_as_rekeyed() -> None:
    current = make_roster(1)
    rotated = PublishedKey(public_key=signing_key(9).public_raw, not_before=T0 + 10)
    members = [
        replace(m, signing_keys=(*m.signing_keys, rotated)) if m.node_id == "tsu" else m
        for m in founding_members()
    ]
    change = check_update(current, sign_roster(make_roster(2, members), FEDERATION_KEY))
    assert change.rekeyed == ("tsu",)
    assert change.joined == change.status_changed == ()


def test_update_that_only_reissues_reports_no_changes() -> None:
    change = check_update(make_roster(1), sign_roster(make_roster(2), FEDERATION_KEY))
    assert (change.joined, change.status_changed, change.rekeyed) == ((), (), ())


def test_version_may_skip_ahead() -> None:
    change = check_update(make_roster(3), sign_roster(make_roster(10), FEDERATION_KEY))
    assert (change.previous_version, change.version) == (3, 10)


def test_roster_with_the_same_version_is_refused_as_rollback() -> None:
    current = make_roster(5)
    assert refused_update(current, sign_roster(make_roster(5), FEDERATION_KEY)).code == (
        "roster_rollback"
    )


def test_roster_with_an_older_version_is_refused_as_rollback() -> None:
    current = make_roster(5)
    assert refused_update(current, sign_roster(make_roster(4), FEDERATION_KEY)).code == (
        "roster_rollback"
    )


def test_captured_old_roster_cannot_resurrect_a_revoked_member() -> None:
    v1 = make_roster(1)
    captured = sign_roster(v1, FEDERATION_KEY)
    revoked = [
        replace(m, status=MemberStatus.REVOKED) if m.node_id == "tsu" else m
        for m in founding_members()
    ]
    v2 = make_roster(2, revoked)
    check_update(v1, sign_roster(v2, FEDERATION_KEY))
    assert refused_update(v2, captured).code == "roster_rollback"


def test_update_signed_by_another_key_is_refused_as_bad_roster_signature() -> None:
    candidate = sign_roster(make_roster(2), OTHER_KEY)
    assert refused_update(make_roster(1), candidate).code == "bad_roster_signature"


def test_update_for_another_federation_is_refused_as_wrong_federation() -> None:
    candidate = sign_roster(make_roster(2, federation_id="aichi-renkei-0b1c"), FEDERATION_KEY)
    assert refused_update(make_roster(1), candidate).code == "wrong_federation"


def test_every_single_byte_flip_in_the_body_is_refused() -> None:
    current = make_roster(1)
    signed = sign_roster(make_roster(2), FEDERATION_KEY)
    accepted: list[int] = []
    for index in range(len(signed.body)):
        body = bytearray(signed.body)
        body[index] ^= 0x01
        wire = codec.encode({"body": bytes(body), "sig": signed.signature, "kid": signed.key_id})
        try:
            check_update(current, SignedRoster.from_bytes(wire))
        except KakehashiError as exc:
            assert isinstance(exc, ProtocolError | TrustError)
        else:
            accepted.append(index)
    assert accepted == []


def test_federation_key_rotation_is_announced_by_the_old_key_and_then_used() -> None:
    new_key = signing_key(102)
    v1 = make_roster(1)
    v2 = make_roster(2, federation_key=new_key)  # names the new key, signed by the old
    check_update(v1, sign_roster(v2, FEDERATION_KEY))

    v3 = make_roster(3, federation_key=new_key)
    check_update(v2, sign_roster(v3, new_key))
    assert refused_update(v2, sign_roster(v3, FEDERATION_KEY)).code == "bad_roster_signature"


def test_roster_naming_a_new_key_but_signed_by_it_is_refused() -> None:
    new_key = signing_key(102)
    v2 = make_roster(2, federation_key=new_key)
    assert refused_update(make_roster(1), sign_roster(v2, new_key)).code == ("bad_roster_signature")


# --- members ------------------------------------------------------------------------------


def statuses_roster() -> Roster:
    return make_roster(
        members=[
            *founding_members(),
            member("ise", seed=5, status=MemberStatus.SUSPENDED),
            member("kuwana", seed=6, status=MemberStatus.REVOKED),
        ]
    )


def test_active_member_returns_the_entry_of_an_active_member() -> None:
    entry = statuses_roster().active_member("tsu")
    assert entry.node_id == "tsu"
    assert entry.active


@pytest.mark.parametrize(
    ("node_id", "code"),
    [("nabari", "unknown_peer"), ("ise", "peer_suspended"), ("kuwana", "peer_revoked")],
)
def test_active_member_refuses_unknown_suspended_and_revoked_nodes(node_id: str, code: str) -> None:
    with pytest.raises(TrustError) as info:
        statuses_roster().active_member(node_id)
    assert info.value.code == code
    assert info.value.status == 403


def test_member_lookup_finds_members_whatever_their_status() -> None:
    roster = statuses_roster()
    kuwana = roster.member("kuwana")
    assert kuwana is not None
    assert kuwana.status is MemberStatus.REVOKED
    assert not kuwana.active
    assert roster.member("nabari") is None


def test_member_is_found_by_its_tls_fingerprint() -> None:
    roster = make_roster()
    found = roster.by_fingerprint(fingerprint("yokkaichi-cert-1"))
    assert found is not None
    assert found.node_id == "yokkaichi"
    assert roster.by_fingerprint(fingerprint("nobody")) is None


def test_with_member_adds_in_order_and_bumps_the_version() -> None:
    roster = make_roster(4)
    added = roster.with_member(member("ise", seed=5), issued_at=T0 + 100)
    assert added.version == 5
    assert added.issued_at == T0 + 100
    assert [m.node_id for m in added.members] == [
        "ise",
        "matsusaka",
        "mie-pref",
        "tsu",
        "yokkaichi",
    ]


def test_with_member_replaces_the_member_of_the_same_id() -> None:
    roster = make_roster(1)
    suspended = replace(roster.active_member("tsu"), status=MemberStatus.SUSPENDED)
    updated = roster.with_member(suspended, issued_at=T0 + 5)
    assert len(updated.members) == len(roster.members)
    tsu = updated.member("tsu")
    assert tsu is not None
    assert tsu.status is MemberStatus.SUSPENDED


def test_member_endpoint_and_signing_key_lookup() -> None:
    entry = make_roster().active_member("mie-pref")
    assert entry.segments == ("internet", "lgwan")
    lgwan = entry.endpoint("lgwan")
    assert lgwan is not None
    assert lgwan.url == "https://mie-pref.lgwan.example.lg.jp:8443"
    assert entry.endpoint("other") is None
    kid = hashlib.sha256(signing_key(1).public_raw).hexdigest()[:16]
    published = entry.signing_key(kid)
    assert published is not None
    assert published.public_key == signing_key(1).public_raw
    assert entry.signing_key("0" * 16) is None


# --- validation ---------------------------------------------------------------------------


def entry_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "node_id": "tsu",
        "name": "津市",
        "code": "242012",
        "endpoints": (
            Endpoint(segment="internet", url="https://tsu.example.jp"),
            Endpoint(segment="lgwan", url="https://tsu.lgwan.example"),
        ),
        "signing_keys": (PublishedKey(public_key=b"\x01" * 32, not_before=T0),),
        "tls_fingerprint": b"\x02" * 32,
    }
    fields.update(overrides)
    return fields


def test_valid_entry_fields_build_an_entry() -> None:
    assert RosterEntry(**entry_fields()).node_id == "tsu"


@pytest.mark.parametrize(
    "overrides",
    [
        {"endpoints": tuple(reversed(entry_fields()["endpoints"]))},
        {"endpoints": (Endpoint(segment="lgwan", url="https://a"),) * 2},
        {"tls_fingerprint": b"\x02" * 31},
        {"tls_fingerprint": b"\x02" * 33},
        {"signing_keys": ()},
        {"code": "242013"},
        {"node_id": "Tsu"},
        {"name": ""},
        {"name": "x" * 201},
    ],
    ids=[
        "unsorted-endpoints",
        "duplicate-segment",
        "short-fingerprint",
        "long-fingerprint",
        "no-signing-keys",
        "bad-code",
        "bad-node-id",
        "empty-name",
        "long-name",
    ],
)
def test_invalid_roster_entry_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        RosterEntry(**entry_fields(**overrides))


def test_endpoint_must_be_https_on_a_named_segment() -> None:
    with pytest.raises(ProtocolError) as info:
        Endpoint(segment="lgwan", url="http://tsu.example.jp")
    assert info.value.code == "bad_endpoint"
    with pytest.raises(ProtocolError) as info:
        Endpoint(segment="LGWAN", url="https://tsu.example.jp")
    assert info.value.code == "bad_segment"


def test_published_key_is_valid_inclusively_within_its_window() -> None:
    key = PublishedKey(public_key=b"\x01" * 32, not_before=100, not_after=200)
    assert not key.valid_at(99)
    assert key.valid_at(100)
    assert key.valid_at(150)
    assert key.valid_at(200)
    assert not key.valid_at(201)


def test_current_published_key_is_valid_from_not_before_onwards() -> None:
    key = PublishedKey(public_key=b"\x01" * 32, not_before=100)
    assert not key.valid_at(99)
    assert key.valid_at(100)
    assert key.valid_at(2**40)


def test_published_key_refuses_a_window_that_ends_before_it_starts() -> None:
    PublishedKey(public_key=b"\x01" * 32, not_before=100, not_after=100)  # one instant is fine
    with pytest.raises(ProtocolError):
        PublishedKey(public_key=b"\x01" * 32, not_before=100, not_after=99)


@pytest.mark.parametrize("length", [0, 31, 33])
def test_published_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ProtocolError):
        PublishedKey(public_key=b"\x01" * length, not_before=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"version": 0},
        {"authority": "ise"},
        {"federation_id": "Mie"},
        {"federation_key": b"\x01" * 31},
        {"ca_fingerprint": b"\x01" * 33},
    ],
    ids=["version-0", "authority-not-member", "bad-federation-id", "short-key", "long-ca"],
)
def test_invalid_roster_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        replace(make_roster(), **overrides)


def test_roster_members_must_be_sorted_and_unique() -> None:
    members = make_roster().members
    with pytest.raises(ProtocolError):
        replace(make_roster(), members=tuple(reversed(members)))
    with pytest.raises(ProtocolError):
        replace(make_roster(), members=(*members, members[-1]))


# --- refusing malformed wire input --------------------------------------------------------


def roster_wire(**changes: Any) -> dict[str, Any]:
    wire = make_roster().to_wire()
    wire.update(changes)
    return wire


def refused_roster(wire: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        Roster.from_bytes(codec.encode(wire))
    return info.value


def test_unknown_roster_format_is_refused() -> None:
    assert refused_roster(roster_wire(format=2)).code == "bad_roster"


def test_roster_field_of_the_wrong_type_is_refused() -> None:
    assert refused_roster(roster_wire(version="2")).code == "bad_roster"


def test_boolean_is_not_accepted_as_a_roster_integer() -> None:
    assert refused_roster(roster_wire(version=True)).code == "bad_roster"


def test_boolean_true_is_not_accepted_as_roster_format_1() -> None:
    assert refused_roster(roster_wire(format=True)).code == "bad_roster"


def test_roster_missing_a_field_is_refused() -> None:
    wire = roster_wire()
    del wire["ca_fingerprint"]
    assert refused_roster(wire).code == "bad_roster"


def test_member_with_an_unknown_status_is_refused() -> None:
    wire = roster_wire()
    wire["members"][0]["status"] = "banned"
    assert refused_roster(wire).code == "bad_roster"


def test_signing_key_window_end_must_be_an_integer() -> None:
    wire = roster_wire()
    wire["members"][0]["signing_keys"][0]["not_after"] = True
    assert refused_roster(wire).code == "bad_roster"


def test_signed_roster_with_an_extra_field_is_refused() -> None:
    signed = sign_roster(make_roster(), FEDERATION_KEY)
    wire = {"body": signed.body, "sig": signed.signature, "kid": signed.key_id, "x": 1}
    with pytest.raises(ProtocolError) as info:
        SignedRoster.from_bytes(codec.encode(wire))
    assert info.value.code == "bad_roster"


def test_signed_roster_whose_body_is_not_a_roster_is_refused() -> None:
    wire = {"body": codec.encode([1, 2]), "sig": b"\x00" * 64, "kid": "0" * 16}
    with pytest.raises(ProtocolError):
        SignedRoster.from_bytes(codec.encode(wire))


# --- properties ---------------------------------------------------------------------------

NO_DB = settings(database=None, deadline=None)


@settings(NO_DB, max_examples=300)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_as_a_signed_roster_raise_only_protocol_error(data: bytes) -> None:
    try:
        signed = SignedRoster.from_bytes(data)
    except ProtocolError as exc:
        assert exc.code
    else:  # random bytes essentially never form a roster; if they do, they are canonical
        assert signed.to_bytes() == data


def _field_paths() -> list[tuple[Any, ...]]:
    wire = make_roster().to_wire()
    paths: list[tuple[Any, ...]] = [(key,) for key in wire]
    member_wire = wire["members"][0]
    paths += [("members", 0, key) for key in member_wire]
    paths += [("members", 0, "endpoints", 0, key) for key in member_wire["endpoints"][0]]
    paths += [("members", 0, "signing_keys", 0, key) for key in member_wire["signing_keys"][0]]
    return paths


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=40)
    | st.binary(min_size=30, max_size=34)
    | st.sampled_from(["active", "revoked", "lgwan", "https://x", "242012", "tsu"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=6,
)


@settings(NO_DB, max_examples=150)
@given(st.sampled_from(_field_paths()), wire_values)
def test_roster_with_any_field_replaced_is_refused_with_protocol_error_or_reencodes_exactly(
    path: tuple[Any, ...], value: Any
) -> None:
    wire = make_roster().to_wire()
    parent = wire
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    data = codec.encode(wire)
    try:
        roster = Roster.from_bytes(data)
    except ProtocolError:
        return
    # Whatever is accepted is re-encoded to exactly the bytes that were signed.
    assert roster.to_bytes() == data


@pytest.mark.parametrize("path", _field_paths(), ids=lambda p: ".".join(map(str, p)))
def test_roster_with_a_required_field_removed_is_refused(path: tuple[Any, ...]) -> None:
    wire = make_roster().to_wire()
    parent = wire
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    if path[-1] == "code":  # optional: absence reads as "no code"
        assert Roster.from_bytes(codec.encode(wire)).members[0].code is None
        return
    if path[-1] == "not_after":  # optional: absence reads as "current key"
        assert Roster.from_bytes(codec.encode(wire)).members[0].signing_keys[0].not_after is None
        return
    with pytest.raises(ProtocolError):
        Roster.from_bytes(codec.encode(wire))


# --------------------------------------------------------------------------- key lifecycle


def test_certificate_rotation_accepts_the_replaced_one_only_during_the_overlap() -> None:
    tsu = member("tsu", seed=2)
    rotated = with_certificate(tsu, fingerprint("tsu-cert-2"), now=T0 + 10, overlap=3600)
    assert rotated.certificates(T0 + 10) == (fingerprint("tsu-cert-2"), fingerprint("tsu-cert-1"))
    assert len(rotated.certificates(T0 + 3610)) == 2  # the last second of the overlap
    assert rotated.certificates(T0 + 3611) == (fingerprint("tsu-cert-2"),)
    roster = make_roster(2, [*founding_members()[:1], rotated, *founding_members()[2:]])
    assert roster.by_fingerprint(fingerprint("tsu-cert-1")) == rotated
    assert roster.by_fingerprint(fingerprint("tsu-cert-2")) == rotated
    with pytest.raises(TrustError) as same:
        with_certificate(rotated, fingerprint("tsu-cert-2"), now=T0, overlap=1)
    assert same.value.code == "same_certificate"


def test_a_rotation_in_progress_survives_the_wire_and_a_plain_entry_encodes_as_before() -> None:
    plain = member("tsu", seed=2)
    assert "previous_tls" not in plain.to_wire()
    rotated = with_certificate(plain, fingerprint("tsu-cert-2"), now=T0, overlap=60)
    roster = make_roster(2, [rotated, member("mie-pref", seed=1)])
    again = Roster.from_bytes(roster.to_bytes())
    assert again == roster
    assert again.member("tsu") == rotated


def test_signing_key_rotation_closes_open_windows_and_keeps_history() -> None:
    tsu = member("tsu", seed=2)
    once = with_signing_key(tsu, public_key(20), now=T0 + 100, overlap=50)
    first, second = once.signing_keys
    assert (first.not_before, first.not_after) == (T0, T0 + 150)
    assert (second.not_before, second.not_after) == (T0 + 100, None)
    assert first.valid_at(T0 + 99) and first.valid_at(T0 + 150) and not first.valid_at(T0 + 151)
    twice = with_signing_key(once, public_key(21), now=T0 + 1000, overlap=50)
    assert twice.signing_keys[0] == first  # an old window is never reopened or moved
    assert twice.signing_keys[1].not_after == T0 + 1050
    with pytest.raises(TrustError) as reused:
        with_signing_key(twice, public_key(2), now=T0 + 2000, overlap=50)
    assert reused.value.code == "key_reused"


def test_key_proof_binds_federation_node_and_key() -> None:
    key = signing_key(30)
    proof = key.sign(key_proof_message(FEDERATION_ID, "tsu", key.public_raw))
    verify_signature(key.public_raw, proof, key_proof_message(FEDERATION_ID, "tsu", key.public_raw))
    for federation, node in (("other-fed-1a2b", "tsu"), (FEDERATION_ID, "ise")):
        with pytest.raises(TrustError):
            verify_signature(
                key.public_raw, proof, key_proof_message(federation, node, key.public_raw)
            )


def test_rotation_chain_lets_a_node_follow_every_federation_key_change() -> None:
    k0, k1, k2 = FEDERATION_KEY, OTHER_KEY, signing_key(102)
    v1 = make_roster(1)
    signed: list[SignedRoster] = [sign_roster(v1, k0)]
    keys_by_version = {1: k0, 2: k0, 3: k1, 4: k1, 5: k2, 6: k2}
    for version in range(2, 7):
        announced = keys_by_version.get(version + 1, keys_by_version[version])
        roster = replace(make_roster(version), federation_key=announced.public_raw)
        signed.append(sign_roster(roster, keys_by_version[version]))
    # v2 names k1 (signed by k0), v4 names k2 (signed by k1), v6 is the newest.
    chain = rotation_chain(v1, reversed(signed))
    assert [s.version for s in chain] == [2, 4, 6]
    held = v1
    for step in chain:
        check_update(held, step)
        held = step.roster
    assert held.version == 6
    # Without the chain, the newest cannot be checked against what v1 names.
    assert refused_update(v1, signed[-1]).code == "bad_roster_signature"
    assert rotation_chain(held, signed) == []
