"""Live events for staff clients: one timeline subscription, fanned out over WebSockets.

- **Fan-out**: the hub subscribes once to the node's `Timeline` (which follows
  `RoomService.listen`). For each event it finds the connected users of this node
  the event concerns (the room's member users; for a room change, those before and
  after it), serialises the JSON once and appends it to each of their connections'
  queues. Nothing in the fan-out waits on a client.
- **Slow clients**: each connection has a bounded queue and one sender task. A
  client that falls `queue_limit` events behind (slow network, busy browser) is
  dropped: closed with code 4408, after which it reconnects and fetches what it
  missed (`GET /api/v1/rooms/{room}/messages?after=ID`). The slowest client never
  holds up the others or the node.
- **Liveness**: a WebSocket ping every `heartbeat` seconds; no pong closes it.
- **Authentication**: the access token comes in the query (`?access_token=`; an
  invalid one is refused with HTTP 401 before the upgrade) or as the first message,
  `{"type": "auth", "access_token": "..."}`, within `AUTH_TIMEOUT` seconds (browsers
  cannot set headers on a WebSocket). It is checked again every `RECHECK` seconds
  and when it expires, so a revoked session or a disabled user ends the connection
  (4401); the client keeps it open by sending `{"type": "auth", ...}` with a fresh
  access token before the old one expires.

Close codes: 4401 token refused or expired, 4408 too slow (events dropped),
4400 bad first message, 4429 too many connections of one user (`PER_USER`; with the
token in the URL, refused before the upgrade with HTTP 429), 1001 node stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import WSMsgType, web

from federation.errors import KakehashiError, ProtocolError
from federation.rooms import RoomState

from .timeline import MessagePosted, RoomChanged
from .tokens import AuthError
from .views import Directory, event_json, user_json

if TYPE_CHECKING:
    from .accounts import Accounts, Principal
    from .timeline import TimelineEvent

__all__ = [
    "CLOSE_BAD_REQUEST",
    "CLOSE_GOING_AWAY",
    "CLOSE_TOO_MANY",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAUTHORIZED",
    "Connection",
    "Hub",
]

log = structlog.get_logger("kakehashi.events")

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4408
CLOSE_BAD_REQUEST = 4400
CLOSE_TOO_MANY = 4429
CLOSE_GOING_AWAY = 1001
PER_USER = 50
"""Live connections one user may hold (tabs, devices, bots)."""
QUEUE_LIMIT = 1000
"""Events a connection may fall behind before it is dropped."""
HEARTBEAT = 30.0
"""Seconds between WebSocket pings."""
AUTH_TIMEOUT = 10.0
"""Seconds a connection without a token in its URL has to send one."""
RECHECK = 60.0
"""Seconds between checks that a connection's token is still good."""
CLOSE_TIMEOUT = 5.0
"""Seconds a close may take before the connection is cut."""
MAX_CLIENT_MESSAGE = 8192


