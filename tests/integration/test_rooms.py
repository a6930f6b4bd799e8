"""Shared rooms between real nodes: every member ends with the same timeline, exactly once.

Nodes run in the test's event loop on 127.0.0.1 with real mutual TLS. Every envelope a
node applies is counted through `RoomService.listen` (hooked in before the node loads),
so "exactly once" is checked where it happens, not only in the database (whose primary
key would hide a second application).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import gateway.rooms as rooms_module
from federation import codec
from federation.causal import MAX_CLOCK_AHEAD_MS, hlc_to_ms
from federation.envelope import Envelope, Kind
from federation.errors import KakehashiError, ProtocolError, StorageError, TrustError
from federation.roster import MemberStatus
from gateway.catchup import CatchUp
from gateway.node import Node
from gateway.outbox import DeliverySettings, _Sender
from gateway.rooms import RoomService, Served
from gateway.roomstore import OutboxBatch, RoomStore

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
Applied = dict[str, Counter[bytes]]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> Iterator[Applied]:
    """node id -> how many times each envelope id was applied there (across restarts)."""
    counts: Applied = defaultdict(Counter)
    original = RoomService.__init__

    def init(self: RoomService, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        node_counts = counts[self.node_id]
        self.listen(lambda envelopes: node_counts.update(e.id for e in envelopes))

    monkeypatch.setattr(RoomService, "__init__", init)
    yield counts


async def three_nodes(cluster: Cluster) -> tuple[Node, Node, Node]:
    """mie-pref (authority) with tsu and ise, every node holding roster v3."""
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    ise = await cluster.member("ise", "伊勢市", "242039")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {3})
    return mie, tsu, ise


async def timeline(node: Node, room: str) -> list[Envelope]:
    """The room's accepted envelopes at `node`, oldest first."""
    rows = await node.rooms.store.history(room, 10**6)
    return [Envelope.from_bytes(wire) for _, wire in reversed(rows)]


async def timeline_ids(node: Node, room: str) -> list[bytes]:
    return [envelope.id for envelope in await timeline(node, room)]


