"""The staff client API on real nodes: HTTPS and WebSocket clients against tsu and ise.

Two towns (tsu is the federation authority, ise a member) run on 127.0.0.1 with
their client API on its own port. Staff are added through `node.accounts`, log in
over HTTPS (the client trusts the federation CA, which issued the certificate the
API presents by default) and every answer is checked against schemas/openapi.json
(`apiclient`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from federation import codec
from federation.envelope import Content, Kind, seal_batch
from federation.roster import MemberStatus
from federation.signing import SigningKey
from gateway.api import API_PREFIX, principal
from gateway.events import CLOSE_TOO_MANY, CLOSE_UNAUTHORIZED
from gateway.local import LocalFederation
from gateway.node import Node
from gateway.timeline import Timeline
from gateway.webclient import WEB_FILES

from .apiclient import SPEC, Api, session_for
from .conftest import eventually

pytestmark = pytest.mark.integration

STAFF = {
    # login: (node, display name, role, password)
    "tanaka": ("tsu", "田中太郎", "room_admin", "津市役所の桜はきれいです"),
    "sato": ("tsu", "佐藤花子", "staff", "津の海はひろくてあおいです"),
    "kato": ("tsu", "加藤一郎", "staff", "津駅前の朝はとてもいそがしい"),
    "suzuki": ("ise", "鈴木次郎", "staff", "伊勢神宮の森はしずかです"),
    "ito": ("ise", "伊藤三郎", "staff", "伊勢うどんはとてもやわらかい"),
}


@dataclass
class Towns:
    federation: LocalFederation
    tsu: Node
    ise: Node
    session: aiohttp.ClientSession

    def node(self, name: str) -> Node:
        return self.federation.nodes[name]

    async def as_user(self, login: str) -> Api:
        node_id, _, _, password = STAFF[login]
        api = Api(self.session, self.node(node_id))
        await api.login(login, password)
        return api


@pytest.fixture
async def towns(tmp_path: Path) -> AsyncIterator[Towns]:
    federation = LocalFederation(tmp_path, api=True)
    try:
        tsu = await federation.authority("tsu", "津市", "242012")
        ise = await federation.member("ise", "伊勢市", "242039")
        await eventually(lambda: tsu.roster.version == ise.roster.version == 2)
        for login, (node_id, name, role, password) in STAFF.items():
            node = federation.nodes[node_id]
            await node.accounts.add_user(login, display_name=name, role=role, password=password)
        async with session_for(tsu) as session:
            yield Towns(federation, tsu, ise, session)
    finally:
        await federation.stop_all()


async def shared_room(towns: Towns, tanaka: Api, *members: str, kind: str = "standard") -> str:
    """A room created by tanaka at tsu; returns its id once every member node knows it."""
    answer = await tanaka.post(
        "/rooms", {"name": "防災連絡", "kind": kind, "members": list(members)}, expect=201
    )
    room: str = answer["id"]
    nodes = {member.rpartition("@")[2] for member in members} | {"tsu"}
    await eventually(lambda: all(towns.node(n).rooms.state(room) is not None for n in nodes))
    return room


def texts(page: Any) -> list[str | None]:
    return [message["text"] for message in page["messages"]]


# --------------------------------------------------------------------------- 既読 across towns


async def test_message_from_tsu_reaches_ise_websocket_and_its_read_receipt_comes_back(
    towns: Towns,
) -> None:
    tanaka, suzuki = await towns.as_user("tanaka"), await towns.as_user("suzuki")
    assert tanaka.user is not None and tanaka.user["municipality"] == "津市"
    room = await shared_room(towns, tanaka, "suzuki@ise")
    listed = await suzuki.get("/rooms")
    assert [r["id"] for r in listed["rooms"]] == [room]
    assert {n["municipality"] for n in listed["rooms"][0]["nodes"]} == {"津市", "伊勢市"}

    async with suzuki.events() as at_ise, tanaka.events() as at_tsu:
        sent = await tanaka.post(
            f"/rooms/{room}/messages", {"text": "明日の訓練は9時からです"}, expect=201
        )
        message_id = sent["id"]
        assert sent["read_count"] == 0 and sent["sender_name"] == "田中太郎"
        event = await at_ise.wait_for(type="message", id=message_id)
        assert event["room"] == room and event["sender"] == "tanaka@tsu"
        assert event["text"] == "明日の訓練は9時からです" and event["time"] == sent["time"]
        # At ise, tanaka is a user of another node: shown by the name tsu gave, with the
        # municipality from the roster.
        assert event["sender_name"] == "田中太郎" and event["sender_municipality"] == "津市"
        assert (await suzuki.get("/rooms"))["rooms"][0]["unread"] == 1

        read = await suzuki.post(f"/rooms/{room}/read", {"up_to": message_id})
        assert read.body == {"room": room, "up_to": message_id, "unread": 0}
        receipt = await at_tsu.wait_for(type="receipt", id=message_id)
        assert receipt["reader"] == "suzuki@ise" and receipt["municipality"] == "伊勢市"
        assert receipt["reader_name"] == "鈴木次郎" and receipt["read_count"] == 1

    page = await tanaka.get(f"/rooms/{room}/messages")
    assert [(m["id"], m["read_count"]) for m in page["messages"]] == [(message_id, 1)]
    readers = await tanaka.get(f"/rooms/{room}/messages/{message_id}/readers")
    assert readers["read_count"] == 1
    [reader] = readers["readers"]
    assert reader["user"] == "suzuki@ise" and reader["municipality"] == "伊勢市"
    assert reader["display_name"] == "鈴木次郎"  # the name ise put in the receipt
    assert reader["read_at"] >= sent["time"]
    # At suzuki's own node his name comes from its accounts.
    at_ise = await suzuki.get(f"/rooms/{room}/messages/{message_id}/readers")
    assert at_ise["readers"][0]["display_name"] == "鈴木次郎"
    # Reading the same message again sends nothing new and keeps the count.
    again = await suzuki.post(f"/rooms/{room}/read", {"up_to": message_id})
    assert again["unread"] == 0
    assert (await tanaka.get(f"/rooms/{room}/messages/{message_id}"))["read_count"] == 1


async def test_live_events_are_made_only_while_a_connection_listens(
    towns: Towns, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple[str, int]] = []
    events = Timeline._events

    async def counted(self: Timeline, envelopes: Any, *args: Any) -> Any:
        made.append(
            (
                next(n for n, node in towns.federation.nodes.items() if node.timeline is self),
                len(envelopes),
            )
        )
        return await events(self, envelopes, *args)

    monkeypatch.setattr(Timeline, "_events", counted)
    tanaka, suzuki = await towns.as_user("tanaka"), await towns.as_user("suzuki")
    room = await shared_room(towns, tanaka, "suzuki@ise")
    first = await tanaka.post(f"/rooms/{room}/messages", {"text": "誰も見ていない"}, expect=201)

    async def at_ise() -> bool:
        page = await suzuki.get(f"/rooms/{room}/messages")
        return first["id"] in [m["id"] for m in page["messages"]]

    await eventually(at_ise)
    await towns.ise.timeline.settled()
    assert made == []  # indexed at both nodes, and no event made for nobody
    async with suzuki.events() as live:
        second = await tanaka.post(f"/rooms/{room}/messages", {"text": "見ている"}, expect=201)
        event = await live.wait_for(type="message", id=second["id"])
        assert event["text"] == "見ている"
    assert ("ise", 1) in made and all(node == "ise" for node, _ in made)


async def test_staff_of_another_town_are_shown_by_the_names_their_own_node_gives(
    towns: Towns,
) -> None:
    tanaka, suzuki = await towns.as_user("tanaka"), await towns.as_user("suzuki")
    ito = await towns.as_user("ito")
    room = await shared_room(towns, tanaka, "suzuki@ise", "ito@ise")
    async with tanaka.events() as at_tsu:
        reply = await suzuki.post(f"/rooms/{room}/messages", {"text": "伊勢も了解です"}, expect=201)
        event = await at_tsu.wait_for(type="message", id=reply["id"])
        assert event["sender"] == "suzuki@ise" and event["sender_name"] == "鈴木次郎"
        assert event["sender_municipality"] == "伊勢市"
        await tanaka.post(f"/rooms/{room}/read", {"up_to": reply["id"]})
        await ito.post(f"/rooms/{room}/messages/{reply['id']}/react", {"emoji": "👍"})
        reaction = await at_tsu.wait_for(type="reaction", id=reply["id"])
        assert reaction["sender"] == "ito@ise" and reaction["sender_name"] == "伊藤三郎"
    page = await tanaka.get(f"/rooms/{room}/messages")
    [shown] = page["messages"]
    assert (shown["sender_name"], shown["sender_municipality"]) == ("鈴木次郎", "伊勢市")
    # ito has only reacted so far: the reaction named him at tsu too.
    detail = await tanaka.get(f"/rooms/{room}")
    names = {m["user"]: (m["display_name"], m["municipality"]) for m in detail["members"]}
    assert names == {
        "tanaka@tsu": ("田中太郎", "津市"),
        "suzuki@ise": ("鈴木次郎", "伊勢市"),
        "ito@ise": ("伊藤三郎", "伊勢市"),
    }
    # ise learns tanaka's name from his receipt, the message's reader list shows it.
    readers = f"/rooms/{room}/messages/{reply['id']}/readers"

    async def read_at_ise() -> bool:
        return (await suzuki.get(readers))["read_count"] == 1

    await eventually(read_at_ise, timeout=15)
    [reader] = (await suzuki.get(readers))["readers"]
    assert (reader["display_name"], reader["municipality"]) == ("田中太郎", "津市")


async def test_a_name_for_another_towns_user_is_refused_and_never_shown(towns: Towns) -> None:
    # A third town, nabari, in the room: it signs a receipt claiming to be suzuki@ise
    # under another name. Only ise speaks for its users: tsu refuses the envelope
    # (sender_not_of_origin) and keeps showing the name ise gave.
    nabari = await towns.federation.member("nabari", "名張市", "242080")
    await eventually(lambda: {n.roster.version for n in towns.federation.nodes.values()} == {3})
    await nabari.accounts.add_user(
        "yamada", display_name="山田五郎", password="名張の赤目四十八滝はすずしい"
    )
    tanaka, suzuki = await towns.as_user("tanaka"), await towns.as_user("suzuki")
    room = await shared_room(towns, tanaka, "suzuki@ise", "yamada@nabari")
    sent = await tanaka.post(f"/rooms/{room}/messages", {"text": "各市の状況は"}, expect=201)
    await eventually(lambda: nabari.rooms.vector(room).get("tsu", 0) >= 2, timeout=15)
    await suzuki.post(f"/rooms/{room}/read", {"up_to": sent["id"]})
    readers = f"/rooms/{room}/messages/{sent['id']}/readers"

    async def suzuki_read() -> bool:
        return [r["display_name"] for r in (await tanaka.get(readers))["readers"]] == ["鈴木次郎"]

    await eventually(suzuki_read, timeout=15)

    key = SigningKey.from_pem(towns.federation.home("nabari").signing_key.read_bytes())
    vector = towns.tsu.rooms.vector(room)
    seq = nabari.rooms.vector(room).get("nabari", 0) + 1
    deps = {"tsu": vector["tsu"], **({"nabari": seq - 1} if seq > 1 else {})}
    forged = Content(
        room=room,
        origin="nabari",
        seq=seq,
        kind=Kind.RECEIPT,
        sender="suzuki@ise",
        hlc=int(time.time() * 1000 + 1000) << 16,  # newer than anything ise sent
        deps=deps,
        key_id=key.key_id,
        body={"up_to": bytes.fromhex(sent["id"]), "name": "偽の鈴木"},
    )
    (envelope,) = seal_batch([forged], key)
    entry = nabari.roster.member("tsu")
    assert entry is not None
    batch = codec.encode({"envelopes": [envelope.to_bytes()]})
    response = await nabari.client.request(entry, "POST", "/envelopes", batch)
    answer = codec.decode_map(response.body)
    assert answer["accepted"] == 0
    assert answer["refused"] == [[envelope.id, "sender_not_of_origin"]]
    assert towns.tsu.names.get("suzuki@ise") == "鈴木次郎"
    [reader] = (await tanaka.get(readers))["readers"]
    assert (reader["user"], reader["display_name"]) == ("suzuki@ise", "鈴木次郎")
    detail = await tanaka.get(f"/rooms/{room}")
    assert {m["display_name"] for m in detail["members"]} >= {"鈴木次郎"}
    assert "偽の鈴木" not in {m["display_name"] for m in detail["members"]}
    with closing(sqlite3.connect(towns.federation.home("tsu").database)) as db:
        stored = dict(db.execute("SELECT user_id, display_name FROM remote_user").fetchall())
    assert stored == {"suzuki@ise": "鈴木次郎"}


async def test_announcement_room_takes_posts_from_admins_only_and_counts_reads_per_town(
    towns: Towns,
) -> None:
    tanaka = await towns.as_user("tanaka")
    sato, suzuki, ito = [await towns.as_user(n) for n in ("sato", "suzuki", "ito")]
    room = await shared_room(
        towns, tanaka, "sato@tsu", "suzuki@ise", "ito@ise", kind="announcement"
    )
    refused = await suzuki.post(f"/rooms/{room}/messages", {"text": "質問です"}, expect=403)
    assert refused["error"] == "not_allowed_to_post"
    assert "only the room's admins post in an announcement room" in refused["message"]
    refused = await sato.post(f"/rooms/{room}/messages", {"text": "質問です"}, expect=403)
    assert refused["error"] == "not_allowed_to_post"
    notice = await tanaka.post(
        f"/rooms/{room}/messages", {"text": "【通知】台風接近のため本日は17時閉庁"}, expect=201
    )

    def counts(board: Any) -> dict[str, tuple[int, int]]:
        [entry] = board["announcements"]
        assert entry["message"]["id"] == notice["id"]
        return {m["municipality"]: (m["read"], m["members"]) for m in entry["municipalities"]}

    board = await tanaka.get(f"/rooms/{room}/announcements")
    assert counts(board) == {"津市": (0, 1), "伊勢市": (0, 2)}  # the sender is not counted

    async def arrived() -> bool:
        page = await suzuki.get(f"/rooms/{room}/messages")
        return [m["id"] for m in page["messages"]] == [notice["id"]]

    await eventually(arrived, timeout=15)
    await suzuki.post(f"/rooms/{room}/read", {"up_to": notice["id"]})
    await sato.post(f"/rooms/{room}/read", {"up_to": notice["id"]})

    async def everyone_but_ito_read(api: Api) -> bool:
        board = await api.get(f"/rooms/{room}/announcements")
        return counts(board) == {"津市": (1, 1), "伊勢市": (1, 2)}

    await eventually(lambda: everyone_but_ito_read(tanaka), timeout=15)
    await eventually(lambda: everyone_but_ito_read(ito), timeout=15)
    [entry] = (await tanaka.get(f"/rooms/{room}/announcements"))["announcements"]
    assert (entry["read"], entry["members"]) == (2, 3)
    # A standard room has no board.
    standard = await shared_room(towns, tanaka, "sato@tsu")
    other = await tanaka.get(f"/rooms/{standard}/announcements", expect=400)
    assert other["error"] == "not_announcement_room"


# --------------------------------------------------------------------------- refusals


async def test_refusals_bad_and_expired_tokens_non_members_and_throttled_logins(
    towns: Towns,
) -> None:
    tanaka, kato = await towns.as_user("tanaka"), await towns.as_user("kato")
    room = await shared_room(towns, tanaka, "sato@tsu")
    sent = await tanaka.post(f"/rooms/{room}/messages", {"text": "会議は3階です"}, expect=201)

    anonymous = Api(towns.session, towns.tsu)
    assert (await anonymous.get("/me", expect=401))["error"] == "bad_token"
    assert (await anonymous.get("/me", token="not-a-jwt", expect=401))["error"] == "bad_token"
    forged = tanaka.token[:-4] + ("AAAA" if not tanaka.token.endswith("AAAA") else "BBBB")  # type: ignore[index]
    assert (await anonymous.get("/me", token=forged, expect=401))["error"] == "bad_token"
    # A token of ise's is no good at tsu.
    suzuki = await towns.as_user("suzuki")
    assert (await anonymous.get("/me", token=suzuki.token, expect=401))["error"] == "bad_token"

    towns.federation.clocks["tsu"].offset = 16 * 60  # access tokens last 15 minutes
    try:
        assert (await tanaka.get("/me", expect=401))["error"] == "token_expired"
        assert (await tanaka.get(f"/rooms/{room}/messages", expect=401))["error"] == (
            "token_expired"
        )
    finally:
        towns.federation.clocks["tsu"].offset = 0
    assert (await tanaka.get("/me"))["id"] == "tanaka@tsu"

    # kato is a user of tsu but not in the room.
    for method, path, body in [
        ("GET", f"/rooms/{room}", None),
        ("GET", f"/rooms/{room}/messages", None),
        ("POST", f"/rooms/{room}/messages", {"text": "割り込み"}),
        ("POST", f"/rooms/{room}/read", {"up_to": sent["id"]}),
        ("GET", f"/rooms/{room}/messages/{sent['id']}/readers", None),
        ("POST", f"/rooms/{room}/messages/{sent['id']}/react", {"emoji": "👍"}),
        ("GET", f"/rooms/{room}/announcements", None),
    ]:
        answer = await kato.request(method, path, body, expect=403)
        assert answer["error"] == "not_a_member", (method, path)
    assert (await kato.get("/rooms"))["rooms"] == []
    assert (await kato.post("/rooms", {"name": "x"}, expect=403))["error"] == "not_allowed"
    missing = "!nosuchroom0000:tsu"
    assert (await tanaka.get(f"/rooms/{missing}/messages", expect=404))["error"] == "unknown_room"
    unknown = "ab" * 32
    answer = await tanaka.get(f"/rooms/{room}/messages/{unknown}", expect=404)
    assert answer["error"] == "unknown_message"
    assert (await tanaka.get(f"/rooms/{room}/messages/xyz", expect=400))["error"] == "bad_request"
    answer = await tanaka.post(f"/rooms/{room}/messages", {"text": ""}, expect=400)
    assert answer["error"] == "bad_body"
    huge = {"text": "あ" * 100_000}
    assert (await tanaka.post(f"/rooms/{room}/messages", huge, expect=413))["error"] == "too_large"
    long = {"text": "あ" * 30_000}  # fits the request, not a 64 KiB envelope
    answer = await tanaka.post(f"/rooms/{room}/messages", long, expect=413)
    assert answer["error"] == "envelope_too_large"

    # Failed logins: five for one login, then even the right password waits.
    for _ in range(5):
        answer = await anonymous.post(
            "/auth/login", {"login": "sato", "password": "まちがったパスワードです"}, expect=401
        )
        assert answer["error"] == "bad_credentials"
    answer = await anonymous.post(
        "/auth/login", {"login": "sato", "password": STAFF["sato"][3]}, expect=429
    )
    assert answer["error"] == "too_many_attempts"
    assert int(answer.headers["Retry-After"]) > 0
    # The WebSocket refuses a bad token before the upgrade, and closes on a bad first message.
    answer = await anonymous.get("/events", params={"access_token": "bad"}, expect=401)
    assert answer["error"] == "bad_token"
    url = f"{anonymous.base}{API_PREFIX}/events"
    async with towns.session.ws_connect(url, server_hostname="tsu") as ws:
        await ws.send_json({"type": "auth", "access_token": "bad"})
        closing = await ws.receive(timeout=10)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == CLOSE_UNAUTHORIZED


async def test_logout_ends_the_session_and_refresh_rotates_tokens(towns: Towns) -> None:
    sato = await towns.as_user("sato")
    old_refresh = sato.refresh_token
    renewed = await sato.post("/auth/refresh", {"refresh_token": old_refresh})
    assert renewed["user"]["id"] == "sato@tsu" and renewed["refresh_token"] != old_refresh
    assert 0 < renewed["expires_in"] <= 15 * 60
    await sato.get("/me", token=renewed["access_token"])
    # The used refresh token again: a copy exists, the session ends.
    answer = await sato.post("/auth/refresh", {"refresh_token": old_refresh}, expect=401)
    assert answer["error"] == "bad_token"
    assert (await sato.get("/me", token=renewed["access_token"], expect=401))["error"] == (
        "session_revoked"
    )
    again = await towns.as_user("sato")
    await again.post("/auth/logout", {"refresh_token": again.refresh_token}, expect=204)
    assert (await again.get("/me", expect=401))["error"] == "session_revoked"


# --------------------------------------------------------------------------- history


async def test_history_pages_with_edits_reactions_and_withdrawals(towns: Towns) -> None:
    tanaka, sato = await towns.as_user("tanaka"), await towns.as_user("sato")
    room = await shared_room(towns, tanaka, "sato@tsu")
    ids = []
    for n in range(1, 8):
        ids.append(
            (await tanaka.post(f"/rooms/{room}/messages", {"text": f"第{n}報"}, expect=201))["id"]
        )

    newest = await sato.get(f"/rooms/{room}/messages", params={"limit": "3"})
    assert texts(newest) == ["第5報", "第6報", "第7報"]
    assert newest["next_before"] == ids[4] and newest["next_after"] is None
    older = await sato.get(f"/rooms/{room}/messages", params={"limit": "3", "before": ids[4]})
    assert texts(older) == ["第2報", "第3報", "第4報"] and older["next_before"] == ids[1]
    assert older["next_after"] == ids[3]
    oldest = await sato.get(f"/rooms/{room}/messages", params={"limit": "3", "before": ids[1]})
    assert texts(oldest) == ["第1報"] and oldest["next_before"] is None
    forward = await sato.get(f"/rooms/{room}/messages", params={"limit": "4", "after": ids[0]})
    assert texts(forward) == ["第2報", "第3報", "第4報", "第5報"]
    assert forward["next_after"] == ids[4]
    rest = await sato.get(f"/rooms/{room}/messages", params={"limit": "4", "after": ids[4]})
    assert texts(rest) == ["第6報", "第7報"] and rest["next_after"] is None
    await sato.get(f"/rooms/{room}/messages", params={"limit": "0"}, expect=400)
    both = {"before": ids[3], "after": ids[1]}
    await sato.get(f"/rooms/{room}/messages", params=both, expect=400)

    first = f"/rooms/{room}/messages/{ids[0]}"
    async with sato.events() as events:
        edited = await tanaka.post(f"{first}/edit", {"text": "第1報(訂正)"})
        assert edited["text"] == "第1報(訂正)" and edited["edited"]
        assert (await events.wait_for(type="edit", id=ids[0]))["text"] == "第1報(訂正)"
        answer = await sato.post(f"{first}/edit", {"text": "改ざん"}, expect=403)
        assert answer["error"] == "not_allowed"

        reacted = await sato.post(f"{first}/react", {"emoji": "👍"})
        assert reacted["reactions"] == [{"emoji": "👍", "count": 1, "users": ["sato@tsu"]}]
        assert (await events.wait_for(type="reaction", id=ids[0]))["added"] is True
        twice = await sato.post(f"{first}/react", {"emoji": "👍"})
        assert twice["reactions"] == reacted["reactions"]
        await tanaka.post(f"{first}/react", {"emoji": "👍"})
        taken_back = await sato.post(f"{first}/react", {"emoji": "👍", "remove": True})
        assert taken_back["reactions"] == [{"emoji": "👍", "count": 1, "users": ["tanaka@tsu"]}]
        removal = await events.wait_for(type="reaction", sender="sato@tsu", added=False)
        assert removal["emoji"] == "👍"
        # Again and back again: only the new reaction is withdrawn the second time.
        await sato.post(f"{first}/react", {"emoji": "👍"})
        await sato.post(f"{first}/react", {"emoji": "👍", "remove": True})
        reactions = await towns.tsu.timeline.rows.relations([bytes.fromhex(ids[0])])
        by_sato = [r for r in reactions if r.sender == "sato@tsu" and r.kind == "reaction"]
        withdrawals = await towns.tsu.timeline.rows.relations(r.envelope_id for r in by_sato)
        assert len(by_sato) == 2 and len(withdrawals) == 2
        assert {w.target for w in withdrawals} == {r.envelope_id for r in by_sato}

        answer = await sato.post(f"{first}/redact", {"reason": "不要"}, expect=403)
        assert answer["error"] == "not_allowed"
        withdrawn = await tanaka.post(f"{first}/redact", {"reason": "誤報"})
        assert withdrawn["redacted"] and withdrawn["text"] is None
        assert (await events.wait_for(type="redact", id=ids[0]))["sender"] == "tanaka@tsu"

    # A message the node sent itself (an operator's `kakehashi room send`) has no sender.
    [operator] = await towns.tsu.rooms.send(room, ["システム保守のお知らせ"])
    notice = await sato.get(f"/rooms/{room}/messages/{operator.hex()}")
    assert notice["sender"] is None and notice["sender_name"] == "津市"

    page = await sato.get(f"/rooms/{room}/messages", params={"limit": "1", "after": ids[0]})
    assert texts(page) == ["第2報"]
    [shown] = (await sato.get(f"/rooms/{room}/messages", params={"before": ids[1]}))["messages"]
    assert shown["redacted"] and shown["text"] is None and shown["edited"]


# --------------------------------------------------------------------------- membership


async def test_room_admin_adds_a_user_of_another_town_and_a_staff_member_leaves(
    towns: Towns,
) -> None:
    tanaka, suzuki = await towns.as_user("tanaka"), await towns.as_user("suzuki")
    ito = await towns.as_user("ito")
    room = await shared_room(towns, tanaka, "suzuki@ise")
    assert (await ito.get("/rooms"))["rooms"] == []
    refused = await suzuki.post(f"/rooms/{room}/members", {"add": ["ito@ise"]}, expect=403)
    assert refused["error"] == "not_allowed"
    added = await tanaka.post(f"/rooms/{room}/members", {"add": ["ito@ise"]})
    assert added.body == {"room": room, "result": "changed"}

    async def ito_in_room() -> bool:
        return [r["id"] for r in (await ito.get("/rooms"))["rooms"]] == [room]

    await eventually(ito_in_room, timeout=15)

    async with tanaka.events() as at_tsu, suzuki.events() as at_ise:
        left = await suzuki.post(f"/rooms/{room}/leave")
        assert left.body == {"room": room, "result": "requested"}  # ise is not the home
        gone = await at_ise.wait_for(type="room", room=room, member=False, timeout=20)
        assert gone["state"]["role"] is None
        change = await at_tsu.wait_for(type="room", room=room, timeout=20)
        assert change["member"] is True

    async def suzuki_out() -> bool:
        return (await suzuki.get(f"/rooms/{room}", expect=None)).status == 403

    await eventually(suzuki_out, timeout=15)
    detail = await tanaka.get(f"/rooms/{room}")
    assert {m["user"] for m in detail["members"]} == {"tanaka@tsu", "ito@ise"}
    assert (await suzuki.get("/rooms"))["rooms"] == []


async def test_a_user_of_a_revoked_town_cannot_be_added_to_a_room(towns: Towns) -> None:
    tanaka = await towns.as_user("tanaka")
    room = await shared_room(towns, tanaka, "suzuki@ise")
    assert towns.tsu.authority is not None
    await towns.tsu.authority.set_status("ise", MemberStatus.REVOKED, "市町村合併")
    # The home (tsu) takes ise out of the room, with its users.
    await eventually(lambda: towns.tsu.rooms.state(room).nodes == {"tsu"})  # type: ignore[union-attr]
    for path, body in (
        (f"/rooms/{room}/members", {"add": ["ito@ise"]}),
        ("/rooms", {"name": "合併後", "kind": "standard", "members": ["suzuki@ise"]}),
    ):
        refused = await tanaka.post(path, body, expect=403)
        assert refused["error"] == "peer_revoked", path
        assert "revoked" in refused["message"]
    assert towns.tsu.rooms.state(room).nodes == {"tsu"}  # type: ignore[union-attr]


# --------------------------------------------------------------------------- index and spec


async def test_read_state_lost_in_a_crash_is_rebuilt_from_the_envelopes_at_start(
    towns: Towns,
) -> None:
    tanaka, suzuki = await towns.as_user("tanaka"), await towns.as_user("suzuki")
    room = await shared_room(towns, tanaka, "suzuki@ise")
    sent = await tanaka.post(f"/rooms/{room}/messages", {"text": "確認をお願いします"}, expect=201)
    await tanaka.post(f"/rooms/{sent['room']}/messages/{sent['id']}/react", {"emoji": "🙏"})

    async def arrived() -> bool:
        return len((await suzuki.get(f"/rooms/{room}/messages"))["messages"]) == 1

    await eventually(arrived, timeout=15)
    await suzuki.post(f"/rooms/{room}/read", {"up_to": sent["id"]})
    readers = f"/rooms/{room}/messages/{sent['id']}/readers"

    async def read_at_tsu() -> bool:
        return (await tanaka.get(readers))["read_count"] == 1

    await eventually(read_at_tsu, timeout=15)
    # As if tsu crashed after committing the envelopes but before indexing them.
    await towns.federation.stop("tsu")
    database = towns.federation.home("tsu").database
    with closing(sqlite3.connect(database, isolation_level=None)) as db:  # autocommit
        for table in ("receipt", "read_marker", "relation"):
            db.execute(f"DELETE FROM {table}")
    await towns.federation.start("tsu")
    tanaka = await towns.as_user("tanaka")
    [reader] = (await tanaka.get(readers))["readers"]
    # The reader's name is not derived from the index: kept with the envelopes, it is
    # there after the restart.
    assert (reader["user"], reader["display_name"]) == ("suzuki@ise", "鈴木次郎")
    message = await tanaka.get(f"/rooms/{room}/messages/{sent['id']}")
    assert message["read_count"] == 1
    assert message["reactions"] == [{"emoji": "🙏", "count": 1, "users": ["tanaka@tsu"]}]


async def test_every_route_of_the_app_is_in_the_openapi_spec_and_back(towns: Towns) -> None:
    api = towns.tsu.api
    assert api is not None and api.app is not None
    served = set()
    for route in api.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path in WEB_FILES:  # the web client's static files
            continue
        assert path.startswith(API_PREFIX), path
        served.add((route.method.lower(), path[len(API_PREFIX) :]))
    described = {
        (method, path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert served == described


async def test_more_routes_mount_under_the_same_authentication(tmp_path: Path) -> None:
    federation = LocalFederation(tmp_path, api=True)
    try:
        await federation.authority("tsu", "津市", "242012")
        await federation.stop("tsu")
        node = Node(federation.home("tsu"), clock=federation.clocks["tsu"])

        async def who(request: web.Request) -> web.Response:
            return web.json_response({"user": principal(request).user_id})

        node.api_routes.append(web.get(f"{API_PREFIX}/whoami/{{sha256}}", who))
        await node.start()
        federation.nodes["tsu"] = node
        await node.accounts.add_user("tanaka", display_name="田中太郎", password=STAFF["tanaka"][3])
        async with session_for(node) as session:
            base = f"https://127.0.0.1:{node.api_port}{API_PREFIX}"
            async with session.get(f"{base}/whoami/{'0' * 64}", server_hostname="tsu") as response:
                assert response.status == 401
                assert (await response.json())["error"] == "bad_token"
            async with session.post(
                f"{base}/auth/login",
                json={"login": "tanaka", "password": STAFF["tanaka"][3]},
                server_hostname="tsu",
            ) as response:
                token = (await response.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(
                f"{base}/whoami/{'0' * 64}", headers=headers, server_hostname="tsu"
            ) as response:
                assert response.status == 200
                assert await response.json() == {"user": "tanaka@tsu"}
    finally:
        await federation.stop_all()


async def test_websocket_takes_the_token_as_its_first_message(towns: Towns) -> None:
    tanaka, sato = await towns.as_user("tanaka"), await towns.as_user("sato")
    room = await shared_room(towns, tanaka, "sato@tsu")
    async with sato.events(first_message=True) as events:
        await events.ws.send_json({"type": "ping"})
        await events.wait_for(type="pong")
        renewed = await sato.post("/auth/refresh", {"refresh_token": sato.refresh_token})
        await events.ws.send_json({"type": "auth", "access_token": renewed["access_token"]})
        assert (await events.wait_for(type="auth"))["expires_in"] > 0
        sent = await tanaka.post(f"/rooms/{room}/messages", {"text": "届きますか"}, expect=201)
        assert (await events.wait_for(type="message"))["id"] == sent["id"]


async def test_the_api_presents_the_nodes_renewed_certificate_after_a_rotation(
    towns: Towns,
) -> None:
    port = towns.ise.api_port
    assert port is not None

    def presented() -> str:
        return ssl.get_server_certificate(("127.0.0.1", port))

    before = await asyncio.to_thread(presented)
    assert before.strip() == towns.ise.home.tls_cert.read_text().strip()
    await towns.ise.keys.rotate_tls()
    after = await asyncio.to_thread(presented)
    assert after != before
    assert after.strip() == towns.ise.home.tls_cert.read_text().strip()


async def test_one_user_may_hold_only_so_many_live_connections(towns: Towns) -> None:
    api = towns.tsu.api
    assert api is not None
    api.hub.per_user = 2
    sato = await towns.as_user("sato")
    async with sato.events(), sato.events(first_message=True):
        answer = await sato.get("/events", params={"access_token": sato.token}, expect=429)
        assert answer["error"] == "too_many_connections"
        url = f"{sato.base}{API_PREFIX}/events"
        async with towns.session.ws_connect(url, server_hostname="tsu") as ws:
            await ws.send_json({"type": "auth", "access_token": sato.token})
            closing = await ws.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == CLOSE_TOO_MANY
    # Closed ones no longer count.
    async with sato.events():
        pass
