"""The WebSocket fan-out (gateway.events) with fake sockets: who gets which event, and a
client that stops reading is dropped instead of holding up the others."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from federation.rooms import Role, RoomState
from gateway.events import CLOSE_TOO_SLOW, CLOSE_UNAUTHORIZED, Connection, Hub
from gateway.timeline import MessagePosted, MessageView, RoomChanged
from gateway.views import Directory

ROOM = "!abcdefgh:tsu"


class FakeSocket:
    """Records what is sent; with `stuck`, a send never completes (a client not reading)."""

    def __init__(self, *, stuck: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, bytes] | None = None
        self.stuck = stuck
        self._never = asyncio.Event()

    async def send_str(self, data: str, compress: int | None = None) -> None:
        if self.stuck:
            await self._never.wait()
        self.sent.append(json.loads(data))

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        self.closed = (code, message)
        return True


class FakeRoster:
    def member(self, node_id: str) -> None:
        return None


async def no_users() -> list[Any]:
    return []


def state(users: dict[str, Role]) -> RoomState:
    return RoomState(
        room=ROOM, version=1, name="防災", nodes=frozenset({"tsu", "ise"}), users=users
    )


def message(n: int) -> MessagePosted:
    return MessagePosted(
        message=MessageView(
            id=n.to_bytes(32, "big"),
            room=ROOM,
            sender="tanaka@tsu",
            position=(n << 16, "tsu", n),
            text=f"第{n}報",
            format="plain",
            files=(),
            edited_at_ms=None,
            redacted=False,
            reactions=(),
            read_count=0,
        )
    )


def hub_for(rooms: dict[str, RoomState], *, limit: int = 1000) -> Hub:
    directory = Directory(node_id="tsu", users=no_users, roster=FakeRoster)  # type: ignore[arg-type]
    return Hub(state=rooms.get, directory=directory, clock=time.time, queue_limit=limit)


def connect(hub: Hub, user: str, socket: FakeSocket, valid: bool = True) -> Connection:
    connection = Connection(
        socket, user=user, expires_at=time.time() + 900, clock=time.time, limit=hub.queue_limit
    )
    hub.add(connection)

    async def still_valid() -> bool:
        return valid

    connection.task = asyncio.create_task(connection.run(still_valid))
    return connection


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_events_reach_only_connected_members_of_the_room() -> None:
    rooms = {ROOM: state({"tanaka@tsu": Role.ADMIN, "sato@tsu": Role.MEMBER})}
    hub = hub_for(rooms)
    sato, sato_phone, kato = FakeSocket(), FakeSocket(), FakeSocket()
    connect(hub, "sato@tsu", sato)
    connect(hub, "sato@tsu", sato_phone)
    connect(hub, "kato@tsu", kato)
    await hub.publish([message(1), message(2)])
    await settle()
    for socket in (sato, sato_phone):
        assert [(e["type"], e["text"]) for e in socket.sent] == [
            ("message", "第1報"),
            ("message", "第2報"),
        ]
    assert kato.sent == []
    await hub.close_all()
    assert sato.closed is not None and sato.closed[0] == 1001


async def test_a_removed_user_is_told_of_the_room_change() -> None:
    after = state({"tanaka@tsu": Role.ADMIN})
    hub = hub_for({ROOM: after})
    sato, tanaka = FakeSocket(), FakeSocket()
    connect(hub, "sato@tsu", sato)
    connect(hub, "tanaka@tsu", tanaka)
    change = RoomChanged(state=after, previous_users=frozenset({"tanaka@tsu", "sato@tsu"}))
    await hub.publish([change])
    await settle()
    assert [(e["type"], e["member"]) for e in sato.sent] == [("room", False)]
    assert [(e["type"], e["member"]) for e in tanaka.sent] == [("room", True)]
    assert tanaka.sent[0]["state"]["role"] == "admin" and sato.sent[0]["state"]["role"] is None
    await hub.close_all()


async def test_a_client_that_stops_reading_is_dropped_and_the_others_go_on() -> None:
    rooms = {ROOM: state({"sato@tsu": Role.MEMBER, "ito@ise": Role.MEMBER})}
    hub = hub_for(rooms, limit=5)
    stuck, fine = FakeSocket(stuck=True), FakeSocket()
    slow = connect(hub, "sato@tsu", stuck)
    connect(hub, "ito@ise", fine)
    for n in range(1, 21):
        await hub.publish([message(n)])
        await settle()
    assert stuck.closed is not None and stuck.closed[0] == CLOSE_TOO_SLOW
    assert b"too slow" in stuck.closed[1]
    assert slow.task is not None and slow.task.done()
    assert hub.dropped == 1
    assert [e["text"] for e in fine.sent] == [f"第{n}報" for n in range(1, 21)]
    assert fine.closed is None
    await hub.close_all()


async def test_a_connection_whose_token_is_no_longer_good_is_closed() -> None:
    hub = hub_for({})
    socket = FakeSocket()
    connection = Connection(
        socket, user="sato@tsu", expires_at=time.time() - 1, clock=time.time, limit=10
    )

    async def refused() -> bool:
        return False

    await asyncio.wait_for(connection.run(refused), 5)
    assert socket.closed is not None and socket.closed[0] == CLOSE_UNAUTHORIZED
    assert hub.connections == 0
