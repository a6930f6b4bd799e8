"""Catch-up of a big backlog, as an operator follows it: the serving peer says how much
is left after each page, and `kakehashi catchup --wait` follows the pass to its end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from federation import codec
from federation.envelope import Envelope
from gateway import catchup as catchup_module
from gateway.catchup import ANSWER_LIMITS, CatchUp
from gateway.node import Node
from gateway.rooms import BATCH_LIMITS, Refusal, RoomService
from gateway.store import Store

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


async def test_sync_pages_say_how_much_is_left(cluster: Cluster) -> None:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("大量", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    for chunk in range(5):
        await mie.rooms.send(room, [f"{chunk}-{i}" for i in range(100)])
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    body = codec.encode({"limit": 120, "rooms": {room: {"mie-pref": 1}}})
    response = await tsu.client.request(entry, "POST", "/sync", body)
    answer = codec.decode_map(response.body, BATCH_LIMITS, canonical=False)
    assert len(answer["envelopes"]) == 120 and answer["more"]
    assert answer["remaining"] == 500 - 120
    body = codec.encode({"limit": 1000, "rooms": {room: {"mie-pref": 1}}})
    response = await tsu.client.request(entry, "POST", "/sync", body)
    answer = codec.decode_map(response.body, BATCH_LIMITS, canonical=False)
    assert len(answer["envelopes"]) == 500 and not answer["more"]
    assert "remaining" not in answer


async def backlog(cluster: Cluster, chunks: int, size: int) -> tuple[Node, str]:
    """tsu, stopped, misses `chunks` sends of `size` messages in a room with mie-pref, and
    nothing is pushed to it (mie's outbox is emptied): only catch-up brings them. Returns
    the restarted tsu and the room."""
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("大量", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await cluster.stop("tsu")
    for chunk in range(chunks):
        await mie.rooms.send(room, [f"{chunk}-{i}" for i in range(size)])
    await mie.store.write_all([("DELETE FROM outbox", [()])])
    return await cluster.start("tsu"), room


def committed(node: Node, room: str, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether `node` has `count` envelopes of `room` on disk. Memory runs ahead of disk
    while a step commits, so the vector alone says nothing of what a read finds."""

    async def check() -> bool:
        return len(await node.rooms.store.history(room, count + 1)) == count

    return check


async def test_catchup_wait_follows_a_backlog_to_its_end(cluster: Cluster) -> None:
    tsu, room = await backlog(cluster, 6, 1000)
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        "catchup",
        "--wait",
        "--peer",
        "mie-pref",
        "--home",
        str(tsu.home.root),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()
    data = json.loads(out)
    assert not data["peers"]["mie-pref"]["running"]
    assert tsu.rooms.vector(room) == {"mie-pref": 6001}


async def test_a_node_in_hundreds_of_rooms_can_still_ask_for_them_all(cluster: Cluster) -> None:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    rooms = {f"!room{i:04d}:mie-pref": {"mie-pref": 1} for i in range(600)}
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    body = codec.encode({"limit": 10, "rooms": rooms})
    response = await tsu.client.request(entry, "POST", "/sync", body)
    answer = codec.decode_map(response.body, BATCH_LIMITS, canonical=False)
    assert answer["envelopes"] == [] and not answer["more"]
    assert mie.refusals == {}


async def test_a_page_says_where_it_ends_and_the_next_page_starts_right_after(
    cluster: Cluster,
) -> None:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("大量", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    for chunk in range(3):
        await mie.rooms.send(room, [f"mie {chunk}-{i}" for i in range(60)])
        await tsu.rooms.send(room, [f"tsu {chunk}-{i}" for i in range(40)])
    entry = tsu.roster.member("mie-pref")
    assert entry is not None

    async def page(vector: dict[str, int], through: bool) -> dict[str, object]:
        ask: dict[str, object] = {"limit": 120, "rooms": {room: vector}}
        if through:
            ask["through"] = True
        response = await tsu.client.request(entry, "POST", "/sync", codec.encode(ask))
        return codec.decode_map(response.body, ANSWER_LIMITS, canonical=False)

    assert "through" not in await page({}, through=False)  # only for pullers that ask
    vector: dict[str, int] = {}
    seen: list[tuple[str, int]] = []
    while True:
        answer = await page(vector, through=True)
        served = [Envelope.from_bytes(wire).content for wire in answer["envelopes"]]  # type: ignore[attr-defined]
        seen += [(content.origin, content.seq) for content in served]
        if not answer["more"]:
            assert "through" not in answer
            break
        highest: dict[str, int] = {}
        for content in served:
            highest[content.origin] = max(highest.get(content.origin, 0), content.seq)
        assert answer["through"] == {room: highest}
        vector = {**vector, **highest}
    # Page after page from where each said it ended: everything once, nothing skipped.
    assert len(seen) == len(set(seen)) == 301
    assert sorted(seen) == sorted(
        [("mie-pref", seq) for seq in range(1, 182)] + [("tsu", seq) for seq in range(1, 121)]
    )


async def test_catch_up_asks_for_each_page_before_the_one_before_is_in(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catchup_module, "PAGE_COUNT", 100)
    asked = received = asked_ahead = duplicates = 0
    ask, receive = CatchUp._ask, RoomService.receive

    async def counted_ask(self: CatchUp, *args: Any, **kwargs: Any) -> dict[str, Any]:
        nonlocal asked, asked_ahead
        if self._node_id == "tsu":  # not mie's own pass, asking tsu
            asked_ahead += received < asked  # a page asked for earlier is not in yet
            asked += 1
        return await ask(self, *args, **kwargs)

    async def counted_receive(
        self: RoomService, peer: str, wires: Sequence[bytes], **kwargs: Any
    ) -> tuple[int, int, list[Refusal]]:
        nonlocal received, duplicates
        result = await receive(self, peer, wires, **kwargs)
        if self.node_id == "tsu":
            received += kwargs.get("decoded") is not None  # a page (not a push)
            duplicates += result[1]
        return result

    monkeypatch.setattr(CatchUp, "_ask", counted_ask)
    monkeypatch.setattr(RoomService, "receive", counted_receive)
    tsu, room = await backlog(cluster, 10, 100)
    await eventually(committed(tsu, room, 1001), timeout=30)
    held = await tsu.rooms.store.history(room, 2000)
    assert len(held) == 1001
    assert duplicates == 0
    # Each page after the first is asked for as soon as the answer before it said where
    # it ended, before that page is decoded and committed.
    assert asked_ahead >= 9, (asked, received)


async def test_catch_up_fetches_at_most_two_pages_ahead_of_the_one_taken_in(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catchup_module, "PAGE_COUNT", 100)
    asks = 0
    gate = asyncio.Event()
    ask, decode = CatchUp._ask, RoomService.decode

    async def counted_ask(self: CatchUp, *args: Any, **kwargs: Any) -> dict[str, Any]:
        nonlocal asks
        asks += self._node_id == "tsu"  # not mie's own pass, asking tsu
        return await ask(self, *args, **kwargs)

    async def held_decode(self: RoomService, wires: Sequence[bytes]) -> Any:
        await gate.wait()
        return await decode(self, wires)

    monkeypatch.setattr(CatchUp, "_ask", counted_ask)
    monkeypatch.setattr(RoomService, "decode", held_decode)
    tsu, room = await backlog(cluster, 10, 100)
    # No page can be decoded, so none is taken in: the first page, and the one after it
    # (asked for as soon as the first answer said where it ended), and no more.
    await eventually(lambda: asks == catchup_module.PAGES_AHEAD)
    await asyncio.sleep(0.5)
    assert asks == catchup_module.PAGES_AHEAD
    assert tsu.rooms.vector(room) == {"mie-pref": 1}
    gate.set()
    await eventually(committed(tsu, room, 1001), timeout=30)
    assert tsu.rooms.vector(room) == {"mie-pref": 1001}


async def test_catch_up_takes_in_the_next_page_while_the_one_before_commits(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catchup_module, "PAGE_COUNT", 100)
    tsu, room = await backlog(cluster, 0, 0)  # tsu knows the room; the backlog comes next
    await cluster.stop("tsu")
    mie = cluster.nodes["mie-pref"]
    for chunk in range(10):
        await mie.rooms.send(room, [f"{chunk}-{i}" for i in range(100)])
    await mie.store.write_all([("DELETE FROM outbox", [()])])
    gate = asyncio.Event()
    commits: list[str] = []
    write_all = Store.write_all

    async def first_page_held(self: Store, statements: Any, **kwargs: Any) -> None:
        envelopes = sum(len(rows) for sql, rows in statements if "INTO envelope" in sql)
        if envelopes and self is not mie.store:
            if not commits:
                commits.append("held")
                await gate.wait()
            await write_all(self, statements, **kwargs)
            commits.append(f"{envelopes} written")
            return
        await write_all(self, statements, **kwargs)

    monkeypatch.setattr(Store, "write_all", first_page_held)
    tsu = await cluster.start("tsu")
    # While the first page's commit is held, the second is verified and applied in
    # memory (the vector moves past it), and not committed before the first.
    await eventually(lambda: tsu.rooms.vector(room) == {"mie-pref": 201})
    await asyncio.sleep(0.3)
    assert commits == ["held"]
    gate.set()
    await eventually(lambda: len(commits) > 2 and tsu.rooms.vector(room) == {"mie-pref": 1001})
    assert commits[:3] == ["held", "100 written", "100 written"]
    await eventually(lambda: sum(c == "100 written" for c in commits) == 10)
    assert len(await tsu.rooms.store.history(room, 2000)) == 1001