def holds(node: Node, room: str, count: int) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: `node` holds `count` accepted envelopes of `room`."""

    async def check() -> bool:
        counts = await node.rooms.store.counts()
        return counts.get(room, (0, 0))[0] >= count

    return check


def assert_causal(envelopes: list[Envelope]) -> None:
    """Every envelope's dependencies come earlier; each origin's envelopes come gap-free."""
    seen: dict[str, int] = {}
    for envelope in envelopes:
        content = envelope.content
        for origin, seq in content.deps.items():
            assert seen.get(origin, 0) >= seq, (
                f"{content.origin}#{content.seq} needs {origin}#{seq}, only "
                f"{origin}#{seen.get(origin, 0)} came before it"
            )
        assert content.seq == seen.get(content.origin, 0) + 1
        seen[content.origin] = content.seq


def assert_once(applied: Applied, node_id: str, ids: list[bytes]) -> None:
    """`node_id` applied every one of `ids` exactly once, and nothing else in their place."""
    counts = applied[node_id]
    twice = {i.hex()[:12]: n for i, n in counts.items() if n != 1}
    assert not twice, f"{node_id} applied envelopes more than once: {twice}"
    assert set(ids) <= set(counts)


def texts(envelopes: list[Envelope]) -> list[str]:
    return [e.content.body["text"] for e in envelopes if e.content.kind is Kind.MESSAGE]


# --------------------------------------------------------------------------- tests


async def test_messages_from_three_nodes_reach_every_member_once_in_one_causal_timeline(
    cluster: Cluster, applied: Applied
) -> None:
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("防災連絡", nodes=["tsu", "ise"])
    await eventually(lambda: all(n.rooms.state(room) is not None for n in (tsu, ise)))
    assert tsu.rooms.state(room).nodes == {"mie-pref", "tsu", "ise"}  # type: ignore[union-attr]

    async def talk(node: Node) -> None:
        for round_ in range(5):
            await node.rooms.send(room, [f"{node.node_id} {round_}.{k}" for k in range(4)])
            await asyncio.sleep(0.02)  # let the others' envelopes arrive in between

    await asyncio.gather(talk(mie), talk(tsu), talk(ise))
    expected = 1 + 3 * 5 * 4
    for node in (mie, tsu, ise):
        await eventually(holds(node, room, expected), timeout=10)
    reference = await timeline(mie, room)
    ids = [e.id for e in reference]
    assert len(ids) == expected == len(set(ids))
    for node in (tsu, ise):
        assert await timeline_ids(node, room) == ids, f"{node.node_id} has another timeline"
    assert_causal(reference)
    for node in (mie, tsu, ise):
        assert_once(applied, node.node_id, ids)
        assert sum(applied[node.node_id].values()) == expected
    by_origin = Counter(e.content.origin for e in reference)
    assert by_origin == {"mie-pref": 1 + 20, "tsu": 20, "ise": 20}
    # Nothing is left waiting for dependencies anywhere.
    assert [n.rooms.pending_count() for n in (mie, tsu, ise)] == [0, 0, 0]


async def test_node_invited_later_by_a_non_home_member_receives_the_whole_history(
    cluster: Cluster, applied: Applied
) -> None:
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("観光", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await mie.rooms.send(room, [f"mie {k}" for k in range(30)])
    await tsu.rooms.send(room, [f"tsu {k}" for k in range(30)])
    await eventually(holds(mie, room, 61), timeout=10)
    await eventually(holds(tsu, room, 61), timeout=10)
    assert ise.rooms.state(room) is None  # not a member: nothing was sent to it

    assert await tsu.rooms.invite(room, "ise") == "requested"

    def ise_is_member() -> bool:
        state = ise.rooms.state(room)
        return state is not None and "ise" in state.nodes

    await eventually(ise_is_member, timeout=10)
    # state-request (tsu) + state granted by the home (mie-pref).
    await eventually(holds(ise, room, 63), timeout=10)
    await ise.rooms.send(room, ["ise joins"])
    await tsu.rooms.send(room, ["welcome ise"])
    for node in (mie, tsu, ise):
        await eventually(holds(node, room, 65), timeout=10)
    ids = await timeline_ids(mie, room)
    assert await timeline_ids(tsu, room) == ids
    at_ise = await timeline(ise, room)
    assert [e.id for e in at_ise] == ids
    assert_causal(at_ise)
    granted = [e for e in at_ise if e.content.kind is Kind.STATE and e.content.seq > 1]
    (request,) = [e for e in at_ise if e.content.kind is Kind.STATE_REQUEST]
    assert [(e.content.origin, e.content.body) for e in granted] == [
        ("mie-pref", {"add_nodes": ["ise"], "answers": [request.id]})
    ]
    assert texts(at_ise)[:60] == [f"mie {k}" for k in range(30)] + [f"tsu {k}" for k in range(30)]
    assert_once(applied, "ise", ids)


async def test_node_removed_by_the_home_gets_no_new_messages_and_sync_refuses_it_the_room(
    cluster: Cluster, applied: Applied
) -> None:
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("議会", nodes=["tsu", "ise"])
    await mie.rooms.send(room, ["before"])
    for node in (tsu, ise):
        await eventually(holds(node, room, 2))
    # Before the removal, ise is served the room on catch-up.
    served = await mie.rooms.missing_for("ise", {room: {}}, 100, 1 << 20)
    assert len(served.wires) == 2

    assert await mie.rooms.change(room, {"remove_nodes": ["ise"]}) == "changed"

    def ise_knows_it_was_removed() -> bool:
        state = ise.rooms.state(room)
        return state is not None and "ise" not in state.nodes

    await eventually(ise_knows_it_was_removed)
    at_ise_before = await timeline_ids(ise, room)
    assert len(at_ise_before) == 3  # the removal itself reached it

    after = await mie.rooms.send(room, ["after 1", "after 2"])
    after += await tsu.rooms.send(room, ["after 3"])
    for node in (mie, tsu):
        await eventually(holds(node, room, 6))

    async def outboxes_empty() -> bool:
        depths = [await n.rooms.store.outbox_depths() for n in (mie, tsu)]
        return all(not d for d in depths)

    await eventually(outboxes_empty)
    # The serving side refuses the room to ise, in memory and over real mutual TLS ...
    assert await mie.rooms.missing_for("ise", {room: {}}, 100, 1 << 20) == Served()
    assert await tsu.rooms.missing_for("ise", {room: {}}, 100, 1 << 20) == Served()
    request = codec.encode({"rooms": {room: {}}, "limit": 100})
    for server in ("mie-pref", "tsu"):
        entry = ise.roster.member(server)
        assert entry is not None
        answer = codec.decode_map((await ise.client.request(entry, "POST", "/sync", request)).body)
        assert answer["envelopes"] == [], f"{server} served the room to a removed node"
    # ... while a member still gets it, through the same route.
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    answer = codec.decode_map((await tsu.client.request(entry, "POST", "/sync", request)).body)
    assert len(answer["envelopes"]) == 6
    # A catch-up pass from ise pulls nothing, and ise holds nothing sent after its removal.
    assert await ise.catchup.sync_with("mie-pref") == 0
    assert await ise.catchup.sync_with("tsu") == 0
    assert await timeline_ids(ise, room) == at_ise_before
    assert not set(after) & set(applied["ise"])
    with pytest.raises(Exception) as refused:
        await ise.rooms.send(room, ["still here?"])
    assert getattr(refused.value, "code", None) == "not_a_member"


async def _held_at_tsu(cluster: Cluster, name: str) -> tuple[Node, Node, str, list[bytes]]:
    """A room of mie's with tsu and 20 messages, all held at tsu; and their wires."""
    mie, tsu, _ = await three_nodes(cluster)
    room = await mie.rooms.create(name, nodes=["tsu"])
    await mie.rooms.send(room, [f"m {k}" for k in range(20)])
    await eventually(holds(tsu, room, 21))
    return mie, tsu, room, [wire for _, wire in await mie.rooms.store.history(room, 100)]


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One item per `Envelope.from_bytes` call from now on."""
    calls: list[None] = []
    decode = Envelope.from_bytes

    def counted(data: bytes) -> Envelope:
        calls.append(None)
        return decode(data)

    monkeypatch.setattr(Envelope, "from_bytes", counted)
    return calls


async def test_batches_that_repeat_what_is_held_are_dropped_before_the_full_decode(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, wires = await _held_at_tsu(cluster, "重複")
    decoded = _count_decodes(monkeypatch)
    # mie pushes to tsu what tsu holds: the first repeat is decoded in full and dropped...
    mie_entry = mie.roster.member("tsu")
    assert mie_entry is not None
    answer = await mie.client.request(
        mie_entry, "POST", "/envelopes", codec.encode_frame({"envelopes": wires})
    )
    first = codec.decode_map(answer.body, canonical=False)
    assert (first["accepted"], first["duplicates"]) == (0, 21)
    at_first = len(decoded)
    assert at_first >= 21
    # ... and from then on, while mie's batches repeat, they are set aside undecoded.
    answer = await mie.client.request(
        mie_entry, "POST", "/envelopes", codec.encode_frame({"envelopes": wires})
    )
    second = codec.decode_map(answer.body, canonical=False)
    assert (second["accepted"], second["duplicates"], second["refused"]) == (0, 21, [])
    assert len(decoded) == at_first  # nothing decoded on tsu for the repeat
    # New envelopes in a repeating batch are still decoded, verified and taken in.
    fresh = await mie.rooms.send(room, ["新しい"])
    await eventually(holds(tsu, room, 22))
    assert_once(applied, "tsu", await timeline_ids(tsu, room))
    assert fresh[0] in await timeline_ids(tsu, room)


async def test_a_push_from_a_peer_being_pulled_waits_and_is_not_decoded_again(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After an outage the peer's outbox pushes what catch-up pulls from it, at the same
    # time: the push waits for the pull, then finds everything held.
    mie, tsu, room, wires = await _held_at_tsu(cluster, "追いつき")
    decoded = _count_decodes(monkeypatch)
    with tsu.rooms.pulling("mie-pref"):
        push = asyncio.create_task(_push(mie, "tsu", wires))
        await asyncio.sleep(0.5)
        assert not push.done()  # waiting for the pull to end
    answer = await asyncio.wait_for(push, 10)
    assert (answer["accepted"], answer["duplicates"], answer["refused"]) == (0, 21, [])
    assert not decoded  # not even the first repeat was decoded
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def test_a_push_waits_for_a_pull_only_so_long(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, _ = await three_nodes(cluster)
    room = await mie.rooms.create("待ち", nodes=["tsu"])
    await cluster.stop("tsu")
    await mie.rooms.send(room, ["停電のお知らせ"])
    wires = [wire for _, wire in await mie.rooms.store.history(room, 10)]
    tsu = await cluster.start("tsu")
    monkeypatch.setattr(rooms_module, "CLAIM_WAIT", 0.3)
    with tsu.rooms.pulling("mie-pref"):  # a pull that never ends
        answer = await asyncio.wait_for(_push(mie, "tsu", wires), 10)
        assert answer["refused"] == []
        assert answer["accepted"] + answer["duplicates"] == 2
        assert tsu.rooms.vector(room) == {"mie-pref": 2}


def _id(wire: bytes) -> bytes:
    return Envelope.from_bytes(wire).id


async def _unsent(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, sends: Sequence[list[str]]
) -> tuple[Node, Node, str, list[list[bytes]]]:
    """Signing batches of mie's (one per send) in a room with tsu that tsu has not
    received, and will receive only when a test pushes them (no outbox, no catch-up)."""
    mie, tsu, _ = await three_nodes(cluster)
    room = await mie.rooms.create("順番", nodes=["tsu"])
    await eventually(holds(tsu, room, 1))
    await cluster.stop("tsu")
    sent = [await mie.rooms.send(room, texts) for texts in sends]
    await mie.store.write_all([("DELETE FROM outbox", [()])])
    wires = {
        Envelope.from_bytes(wire).id: wire for _, wire in await mie.rooms.store.history(room, 100)
    }

    async def no_catch_up(self: CatchUp, *args: object, **kwargs: object) -> int:
        return 0

    monkeypatch.setattr(CatchUp, "sync_with", no_catch_up)
    tsu = await cluster.start("tsu")
    return mie, tsu, room, [[wires[i] for i in ids] for ids in sent]


async def _unsent_batches(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> tuple[Node, Node, str, list[bytes], list[bytes]]:
    """Two such batches: two messages, then one."""
    mie, tsu, room, (first, second) = await _unsent(cluster, monkeypatch, [["一", "二"], ["三"]])
    return mie, tsu, room, first, second


def _first_commit_held(
    node: Node, monkeypatch: pytest.MonkeyPatch, *, fails: bool = False, at_commit: bool = False
) -> tuple[asyncio.Event, list[str]]:
    """Hold the transaction of `node`'s next step until the event is set, then write it
    (or fail it as a full disk would); the list records each step's transaction: "held",
    then "written" or "failed". `at_commit`: held once its statements ran, as its COMMIT
    begins (the node is told so, as by the database thread); else before them.
    Other transactions (acknowledged rows deleted in the background) go through."""
    write_all = node.store.write_all
    gate = asyncio.Event()
    commits: list[str] = []

    async def held(statements: Any, **kwargs: Any) -> None:
        committing = kwargs.get("committing")
        if committing is None:
            await write_all(statements, **kwargs)
            return
        if not commits:
            commits.append("held")
            if at_commit:
                committing()
            await gate.wait()
            if fails:
                commits.append("failed")
                raise StorageError("database or disk is full", code="disk_full")
        await write_all(statements, **kwargs)
        commits.append("written")

    monkeypatch.setattr(node.store, "write_all", held)
    return gate, commits


async def _held_fails_and_the_next_is_not_written(
    gate: asyncio.Event, commits: list[str], held: Awaitable[Any], planned_during: Awaitable[Any]
) -> None:
    """Release the held commit (`_first_commit_held(fails=True)`): it fails as a full disk
    would, and the step planned while it was held fails unwritten after it."""
    gate.set()
    with pytest.raises(KakehashiError) as failed:
        await held
    assert failed.value.code == "disk_full"
    with pytest.raises(KakehashiError) as after:
        await planned_during
    assert after.value.code == "commit_failed"
    assert commits == ["held", "failed"]  # the second was not written on top of it


async def test_a_batch_is_processed_while_the_one_before_commits_and_committed_after_it(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, first, second = await _unsent_batches(cluster, monkeypatch)
    gate, commits = _first_commit_held(tsu, monkeypatch)
    one = asyncio.create_task(_push(mie, "tsu", first))
    await eventually(lambda: commits == ["held"])
    two = asyncio.create_task(_push(mie, "tsu", second))
    # The second batch is processed meanwhile (memory), but not acknowledged before the
    # first is durable.
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 4})
    await asyncio.sleep(0.3)
    assert not one.done() and not two.done()
    gate.set()
    assert (await one)["accepted"] == 2
    assert (await two)["accepted"] == 1
    assert commits == ["held", "written", "written"]
    texts = [e.content.body.get("text") for e in await timeline(tsu, room)]
    assert texts == [None, "一", "二", "三"]
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def test_batches_queued_behind_a_commit_share_the_next_one(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, batches = await _unsent(cluster, monkeypatch, [["一"], ["二"], ["三"], ["四"]])
    gate, commits = _first_commit_held(tsu, monkeypatch)
    one = asyncio.create_task(_push(mie, "tsu", batches[0]))
    await eventually(lambda: commits == ["held"])
    rest = [asyncio.create_task(_push(mie, "tsu", batch)) for batch in batches[1:]]
    # All three are processed while the first commits, and wait for it.
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 5})
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in [one, *rest])
    gate.set()
    answers = [await one, *[await task for task in rest]]
    assert sum(answer["accepted"] for answer in answers) == 4
    # The first commit, then one transaction for the three queued behind it, not three.
    assert commits == ["held", "written", "written"]
    texts = [e.content.body.get("text") for e in await timeline(tsu, room)]
    assert texts == [None, "一", "二", "三", "四"]
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def test_while_a_batch_awaits_its_answer_a_few_new_rows_go_at_once_and_many_wait(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message sent while the previous batch is on its way goes at once (it does not
    wait for that batch's answer); a large amount waits, to go as one batch."""
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {2})
    room = await mie.rooms.create("即時", nodes=["tsu"])
    await eventually(holds(tsu, room, 1))
    received: list[int] = []  # envelopes per batch tsu was given
    receive = tsu.rooms.receive

    async def counted(peer: str, wires: Sequence[bytes], **kwargs: Any) -> Any:
        received.append(len(wires))
        return await receive(peer, wires, **kwargs)

    monkeypatch.setattr(tsu.rooms, "receive", counted)
    # Many: while the first batch's commit (and so its answer) is held, 100 rows wait.
    gate, commits = _first_commit_held(tsu, monkeypatch)
    await mie.rooms.send(room, ["一"])
    await eventually(lambda: commits == ["held"])
    await mie.rooms.send(room, [f"多 {k}" for k in range(100)])
    await asyncio.sleep(0.3)
    assert received == [1]
    gate.set()
    await eventually(holds(tsu, room, 102))
    assert received == [1, 100]
    # Few: one message while the batch before it is held goes without waiting.
    gate, commits = _first_commit_held(tsu, monkeypatch)
    await mie.rooms.send(room, ["二"])
    await eventually(lambda: commits == ["held"])
    await mie.rooms.send(room, ["三"])
    await eventually(lambda: received == [1, 100, 1, 1])
    assert not await holds(tsu, room, 103)()  # neither is committed: the first is held
    gate.set()
    await eventually(holds(tsu, room, 104))
    texts = [e.content.body.get("text") for e in await timeline(tsu, room)]
    assert texts[-2:] == ["二", "三"]


