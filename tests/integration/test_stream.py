"""The stream between nodes: batches go on one WebSocket per peer, under the same trust rules.

Real nodes on 127.0.0.1 over real mutual TLS. The stream is opened by a request that passes
the federation's gatekeeping; these tests check what is particular to a connection that
outlives a roster change or carries frames: a peer suspended while its stream is open, a
frame that is not a request, a frame over the size limit, a route the stream does not
serve, a peer that offers no stream, and a peer that restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from federation import codec
from federation.errors import ProtocolError, TrustError
from federation.roster import MemberStatus
from gateway import tls
from gateway.config import load_config, write_config
from gateway.node import Node
from gateway.stream import STREAM_ROUTE
from gateway.transport import HEADER_NODE, MAX_BATCH_REQUEST_BYTES

from .conftest import Cluster, eventually
from .test_admin import cli

pytestmark = pytest.mark.integration


@pytest.fixture
async def pair(cluster: Cluster) -> AsyncIterator[tuple[Cluster, str]]:
    """mie-pref (authority) and tsu, sharing a room with one message in it (sent on a stream)."""
    mie = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {2})
    room = await mie.rooms.create("防災", nodes=["tsu"])
    await mie.rooms.send(room, ["ようこそ"])
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 2)
    yield cluster, room


def refused(logs: list[Any], reason: str) -> list[Any]:
    return [e for e in logs if e["event"] == "peer_refused" and e["reason"] == reason]


async def raw_stream(
    cluster: Cluster, source: str, target: Node, context: ssl.SSLContext | None = None
) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    """A stream opened with a plain aiohttp client presenting `source`'s real certificate."""
    home = cluster.home(source)
    context = context or tls.client_context(home.tls_cert, home.tls_key, home.ca_cert)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
    try:
        ws = await session.ws_connect(
            f"https://127.0.0.1:{target.federation_port}{STREAM_ROUTE}",
            headers={HEADER_NODE: source},
        )
    except BaseException:
        await session.close()
        raise
    return session, ws


async def test_messages_go_on_one_stream_each_way(pair: tuple[Cluster, str]) -> None:
    cluster, room = pair
    mie, tsu = cluster.nodes["mie-pref"], cluster.nodes["tsu"]
    await tsu.rooms.send(room, [f"返信 {i}" for i in range(20)])
    await mie.rooms.send(room, [f"連絡 {i}" for i in range(20)])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 20)
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 22)
    assert mie.streams.is_open("tsu") and tsu.streams.is_open("mie-pref")
    assert (mie.stream_server.open_count, tsu.stream_server.open_count) == (1, 1)
    code, out, _ = await cli("peer", "list", "--home", str(mie.home.root), "--json")
    rows = {row["node_id"]: row for row in json.loads(out)}
    assert code == 0 and rows["tsu"]["stream"] and not rows["mie-pref"]["stream"]
    code, out, _ = await cli("peer", "list", "--home", str(mie.home.root))
    assert code == 0 and "stream" in out  # the route column: "direct, stream"
    assert mie.outbox.stats("tsu").delivered == 22
    assert tsu.outbox.stats("mie-pref").delivered == 20


async def test_a_peer_suspended_while_its_stream_is_open_is_refused_at_the_next_frame(
    pair: tuple[Cluster, str],
) -> None:
    cluster, room = pair
    mie, tsu = cluster.nodes["mie-pref"], cluster.nodes["tsu"]
    await tsu.rooms.send(room, ["開通"])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 1)
    assert tsu.streams.is_open("mie-pref") and mie.stream_server.open_count == 1
    assert mie.authority is not None
    await mie.authority.set_status("tsu", MemberStatus.SUSPENDED, "audit")
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    body = codec.encode({"envelopes": []})
    with capture_logs() as logs, pytest.raises(TrustError) as on_stream:
        await tsu.streams.exchange(entry, "/envelopes", body)
    assert on_stream.value.code == "peer_suspended"
    assert [e["peer"] for e in refused(logs, "peer_suspended")] == ["tsu"]
    # The node closes a refused peer's stream; a new one is refused at the upgrade, and
    # the request that follows says why.
    await eventually(lambda: mie.stream_server.open_count == 0)
    with pytest.raises(TrustError) as again:
        await tsu.streams.exchange(entry, "/envelopes", body)
    assert again.value.code == "peer_suspended"
    await mie.authority.set_status("tsu", MemberStatus.ACTIVE, "audit done")
    await eventually(lambda: (m := tsu.roster.member("tsu")) is not None and m.active)
    await tsu.rooms.send(room, ["再開"])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 2, timeout=15)
    assert tsu.streams.is_open("mie-pref")


async def test_a_stream_without_a_client_certificate_is_refused_at_the_upgrade(
    pair: tuple[Cluster, str],
) -> None:
    cluster, _ = pair
    mie = cluster.nodes["mie-pref"]
    anonymous = tls.client_context(None, None, cluster.home("mie-pref").ca_cert)
    with capture_logs() as logs, pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
        await raw_stream(cluster, "tsu", mie, anonymous)
    assert refusal.value.status == 401
    assert len(refused(logs, "client_certificate_required")) == 1
    assert mie.stream_server.open_count == 0


