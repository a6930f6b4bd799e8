"""Catch-up of a big backlog, as an operator follows it: the serving peer says how much
is left after each page, and `kakehashi catchup --wait` follows the pass to its end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from federation import codec
from gateway.rooms import BATCH_LIMITS

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


async def test_catchup_wait_follows_a_backlog_to_its_end(cluster: Cluster) -> None:
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    room = await mie.rooms.create("大量", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await cluster.stop("tsu")
    for chunk in range(6):
        await mie.rooms.send(room, [f"{chunk}-{i}" for i in range(1000)])
    # Nothing is pushed: only catch-up brings the backlog (the outbox is emptied first).
    async with mie.store.db.execute("DELETE FROM outbox") as _:
        pass
    await mie.store.db.commit()
    tsu = await cluster.start("tsu")
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