async def test_a_failed_commit_fails_the_batches_planned_after_it_and_memory_follows_disk(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, first, second = await _unsent_batches(cluster, monkeypatch)
    gate, commits = _first_commit_held(tsu, monkeypatch, fails=True)
    one = asyncio.create_task(_push(mie, "tsu", first))
    await eventually(lambda: commits == ["held"])
    two = asyncio.create_task(_push(mie, "tsu", second))
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 4})
    await _held_fails_and_the_next_is_not_written(gate, commits, one, two)
    # Memory was rebuilt from disk: neither batch is held, and none was applied.
    assert tsu.rooms.vector(room) == {"mie-pref": 1}
    assert len(await timeline_ids(tsu, room)) == 1
    assert not set(await timeline_ids(tsu, room)) & set(map(_id, first + second))
    # Sent again (as the sender does), both go in, once each.
    assert (await _push(mie, "tsu", first))["accepted"] == 2
    assert (await _push(mie, "tsu", second))["accepted"] == 1
    assert tsu.rooms.vector(room) == {"mie-pref": 4}
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def _room_with_tsu(cluster: Cluster) -> tuple[Node, Node, str]:
    mie, tsu, _ = await three_nodes(cluster)
    room = await mie.rooms.create("順番", nodes=["tsu"])
    await eventually(holds(tsu, room, 1))
    return mie, tsu, room