class Sink(Protocol):
    """Where a connection writes (aiohttp's `WebSocketResponse`)."""

    async def send_str(self, data: str, compress: int | None = None) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ..., drain: bool = ...) -> bool: ...


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class Connection:
    """One client's WebSocket: a bounded queue of serialised events and its sender."""

    def __init__(
        self,
        sink: Sink,
        *,
        user: str,
        expires_at: float,
        clock: Callable[[], float],
        limit: int = QUEUE_LIMIT,
    ) -> None:
        self.sink = sink
        self.user = user
        self.expires_at = expires_at
        self._clock = clock
        self._limit = limit
        self._queue: deque[str] = deque()
        self._wake = asyncio.Event()
        self._sending = False
        self._check = False
        self.close_code: int | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def push(self, text: str) -> bool:
        """Queue one event; False if the connection is closing (or was just dropped)."""
        if self.close_code is not None:
            return False
        if len(self._queue) >= self._limit:
            self._queue.clear()
            self.close(CLOSE_TOO_SLOW)
            return False
        self._queue.append(text)
        self._wake.set()
        return True

    def close(self, code: int) -> None:
        """Close soon with `code` (the sender task closes; a send in progress is abandoned)."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._wake.set()
        if self._sending and self.task is not None:
            self.task.cancel()  # stuck writing to a client that does not read

    def _check_due(self) -> None:
        self._check = True
        self._wake.set()

    async def run(self, still_valid: Callable[[], Awaitable[bool]]) -> None:
        """Send queued events until closed; check the token when due (`still_valid`).

        One timer per connection for the token check, not one per wake-up: a fan-out
        to thousands of connections wakes every sender, so waking must stay cheap.
        """
        loop = asyncio.get_running_loop()

        def arm() -> asyncio.TimerHandle:
            due = max(0.0, min(RECHECK, self.expires_at - self._clock()))
            return loop.call_later(due, self._check_due)

        timer = arm()
        try:
            while self.close_code is None:
                await self._wake.wait()
                self._wake.clear()
                if self._check:
                    self._check = False
                    if not await still_valid():
                        self.close(CLOSE_UNAUTHORIZED)
                        break
                    timer = arm()
                while self._queue and self.close_code is None:
                    text = self._queue.popleft()
                    self._sending = True
                    try:
                        await self.sink.send_str(text)
                    finally:
                        self._sending = False
        except asyncio.CancelledError:
            if self.close_code is None:
                raise  # cancelled from outside: the handler is finishing
        except (ConnectionError, RuntimeError):
            return  # the client went away
        finally:
            timer.cancel()
        await self._close()

    async def _close(self) -> None:
        code = self.close_code or CLOSE_GOING_AWAY
        reason = {
            CLOSE_TOO_SLOW: b"too slow: events were dropped; fetch what you missed and reconnect",
            CLOSE_UNAUTHORIZED: b"access token refused or expired",
            CLOSE_GOING_AWAY: b"node stopping",
        }.get(code, b"")
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(self.sink.close(code=code, message=reason), CLOSE_TIMEOUT)


class Hub:
    """Every live connection of this node, and the fan-out of timeline events to them."""

    def __init__(
        self,
        *,
        state: Callable[[str], RoomState | None],
        directory: Directory,
        clock: Callable[[], float],
        queue_limit: int = QUEUE_LIMIT,
        heartbeat: float = HEARTBEAT,
        per_user: int = PER_USER,
    ) -> None:
        self._state = state
        self.per_user = per_user
        self._directory = directory
        self._clock = clock
        self.queue_limit = queue_limit
        self.heartbeat = heartbeat
        self._by_user: dict[str, set[Connection]] = {}
        self.dropped = 0
        """Connections closed for being too slow, since the node started."""

    def _full(self, user: str) -> bool:
        return len(self._by_user.get(user, ())) >= self.per_user

    @property
    def connections(self) -> int:
        return sum(len(group) for group in self._by_user.values())

    def listening(self) -> bool:
        """Whether any connection is open: events are made only then (`Timeline.subscribe`)."""
        return bool(self._by_user)

    def add(self, connection: Connection) -> None:
        self._by_user.setdefault(connection.user, set()).add(connection)

    def remove(self, connection: Connection) -> None:
        group = self._by_user.get(connection.user)
        if group is not None:
            group.discard(connection)
            if not group:
                del self._by_user[connection.user]

    def _push(self, connections: Sequence[Connection], text: str) -> None:
        for connection in connections:
            if connection.close_code is not None:
                continue  # closing: its handler removes it
            connection.push(text)
            if connection.close_code == CLOSE_TOO_SLOW:
                self.dropped += 1
                log.warning("client_too_slow", user=connection.user, limit=self.queue_limit)

    def _connected(self, users: Sequence[str] | frozenset[str]) -> list[Connection]:
        if len(users) > len(self._by_user):
            return [c for user, group in self._by_user.items() if user in users for c in group]
        return [c for user in users for c in self._by_user.get(user, ())]

    async def publish(self, events: Sequence[TimelineEvent]) -> None:
        """`Timeline` subscriber: queue each event for the connections it concerns."""
        if not self._by_user:
            return
        await self._directory.refresh()
        for event in events:
            if isinstance(event, RoomChanged):
                users = frozenset(event.state.users) | event.previous_users
                for connection in self._connected(users):
                    text = _dumps(event_json(event, self._directory, connection.user))
                    self._push([connection], text)
                continue
            room = event.message.room if isinstance(event, MessagePosted) else event.room
            current = self._state(room)
            if current is None:
                continue
            targets = self._connected(frozenset(current.users))
            if targets:
                self._push(targets, _dumps(event_json(event, self._directory)))

    async def close_all(self) -> None:
        """Close every connection with 1001 (the node is stopping)."""
        connections = [c for group in self._by_user.values() for c in group]
        for connection in connections:
            connection.close(CLOSE_GOING_AWAY)
        tasks = [c.task for c in connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT + 1)

    # the WebSocket route --------------------------------------------------------------

    async def serve(self, request: web.Request, accounts: Accounts) -> web.StreamResponse:
        """`GET /api/v1/events`: authenticate, upgrade, stream events until closed."""
        token = request.query.get("access_token")
        principal = None
        if token is not None:
            principal = await accounts.verify_access(token)  # refused before the upgrade: 401
            if self._full(principal.user_id):
                raise ProtocolError(
                    f"{principal.user_id} has {self.per_user} live connections already",
                    code="too_many_connections",
                    status=429,
                    hint="close other tabs or clients of this user",
                )
        ws = web.WebSocketResponse(
            heartbeat=self.heartbeat, compress=False, max_msg_size=MAX_CLIENT_MESSAGE
        )
        await ws.prepare(request)
        if token is None or principal is None:
            first = await self._first_auth(ws, accounts)
            if first is None:
                return ws
            token, principal = first
            if self._full(principal.user_id):
                await ws.close(code=CLOSE_TOO_MANY, message=b"too many connections of this user")
                return ws
        connection = Connection(
            ws,
            user=principal.user_id,
            expires_at=principal.expires_at,
            clock=self._clock,
            limit=self.queue_limit,
        )
        current = {"token": token}

        async def still_valid() -> bool:
            try:
                checked = await accounts.verify_access(current["token"])
            except KakehashiError:
                return False
            connection.expires_at = checked.expires_at
            return True

        await self._directory.refresh()
        connection.push(_dumps({"type": "ready", "user": user_json(principal, self._directory)}))
        self.add(connection)
        connection.task = asyncio.create_task(connection.run(still_valid), name="ws-sender")
        log.info("client_connected", user=principal.user_id, connections=self.connections)
        try:
            async for message in ws:
                data = _parse(message.data) if message.type is WSMsgType.TEXT else None
                if data is None:
                    continue
                if data.get("type") == "ping":
                    connection.push(_dumps({"type": "pong"}))
                elif data.get("type") == "auth":
                    fresh = str(data.get("access_token", ""))
                    try:
                        renewed = await accounts.verify_access(fresh)
                    except AuthError:
                        connection.close(CLOSE_UNAUTHORIZED)
                        continue
                    if renewed.user_id != principal.user_id:
                        connection.close(CLOSE_UNAUTHORIZED)
                        continue
                    current["token"] = fresh
                    connection.expires_at = renewed.expires_at
                    left = int(renewed.expires_at - self._clock())
                    connection.push(_dumps({"type": "auth", "expires_in": left}))
        finally:
            self.remove(connection)
            task = connection.task
            assert task is not None
            if connection.close_code is None:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, CLOSE_TIMEOUT + 1)
            log.info(
                "client_disconnected",
                user=principal.user_id,
                code=connection.close_code or ws.close_code,
            )
        return ws

    async def _first_auth(
        self, ws: web.WebSocketResponse, accounts: Accounts
    ) -> tuple[str, Principal] | None:
        """The token of the first message; None (after closing) if it is missing or bad."""
        try:
            message = await ws.receive(timeout=AUTH_TIMEOUT)
        except TimeoutError:
            await ws.close(code=CLOSE_UNAUTHORIZED, message=b"no access token")
            return None
        data = _parse(message.data) if message.type is WSMsgType.TEXT else None
        if data is None or data.get("type") != "auth":
            await ws.close(
                code=CLOSE_BAD_REQUEST,
                message=b'send {"type": "auth", "access_token": "..."} first',
            )
            return None
        token = str(data.get("access_token", ""))
        try:
            return token, await accounts.verify_access(token)
        except AuthError as exc:
            await ws.close(code=CLOSE_UNAUTHORIZED, message=exc.code.encode())
            return None


def _parse(text: object) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
