"""Envelopes a node must not take: each is refused with its reason, and the node goes on serving.

Every batch here is crafted by hand and sent over real mutual TLS to a running node's
`/federation/v1/envelopes`, through the sending node's own client: once as a POST, once as
a frame on the node's stream (each test runs for both). Each test checks
the `refused` entry of the answer (or the HTTP-level refusal), the logged reason, that the
envelope is not in the receiver's timeline, and that a valid envelope sent afterwards is
accepted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from federation import codec
from federation.audit import AuditRecord
from federation.envelope import (
    SIGNING_CONTEXT,
    Content,
    Envelope,
    Kind,
    merkle_root,
    room_home,
    seal_batch,
)
from federation.errors import KakehashiError, ProtocolError, StorageError
from federation.signing import SigningKey
from gateway.audit import read_records
from gateway.node import Node
from gateway.roomstore import RoomStore

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class Setup:
    """mie-pref (home of `room`) with tsu in the room; ise is in the federation, not the room."""

    cluster: Cluster
    room: str
    mie: Node
    tsu: Node
    ise: Node
    via: str
    """"post" or "stream": how batches are sent."""

    def key(self, node_id: str) -> SigningKey:
        return SigningKey.from_pem(self.cluster.home(node_id).signing_key.read_bytes())


@pytest.fixture(params=["post", "stream"])
async def setup(cluster: Cluster, request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    ise = await cluster.member("ise", "伊勢市", "242039")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {3})
    room = await mie.rooms.create("防災", nodes=["tsu"])
    await mie.rooms.send(room, ["ようこそ"])
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 2)
    yield Setup(cluster, room, mie, tsu, ise, request.param)


# --------------------------------------------------------------------------- helpers


def now_hlc() -> int:
    return int(time.time() * 1000) << 16


def content(
    receiver: Node,
    room: str,
    origin: str,
    key: SigningKey,
    *,
    kind: Kind = Kind.MESSAGE,
    body: dict[str, Any] | None = None,
    sender: str = "",
    seq: int | None = None,
) -> Content:
    """The next envelope content of `origin` as `receiver` sees the room: valid deps and seq."""
    vector = receiver.rooms.vector(room)
    seq = seq if seq is not None else vector.get(origin, 0) + 1
    home = room_home(room)
    deps = {home: max(vector.get(home, 0), 1)} if origin != home else {}
    if seq > 1:
        deps[origin] = seq - 1
    return Content(
        room=room,
        origin=origin,
        seq=seq,
        kind=kind,
        sender=sender,
        hlc=now_hlc(),
        deps=deps,
        key_id=key.key_id,
        body=body if body is not None else {"text": "hello"},
    )


def seal_raw(content_bytes: bytes, key: SigningKey) -> bytes:
    """A lone envelope around arbitrary content bytes, correctly signed (seal_batch would
    refuse what these tests need: unknown kinds, oversized contents)."""
    root = merkle_root([hashlib.sha256(content_bytes).digest()])
    signature = key.sign(SIGNING_CONTEXT + root)
    return codec.encode({"c": content_bytes, "sig": signature, "i": 0, "n": 1, "p": []})


async def send_raw(s: Setup, sender: Node, receiver: Node, body: bytes) -> bytes:
    """Send a batch body as `sender` (its client, its certificate) to `receiver`, the way
    `s.via` says; the answer's body."""
    entry = sender.roster.member(receiver.node_id)
    assert entry is not None
    if s.via == "stream":
        response = await sender.streams.exchange(entry, "/envelopes", body)
        assert sender.streams.is_open(receiver.node_id)
    else:
        response = await sender.client.request(entry, "POST", "/envelopes", body)
    assert response.status == 200
    return response.body


async def post(s: Setup, sender: Node, receiver: Node, wires: Sequence[bytes]) -> dict[str, Any]:
    """Send a batch of `wires`; the decoded answer."""
    body = codec.encode({"envelopes": list(wires)})
    return codec.decode_map(await send_raw(s, sender, receiver, body))