async def test_the_next_round_of_local_sends_is_sealed_while_the_last_one_commits(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room = await _room_with_tsu(cluster)
    gate, commits = _first_commit_held(mie, monkeypatch, at_commit=True)
    one = asyncio.create_task(mie.rooms.send(room, ["一"]))
    await eventually(lambda: commits == ["held"])
    two = asyncio.create_task(mie.rooms.send(room, ["二"]))
    # The second round is sealed and in memory while the first one's COMMIT runs, and
    # neither caller is answered before its own round is durable.
    await eventually(lambda: mie.rooms.vector(room) == {"mie-pref": 3})
    await asyncio.sleep(0.3)
    assert not one.done() and not two.done()
    gate.set()
    first, second = await one, await two
    assert commits == ["held", "written", "written"]
    assert texts(await timeline(mie, room)) == ["一", "二"]
    assert (await timeline_ids(mie, room))[1:] == [*first, *second]  # each its own round's
    await eventually(holds(tsu, room, 3))
    assert texts(await timeline(tsu, room)) == ["一", "二"]
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def test_the_next_round_of_local_sends_waits_while_the_last_ones_statements_run(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, _, room = await _room_with_tsu(cluster)
    gate, commits = _first_commit_held(mie, monkeypatch)
    one = asyncio.create_task(mie.rooms.send(room, ["一"]))
    await eventually(lambda: commits == ["held"])
    two = asyncio.create_task(mie.rooms.send(room, ["二"]))
    await asyncio.sleep(0.3)
    assert mie.rooms.vector(room) == {"mie-pref": 2}  # the second is not sealed yet
    gate.set()
    await one
    await two
    assert commits == ["held", "written", "written"]
    assert texts(await timeline(mie, room)) == ["一", "二"]


async def test_a_failed_commit_fails_the_round_of_local_sends_sealed_during_it(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room = await _room_with_tsu(cluster)
    before = await timeline_ids(mie, room)
    gate, commits = _first_commit_held(mie, monkeypatch, fails=True, at_commit=True)
    one = asyncio.create_task(mie.rooms.send(room, ["一"]))
    await eventually(lambda: commits == ["held"])
    two = asyncio.create_task(mie.rooms.send(room, ["二"]))
    await eventually(lambda: mie.rooms.vector(room) == {"mie-pref": 3})
    await _held_fails_and_the_next_is_not_written(gate, commits, one, two)
    # Memory was rebuilt from disk; nothing of either round was kept or handed on, so
    # the next message takes the first round's place, and tsu gets only that one.
    assert mie.rooms.vector(room) == {"mie-pref": 1}
    assert await timeline_ids(mie, room) == before
    (three,) = await mie.rooms.send(room, ["三"])
    assert mie.rooms.vector(room) == {"mie-pref": 2}
    await eventually(holds(tsu, room, 2))
    await asyncio.sleep(0.3)
    assert texts(await timeline(tsu, room)) == ["三"]
    assert (await timeline_ids(tsu, room))[-1] == three
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def _all_three_after_a_restart(cluster: Cluster, applied: Applied, room: str) -> None:
    """tsu, restarted, holds mie's three messages from disk, each applied once."""
    await cluster.stop("tsu")
    tsu = await cluster.start("tsu")
    assert tsu.rooms.vector(room) == {"mie-pref": 4}
    assert texts(await timeline(tsu, room)) == ["一", "二", "三"]
    assert_once(applied, "tsu", await timeline_ids(tsu, room))


async def test_a_batch_whose_receiver_is_cancelled_while_it_commits_is_written_all_the_same(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A catch-up pass given up, or a node stopping, cancels a receive mid-commit: the
    # batch is in memory already, so it must reach the disk, and later batches after it.
    mie, tsu, room, first, second = await _unsent_batches(cluster, monkeypatch)
    gate, commits = _first_commit_held(tsu, monkeypatch)
    one = asyncio.create_task(tsu.rooms.receive("mie-pref", first))
    await eventually(lambda: commits == ["held"])
    one.cancel()
    with pytest.raises(asyncio.CancelledError):
        await one
    gate.set()
    await eventually(lambda: commits == ["held", "written"])
    assert (await _push(mie, "tsu", second))["accepted"] == 1
    assert (await _push(mie, "tsu", first))["duplicates"] == 2
    await _all_three_after_a_restart(cluster, applied, room)


async def test_a_commit_that_fails_after_its_receiver_was_cancelled_is_logged_and_undone(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, first, second = await _unsent_batches(cluster, monkeypatch)
    gate, commits = _first_commit_held(tsu, monkeypatch, fails=True)
    one = asyncio.create_task(tsu.rooms.receive("mie-pref", first))
    await eventually(lambda: commits == ["held"])
    one.cancel()
    with pytest.raises(asyncio.CancelledError):
        await one
    with capture_logs() as logs:
        gate.set()
        await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 1})  # memory = disk
    failed = [e for e in logs if e["event"] == "room_commit_failed"]
    assert [(e["caller"], e["code"]) for e in failed] == [("cancelled", "disk_full")]
    assert (await _push(mie, "tsu", first))["accepted"] == 2
    assert (await _push(mie, "tsu", second))["accepted"] == 1
    await _all_three_after_a_restart(cluster, applied, room)


async def test_a_batch_cancelled_while_it_waits_for_the_commit_before_it_is_written_after_it(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, (first, second, third) = await _unsent(
        cluster, monkeypatch, [["一"], ["二"], ["三"]]
    )
    gate, commits = _first_commit_held(tsu, monkeypatch)
    one = asyncio.create_task(_push(mie, "tsu", first))
    await eventually(lambda: commits == ["held"])
    two = asyncio.create_task(tsu.rooms.receive("mie-pref", second))
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 3})
    two.cancel()
    with pytest.raises(asyncio.CancelledError):
        await two
    gate.set()
    assert (await one)["accepted"] == 1
    await eventually(lambda: commits == ["held", "written", "written"])
    assert (await _push(mie, "tsu", third))["accepted"] == 1
    await _all_three_after_a_restart(cluster, applied, room)


async def test_a_node_stopping_waits_for_a_commit_that_hangs_only_so_long(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie, tsu, room, first, second = await _unsent_batches(cluster, monkeypatch)
    _first_commit_held(tsu, monkeypatch)  # and never let go: a disk that hangs
    monkeypatch.setattr(rooms_module, "COMMIT_SETTLE_SECONDS", 0.2)
    one = asyncio.create_task(tsu.rooms.receive("mie-pref", first))
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 3})
    two = asyncio.create_task(tsu.rooms.receive("mie-pref", second))  # waits for the first
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 4})
    with capture_logs() as logs:
        await asyncio.wait_for(cluster.stop("tsu"), 10)
    for task in (one, two):
        with pytest.raises(asyncio.CancelledError):
            await task
    # Each ended by its own cancellation: the wait of the second did not cancel the first.
    abandoned = [e["count"] for e in logs if e["event"] == "room_commits_abandoned"]
    assert abandoned == [2]
    assert not [e for e in logs if "InvalidStateError" in str(e)]
    tsu = await cluster.start("tsu")
    assert tsu.rooms.vector(room) == {"mie-pref": 1}  # never written, so not held
    assert (await _push(mie, "tsu", first))["accepted"] == 2


async def _joining_wires(cluster: Cluster) -> tuple[Node, Node, str, bytes, bytes]:
    """mie adds a stopped tsu to a new room and says hello; nothing is pushed. Returns the
    running tsu, mie, the room, and the wires of the state adding tsu and of the hello."""
    mie, tsu, _ = await three_nodes(cluster)
    await cluster.stop("tsu")
    room = await mie.rooms.create("合流", nodes=["tsu"])
    await mie.rooms.send(room, ["ようこそ"])
    await mie.store.write_all([("DELETE FROM outbox", [()])])
    wires = [wire for _, wire in await mie.rooms.store.history(room, 10)]
    state, hello = sorted(wires, key=lambda wire: Envelope.from_bytes(wire).content.seq)
    assert Envelope.from_bytes(state).content.kind is Kind.STATE
    tsu = await cluster.start("tsu")
    return mie, tsu, room, state, hello


async def _push(sender: Node, to: str, wires: list[bytes]) -> dict[str, Any]:
    entry = sender.roster.member(to)
    assert entry is not None
    response = await sender.client.request(
        entry, "POST", "/envelopes", codec.encode_frame({"envelopes": wires})
    )
    return codec.decode_map(response.body, canonical=False)


