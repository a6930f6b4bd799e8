"""The staff client API: JSON over HTTPS and a WebSocket, under `/api/v1`.

Staff of a town use their own node: they log in with the login and password their
node's operator gave them (`kakehashi user add`), then act in the rooms they are a
member user of, which may span towns. The contract is `schemas/openapi.json`.

- **Listener**: its own TCP port (`[api] listen`), HTTPS without client
  certificates (TLS 1.2 or 1.3), presenting `[api] tls_cert`/`tls_key` or, by
  default, the node's own certificate. The federation port is not involved.
- **Authentication**: `Authorization: Bearer <access token>` on every route but
  `/auth/login`, `/auth/refresh`, `/auth/logout` and `/events` (which takes the
  token in its query or first message, see `gateway.events`). Tokens are the
  node's (`gateway.accounts`); a role change or a revoked session applies at once.
- **Who may do what** is the room rules' decision (`federation.rooms.judge`):
  every envelope is sent with the user as its sender and refused unless the sender
  is a member user allowed to post. The API checks membership before reading, and
  what the rules leave to the node: creating rooms takes the room_admin or
  node_admin role, editing a message takes being its sender, withdrawing it its
  sender or a room admin, changing members a room admin. Leaving a room is asked by
  the node for its own user (a node may remove its own users from a room).
- **Errors** are `{"error": code, "message": text, "hint": text|null}` with the
  HTTP status: 400 bad request, 401 bad or expired token, 403 not a member or not
  allowed, 404 unknown room or message, 413 too large, 429 too many failed logins
  (with Retry-After), 503 catching up after a restore.
- **Extensions**: `api_app(node, extra_routes=...)` mounts more routes (files) on
  the same app, behind the same authentication; they find the user with
  `principal(request)` and check membership with `member_state`.
"""

from __future__ import annotations

import asyncio.sslproto
import json
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from federation.envelope import Kind, check_room_id
from federation.errors import (
    ConfigError,
    KakehashiError,
    ProtocolError,
    StorageError,
    TrustError,
)
from federation.rooms import Role, RoomKind, RoomState, check_body, check_user_id

from .accounts import Principal
from .events import Hub
from .staff import StaffRole
from .tokens import AuthError
from .views import (
    Directory,
    board_json,
    iso_time,
    message_json,
    page_json,
    room_json,
    user_json,
)

if TYPE_CHECKING:
    from .node import Node
    from .timeline import Timeline

__all__ = [
    "API_PREFIX",
    "PRINCIPAL",
    "ClientApi",
    "api_app",
    "api_ssl_context",
    "member_state",
    "principal",
]

log = structlog.get_logger("kakehashi.api")

API_PREFIX = "/api/v1"
PRINCIPAL = web.RequestKey("principal", Principal)
PUBLIC = frozenset(
    f"{API_PREFIX}/{path}" for path in ("auth/login", "auth/refresh", "auth/logout", "events")
)
"""Routes that authenticate on their own."""
MAX_BODY = 256 * 1024
"""Largest JSON body (a 32,768-character message in \\u escapes fits)."""
PAGE_DEFAULT = 50
PAGE_MAX = 200
MAX_MEMBERS = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# helpers for every route (also for routes mounted from other modules) ------------------


def principal(request: web.Request) -> Principal:
    """The user the request's access token authenticates."""
    return request[PRINCIPAL]


def member_state(node: Node, user: str, room: str) -> RoomState:
    """The room's state if `user` is a member user of it here; 404 / 403 otherwise."""
    try:
        check_room_id(room)
    except ProtocolError as exc:
        raise ProtocolError(f"no room {room!r}", code="unknown_room", status=404) from exc
    state = node.rooms.state(room)
    if state is None:
        raise ProtocolError(f"this node knows no room {room}", code="unknown_room", status=404)
    if node.node_id not in state.nodes or user not in state.users:
        raise TrustError(
            f"{user} is not a member of {room}",
            code="not_a_member",
            hint="ask one of the room's admins to add you",
        )
    return state