def logged(logs: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    """The refusal/rejection events with `reason` among captured log events."""
    events = ("envelope_refused", "envelope_rejected", "envelope_equivocation")
    return [e for e in logs if e["event"] in events and e.get("reason") == reason]


async def timeline_ids(node: Node, room: str) -> set[bytes]:
    return {envelope_id for envelope_id, _ in await node.rooms.store.history(room, 10**6)}


async def assert_refused(
    s: Setup, wire: bytes, code: str, *, envelope_id: bytes, sender: Node | None = None
) -> list[dict[str, Any]]:
    """POST one envelope to mie-pref: refused with `code`, logged, not in the timeline.
    Returns the logged refusal events."""
    with capture_logs() as logs:
        answer = await post(s, sender or s.tsu, s.mie, [wire])
    assert answer["accepted"] == 0
    assert answer["refused"] == [[envelope_id, code]], answer
    events = logged(logs, code)
    assert len(events) == 1, logs
    if envelope_id and events[0]["event"] == "envelope_refused":
        assert events[0]["envelope_id"] == envelope_id.hex()[:16]
    full_id = envelope_id or hashlib.sha256(codec.decode_map(wire)["c"]).digest()
    assert full_id not in await timeline_ids(s.mie, s.room)
    return events


async def assert_still_serving(s: Setup) -> None:
    """A valid envelope from tsu, sent the same way afterwards, is accepted into the timeline."""
    (valid,) = seal_batch([content(s.mie, s.room, "tsu", s.key("tsu"))], s.key("tsu"))
    answer = await post(s, s.tsu, s.mie, [valid.to_bytes()])
    assert (answer["accepted"], answer["refused"]) == (1, [])
    assert valid.id in await timeline_ids(s.mie, s.room)


# --------------------------------------------------------------------------- signatures


async def test_envelope_sealed_with_another_key_claiming_tsus_key_id_is_refused(
    setup: Setup,
) -> None:
    s = setup
    forger = SigningKey.generate()
    claimed = content(s.mie, s.room, "tsu", s.key("tsu"))  # names tsu's real key id
    assert claimed.key_id == s.key("tsu").key_id != forger.key_id
    (forged,) = seal_batch([claimed], forger)
    await assert_refused(s, forged.to_bytes(), "bad_envelope_signature", envelope_id=forged.id)
    await assert_still_serving(s)


async def test_envelope_whose_signed_content_was_altered_by_one_byte_is_refused(
    setup: Setup,
) -> None:
    s = setup
    (genuine,) = seal_batch([content(s.mie, s.room, "tsu", s.key("tsu"))], s.key("tsu"))
    raw = codec.decode_map(genuine.to_bytes())
    assert raw["c"].count(b"hello") == 1
    raw["c"] = raw["c"].replace(b"hello", b"hellp")  # same length: still canonical msgpack
    tampered = Envelope.from_bytes(codec.encode(raw))  # well formed ...
    assert tampered.content.body == {"text": "hellp"}
    await assert_refused(s, tampered.to_bytes(), "bad_envelope_signature", envelope_id=tampered.id)
    await assert_still_serving(s)


async def test_envelope_with_an_altered_inclusion_path_is_refused(setup: Setup) -> None:
    s = setup
    first = content(s.mie, s.room, "tsu", s.key("tsu"))
    second = dataclasses.replace(first, seq=first.seq + 1, deps={**first.deps, "tsu": first.seq})
    genuine, _ = seal_batch([first, second], s.key("tsu"))
    assert len(genuine.path) == 1
    path = (bytes([genuine.path[0][0] ^ 0x01]) + genuine.path[0][1:],)
    tampered = dataclasses.replace(genuine, path=path, wire=b"")
    await assert_refused(s, tampered.to_bytes(), "bad_envelope_signature", envelope_id=genuine.id)
    # The untampered envelope of the same batch is still good: the refusal was the path's.
    answer = await post(s, s.tsu, s.mie, [genuine.to_bytes()])
    assert (answer["accepted"], answer["refused"]) == (1, [])


# --------------------------------------------------------------------------- repeats


def altered(genuine: Envelope) -> Envelope:
    """`genuine` with one byte of its signed content changed: the same place, another id."""
    raw = codec.decode_map(genuine.to_bytes())
    assert raw["c"].count(b"hello") == 1
    raw["c"] = raw["c"].replace(b"hello", b"hellp")
    return Envelope.from_bytes(codec.encode(raw))


async def accepted_and_repeated(s: Setup, genuine: Envelope) -> None:
    """Send `genuine` from tsu, then again: mie holds it, and takes tsu for a peer whose
    batches repeat what it holds (it sets their envelopes aside before decoding them)."""
    answer = await post(s, s.tsu, s.mie, [genuine.to_bytes()])
    assert (answer["accepted"], answer["refused"]) == (1, [])
    again = await post(s, s.tsu, s.mie, [genuine.to_bytes()])
    assert (again["accepted"], again["duplicates"], again["refused"]) == (0, 1, [])


async def test_a_tampered_copy_of_an_envelope_held_is_refused_though_set_aside_undecoded(
    setup: Setup,
) -> None:
    # A copy for a place mie holds, from a peer whose batches repeat: it is set aside by
    # its place without the full decode, then found to differ from the envelope held.
    s = setup
    (genuine,) = seal_batch([content(s.mie, s.room, "tsu", s.key("tsu"))], s.key("tsu"))
    await accepted_and_repeated(s, genuine)
    tampered = altered(genuine)
    await assert_refused(s, tampered.to_bytes(), "bad_envelope_signature", envelope_id=tampered.id)
    assert genuine.id in await timeline_ids(s.mie, s.room)
    await assert_still_serving(s)


@pytest.mark.parametrize("repeating", [False, True], ids=["decoded", "set-aside"])
async def test_a_second_envelope_its_origin_signed_for_a_held_place_is_refused_as_equivocation(
    setup: Setup, repeating: bool
) -> None:
    s = setup
    first = content(s.mie, s.room, "tsu", s.key("tsu"))
    (genuine,) = seal_batch([first], s.key("tsu"))
    if repeating:
        await accepted_and_repeated(s, genuine)
    else:
        answer = await post(s, s.tsu, s.mie, [genuine.to_bytes()])
        assert (answer["accepted"], answer["refused"]) == (1, [])
    # tsu signs other content for the same seq (as a node restored from an old backup
    # would if it did not wait for catch-up): validly signed, never applied.
    (other,) = seal_batch([dataclasses.replace(first, body={"text": "別の内容"})], s.key("tsu"))
    assert other.content.seq == genuine.content.seq and other.id != genuine.id
    (event,) = await assert_refused(s, other.to_bytes(), "equivocation", envelope_id=other.id)
    assert event["log_level"] == "error"
    assert (event["origin"], event["seq"]) == ("tsu", genuine.content.seq)
    assert event["held_id"] == genuine.id.hex()[:16]
    assert genuine.id in await timeline_ids(s.mie, s.room)
    assert s.mie.rooms.counts.refused["equivocation"] == 1
    # Evidence against tsu, in mie's audit log: the origin, not the peer that brought it.
    await eventually(lambda: equivocations(s.mie) != [])
    (record,) = equivocations(s.mie)
    assert record["source"] == "tsu"
    assert genuine.id.hex()[:16] in record["message"]
    await assert_still_serving(s)


async def test_a_batch_whose_repeats_cannot_be_checked_is_answered_and_nothing_applied(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup
    first = content(s.mie, s.room, "tsu", s.key("tsu"))
    (genuine,) = seal_batch([first], s.key("tsu"))
    answer = await post(s, s.tsu, s.mie, [genuine.to_bytes()])
    assert (answer["accepted"], answer["refused"]) == (1, [])
    (other,) = seal_batch([dataclasses.replace(first, body={"text": "別の内容"})], s.key("tsu"))

    async def failing(self: RoomStore, places: object) -> dict[object, bytes]:
        raise StorageError("database error: disk I/O error", code="database_error")

    monkeypatch.setattr(RoomStore, "ids_at", failing)
    with capture_logs() as logs:
        answer = await post(s, s.tsu, s.mie, [other.to_bytes()])
    # Committed as a duplicate (nothing applied); the check is logged as not done.
    assert (answer["accepted"], answer["duplicates"], answer["refused"]) == (0, 1, [])
    (event,) = [e for e in logs if e["event"] == "repeats_not_checked"]
    assert (event["peer"], event["count"], event["code"]) == ("tsu", 1, "database_error")
    assert other.id not in await timeline_ids(s.mie, s.room)
    monkeypatch.undo()
    await assert_still_serving(s)


def equivocations(node: Node) -> list[dict[str, Any]]:
    """The fields of `node`'s audit records of refused equivocations."""
    records = [
        dict(r.fields)
        for r in read_records(node.home.database, event="peer_refused")
        if isinstance(r, AuditRecord)
    ]
    return [fields for fields in records if fields.get("reason") == "equivocation"]


# --------------------------------------------------------------------------- room rules


async def test_message_from_a_federation_node_outside_the_room_is_rejected_origin_not_member(
    setup: Setup,
) -> None:
    s = setup
    assert "ise" not in s.mie.rooms.state(s.room).nodes  # type: ignore[union-attr]
    home_seq = s.mie.rooms.vector(s.room)["mie-pref"]
    by_hand = Content(
        room=s.room,
        origin="ise",
        seq=1,
        kind=Kind.MESSAGE,
        sender="",
        hlc=now_hlc(),
        deps={"mie-pref": home_seq},  # valid: released at once, then judged
        key_id=s.key("ise").key_id,
        body={"text": "入れて"},
    )
    (envelope,) = seal_batch([by_hand], s.key("ise"))
    (event,) = await assert_refused(
        s, envelope.to_bytes(), "origin_not_member", envelope_id=envelope.id, sender=s.ise
    )
    assert (event["event"], event["origin"], event["seq"]) == ("envelope_rejected", "ise", 1)
    await assert_still_serving(s)


async def test_message_from_a_sender_who_is_not_a_room_member_is_rejected(setup: Setup) -> None:
    s = setup
    wrong = content(s.mie, s.room, "tsu", s.key("tsu"), sender="nobody@tsu")
    (envelope,) = seal_batch([wrong], s.key("tsu"))
    await assert_refused(s, envelope.to_bytes(), "sender_not_member", envelope_id=envelope.id)
    await assert_still_serving(s)


async def test_state_change_from_a_member_that_is_not_the_home_is_rejected(setup: Setup) -> None:
    s = setup
    before = s.mie.rooms.state(s.room)
    takeover = content(
        s.mie, s.room, "tsu", s.key("tsu"), kind=Kind.STATE, body={"name": "乗っ取り"}
    )
    (envelope,) = seal_batch([takeover], s.key("tsu"))
    await assert_refused(s, envelope.to_bytes(), "state_not_from_home", envelope_id=envelope.id)
    assert s.mie.rooms.state(s.room) == before
    await assert_still_serving(s)


# --------------------------------------------------------------------------- form


async def test_envelope_over_64_kib_is_refused_as_envelope_too_large(setup: Setup) -> None:
    s = setup
    big = content(s.mie, s.room, "tsu", s.key("tsu"), body={"text": "x" * 70_000})
    with pytest.raises(ProtocolError):
        seal_batch([big], s.key("tsu"))  # an honest sender cannot even make it
    wire = seal_raw(big.to_bytes(), s.key("tsu"))
    assert len(wire) > 64 * 1024
    with capture_logs() as logs:
        try:
            answer = await post(s, s.tsu, s.mie, [wire])
        except KakehashiError as exc:  # refused as a whole request
            assert exc.code == "envelope_too_large"
            assert [e for e in logs if e.get("reason") == "envelope_too_large"]
        else:  # or refused as one envelope of the batch
            assert answer["refused"] == [[b"", "envelope_too_large"]]
            assert answer["accepted"] == 0
            assert logged(logs, "envelope_too_large")
    assert hashlib.sha256(big.to_bytes()).digest() not in await timeline_ids(s.mie, s.room)
    await assert_still_serving(s)


async def test_bytes_that_are_not_msgpack_in_the_list_are_refused_and_the_rest_applied(
    setup: Setup,
) -> None:
    s = setup
    (valid,) = seal_batch([content(s.mie, s.room, "tsu", s.key("tsu"))], s.key("tsu"))
    with capture_logs() as logs:
        answer = await post(s, s.tsu, s.mie, [b"\xc1\x00 not an envelope", valid.to_bytes()])
    assert answer["refused"] == [[b"", "malformed_msgpack"]]
    assert answer["accepted"] == 1
    assert len(logged(logs, "malformed_msgpack")) == 1
    assert valid.id in await timeline_ids(s.mie, s.room)
    await assert_still_serving(s)


async def test_envelope_of_an_unknown_kind_is_refused(setup: Setup) -> None:
    s = setup
    wire_content = content(s.mie, s.room, "tsu", s.key("tsu")).to_wire()
    wire_content["kind"] = "poke"
    content_bytes = codec.encode(wire_content)
    await assert_refused(s, seal_raw(content_bytes, s.key("tsu")), "unknown_kind", envelope_id=b"")
    await assert_still_serving(s)


async def test_envelope_for_a_room_the_receiver_does_not_know_is_refused(setup: Setup) -> None:
    s = setup
    nowhere = "!nosuchroom:mie-pref"
    stray = content(s.mie, nowhere, "tsu", s.key("tsu"), seq=1)
    assert stray.deps == {"mie-pref": 1}
    (envelope,) = seal_batch([stray], s.key("tsu"))
    await assert_refused(s, envelope.to_bytes(), "unknown_room", envelope_id=envelope.id)
    assert nowhere not in s.mie.rooms.room_ids()
    assert await s.mie.rooms.store.history(nowhere, 10) == []
    await assert_still_serving(s)


async def test_batch_body_that_is_not_msgpack_is_refused_with_http_400(setup: Setup) -> None:
    s = setup
    with capture_logs() as logs, pytest.raises(ProtocolError) as refused:
        await send_raw(s, s.tsu, s.mie, b"\xc1 this is not msgpack")
    assert refused.value.code == "malformed_msgpack"
    assert refused.value.status == 400
    events = [e for e in logs if e["event"] == "peer_refused"]
    assert [(e["reason"], e["path"]) for e in events] == [
        ("malformed_msgpack", "/federation/v1/envelopes")
    ]
    assert s.mie.refusals["malformed_msgpack"] == 1
    await assert_still_serving(s)


async def test_envelope_whose_origin_is_not_a_federation_member_is_refused(setup: Setup) -> None:
    s = setup
    outsider = SigningKey.generate()
    assert s.mie.roster.member("nabari") is None
    stranger = content(s.mie, s.room, "nabari", outsider)
    (envelope,) = seal_batch([stranger], outsider)
    await assert_refused(s, envelope.to_bytes(), "unknown_origin", envelope_id=envelope.id)
    await assert_still_serving(s)