async def test_a_batch_that_adds_this_node_to_a_room_brings_the_rooms_messages_too(
    cluster: Cluster,
) -> None:
    mie, tsu, room, state, hello = await _joining_wires(cluster)
    answer = await _push(mie, "tsu", [state, hello])
    assert (answer["accepted"], answer["refused"]) == (2, [])
    assert tsu.rooms.vector(room) == {"mie-pref": 2}


async def test_messages_checked_before_the_state_adding_this_node_come_by_catch_up(
    cluster: Cluster,
) -> None:
    mie, tsu, room, state, hello = await _joining_wires(cluster)
    # The second batch on the way is checked first: the room is unknown yet.
    early = await _push(mie, "tsu", [hello])
    assert [code for _, code in early["refused"]] == ["unknown_room"]
    assert (await _push(mie, "tsu", [state]))["accepted"] == 1
    took = await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 2}, timeout=10)
    assert took < 5  # a catch-up pass follows the refusal, not the next routine one


async def test_two_thousand_messages_in_one_send_arrive_complete_and_outboxes_drain(
    cluster: Cluster, applied: Applied
) -> None:
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("統計", nodes=["tsu", "ise"])
    sent = await mie.rooms.send(room, [f"row {k:04d}" for k in range(2000)])
    assert len(sent) == len(set(sent)) == 2000
    for node in (tsu, ise):
        await eventually(holds(node, room, 2001), timeout=15)
    reference = await timeline_ids(mie, room)
    for node in (tsu, ise):
        ids = await timeline_ids(node, room)
        assert len(ids) == len(set(ids)) == 2001
        assert ids == reference
        assert set(sent) <= set(ids)
        assert_once(applied, node.node_id, ids)
        assert sum(applied[node.node_id].values()) == 2001
    assert texts(await timeline(ise, room)) == [f"row {k:04d}" for k in range(2000)]

    async def drained() -> bool:
        depths = await mie.rooms.store.outbox_depths()
        return all(count == 0 for count, _ in depths.values())

    await eventually(drained, timeout=5)
    assert await mie.rooms.store.outbox_depths() == {}


async def test_receiver_stopped_while_500_messages_are_sent_gets_them_all_once_after_restart(
    cluster: Cluster, applied: Applied
) -> None:
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("停電情報", nodes=["tsu", "ise"])
    await eventually(holds(ise, room, 1))
    await cluster.stop("ise")
    sent: list[bytes] = []
    for batch in range(5):
        sent += await mie.rooms.send(room, [f"mie {batch}.{k}" for k in range(50)])
        sent += await tsu.rooms.send(room, [f"tsu {batch}.{k}" for k in range(50)])
    assert len(sent) == 500
    await eventually(holds(tsu, room, 501), timeout=10)
    depths = await mie.rooms.store.outbox_depths()
    assert depths.get("ise", (0, 0))[0] == 250  # queued for the stopped node

    ise = await cluster.start("ise")
    took = await eventually(holds(ise, room, 501), timeout=15)
    assert took < 15
    reference = await timeline_ids(mie, room)
    assert await timeline_ids(tsu, room) == reference
    ids = await timeline_ids(ise, room)
    assert ids == reference and len(set(ids)) == 501
    assert set(sent) <= set(ids)
    assert_causal(await timeline(ise, room))
    await asyncio.sleep(0.5)  # let any late duplicate (outbox retry after catch-up) arrive
    assert_once(applied, "ise", ids)
    assert sum(applied["ise"].values()) == 501

    async def drained() -> bool:
        depths = [await n.rooms.store.outbox_depths() for n in (mie, tsu)]
        return all("ise" not in d for d in depths)

    await eventually(drained, timeout=10)