def _json(data: Any, status: int = 200) -> web.Response:
    """A JSON answer, UTF-8 (Japanese text as it is, not as \\u escapes)."""
    return web.json_response(data, status=status, dumps=_dumps)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def _error(status: int, code: str, message: str, hint: str | None = None) -> web.Response:
    return _json({"error": code, "message": message, "hint": hint}, status=status)


_TRUST_STATUS = {"bad_body": 400, "unknown_room": 404, "unknown_peer": 400}
_HTTP_CODES = {
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "this route does not take that method"),
    413: ("too_large", f"the request body exceeds {MAX_BODY} bytes"),
}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AuthError as exc:
        response = _error(exc.status, exc.code, str(exc), exc.hint)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except ProtocolError as exc:
        return _error(exc.status, exc.code, str(exc), exc.hint)
    except TrustError as exc:
        return _error(_TRUST_STATUS.get(exc.code, 403), exc.code, str(exc), exc.hint)
    except StorageError as exc:
        log.error("api_storage_error", code=exc.code, error=str(exc))
        return _error(exc.status, exc.code, "the node's storage failed; try again later")
    except KakehashiError as exc:
        return _error(400, exc.code, str(exc), exc.hint)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        return _error(exc.status, code, message)
    except Exception:
        log.exception("api_request_failed", method=request.method, path=request.path)
        return _error(500, "internal_error", "the node failed to answer; this is a bug")


def _auth(node: Node) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC or not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(
                "this route needs Authorization: Bearer <access token>",
                code="bad_token",
                hint="log in with POST /api/v1/auth/login",
            )
        request[PRINCIPAL] = await node.accounts.verify_access(token.strip())
        return await handler(request)

    return authenticate


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise ProtocolError("the request body is not JSON", code="bad_request") from exc
    if not isinstance(data, dict):
        raise ProtocolError("the request body must be a JSON object", code="bad_request")
    return data