@pytest.mark.parametrize(
    ("frame", "reason", "close_code"),
    [
        (b"\xc1 not msgpack", "bad_frame", aiohttp.WSCloseCode.PROTOCOL_ERROR),
        (codec.encode({"id": "one", "path": "/envelopes"}), "bad_frame", 1002),
        # Dropped without reading it whole, so no close frame: the client sees 1006.
        (b"\x00" * (MAX_BATCH_REQUEST_BYTES + 64 * 1024), "too_large", 1006),
    ],
    ids=["not-msgpack", "not-a-request", "over-the-limit"],
)
async def test_a_frame_that_is_not_a_request_closes_the_stream_and_the_node_serves_on(
    pair: tuple[Cluster, str], frame: bytes, reason: str, close_code: int
) -> None:
    cluster, room = pair
    mie, tsu = cluster.nodes["mie-pref"], cluster.nodes["tsu"]
    session, ws = await raw_stream(cluster, "tsu", mie)
    try:
        with capture_logs() as logs:
            await ws.send_bytes(frame)
            msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == close_code
        assert [e["peer"] for e in refused(logs, reason)] == ["tsu"]
        assert mie.refusals[reason] == 1
    finally:
        await ws.close()
        await session.close()
    await tsu.rooms.send(room, ["まだ届く"])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 1)


async def test_a_route_the_stream_does_not_serve_is_refused_and_the_stream_stays_open(
    pair: tuple[Cluster, str],
) -> None:
    cluster, room = pair
    mie, tsu = cluster.nodes["mie-pref"], cluster.nodes["tsu"]
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    with pytest.raises(ProtocolError) as refusal:
        await tsu.streams.exchange(entry, "/roster", b"")
    assert (refusal.value.code, refusal.value.status) == ("unknown_route", 404)
    assert tsu.streams.is_open("mie-pref")
    await tsu.rooms.send(room, ["同じストリームで"])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 1)
    assert mie.stream_server.open_count == 1


async def test_a_peer_that_offers_no_stream_is_sent_posts(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    mie = await cluster.authority()
    routes = Node.routes

    def without_stream(node: Node) -> list[web.RouteDef]:
        return [r for r in routes(node) if r.path != STREAM_ROUTE]

    monkeypatch.setattr(Node, "routes", without_stream)  # tsu is an older version
    tsu = await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {2})
    with capture_logs() as logs:
        room = await mie.rooms.create("防災", nodes=["tsu"])
        await mie.rooms.send(room, ["旧版へ"])
        await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 2)
    assert [e["peer"] for e in logs if e["event"] == "stream_not_offered"] == ["tsu"]
    assert not mie.streams.is_open("tsu")
    assert mie.outbox.stats("tsu").failures == 0
    await tsu.rooms.send(room, ["新版へ"])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 1)
    assert tsu.streams.is_open("mie-pref")


async def test_calls_at_once_to_a_peer_that_offers_no_stream_try_the_upgrade_once(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox keeps two batches in flight: both must not try the upgrade in turn.
    mie = await cluster.authority()
    routes = Node.routes
    monkeypatch.setattr(
        Node, "routes", lambda node: [r for r in routes(node) if r.path != STREAM_ROUTE]
    )
    await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {2})
    entry = mie.roster.member("tsu")
    assert entry is not None
    body = codec.encode({"envelopes": []})
    with capture_logs() as logs:
        answers = await asyncio.gather(
            *(mie.streams.exchange(entry, "/envelopes", body) for _ in range(3))
        )
    assert [answer.status for answer in answers] == [200, 200, 200]  # each sent as a POST
    assert [e["peer"] for e in logs if e["event"] == "stream_not_offered"] == ["tsu"]
    assert not mie.streams.is_open("tsu")


async def test_a_stream_broken_by_a_restart_is_opened_again_and_nothing_is_lost(
    pair: tuple[Cluster, str],
) -> None:
    cluster, room = pair
    mie = cluster.nodes["mie-pref"]
    assert mie.streams.is_open("tsu")
    await cluster.stop("tsu")
    await mie.rooms.send(room, [f"停止中 {i}" for i in range(30)])
    await eventually(lambda: not mie.streams.is_open("tsu"))
    tsu = await cluster.start("tsu")
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 32, timeout=20)
    # Catch-up may have brought them first; the sender still empties its outbox, anew.
    await eventually(lambda: mie.streams.is_open("tsu"), timeout=20)
    history = await tsu.rooms.store.history(room, 100)
    assert len(history) == len({envelope_id for envelope_id, _ in history})
    assert history == await mie.rooms.store.history(room, 100)


async def test_a_node_configured_without_streams_sends_posts(cluster: Cluster) -> None:
    mie = await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    await cluster.stop("tsu")
    config = load_config(cluster.home("tsu"))
    write_config(cluster.home("tsu"), dataclasses.replace(config, streams=False))
    tsu = await cluster.start("tsu")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {2})
    room = await mie.rooms.create("防災", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.state(room) is not None)
    await tsu.rooms.send(room, [f"POST {i}" for i in range(5)])
    await eventually(lambda: mie.rooms.vector(room).get("tsu") == 5)
    assert not tsu.streams.is_open("mie-pref")
    assert tsu.outbox.stats("mie-pref").failures == 0
    assert mie.stream_server.open_count == 0
    # tsu still serves the stream mie-pref opened to it (the room's creation went on it).
    assert mie.streams.is_open("tsu") and tsu.stream_server.open_count == 1