async def cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    data = stdin.encode() if stdin is not None else None
    out, err = await asyncio.wait_for(process.communicate(data), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_creates_a_room_sends_stdin_lines_and_another_node_lists_and_reads_them(
    cluster: Cluster,
) -> None:
    mie, tsu, ise = await three_nodes(cluster)
    home = str(mie.home.root)
    code, out, err = await cli(
        "room", "create", "--home", home, "広域連絡", "--node", "tsu", "--json"
    )
    assert code == 0, err
    created = json.loads(out)
    assert list(created) == ["room_id"]
    room = created["room_id"]
    assert room.startswith("!") and room.endswith(":mie-pref")

    # A refused send says which rule it breaks, not only the verdict's code.
    code, out, err = await cli("room", "send", "--home", home, room, "")
    assert code == 1
    assert "refused by the room's rules: body field 'text' must be text of 1-" in err
    assert err.rstrip().endswith("(bad_body)")

    lines = [f"連絡 {k:02d}: 異常なし" for k in range(50)]
    code, out, err = await cli("room", "send", "--home", home, room, "-", stdin="\n".join(lines))
    assert code == 0, err
    assert "sent 50 messages" in err
    await eventually(holds(tsu, room, 51), timeout=10)

    code, out, err = await cli("room", "list", "--home", str(tsu.home.root), "--json")
    assert code == 0, err
    rows = {row["room_id"]: row for row in json.loads(out)}
    assert rows[room]["name"] == "広域連絡"
    assert rows[room]["home"] == "mie-pref" and rows[room]["home_revoked"] is False
    assert rows[room]["nodes"] == ["mie-pref", "tsu"]
    assert rows[room]["envelopes"] == 51 and rows[room]["member"] is True

    code, out, err = await cli(
        "room", "history", "--home", str(tsu.home.root), room, "--json", "--limit", "1000"
    )
    assert code == 0, err
    history = json.loads(out)
    assert [row["text"] for row in history if row["kind"] == "message"] == lines
    assert {row["origin"] for row in history} == {"mie-pref"}

    code, out, err = await cli("room", "invite", "--home", home, room, "ise", "--json")
    assert code == 0, err
    assert json.loads(out) == {"room_id": room, "node_id": "ise", "result": "added"}
    await eventually(holds(ise, room, 52), timeout=10)
    code, out, err = await cli(
        "room", "history", "--home", str(ise.home.root), room, "--json", "--limit", "1000"
    )
    assert code == 0, err
    assert [row["text"] for row in json.loads(out) if row["kind"] == "message"] == lines
    code, out, err = await cli("room", "list", "--home", str(ise.home.root), "--json")
    assert code == 0, err
    assert [row["nodes"] for row in json.loads(out)] == [["ise", "mie-pref", "tsu"]]

    code, out, err = await cli("room", "remove", "--home", str(tsu.home.root), room, "ise")
    assert code == 1
    assert "only the room's home node mie-pref removes other nodes from it" in err
    code, out, err = await cli("room", "remove", "--home", home, room, "ise")
    assert code == 0, err
    assert out.strip() == f"removed ise from {room}"
    code, out, err = await cli("room", "list", "--home", home, "--json")
    assert code == 0, err
    assert [row["nodes"] for row in json.loads(out)] == [["mie-pref", "tsu"]]


async def test_cli_send_from_stdin_refused_partway_names_the_input_line_to_resend_from(
    cluster: Cluster,
) -> None:
    mie = await cluster.authority()
    home = str(mie.home.root)
    code, out, err = await cli("room", "create", "--home", home, "一括送信", "--json")
    assert code == 0, err
    room = json.loads(out)["room_id"]
    # 1,000 messages with a blank line after each (blank lines are not sent): the first
    # request. The second holds a line too large for an envelope, and is refused whole.
    lines = [line for k in range(1000) for line in (f"連絡 {k}", "")]
    lines += ["次の分 0", "あ" * 30_000, "次の分 2"]
    code, out, err = await cli("room", "send", "--home", home, room, "-", stdin="\n".join(lines))
    assert code == 1
    assert "(envelope_too_large)" in err
    assert (
        "1000 messages, from the lines before line 2001, were sent and are stored; "
        "resend from line 2001"
    ) in err
    assert lines[2000] == "次の分 0"  # line 2001 of the input
    assert (await mie.rooms.store.counts())[room][0] == 1 + 1000  # the creation, the first 1,000


async def test_a_message_too_large_fails_only_its_own_send_not_those_sealed_with_it(
    cluster: Cluster,
) -> None:
    """Sends to one room that arrive together share a signing batch; one of them too large
    to seal must fail alone, and the others keep gapless sequence numbers."""
    mie = await cluster.authority()
    room = await mie.rooms.create("同時送信")
    ok, big, two = await asyncio.gather(
        mie.rooms.send(room, ["了解"]),
        mie.rooms.send(room, ["あ" * 30_000]),
        mie.rooms.send(room, ["確認しました", "以上"]),
        return_exceptions=True,
    )
    assert isinstance(big, KakehashiError) and big.code == "envelope_too_large"
    assert isinstance(ok, list) and len(ok) == 1
    assert isinstance(two, list) and len(two) == 2
    envelopes = await timeline(mie, room)
    assert [e.content.body.get("text") for e in envelopes] == [None, "了解", "確認しました", "以上"]
    assert [e.content.seq for e in envelopes] == [1, 2, 3, 4]
    assert [e.id for e in envelopes[1:]] == [*ok, *two]
    assert mie.rooms.vector(room) == {"mie-pref": 4}


async def test_a_sender_whose_outbox_read_fails_reads_again_after_the_backoff(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the outbox that fails (a disk error) is retried as a failed post is:
    the sender goes on, and what was queued arrives."""
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("読み出し失敗", nodes=["tsu"])
    await eventually(holds(tsu, room, 1))
    read = mie.rooms.store.outbox_batch
    failures = [StorageError("disk I/O error", code="database_error")]

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await read(*args, **kwargs)

    monkeypatch.setattr(mie.rooms.store, "outbox_batch", failing_once)
    before = mie.outbox.stats("tsu").delivered  # type: ignore[union-attr]
    # A failed post makes the sender read the outbox again (not its rows in memory).
    await cluster.stop("tsu")
    await mie.rooms.send(room, ["読み出し失敗の後"])
    await eventually(lambda: mie.outbox.stats("tsu").failures >= 1)  # type: ignore[union-attr]
    tsu = await cluster.start("tsu")
    await eventually(lambda: not failures, timeout=15)  # the sender's read failed

    async def delivered_by_the_sender() -> bool:  # tsu may catch up by itself too
        return "tsu" not in await mie.rooms.store.outbox_depths()

    await eventually(delivered_by_the_sender, timeout=15)
    await eventually(holds(tsu, room, 2))
    stats = mie.outbox.stats("tsu")
    assert stats is not None and stats.failures >= 2
    assert stats.delivered > before


async def test_a_refused_send_whose_caller_gave_up_does_not_fail_the_others(
    cluster: Cluster,
) -> None:
    """A caller may stop waiting (cancelled) before its send is planned. Its refusal then
    has nowhere to go, and must not become the error of the sends planned with it."""
    mie = await cluster.authority()
    room = await mie.rooms.create("取り消し")
    gone = asyncio.create_task(mie.rooms.send(room, [""]))  # refused: empty text
    kept = asyncio.create_task(mie.rooms.send(room, ["届きました"]))
    await asyncio.sleep(0)  # both are queued for the same round, not yet planned
    gone.cancel()
    [sent] = await kept
    with pytest.raises(asyncio.CancelledError):
        await gone
    envelopes = await timeline(mie, room)
    assert [e.id for e in envelopes[1:]] == [sent]
    assert envelopes[1].content.body["text"] == "届きました"


async def test_a_revoked_node_gets_nothing_more_and_what_was_queued_for_it_is_dropped(
    cluster: Cluster,
) -> None:
    """Revocation is final: every node forgets what it kept queued for the revoked node,
    queues nothing more for it, and refuses to add it to a room. The others go on."""
    mie, tsu, ise = await three_nodes(cluster)
    assert mie.authority is not None
    room = await mie.rooms.create("合併前", nodes=["tsu", "ise"])
    await eventually(holds(ise, room, 1))
    await cluster.stop("ise")
    await mie.rooms.send(room, ["停止中 1", "停止中 2"])
    await tsu.rooms.send(room, ["停止中 3"])
    await eventually(holds(tsu, room, 4))
    assert (await mie.rooms.store.outbox_depths())["ise"][0] == 2
    assert (await tsu.rooms.store.outbox_depths())["ise"][0] == 1

    await mie.authority.set_status("ise", MemberStatus.REVOKED, "市町村合併")
    await eventually(lambda: tsu.roster.member("ise").status is MemberStatus.REVOKED)  # type: ignore[union-attr]

    async def nothing_queued_for_ise() -> bool:
        depths = [await node.rooms.store.outbox_depths() for node in (mie, tsu)]
        return all("ise" not in depth for depth in depths)

    await eventually(nothing_queued_for_ise)
    # The home node takes ise out of its rooms (one state change each), so no town's
    # read count waits for ise any more.
    await eventually(lambda: all("ise" not in n.rooms.state(room).nodes for n in (mie, tsu)))  # type: ignore[union-attr]
    await mie.rooms.send(room, ["失効後"])
    await eventually(holds(tsu, room, 6))
    assert await nothing_queued_for_ise()
    removals = [e for e in await timeline(tsu, room) if e.content.kind is Kind.STATE]
    assert removals[-1].content.body == {"remove_nodes": ["ise"]}
    assert len(removals) == 2  # the creation and the one removal
    with pytest.raises(KakehashiError) as refused:
        await mie.rooms.invite(await mie.rooms.create("新しい部屋"), "ise")
    assert refused.value.code == "peer_revoked"
    with pytest.raises(KakehashiError) as refused:
        await tsu.rooms.create("町の部屋", nodes=["ise"])
    assert refused.value.code == "peer_revoked"
    # A request that asks the home to add it anyway (a member node of an earlier
    # version) is denied there.
    assert await tsu.rooms.change(room, {"add_nodes": ["ise"]}) == "requested"
    await eventually(holds(mie, room, 7))  # the request, committed at the home
    await mie.rooms.send(room, ["要求の後"])
    await eventually(holds(tsu, room, 8))
    assert "ise" not in mie.rooms.state(room).nodes  # type: ignore[union-attr]
    assert "ise" not in tsu.rooms.state(room).nodes  # type: ignore[union-attr]
    # A restart does not bring the queue back, nor start a sender for it.
    await cluster.stop("mie-pref")
    mie = await cluster.start("mie-pref")
    assert "ise" not in await mie.rooms.store.outbox_depths()
    assert mie.outbox.stats("ise") is None
    await mie.rooms.send(room, ["再起動後"])
    await eventually(holds(tsu, room, 9))
    kinds = [e.content.kind for e in await timeline(tsu, room)]
    assert kinds.count(Kind.STATE) == 2  # the restart issued no second removal


async def test_a_room_whose_home_is_revoked_refuses_state_changes_and_keeps_its_messages(
    cluster: Cluster,
) -> None:
    """Nothing is sent to a revoked node, so a request to change a room it is home of
    would never be decided: it is refused at once, with the reason. Messages between
    the other member nodes go on."""
    mie, tsu, ise = await three_nodes(cluster)
    assert mie.authority is not None
    room = await tsu.rooms.create("津市の部屋", nodes=["mie-pref", "ise"])
    await eventually(holds(ise, room, 1))
    assert await ise.rooms.change(room, {"topic": "失効前"}) == "requested"
    await eventually(lambda: tsu.rooms.state(room).topic == "失効前")  # type: ignore[union-attr]

    assert not {v["room_id"]: v for v in await ise.room_views()}[room]["home_revoked"]
    await mie.authority.set_status("tsu", MemberStatus.REVOKED, "市町村合併")
    await eventually(lambda: ise.roster.revoked("tsu"))
    assert {v["room_id"]: v for v in await ise.room_views()}[room]["home_revoked"]
    attempts: list[Callable[[], Awaitable[str]]] = [
        lambda: ise.rooms.change(room, {"topic": "失効後"}),
        lambda: ise.rooms.remove_node(room, "ise"),  # leaving, too, is decided by the home
        lambda: mie.rooms.invite(room, "ise"),
    ]
    for attempt in attempts:
        with pytest.raises(TrustError) as refused:
            await attempt()
        assert refused.value.code == "room_home_revoked"
        assert "tsu" in str(refused.value)
    [sent] = await ise.rooms.send(room, ["失効後も届きます"])

    async def arrived() -> bool:
        return sent in {e.id for e in await timeline(mie, room)}

    await eventually(arrived)
    assert mie.rooms.state(room).topic == "失効前"  # type: ignore[union-attr]


async def test_what_a_node_accepted_from_a_revoked_node_before_it_learned_does_not_wedge_it(
    cluster: Cluster,
) -> None:
    """A node that has not yet adopted a revocation accepts what the revoked node signs
    meanwhile, and its next envelope depends on it. The others, who refuse the revoked
    node's envelope on its own, accept it once an envelope of an active member depends
    on it: else everything that member sends waits for it forever."""
    mie, tsu, ise = await three_nodes(cluster)
    assert mie.authority is not None
    nabari = await cluster.member("nabari", "名張市", "242080")
    await eventually(lambda: {n.roster.version for n in cluster.nodes.values()} == {4})
    room = await mie.rooms.create("県南部", nodes=["tsu", "ise", "nabari"])
    await eventually(holds(nabari, room, 1))
    await eventually(holds(ise, room, 1))

    # tsu and nabari itself will not see the new roster until told to.
    released = asyncio.Event()
    for node in (tsu, nabari):
        adopt = node.adopt

        async def held(signed: Any, adopt: Any = adopt) -> Any:
            await released.wait()
            return await adopt(signed)

        node.adopt = held  # type: ignore[method-assign]
    await mie.authority.set_status("nabari", MemberStatus.REVOKED, "市町村合併")
    await eventually(lambda: ise.roster.revoked("nabari"))
    [late] = await nabari.rooms.send(room, ["合併前の最後の連絡"])  # signed after revocation
    await eventually(holds(tsu, room, 2))  # tsu still takes it
    [vouching] = await tsu.rooms.send(room, ["了解しました"])  # depends on nabari's
    released.set()
    await eventually(lambda: tsu.roster.revoked("nabari"))

    for node in (mie, ise):
        # The stored timeline, not the vector in memory, which runs ahead of the commit.
        async def both_stored(node: Node = node) -> bool:
            ids = {e.id for e in await timeline(node, room)}
            return late in ids and vouching in ids

        await eventually(both_stored, timeout=15)
        ids = [e.id for e in await timeline(node, room)]
        assert ids.index(late) < ids.index(vouching)
    # On its own, an envelope the revoked node signs now is refused everywhere.
    refused = (await nabari.rooms.send(room, ["失効後"]))[0]
    [last] = await tsu.rooms.send(room, ["以上"])

    async def last_stored() -> bool:
        return last in {e.id for e in await timeline(mie, room)}

    await eventually(last_stored, timeout=15)
    assert refused not in [e.id for e in await timeline(mie, room)]
    assert refused not in [e.id for e in await timeline(tsu, room)]


async def test_the_home_removes_a_node_and_a_member_node_can_only_leave(cluster: Cluster) -> None:
    """Removing a node takes it and its users out; it keeps what it had and gets nothing
    newer. Only the home removes other nodes; a member node may leave; the home stays."""
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("検討会", nodes=["tsu", "ise"])
    await eventually(holds(ise, room, 1))
    await tsu.rooms.send(room, ["資料を共有します"])
    await eventually(holds(ise, room, 2))

    for node, target, code in (
        (tsu, "ise", "not_room_home"),  # only the home removes another node
        (tsu, "mie-pref", "home_node_stays"),
        (mie, "mie-pref", "home_node_stays"),
        (mie, "nabari", "not_in_room"),
    ):
        with pytest.raises(KakehashiError) as refused:
            await node.rooms.remove_node(room, target)
        assert refused.value.code == code, (node.node_id, target)
    assert await mie.rooms.remove_node(room, "ise") == "removed"
    await eventually(lambda: tsu.rooms.state(room).nodes == {"mie-pref", "tsu"})  # type: ignore[union-attr]
    with pytest.raises(KakehashiError) as refused:
        await mie.rooms.remove_node(room, "ise")
    assert refused.value.code == "not_in_room"

    await tsu.rooms.send(room, ["削除後の連絡"])
    await eventually(holds(mie, room, 4))
    # ise got the change that removed it, and nothing after it.
    await eventually(lambda: "ise" not in ise.rooms.state(room).nodes)  # type: ignore[union-attr]
    assert [e.content.kind for e in await timeline(ise, room)] == [
        Kind.STATE,
        Kind.MESSAGE,
        Kind.STATE,
    ]
    assert "ise" not in await tsu.rooms.store.outbox_depths()

    # Invited again, ise catches up with what was sent while it was out.
    assert await mie.rooms.invite(room, "ise") == "added"
    await eventually(holds(ise, room, 5), timeout=15)
    at_ise, at_mie = await timeline(ise, room), await timeline(mie, room)
    assert [e.id for e in at_ise] == [e.id for e in at_mie]
    assert_causal(at_ise)

    # A member node leaves by asking the home, which grants it.
    assert await tsu.rooms.remove_node(room, "tsu") == "requested"
    await eventually(lambda: mie.rooms.state(room).nodes == {"mie-pref", "ise"})  # type: ignore[union-attr]


async def test_a_peer_whose_clock_is_days_ahead_does_not_carry_the_others_clocks_along(
    cluster: Cluster,
) -> None:
    """A server without NTP signs with its own wrong time; the others keep theirs."""
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("時計", nodes=["tsu", "ise"])
    await eventually(holds(tsu, room, 1))
    cluster.clocks["tsu"].offset = 2 * 86_400  # two days ahead
    [ahead] = await tsu.rooms.send(room, ["未来の時刻で送信"])
    await eventually(holds(mie, room, 2))
    [reply] = await mie.rooms.send(room, ["返信"])
    await eventually(holds(ise, room, 3))
    now_ms = time.time() * 1000
    stamps = {e.id: hlc_to_ms(e.content.hlc) for e in await timeline(ise, room)}
    assert stamps[ahead] > now_ms + 86_400_000  # tsu's own (wrong) time, as signed
    assert stamps[reply] <= now_ms + MAX_CLOCK_AHEAD_MS  # mie moved at most that far,
    assert stamps[reply] < now_ms + 3_600_000  # which is minutes, not days


async def test_small_batches_from_memory_and_from_the_outbox_deliver_everything_once(
    cluster: Cluster, applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Senders take what was just committed from memory while they keep up, and read the
    outbox when they fall behind (a commit bigger than what they keep, a stopped peer):
    both paths, mixed, deliver every envelope once and in order."""
    from_memory, from_disk = Counter[str](), Counter[str]()
    take, read = _Sender._from_tail, RoomStore.outbox_batch

    def counted_take(self: _Sender, max_count: int, max_bytes: int) -> OutboxBatch | None:
        batch = take(self, max_count, max_bytes)
        from_memory[self.peer] += len(batch.wires) if batch else 0
        return batch

    async def counted_read(
        self: RoomStore, peer: str, max_count: int, max_bytes: int, *, after: int = 0
    ) -> OutboxBatch | None:
        batch = await read(self, peer, max_count, max_bytes, after=after)
        from_disk[peer] += len(batch.wires) if batch else 0
        return batch

    monkeypatch.setattr(_Sender, "_from_tail", counted_take)
    monkeypatch.setattr(RoomStore, "outbox_batch", counted_read)
    mie, tsu, ise = await three_nodes(cluster)
    for node in (mie, tsu):
        # Batches of 5, so the 10 rows a sender keeps in memory overflow easily.
        node.outbox.settings = DeliverySettings(max_batch_count=5)
    room = await mie.rooms.create("小分け", nodes=["tsu", "ise"])
    await eventually(holds(ise, room, 1))
    for k in range(30):
        await mie.rooms.send(room, [f"one {k}"])  # one commit at a time: kept up with
    await asyncio.gather(*(mie.rooms.send(room, [f"together {k}"]) for k in range(30)))
    await mie.rooms.send(room, [f"many {k}" for k in range(40)])  # more than memory holds
    await cluster.stop("ise")
    for k in range(20):
        await tsu.rooms.send(room, [f"tsu {k}"])
    ise = await cluster.start("ise")
    for node in (tsu, ise):
        await eventually(holds(node, room, 121), timeout=20)
    reference = await timeline_ids(mie, room)
    for node in (tsu, ise):
        ids = await timeline_ids(node, room)
        assert ids == reference and len(set(ids)) == 121
        assert_causal(await timeline(node, room))
    await asyncio.sleep(0.5)  # a late duplicate would be counted below
    assert_once(applied, "tsu", reference)
    assert sum(applied["tsu"].values()) == 121
    assert from_memory["tsu"] > 0 and from_disk["tsu"] > 0
    assert from_disk["ise"] > 0  # the stopped peer's rows were read back


async def test_concurrent_sends_share_commits_and_signatures_and_all_arrive_once(
    cluster: Cluster,
) -> None:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("同時送信", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    results = await asyncio.gather(*(mie.rooms.send(room, [f"msg {i}"]) for i in range(200)))
    ids = [envelope_id for batch in results for envelope_id in batch]
    assert len(set(ids)) == 200

    async def tsu_has_all() -> bool:
        held = {envelope_id for envelope_id, _ in await tsu.rooms.store.history(room, 1000)}
        return set(ids) <= held

    await eventually(tsu_has_all, timeout=15)
    rows = await mie.rooms.store.history(room, 1000)
    signatures = {
        Envelope.from_bytes(wire).signature for envelope_id, wire in rows if envelope_id in ids
    }
    # Sends waiting at the same moment were sealed together: far fewer signatures than sends.
    assert len(signatures) < 100, len(signatures)
    seqs = sorted(Envelope.from_bytes(wire).content.seq for _, wire in rows)
    assert seqs == list(range(1, len(seqs) + 1))  # the origin's seqs have no gap


async def test_a_message_sealed_with_an_invitation_after_it_goes_to_the_invited_node_too(
    monkeypatch: pytest.MonkeyPatch, cluster: Cluster
) -> None:
    # One commit round: a message, the invitation of ise, a message. Each goes to the
    # member nodes of the state it was made in: the second to ise as well, the first not.
    mie, tsu, ise = await three_nodes(cluster)
    room = await mie.rooms.create("招待", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    routed: list[tuple[str, str]] = []
    plan_write = RoomStore.plan_write

    def record(self: RoomStore, rows: Any, outbox: Any, *args: Any, **kwargs: Any) -> Any:
        outbox = list(outbox)
        if self is mie.rooms.store:
            for peer, envelope in outbox:
                what = envelope.content.body.get("text", envelope.content.kind.value)
                routed.append((peer, what))
        return plan_write(self, rows, outbox, *args, **kwargs)

    monkeypatch.setattr(RoomStore, "plan_write", record)
    await asyncio.gather(
        mie.rooms.send(room, ["before"]),
        mie.rooms.invite(room, "ise"),
        mie.rooms.send(room, ["after"]),
    )
    assert routed == [
        ("tsu", "before"),
        ("ise", "state"),
        ("tsu", "state"),
        ("ise", "after"),
        ("tsu", "after"),
    ]
    await eventually(holds(ise, room, 4))
    assert texts(await timeline(ise, room)) == ["before", "after"]


async def test_message_too_large_to_seal_is_refused_without_holding_up_other_sends(
    cluster: Cluster,
) -> None:
    mie = await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("大きすぎ", nodes=["tsu"])
    other = await mie.rooms.create("ふつう", nodes=["tsu"])
    oversized = mie.rooms.send(room, ["字" * 30_000])  # ~90 KB of UTF-8: over 64 KiB sealed
    normal = mie.rooms.send(other, ["届く"])
    results = await asyncio.wait_for(
        asyncio.gather(oversized, normal, return_exceptions=True), timeout=10
    )
    assert isinstance(results[0], ProtocolError) and results[0].code == "envelope_too_large"
    assert isinstance(results[1], list) and len(results[1]) == 1
    # The refused send left no trace: the room's next message takes the next seq.
    await mie.rooms.send(room, ["あとから"])
    assert mie.rooms.vector(room)["mie-pref"] == 2


async def test_state_request_left_unanswered_by_a_stopped_home_is_answered_after_restart(
    cluster: Cluster,
) -> None:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    await cluster.member("ise", "伊勢市", "242039")
    room = await mie.rooms.create("再開", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)

    # The home commits tsu's request but stops before answering it (as in a crash).
    async def not_now(request: Envelope) -> None:
        return None

    mie.rooms._answer_request = not_now  # type: ignore[method-assign]
    assert await tsu.rooms.invite(room, "ise") == "requested"
    request_seq = tsu.rooms.vector(room)["tsu"]
    await eventually(lambda: mie.rooms.vector(room).get("tsu", 0) >= request_seq)
    state = mie.rooms.state(room)
    assert state is not None and "ise" not in state.nodes
    await cluster.stop("mie-pref")

    mie = await cluster.start("mie-pref")  # a fresh node on the same home
    await eventually(lambda: "ise" in (mie.rooms.state(room) or state).nodes, timeout=10)
    await eventually(lambda: "ise" in (tsu.rooms.state(room) or state).nodes, timeout=10)
    home_seq = mie.rooms.vector(room)["mie-pref"]

    # Answered once: another restart does not answer it again.
    await cluster.stop("mie-pref")
    mie = await cluster.start("mie-pref")
    await asyncio.sleep(0.5)
    assert mie.rooms.vector(room)["mie-pref"] == home_seq