def _text(data: dict[str, Any], key: str, *, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string", code="bad_request")
    return value


def _id(value: str, what: str = "message") -> bytes:
    """An envelope id from a path or query (64 hex digits)."""
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ProtocolError(f"{what} ids are 64 hex digits", code="bad_request")
    return raw


def _limit(request: web.Request) -> int:
    try:
        limit = int(request.query.get("limit", PAGE_DEFAULT))
    except ValueError as exc:
        raise ProtocolError("limit must be a number", code="bad_request") from exc
    if not 1 <= limit <= PAGE_MAX:
        raise ProtocolError(f"limit must be 1-{PAGE_MAX}", code="bad_request")
    return limit


def _cursors(request: web.Request) -> tuple[bytes | None, bytes | None]:
    before, after = request.query.get("before"), request.query.get("after")
    return (
        None if before is None else _id(before),
        None if after is None else _id(after),
    )


def _users(value: object, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_MEMBERS:
        raise ProtocolError(f"{key} must be a list of user ids (login@node)", code="bad_request")
    return [check_user_id(user) for user in value]


def _named(me: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its sender's display name, which other nodes show them by."""
    return body if me.sender_name is None else {**body, "name": me.sender_name}


# the app -----------------------------------------------------------------------------


class _Routes:
    """The handlers, over one node."""

    def __init__(self, node: Node, timeline: Timeline, hub: Hub, directory: Directory) -> None:
        self.node = node
        self.timeline = timeline
        self.hub = hub
        self.directory = directory

    # auth ----------------------------------------------------------------------------

    async def _tokens(self, access: str, refresh: str, refresh_expires_at: int) -> dict[str, Any]:
        checked = await self.node.accounts.verify_access(access)
        await self.directory.refresh()
        now = self.node.clock()
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": max(0, int(checked.expires_at - now)),
            "refresh_token": refresh,
            "refresh_expires_in": max(0, int(refresh_expires_at - now)),
            "user": user_json(checked, self.directory),
        }

    async def login(self, request: web.Request) -> web.Response:
        data = await _body(request)
        tokens = await self.node.accounts.login(
            _text(data, "login"), _text(data, "password"), source=request.remote
        )
        return _json(
            await self._tokens(tokens.access_token, tokens.refresh_token, tokens.refresh_expires_at)
        )

    async def refresh(self, request: web.Request) -> web.Response:
        data = await _body(request)
        tokens = await self.node.accounts.refresh(_text(data, "refresh_token"))
        return _json(
            await self._tokens(tokens.access_token, tokens.refresh_token, tokens.refresh_expires_at)
        )

    async def logout(self, request: web.Request) -> web.Response:
        data = await _body(request)
        await self.node.accounts.logout(_text(data, "refresh_token"))
        return web.Response(status=204)

    async def me(self, request: web.Request) -> web.Response:
        await self.directory.refresh()
        return _json(user_json(principal(request), self.directory))

    # rooms -----------------------------------------------------------------------------

    def _room(self, request: web.Request) -> RoomState:
        return member_state(self.node, principal(request).user_id, request.match_info["room"])

    async def _room_view(self, state: RoomState, user: str) -> dict[str, Any]:
        await self.directory.refresh()
        unread = await self.timeline.unread(state.room, user)
        return room_json(state, user, self.directory, unread=unread, members=True)

    async def rooms(self, request: web.Request) -> web.Response:
        user = principal(request).user_id
        await self.directory.refresh()
        views = []
        for room in self.node.rooms.room_ids():
            state = self.node.rooms.state(room)
            if state is None or self.node.node_id not in state.nodes or user not in state.users:
                continue
            unread = await self.timeline.unread(room, user)
            views.append(room_json(state, user, self.directory, unread=unread))
        views.sort(key=lambda view: (view["name"], view["id"]))
        return _json({"rooms": views})

    async def room(self, request: web.Request) -> web.Response:
        state = self._room(request)
        return _json(await self._room_view(state, principal(request).user_id))

    async def create_room(self, request: web.Request) -> web.Response:
        me = principal(request)
        if me.role is StaffRole.STAFF:
            raise TrustError(
                "creating rooms takes the room_admin or node_admin role",
                code="not_allowed",
                hint="ask your node's administrator (kakehashi user add --role room_admin)",
            )
        data = await _body(request)
        name = _text(data, "name").strip()
        if not 1 <= len(name) <= 200:
            raise ProtocolError("name must be 1-200 characters", code="bad_request")
        topic = _text(data, "topic", default="")
        try:
            kind = RoomKind(_text(data, "kind", default=RoomKind.STANDARD.value))
        except ValueError as exc:
            raise ProtocolError(
                "kind must be standard or announcement", code="bad_request"
            ) from exc
        members = set(_users(data.get("members", []), "members")) - {me.user_id}
        admins = set(_users(data.get("admins", []), "admins")) - {me.user_id}
        nodes = await self._check_users(members | admins)
        room = await self.node.rooms.create(
            name,
            nodes=sorted(nodes),
            kind=kind,
            topic=topic,
            admins=sorted(admins | {me.user_id}),
            members=sorted(members - admins),
        )
        await self.timeline.settled()
        state = self.node.rooms.state(room)
        assert state is not None
        log.info("api_room_created", room=room, user=me.user_id, users=len(state.users))
        return _json(await self._room_view(state, me.user_id), status=201)

    async def _check_users(self, users: Iterable[str]) -> set[str]:
        """The other nodes of `users`; 400 for a node outside the federation or a user of
        this node that does not exist (other nodes' users cannot be checked from here)."""
        nodes: set[str] = set()
        for user in users:
            login, _, node = user.rpartition("@")
            if node == self.node.node_id:
                try:
                    await self.node.accounts.user(login)
                except ProtocolError as exc:
                    raise ProtocolError(
                        f"{user} is not a user of this node", code="unknown_user"
                    ) from exc
                continue
            if self.node.roster.member(node) is None:
                raise ProtocolError(
                    f"{node!r} ({user}) is not a member of the federation", code="unknown_node"
                )
            self.node.rooms.require_addable(node)  # not revoked
            nodes.add(node)
        return nodes

    async def change_members(self, request: web.Request) -> web.Response:
        me = principal(request)
        state = self._room(request)
        if state.role(me.user_id) is not Role.ADMIN:
            raise TrustError("changing a room's members takes a room admin", code="not_allowed")
        data = await _body(request)
        add = _users(data.get("add", []), "add")
        remove = _users(data.get("remove", []), "remove")
        try:
            role = Role(_text(data, "role", default=Role.MEMBER.value))
        except ValueError as exc:
            raise ProtocolError("role must be member or admin", code="bad_request") from exc
        if not add and not remove:
            raise ProtocolError("name users to add or remove", code="bad_request")
        nodes = await self._check_users(add)
        body: dict[str, Any] = {}
        if nodes - state.nodes:
            body["add_nodes"] = sorted(nodes - state.nodes)
        if add:
            body["set_users"] = {user: role.value for user in sorted(add)}
        if remove:
            body["remove_users"] = sorted(remove)
        check_body(Kind.STATE_REQUEST, body)
        result = await self.node.rooms.change(state.room, body, sender=me.user_id)
        await self.timeline.settled()
        return _json({"room": state.room, "result": result})

    async def leave(self, request: web.Request) -> web.Response:
        me = principal(request)
        state = self._room(request)
        # Asked by the node for its own user: the rules let a node remove its own users
        # (`decide_request`), while a member who is not an admin could not ask alone.
        result = await self.node.rooms.change(state.room, {"remove_users": [me.user_id]})
        await self.timeline.settled()
        log.info("api_room_left", room=state.room, user=me.user_id, result=result)
        return _json({"room": state.room, "result": "left" if result == "changed" else "requested"})

    # messages --------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.Response:
        state = self._room(request)
        before, after = _cursors(request)
        page = await self.timeline.page(
            state.room, limit=_limit(request), before=before, after=after
        )
        await self.directory.refresh()
        return _json(page_json(page, self.directory))

    async def _message_response(
        self, room: str, message_id: bytes, status: int = 200
    ) -> web.Response:
        await self.timeline.settled()
        await self.directory.refresh()
        view = await self.timeline.message(room, message_id)
        return _json(message_json(view, self.directory), status=status)

    async def _post(self, room: str, kind: Kind, body: dict[str, Any], sender: str) -> bytes:
        check_body(kind, body)  # a malformed body is the client's mistake: 400, not 403
        return await self.node.rooms.post(room, kind, body, sender=sender)

    async def send(self, request: web.Request) -> web.Response:
        me = principal(request)
        state = self._room(request)
        data = await _body(request)
        body: dict[str, Any] = {"text": _text(data, "text")}
        if "format" in data:
            body["format"] = _text(data, "format")
        message_id = await self._post(state.room, Kind.MESSAGE, _named(me, body), me.user_id)
        return await self._message_response(state.room, message_id, status=201)

    async def message(self, request: web.Request) -> web.Response:
        state = self._room(request)
        return await self._message_response(state.room, _id(request.match_info["message"]))

    async def _target(self, request: web.Request) -> tuple[Principal, RoomState, bytes, str]:
        """(user, room state, message id, message sender) of a route on one message."""
        me = principal(request)
        state = self._room(request)
        message_id = _id(request.match_info["message"])
        row = await self.timeline.message_row(state.room, message_id)
        return me, state, message_id, row.sender

    async def edit(self, request: web.Request) -> web.Response:
        me, state, message_id, sender = await self._target(request)
        if sender != me.user_id:
            raise TrustError("only its sender edits a message", code="not_allowed")
        data = await _body(request)
        body = {"target": message_id, "text": _text(data, "text")}
        await self._post(state.room, Kind.EDIT, body, me.user_id)
        return await self._message_response(state.room, message_id)

    async def redact(self, request: web.Request) -> web.Response:
        me, state, message_id, sender = await self._target(request)
        if sender != me.user_id and state.role(me.user_id) is not Role.ADMIN:
            raise TrustError(
                "only its sender or a room admin withdraws a message", code="not_allowed"
            )
        data = await _body(request) if request.can_read_body else {}
        body: dict[str, Any] = {"target": message_id}
        if data.get("reason"):
            body["reason"] = _text(data, "reason")
        await self._post(state.room, Kind.REDACT, body, me.user_id)
        return await self._message_response(state.room, message_id)

    async def react(self, request: web.Request) -> web.Response:
        me, state, message_id, _ = await self._target(request)
        data = await _body(request)
        emoji = _text(data, "emoji")
        remove = data.get("remove", False)
        if not isinstance(remove, bool):
            raise ProtocolError("remove must be true or false", code="bad_request")
        current = await self.timeline.message(state.room, message_id)
        reacted = any(me.user_id in users for e, users in current.reactions if e == emoji)
        if remove and reacted:
            # Taking a reaction back withdraws the user's reaction envelopes with that
            # emoji (those not withdrawn already).
            mine = {
                relation.envelope_id
                for relation in await self.timeline.rows.relations([message_id])
                if relation.kind == Kind.REACTION.value
                and relation.sender == me.user_id
                and relation.value == emoji
            }
            for relation in await self.timeline.rows.relations(mine):
                if relation.kind == Kind.REDACT.value and relation.sender == me.user_id:
                    mine.discard(relation.target)
            for reaction_id in sorted(mine):
                withdraw: dict[str, Any] = {"target": reaction_id}
                await self._post(state.room, Kind.REDACT, withdraw, me.user_id)
        elif not remove and not reacted:
            reaction = _named(me, {"target": message_id, "emoji": emoji})
            await self._post(state.room, Kind.REACTION, reaction, me.user_id)
        return await self._message_response(state.room, message_id)

    # 既読 and the announcement board ---------------------------------------------------

    async def read(self, request: web.Request) -> web.Response:
        me = principal(request)
        state = self._room(request)
        data = await _body(request)
        message_id = _id(_text(data, "up_to"))
        row = await self.timeline.message_row(state.room, message_id)
        furthest = await self.timeline.read_position(state.room, me.user_id)
        if furthest is None or row.position > furthest:
            # Receipts are cumulative: reading an older message again sends nothing.
            receipt = _named(me, {"up_to": message_id})
            await self._post(state.room, Kind.RECEIPT, receipt, me.user_id)
            await self.timeline.settled()
        marker = await self.timeline.rows.marker(state.room, me.user_id)
        return _json(
            {
                "room": state.room,
                "up_to": None if marker is None else marker[0].hex(),
                "unread": await self.timeline.unread(state.room, me.user_id),
            }
        )

    async def readers(self, request: web.Request) -> web.Response:
        state = self._room(request)
        message_id = _id(request.match_info["message"])
        readers = await self.timeline.readers(state.room, message_id)
        await self.directory.refresh()
        return _json(
            {
                "room": state.room,
                "id": message_id.hex(),
                "read_count": len(readers),
                "readers": [
                    {**self.directory.person(reader), "read_at": iso_time(at_ms)}
                    for reader, at_ms in readers
                ],
            }
        )

    async def announcements(self, request: web.Request) -> web.Response:
        state = self._room(request)
        before, after = _cursors(request)
        entries, page = await self.timeline.board(
            state, limit=_limit(request), before=before, after=after
        )
        await self.directory.refresh()
        return _json(board_json(state.room, entries, page, self.directory))

    async def events(self, request: web.Request) -> web.StreamResponse:
        return await self.hub.serve(request, self.node.accounts)

    def table(self) -> list[web.RouteDef]:
        p = API_PREFIX
        room = f"{p}/rooms/{{room}}"
        message = f"{room}/messages/{{message}}"
        return [
            web.post(f"{p}/auth/login", self.login),
            web.post(f"{p}/auth/refresh", self.refresh),
            web.post(f"{p}/auth/logout", self.logout),
            web.get(f"{p}/me", self.me),
            web.get(f"{p}/rooms", self.rooms),
            web.post(f"{p}/rooms", self.create_room),
            web.get(room, self.room),
            web.post(f"{room}/members", self.change_members),
            web.post(f"{room}/leave", self.leave),
            web.get(f"{room}/messages", self.messages),
            web.post(f"{room}/messages", self.send),
            web.get(message, self.message),
            web.post(f"{message}/edit", self.edit),
            web.post(f"{message}/redact", self.redact),
            web.post(f"{message}/react", self.react),
            web.get(f"{message}/readers", self.readers),
            web.post(f"{room}/read", self.read),
            web.get(f"{room}/announcements", self.announcements),
            web.get(f"{p}/events", self.events, allow_head=False),
        ]


def api_app(
    node: Node,
    *,
    timeline: Timeline,
    hub: Hub,
    directory: Directory,
    extra_routes: Iterable[web.AbstractRouteDef] = (),
) -> web.Application:
    """The client API app: its routes, then `extra_routes` (authenticated the same way)."""
    app = web.Application(middlewares=[_errors, _auth(node)], client_max_size=MAX_BODY)
    app.add_routes(_Routes(node, timeline, hub, directory).table())
    app.add_routes(list(extra_routes))
    return app


def api_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """HTTPS for staff clients: TLS 1.2 or newer, no client certificate asked."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load the client API's certificate {cert} / key {key}: {exc}",
            code="bad_tls_material",
            hint="check [api] tls_cert and tls_key in config.toml (PEM files)",
        ) from exc
    return context


TLS_READ_BUFFER = 32 * 1024


def _shrink_tls_read_buffers() -> None:
    """Make asyncio's TLS transports read through a 32 KiB buffer instead of 256 KiB.

    Python's `SSLProtocol` allocates (and zero-fills, so it is resident) a read buffer
    of `max_size` bytes per connection: with 2,000 staff WebSockets that was 500 MB of
    the node's memory (measured: 307 KB per connection, 83 KB with 32 KiB). A TLS
    record holds at most 16 KiB, so a 32 KiB buffer costs only more read calls on bulk
    transfers (a few per megabyte). Process-wide: federation connections, few and
    long-lived, read through it too.
    """
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


class ClientApi:
    """The client API's listener and live connections (owned by `Node` when configured)."""

    def __init__(
        self,
        node: Node,
        *,
        timeline: Timeline,
        extra_routes: Iterable[web.AbstractRouteDef] = (),
    ) -> None:
        self._node = node
        self.directory = Directory(
            node_id=node.node_id,
            users=node.accounts.users,
            roster=lambda: node.roster,
            remote=node.names.get,
        )
        self.hub = Hub(state=node.rooms.state, directory=self.directory, clock=node.clock)
        self._timeline = timeline
        self._extra = list(extra_routes)
        self._runner: web.AppRunner | None = None

    @property
    def app(self) -> web.Application | None:
        """The aiohttp app while serving (its router lists every route)."""
        return None if self._runner is None else self._runner.app

    @property
    def port(self) -> int | None:
        """The port actually bound (the config may ask for port 0)."""
        if self._runner is None:
            return None
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return None

    async def start(self, host: str, port: int, context: ssl.SSLContext) -> None:
        _shrink_tls_read_buffers()
        self._timeline.subscribe(self.hub.publish, self.hub.listening)
        app = api_app(
            self._node,
            timeline=self._timeline,
            hub=self.hub,
            directory=self.directory,
            extra_routes=self._extra,
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        try:
            await web.TCPSite(
                self._runner, host, port, ssl_context=context, reuse_address=True
            ).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for the client API on {host}:{port}: {exc.strerror or exc}",
                code="listen_failed",
                hint=f"is another program using port {port}? change [api] listen "
                f"in {self._node.home.config}",
            ) from exc
        log.info("api_started", listen=f"{host}:{self.port}")

    async def stop(self) -> None:
        """Close every WebSocket (1001), then the listener."""
        self._timeline.unsubscribe(self.hub.publish)
        await self.hub.close_all()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
