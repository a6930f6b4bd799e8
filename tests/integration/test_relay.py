"""Relays between segments, on loopback: routing by the roster's segments, relays verify
before they forward, queue durably, and a second relay takes over from a failed one.

On 127.0.0.1 every node could reach every other, so here only the roster's segments
keep them apart: these tests prove the routing and relaying logic with real nodes and
real mutual TLS. tests/system proves the same across real network namespaces, where
the segments are really separate.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiosqlite
import pytest

from federation import codec
from federation.envelope import Envelope
from federation.errors import TrustError
from gateway.node import Node
from gateway.rooms import Served

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
BOTH = ("internet", "lgwan")


async def segmented(cluster: Cluster, *, second_relay: bool = False) -> dict[str, Node]:
    """mie-pref (authority, relay) on both segments; tsu and kameyama on LGWAN only;
    ise on the Internet side only; optionally a second relay, nabari, on both."""
    pref = await cluster.authority(segments=BOTH)
    assert pref.authority is not None
    await pref.authority.update_member("mie-pref", relay=True)
    nodes = {"mie-pref": pref}
    nodes["tsu"] = await cluster.member("tsu", "津市", "242012", segments=("lgwan",))
    nodes["kameyama"] = await cluster.member("kameyama", "亀山市", "242101", segments=("lgwan",))
    nodes["ise"] = await cluster.member("ise", "伊勢市", "242039", segments=("internet",))
    if second_relay:
        nodes["nabari"] = await cluster.member(
            "nabari", "名張市", "242080", segments=BOTH, relay=True
        )
    version = pref.roster.version
    await eventually(lambda: all(n.roster.version == version for n in nodes.values()))
    return nodes


async def committed(node: Node, room: str, count: int) -> bool:
    return (await node.rooms.store.counts()).get(room, (0, 0))[0] >= count


async def texts(node: Node, room: str) -> list[str]:
    rows = await node.rooms.store.history(room, 10**6)
    return [Envelope.from_bytes(wire).content.body.get("text", "") for _, wire in reversed(rows)]


async def test_routes_follow_the_segments_and_peer_list_shows_them(cluster: Cluster) -> None:
    nodes = await segmented(cluster)
    tsu = nodes["tsu"]
    routes = {row["node_id"]: row["route"] for row in tsu.peer_views()}
    assert routes == {
        "mie-pref": "direct",
        "kameyama": "direct",
        "ise": "via mie-pref",
        "tsu": None,
    }
    # The monitor checks only peers on a shared segment: tsu never tries ise directly.
    await eventually(lambda: tsu.monitor.health("mie-pref") is not None)
    await asyncio.sleep(0.3)
    assert tsu.monitor.health("ise") is None


async def test_a_room_between_segments_through_a_relay_that_is_not_a_member(
    cluster: Cluster,
) -> None:
    nodes = await segmented(cluster)
    tsu, ise, pref = nodes["tsu"], nodes["ise"], nodes["mie-pref"]
    room = await tsu.rooms.create("伊勢志摩 観光連携", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    await tsu.rooms.send(room, [f"津から {i}" for i in range(50)])
    await ise.rooms.send(room, [f"伊勢から {i}" for i in range(50)])
    await eventually(lambda: committed(ise, room, 101))
    await eventually(lambda: committed(tsu, room, 101))
    assert await texts(tsu, room) == await texts(ise, room)
    assert len(await texts(tsu, room)) == 101  # the creation and 100 messages, once each
    # The relay forwarded without joining: no room, no timeline, only kept copies.
    assert room not in pref.rooms.room_ids()
    async with pref.store.db.execute(
        "SELECT COUNT(*) FROM relayed WHERE room_id = ?", (room,)
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None and row[0] == 101

    async def drained() -> bool:
        return await pref.rooms.store.outbox_depths() == {}

    await eventually(drained)


async def test_a_member_relay_takes_the_room_in_and_forwards_it(cluster: Cluster) -> None:
    nodes = await segmented(cluster)
    pref, tsu, ise, kameyama = nodes["mie-pref"], nodes["tsu"], nodes["ise"], nodes["kameyama"]
    room = await pref.rooms.create("停電情報 連絡室", nodes=["tsu", "ise", "kameyama"])
    await eventually(lambda: all(n.rooms.state(room) is not None for n in nodes.values()))
    await ise.rooms.send(room, ["伊勢: 停電なし"])
    await tsu.rooms.send(room, ["津: 一部停電"])
    for node in nodes.values():
        await eventually(lambda node=node: committed(node, room, 3))
    expected = await texts(pref, room)
    assert len(expected) == 3
    for node in (tsu, ise, kameyama):
        assert await texts(node, room) == expected


async def test_the_relay_refuses_tampered_envelopes_and_forwards_none(cluster: Cluster) -> None:
    nodes = await segmented(cluster)
    tsu, ise, pref = nodes["tsu"], nodes["ise"], nodes["mie-pref"]
    room = await tsu.rooms.create("連携", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    (sent,) = await tsu.rooms.send(room, ["hello"])
    rows = await tsu.rooms.store.history(room, 1)
    genuine = rows[0][1]
    seq = Envelope.from_bytes(genuine).content.seq

    async def went_through() -> bool:
        # The genuine envelope reached ise through the relay, which holds nothing more.
        arrived = ise.rooms.vector(room).get("tsu", 0) >= seq
        return arrived and await pref.rooms.store.outbox_depths() == {}

    await eventually(went_through)
    raw = codec.decode_map(genuine)
    raw["c"] = raw["c"].replace(b"hello", b"hellp")
    tampered = codec.encode(raw)
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    response = await tsu.client.request(
        entry, "POST", "/relay", codec.encode_frame({"envelopes": [tampered], "to": "ise"})
    )
    answer = codec.decode_map(response.body, canonical=False)
    assert answer["accepted"] == 0
    assert [code for _, code in answer["refused"]] == ["bad_envelope_signature"]
    assert (await pref.rooms.store.outbox_depths()).get("ise") is None
    assert sent == Envelope.from_bytes(genuine).id


async def test_only_relays_relay(cluster: Cluster) -> None:
    nodes = await segmented(cluster)
    tsu, kameyama = nodes["tsu"], nodes["kameyama"]
    entry = tsu.roster.member("kameyama")
    assert entry is not None and not entry.relay
    with pytest.raises(TrustError) as refused:
        await tsu.client.request(
            entry, "POST", "/relay", codec.encode_frame({"envelopes": [], "to": "ise"})
        )
    assert refused.value.code == "not_a_relay"
    assert kameyama.rooms.room_ids() == []


async def test_a_second_relay_carries_on_while_the_first_is_down(cluster: Cluster) -> None:
    nodes = await segmented(cluster, second_relay=True)
    tsu, ise = nodes["tsu"], nodes["ise"]
    room = await tsu.rooms.create("連携", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    assert tsu.route("ise") is not None and tsu.route("ise").relays == ("mie-pref",)  # type: ignore[union-attr]
    await cluster.stop("mie-pref")
    await tsu.rooms.send(room, ["停電中も届く"])
    took = await eventually(lambda: ise.rooms.vector(room).get("tsu") == 2, timeout=10)
    assert took < 5  # no long backoff: the detour is taken at the first failure
    assert tsu.route("ise").relays == ("nabari",)  # type: ignore[union-attr]
    assert {row["node_id"]: row["route"] for row in tsu.peer_views()}["ise"] == "via nabari"


async def test_route_command_explains_the_path(cluster: Cluster) -> None:
    nodes = await segmented(cluster)
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    home = str(nodes["tsu"].home.root)
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        "route",
        "ise",
        "--home",
        home,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    data = json.loads(out)
    assert data["route"]["path"] == ["mie-pref", "ise"]
    assert data["shared_segments"] == []
    assert "mie-pref" in data["reason"]
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        "route",
        "nosuch",
        "--home",
        home,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode != 0
    assert "nosuch" in (out + err).decode()


async def test_two_relays_in_a_row_carry_a_room_across_three_segments(cluster: Cluster) -> None:
    pref = await cluster.authority(segments=("lgwan",))
    tsu = await cluster.member("tsu", "津市", "242012", segments=("lgwan",))
    await cluster.member("nabari", "名張市", "242080", segments=("dmz", "lgwan"), relay=True)
    await cluster.member("owase", "尾鷲市", "242098", segments=("dmz", "internet"), relay=True)
    ise = await cluster.member("ise", "伊勢市", "242039", segments=("internet",))
    version = pref.roster.version
    await eventually(lambda: all(n.roster.version == version for n in cluster.nodes.values()))
    route = tsu.route("ise")
    assert route is not None and route.path == ("nabari", "owase", "ise")
    room = await tsu.rooms.create("南北連携", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    await ise.rooms.send(room, [f"伊勢 {i}" for i in range(30)])
    await tsu.rooms.send(room, [f"津 {i}" for i in range(30)])
    await eventually(lambda: tsu.rooms.vector(room) == {"tsu": 31, "ise": 30})
    await eventually(lambda: ise.rooms.vector(room) == {"tsu": 31, "ise": 30})
    await eventually(lambda: committed(tsu, room, 61))  # vectors move just before the commit
    await eventually(lambda: committed(ise, room, 61))
    assert await texts(tsu, room) == await texts(ise, room)


async def test_peer_update_flags_a_relay_and_refuses_bad_requests(cluster: Cluster) -> None:
    nodes = await segmented(cluster)
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    home = str(nodes["mie-pref"].home.root)

    async def run(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            KAKEHASHI,
            *args,
            "--home",
            home,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, (out + err).decode()

    code, out = await run("peer", "update", "kameyama", "--relay", "--json")
    assert code == 0, out
    assert json.loads(out)["relay"] is True
    version = nodes["mie-pref"].roster.version
    await eventually(lambda: all(n.roster.version == version for n in nodes.values()))
    entry = nodes["ise"].roster.member("kameyama")
    assert entry is not None and entry.relay
    code, out = await run("peer", "update", "kameyama")
    assert code == 2 and "nothing to change" in out
    code, out = await run("peer", "update", "nosuch", "--relay")
    assert code == 1 and "unknown_peer" in out
    code, out = await run("peer", "update", "ise", "--segment", "internet=ftp://x")
    assert code == 1 and "https" in out
    # Ise's office joins LGWAN too: once the roster says so, tsu reaches it directly.
    url = nodes["ise"].config.endpoints[0].url
    assert nodes["tsu"].route("ise").relays == ("mie-pref",)  # type: ignore[union-attr]
    code, out = await run(
        "peer", "update", "ise", "--segment", f"internet={url}", "--segment", f"lgwan={url}"
    )
    assert code == 0, out
    await eventually(lambda: nodes["tsu"].roster.version == nodes["mie-pref"].roster.version)
    assert nodes["tsu"].route("ise").direct  # type: ignore[union-attr]


async def test_a_relay_serves_catch_up_of_what_it_forwarded_only_to_its_addressees(
    cluster: Cluster,
) -> None:
    nodes = await segmented(cluster)
    tsu, ise, pref = nodes["tsu"], nodes["ise"], nodes["mie-pref"]
    room = await tsu.rooms.create("連携", nodes=["ise"])
    await eventually(lambda: ise.rooms.state(room) is not None)
    await tsu.rooms.send(room, [f"津 {i}" for i in range(10)])
    await eventually(lambda: ise.rooms.vector(room) == {"tsu": 11})
    served = await pref.rooms.missing_for("ise", {room: {}}, 100, 1 << 20)
    assert len(served.wires) == 11 and not served.more
    assert await pref.rooms.missing_for("kameyama", {room: {}}, 100, 1 << 20) == Served()
    assert await pref.rooms.missing_for("tsu", {room: {}}, 100, 1 << 20) == Served()
    # ise loses the room's messages (an old backup restored, say) and gets them back
    # from the relay, its only peer on the Internet side that has them.
    await cluster.stop("ise")
    async with aiosqlite.connect(cluster.home("ise").database) as db:
        await db.execute("DELETE FROM envelope WHERE room_id = ? AND seq > 1", (room,))
        await db.commit()
    ise = await cluster.start("ise")  # catches up with its peers as they come up
    await eventually(lambda: committed(ise, room, 11))
    assert ise.direct_peers() == {"mie-pref"}  # the relay was the only one it could ask
    assert await texts(ise, room) == await texts(tsu, room)
