"""The audit log's pure core: the hash chain, signed heads, and verification naming each record."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import codec
from federation.audit import (
    HEAD_SIGNING_CONTEXT,
    ZERO_HASH,
    AuditRecord,
    Problem,
    SignedHead,
    Throttle,
    Unreadable,
    head_from_row,
    make_fields,
    record_from_row,
    redact,
    seal_record,
    sign_head,
    verify_chain,
    verify_head,
)
from federation.errors import ProtocolError, TrustError
from federation.signing import SigningKey

T0 = 1_790_000_000_000  # 2026-09-21 in unix ms; nothing here reads the clock


def signing_key(seed: int) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


KEY = signing_key(7)
PUBLIC = KEY.public_raw


def chain(
    count: int, *, heads_at: tuple[int, ...] = ()
) -> tuple[list[AuditRecord], list[SignedHead]]:
    """`count` records, as the node writes them, and heads signed at `heads_at`."""
    records: list[AuditRecord] = []
    prev = ZERO_HASH
    for seq in range(1, count + 1):
        record = seal_record(
            seq=seq,
            at_ms=T0 + seq * 1000,
            event="member_status_changed" if seq % 2 else "roster_adopted",
            fields={"node": f"town-{seq}", "roster_version": seq, "joined": ["tsu", "ise"]},
            prev=prev,
        )
        records.append(record)
        prev = record.hash
    heads = [
        sign_head(seq=s, digest=records[s - 1].hash, at_ms=T0 + s * 1000 + 1, key=KEY)
        for s in heads_at
    ]
    return records, heads


def rehashed(record: AuditRecord, **changes: object) -> AuditRecord:
    """`record` changed and its hash recomputed, as a careful tamperer would."""
    changed = replace(record, **changes)  # type: ignore[arg-type]
    return replace(changed, hash=changed.computed_hash())


def kinds(problems: list[Problem]) -> list[tuple[str, int]]:
    return [(p.kind.value, p.seq) for p in problems]


# --- the chain ---------------------------------------------------------------------------


def test_each_record_links_to_the_hash_of_the_one_before_and_the_first_to_zeros() -> None:
    records, _ = chain(4)
    assert records[0].prev == ZERO_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev == before.hash
    assert [r.seq for r in records] == [1, 2, 3, 4]


def test_record_hash_is_sha256_of_the_canonical_msgpack_of_its_five_parts() -> None:
    record = seal_record(
        seq=3,
        at_ms=T0,
        event="join_admitted",
        fields={"node": "tsu", "relay": False},
        prev=b"\x01" * 32,
    )
    expected = hashlib.sha256(
        codec.encode(
            {
                "at_ms": T0,
                "event": "join_admitted",
                "fields": {"node": "tsu", "relay": False},
                "prev": b"\x01" * 32,
                "seq": 3,
            }
        )
    ).digest()
    assert record.hash == expected == record.computed_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 4},
        {"at_ms": T0 + 1},
        {"event": "join_denied"},
        {"fields": (("node", "ise"),)},
        {"prev": b"\x02" * 32},
    ],
)
def test_the_hash_covers_every_part_of_a_record(change: dict[str, object]) -> None:
    record = seal_record(
        seq=3, at_ms=T0, event="join_admitted", fields={"node": "tsu"}, prev=ZERO_HASH
    )
    assert replace(record, **change).computed_hash() != record.hash  # type: ignore[arg-type]


def test_stored_columns_read_back_into_the_same_record() -> None:
    records, heads = chain(3, heads_at=(3,))
    record = records[1]
    assert (
        record_from_row(
            record.seq, record.at_ms, record.event, record.fields_bytes(), record.prev, record.hash
        )
        == record
    )
    head = heads[0]
    assert head_from_row(head.seq, head.hash, head.at_ms, head.signature, head.key_id) == head


def test_intact_log_has_no_problems() -> None:
    records, heads = chain(12, heads_at=(5, 10, 12))
    assert verify_chain(records, heads, PUBLIC) == []
    assert verify_chain([], [], PUBLIC) == []


# --- each kind of tampering is found and located ----------------------------------------


def test_edited_record_is_named() -> None:
    records, heads = chain(6, heads_at=(6,))
    records[2] = replace(records[2], fields=(("node", "rogue"),))
    assert kinds(verify_chain(records, heads, PUBLIC)) == [("edited", 3)]


def test_edited_record_with_its_hash_recomputed_is_named_by_the_next_records_link() -> None:
    records, heads = chain(6, heads_at=(6,))
    records[2] = rehashed(records[2], event="join_denied")
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("edited", 3)]
    assert "record 4 links to another version" in problems[0].detail


def test_last_record_edited_and_rehashed_is_caught_by_its_signed_head() -> None:
    records, heads = chain(6, heads_at=(3, 6))
    records[5] = rehashed(records[5], at_ms=T0)
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("head_mismatch", 6)]
    assert "records 4-6 were rewritten" in problems[0].detail


def test_rewritten_and_rechained_records_are_caught_by_the_next_signed_head() -> None:
    records, heads = chain(8, heads_at=(2, 8))
    prev = records[3].prev
    for at in range(3, 8):  # rewrite record 4 and re-chain everything after it
        changes: dict[str, object] = {"prev": prev}
        if at == 3:
            changes["fields"] = (("node", "rogue"),)
        records[at] = rehashed(records[at], **changes)
        prev = records[at].hash
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("head_mismatch", 8)]
    assert "records 3-8" in problems[0].detail  # after the last head that still matches


@pytest.mark.parametrize("removed", [1, 4])
def test_removed_record_is_named(removed: int) -> None:
    records, heads = chain(6, heads_at=(6,))
    del records[removed - 1]
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("removed", removed)]
    assert f"record {removed} is missing" in problems[0].detail


def test_several_removed_records_are_named_as_one_range() -> None:
    records, heads = chain(9, heads_at=(9,))
    del records[3:6]
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("removed", 4)]
    assert "records 4-6 are missing" in problems[0].detail


def test_truncation_is_detected_when_a_signed_head_names_the_lost_records() -> None:
    records, heads = chain(8, heads_at=(4, 8))
    problems = verify_chain(records[:5], heads, PUBLIC)
    assert kinds(problems) == [("truncated", 6)]
    assert "records 6-8 are missing from the end" in problems[0].detail
    assert kinds(verify_chain([], heads, PUBLIC)) == [("truncated", 1)]


def test_truncating_records_after_the_last_signed_head_cannot_be_seen() -> None:
    # The limit of any local log: what no head names yet is protected by the chain alone.
    # This is why the node signs a head every few records, every minute and at stop.
    records, heads = chain(8, heads_at=(5,))
    assert verify_chain(records[:6], heads, PUBLIC) == []


def test_records_whose_seqs_were_swapped_are_named_as_reordered() -> None:
    records, heads = chain(7, heads_at=(7,))
    records[1], records[4] = replace(records[4], seq=2), replace(records[1], seq=5)
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("reordered", 2), ("reordered", 5)]
    assert "holds record 5" in problems[0].detail and "holds record 2" in problems[1].detail


def test_adjacent_records_whose_seqs_were_swapped_are_named_as_reordered() -> None:
    records, heads = chain(5, heads_at=(5,))
    records[2], records[3] = replace(records[3], seq=3), replace(records[2], seq=4)
    assert kinds(verify_chain(records, heads, PUBLIC)) == [("reordered", 3), ("reordered", 4)]


def test_record_moved_to_a_new_seq_is_named_and_not_counted_as_removed() -> None:
    records, heads = chain(5, heads_at=(5,))
    moved = replace(records[2], seq=9)
    problems = verify_chain([*records[:2], *records[3:], moved], heads, PUBLIC)
    assert kinds(problems) == [("reordered", 9)]
    assert "holds record 3" in problems[0].detail


def test_copy_of_a_record_under_another_seq_is_named() -> None:
    records, heads = chain(5, heads_at=(5,))
    problems = verify_chain([*records, replace(records[1], seq=6)], heads, PUBLIC)
    assert kinds(problems) == [("duplicated", 6)]


def test_records_stored_out_of_order_are_named() -> None:
    records, heads = chain(6, heads_at=(6,))
    records[1], records[4] = records[4], records[1]
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("reordered", 2), ("reordered", 5)]
    assert "stored at position 2, where record 2 belongs" in problems[1].detail


def test_unreadable_row_is_named_as_edited() -> None:
    records, heads = chain(4, heads_at=(4,))
    record = records[1]
    broken = record_from_row(2, record.at_ms, record.event, b"\xc1", record.prev, record.hash)
    assert isinstance(broken, Unreadable)
    problems = verify_chain([records[0], broken, *records[2:]], heads, PUBLIC)
    assert kinds(problems) == [("edited", 2)]
    bad_event = record_from_row(
        2, record.at_ms, "DROP TABLE", record.fields_bytes(), record.prev, b""
    )
    assert isinstance(bad_event, Unreadable)


# --- heads ---------------------------------------------------------------------------------


def test_head_with_a_bad_signature_is_named() -> None:
    records, heads = chain(4, heads_at=(2, 4))
    heads[1] = replace(heads[1], signature=bytes(64))
    problems = verify_chain(records, heads, PUBLIC)
    assert kinds(problems) == [("head_bad_signature", 4)]


def test_head_moved_to_cover_another_record_does_not_verify() -> None:
    records, heads = chain(4, heads_at=(4,))
    forged = replace(heads[0], seq=3, hash=records[2].hash)
    assert kinds(verify_chain(records, [forged], PUBLIC)) == [("head_bad_signature", 3)]


def test_head_signed_by_another_key_is_refused_but_a_previous_key_of_the_node_is_accepted() -> None:
    records, _ = chain(3)
    old = signing_key(9)
    head = sign_head(seq=3, digest=records[2].hash, at_ms=T0, key=old)
    problems = verify_chain(records, [head], PUBLIC)
    assert kinds(problems) == [("head_bad_signature", 3)]
    assert old.key_id in problems[0].detail
    assert verify_chain(records, [head], PUBLIC, previous_keys=[old.public_raw]) == []


def test_head_signature_covers_its_own_context_only() -> None:
    records, _ = chain(1)
    head = sign_head(seq=1, digest=records[0].hash, at_ms=T0, key=KEY)
    bare = codec.encode({"seq": 1, "hash": records[0].hash, "at_ms": T0})
    assert HEAD_SIGNING_CONTEXT.startswith(b"kakehashi/audit-head/")
    verify_head(head, [PUBLIC])
    with pytest.raises(TrustError):
        verify_head(replace(head, signature=KEY.sign(bare)), [PUBLIC])
    with pytest.raises(TrustError):
        verify_head(replace(head, at_ms=T0 + 1), [PUBLIC])


# --- fields never carry secrets ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["token", "invite_token", "private_key", "password", "key", "nonce"]
)
def test_field_names_that_suggest_a_secret_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        make_fields({name: "x"})
    assert refused.value.code == "secret_in_audit"


def test_values_that_look_like_tokens_or_pem_blocks_are_redacted() -> None:
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJub2RlIjoidHN1In0.c2lnbmF0dXJl"
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END PRIVATE KEY-----"
    fields = dict(make_fields({"message": f"refused {jwt} for tsu", "detail": [pem, "ok"]}))
    assert fields["message"] == "refused [redacted] for tsu"
    assert fields["detail"] == ("[redacted]", "ok")
    assert redact("tsu and ise") == "tsu and ise"


@pytest.mark.parametrize("value", [1.5, b"raw", {"nested": 1}, [[1]]])
def test_field_values_must_be_json_like_scalars_or_lists_of_them(value: object) -> None:
    with pytest.raises(ProtocolError):
        make_fields({"value": value})


def test_event_and_field_names_are_snake_case() -> None:
    with pytest.raises(ProtocolError):
        seal_record(seq=1, at_ms=T0, event="Join Admitted", fields={}, prev=ZERO_HASH)
    with pytest.raises(ProtocolError):
        make_fields({"Node": "tsu"})


# --- throttle ------------------------------------------------------------------------------


def test_throttle_admits_one_per_key_per_window_and_carries_the_count() -> None:
    throttle = Throttle(window_ms=60_000)
    key = throttle.key("127.0.0.1", "client_certificate_required")
    assert throttle.admit(key, T0) == 0
    assert [throttle.admit(key, T0 + i) for i in range(1, 100)] == [None] * 99
    other = throttle.key("127.0.0.1", "too_large")
    assert throttle.admit(other, T0 + 5) == 0  # another reason has its own window
    assert throttle.admit(key, T0 + 60_000) == 99


def test_throttle_expiry_returns_held_counts_and_forgets_the_keys() -> None:
    throttle = Throttle(window_ms=60_000)
    quiet, loud = throttle.key("tsu", "peer_suspended"), throttle.key("10.0.0.9", "too_large")
    throttle.admit(quiet, T0)
    throttle.admit(loud, T0)
    throttle.admit(loud, T0 + 1)
    throttle.admit(loud, T0 + 2)
    assert throttle.expire(T0 + 59_999) == []
    assert throttle.expire(T0 + 60_000) == [(loud, 2)]
    assert len(throttle) == 0
    assert throttle.admit(loud, T0 + 60_001) == 0


def test_throttle_folds_keys_beyond_its_limit_into_one_per_reason() -> None:
    throttle = Throttle(window_ms=60_000, max_keys=3)
    admitted = [
        throttle.admit(throttle.key(f"10.0.0.{i}", "unknown_certificate"), T0) for i in range(50)
    ]
    assert admitted.count(0) == 4  # three addresses, then the shared overflow key
    assert len(throttle) == 4 - 1 + 1
    assert throttle.key("10.0.0.99", "unknown_certificate") == (
        Throttle.OVERFLOW,
        "unknown_certificate",
    )


# --- property: any single edit, deletion or swap is detected and located --------------------

MUTATIONS = ("edit", "edit_rehashed", "delete", "swap_seqs", "swap_stored_order")


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_any_single_edit_deletion_or_swap_is_detected_and_located(data: st.DataObject) -> None:
    count = data.draw(st.integers(min_value=2, max_value=20), label="records")
    heads_at = tuple(
        sorted({count} | set(data.draw(st.lists(st.integers(1, count), max_size=4), label="heads")))
    )
    records, heads = chain(count, heads_at=heads_at)
    assert verify_chain(records, heads, PUBLIC) == []
    mutation = data.draw(st.sampled_from(MUTATIONS), label="mutation")
    i = data.draw(st.integers(0, count - 1), label="at")
    tampered: list[AuditRecord | Unreadable] = list(records)
    target = records[i]
    if mutation in ("edit", "edit_rehashed"):
        part = data.draw(st.sampled_from(("at_ms", "event", "fields", "prev")), label="part")
        new_value: object = {
            "at_ms": target.at_ms + data.draw(st.integers(1, 10**6)),
            "event": "peer_refused",
            "fields": (("node", "rogue"),),
            "prev": bytes([i + 1]) * 32,
        }[part]
        if getattr(target, part) == new_value:
            new_value = (("node", "another"),) if part == "fields" else "join_denied"
        changed = replace(target, **{part: new_value})  # type: ignore[arg-type]
        if mutation == "edit_rehashed":
            changed = replace(changed, hash=changed.computed_hash())
        tampered[i] = changed
        expected = {target.seq}
    elif mutation == "delete":
        del tampered[i]
        expected = {target.seq}
    else:
        j = data.draw(st.integers(0, count - 1).filter(lambda j: j != i), label="with")
        other = records[j]
        if mutation == "swap_seqs":
            tampered[i], tampered[j] = (
                replace(other, seq=target.seq),
                replace(target, seq=other.seq),
            )
        else:
            tampered[i], tampered[j] = other, target
        expected = {target.seq, other.seq}
    problems = verify_chain(tampered, heads, PUBLIC)
    located = {p.seq for p in problems}
    assert problems, f"{mutation} at {target.seq} went unnoticed"
    assert located == expected, (mutation, kinds(problems))
