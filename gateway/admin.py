"""The admin API: how the CLI talks to its running node, over a Unix socket only.

The socket lives in the node's home with mode 0600, so only the account that
runs the node (and root) can use it; it is never exposed on the network. The
API is JSON; refusals carry {error, message, hint} like the federation API.

A node refuses to start if another process already answers on the socket of
the same home (two nodes on one database would corrupt nothing, thanks to
SQLite, but would confuse everyone); a stale socket left by a crash is removed.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from federation.errors import ConfigError, KakehashiError, ProtocolError, StorageError, TrustError
from federation.identity import check_node_id
from federation.invites import Approval, parse_duration
from federation.rooms import RoomKind
from federation.roster import MemberStatus

from .admin_client import HISTORY_LIMIT
from .config import parse_endpoints
from .monitoring import diagnosis, monitoring_routes
from .staff import StaffRole

if TYPE_CHECKING:
    from .node import Node

__all__ = ["admin_app", "claim_admin_socket", "node_answers", "serve_admin", "user_routes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = structlog.get_logger("kakehashi.admin")


def _error(status: int, exc: KakehashiError) -> web.Response:
    return web.json_response(
        {"error": exc.code, "message": str(exc), "hint": exc.hint}, status=status
    )


def admin_app(node: Node) -> web.Application:
    """JSON routes over the node's state; authority routes refuse on a member node."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (ProtocolError, StorageError) as exc:
            return _error(exc.status, exc)
        except KakehashiError as exc:
            return _error(409, exc)

    def authority() -> Any:
        if node.authority is None:
            raise ConfigError(
                f"{node.node_id} is not the federation authority",
                code="not_authority",
                hint=f"run this on the authority node ({node.roster.authority})",
            )
        node.rooms.require_caught_up()  # after a restore: no roster version issued twice
        return node.authority

    async def body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as exc:
            raise ProtocolError("request body is not JSON", code="bad_request") from exc
        if not isinstance(data, dict):
            raise ProtocolError("request body must be an object", code="bad_request")
        return data

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await node.status())

    async def peers(request: web.Request) -> web.Response:
        return web.json_response(await node.peer_report())

    async def route(request: web.Request) -> web.Response:
        destination = request.query.get("node_id", "")
        check_node_id(destination)
        if node.roster.member(destination) is None:
            raise TrustError(
                f"{destination!r} is not a member of the federation", code="unknown_peer"
            )
        return web.json_response(node.explain_route(destination).to_json())

    async def invite(request: web.Request) -> web.Response:
        data = await body(request)
        issued = await authority().invite(
            str(data.get("node_id", "")),
            expires_in=parse_duration(str(data.get("expires", "72h"))),
            approval=Approval(str(data.get("approval", "auto"))),
            relay=bool(data.get("relay", False)),
        )
        return web.json_response(
            {
                "token": issued.token,
                "node_id": issued.invitation.node_id,
                "expires_at": issued.invitation.expires_at,
                "approval": issued.invitation.approval.value,
                "relay": issued.invitation.relay,
            }
        )

    async def pending(request: web.Request) -> web.Response:
        rows = await authority().pending()
        return web.json_response(
            [{"node_id": r.node_id, "requested_at": r.updated_at, "relay": r.relay} for r in rows]
        )

    async def approve(request: web.Request) -> web.Response:
        data = await body(request)
        roster = await authority().approve(str(data.get("node_id", "")))
        return web.json_response({"node_id": data["node_id"], "roster_version": roster.version})

    async def deny(request: web.Request) -> web.Response:
        data = await body(request)
        await authority().deny(str(data.get("node_id", "")))
        return web.json_response({"node_id": data["node_id"], "denied": True})

    async def set_status(request: web.Request) -> web.Response:
        data = await body(request)
        try:
            status = MemberStatus(str(data.get("status")))
        except ValueError as exc:
            raise ProtocolError(
                "status must be active, suspended or revoked", code="bad_request"
            ) from exc
        roster = await authority().set_status(
            str(data.get("node_id", "")), status, str(data.get("reason", ""))
        )
        return web.json_response(
            {"node_id": data["node_id"], "status": status.value, "roster_version": roster.version}
        )

    async def update_peer(request: web.Request) -> web.Response:
        data = await body(request)
        relay = data.get("relay")
        segments = data.get("segments")
        if relay is not None and not isinstance(relay, bool):
            raise ProtocolError("relay must be true or false", code="bad_request")
        if segments is not None and (not isinstance(segments, dict) or not segments):
            raise ProtocolError("segments must map segment names to URLs", code="bad_request")
        node_id = str(data.get("node_id", ""))
        roster = await authority().update_member(
            node_id,
            relay=relay,
            endpoints=None if segments is None else parse_endpoints(segments, "--segment"),
        )
        entry = roster.member(node_id)
        assert entry is not None
        return web.json_response(
            {
                "node_id": node_id,
                "relay": entry.relay,
                "segments": {e.segment: e.url for e in entry.endpoints},
                "roster_version": roster.version,
            }
        )

    async def rotate_keys(request: web.Request) -> web.Response:
        data = await body(request)
        which = data.get("key")
        rotations = {
            "signing": node.keys.rotate_signing,
            "tls": node.keys.rotate_tls,
            "federation": node.keys.rotate_federation,
        }
        if which not in rotations:
            raise ProtocolError("key must be signing, tls or federation", code="bad_request")
        return web.json_response({"key": which, **await rotations[which]()})

    def catch_up_view() -> dict[str, Any]:
        return {
            "peers": {peer: p.to_json() for peer, p in sorted(node.catchup.progress.items())},
            "pulled": node.catchup.pulled,
            "passes": node.catchup.passes,
            "pending": node.rooms.pending_count(),
        }

    async def catch_up_status(request: web.Request) -> web.Response:
        return web.json_response(catch_up_view())

    async def catch_up_start(request: web.Request) -> web.Response:
        data = await body(request)
        peer = data.get("peer")
        peers = [str(peer)] if peer else sorted(node.direct_peers())
        for name in peers:
            if node.roster.member(name) is None:
                raise TrustError(f"{name!r} is not a member of the federation", code="unknown_peer")
            node.catchup.request(name)
        return web.json_response({"requested": peers, **catch_up_view()})

    async def rooms(request: web.Request) -> web.Response:
        return web.json_response(await node.room_views())

    async def room_create(request: web.Request) -> web.Response:
        data = await body(request)
        nodes = data.get("nodes", [])
        if not isinstance(nodes, list):
            raise ProtocolError("nodes must be a list", code="bad_request")
        try:
            kind = RoomKind(str(data.get("kind", "standard")))
        except ValueError as exc:
            raise ProtocolError(
                "kind must be standard or announcement", code="bad_request"
            ) from exc
        room = await node.rooms.create(str(data.get("name", "")), nodes=nodes, kind=kind)
        return web.json_response({"room_id": room})

    async def room_invite(request: web.Request) -> web.Response:
        data = await body(request)
        result = await node.rooms.invite(str(data.get("room", "")), str(data.get("node_id", "")))
        return web.json_response(
            {"room_id": data["room"], "node_id": data["node_id"], "result": result}
        )

    async def stop(request: web.Request) -> web.Response:
        log.info("stop_requested", node=node.node_id, via="admin socket")
        node.stop_requested.set()  # `kakehashi run` stops the node after this answer
        return web.json_response({"node_id": node.node_id, "pid": os.getpid()})

    async def room_remove(request: web.Request) -> web.Response:
        data = await body(request)
        room, node_id = str(data.get("room", "")), str(data.get("node_id", ""))
        result = await node.rooms.remove_node(room, node_id)
        return web.json_response({"room_id": room, "node_id": node_id, "result": result})

    async def room_send(request: web.Request) -> web.Response:
        data = await body(request)
        texts = data.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ProtocolError("texts must be a non-empty list of strings", code="bad_request")
        ids = await node.rooms.send(str(data.get("room", "")), texts)
        return web.json_response({"room_id": data["room"], "ids": [i.hex() for i in ids]})

    async def room_history(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError as exc:
            raise ProtocolError("limit must be a number", code="bad_request") from exc
        room = request.query.get("room", "")
        return web.json_response(await node.history_view(room, max(1, min(limit, HISTORY_LIMIT))))

    async def doctor(request: web.Request) -> web.Response:
        return web.json_response([check.to_json() for check in await diagnosis(node)])

    async def maintenance(request: web.Request) -> web.Response:
        return web.json_response(node.maintenance.to_json())

    async def set_maintenance(request: web.Request) -> web.Response:
        data = await body(request)
        on, reason = data.get("on"), data.get("reason", "")
        if not isinstance(on, bool) or not isinstance(reason, str):
            raise ProtocolError("on must be true or false, reason a string", code="bad_request")
        await node.maintenance.set(on, reason.strip())
        return web.json_response(node.maintenance.to_json())

    app = web.Application(middlewares=[errors], client_max_size=16 * 1024 * 1024)
    app.add_routes(monitoring_routes(node))
    app.add_routes(user_routes(node))
    app.add_routes(
        [
            web.get("/v1/doctor", doctor),
            web.get("/v1/maintenance", maintenance),
            web.post("/v1/maintenance", set_maintenance),
            web.get("/v1/status", status),
            web.get("/v1/catchup", catch_up_status),
            web.post("/v1/catchup", catch_up_start),
            web.get("/v1/peers", peers),
            web.get("/v1/route", route),
            web.post("/v1/peers/invite", invite),
            web.get("/v1/peers/pending", pending),
            web.post("/v1/peers/approve", approve),
            web.post("/v1/peers/deny", deny),
            web.post("/v1/peers/status", set_status),
            web.post("/v1/peers/update", update_peer),
            web.post("/v1/keys/rotate", rotate_keys),
            web.get("/v1/rooms", rooms),
            web.post("/v1/rooms", room_create),
            web.post("/v1/rooms/invite", room_invite),
            web.post("/v1/rooms/remove", room_remove),
            web.post("/v1/stop", stop),
            web.post("/v1/rooms/send", room_send),
            web.get("/v1/rooms/history", room_history),
        ]
    )
    return app


def user_routes(node: Node) -> list[web.RouteDef]:
    """The admin-socket routes behind `kakehashi user ...`."""

    async def body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as exc:
            raise ProtocolError("request body is not JSON", code="bad_request") from exc
        if not isinstance(data, dict):
            raise ProtocolError("request body must be an object", code="bad_request")
        return data

    def text(data: dict[str, Any], key: str, default: str | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise ProtocolError(f"{key} must be a string", code="bad_request")
        return value

    def optional_password(data: dict[str, Any]) -> str | None:
        value = data.get("password")
        if value is not None and not isinstance(value, str):
            raise ProtocolError("password must be a string", code="bad_request")
        return value

    async def list_users(request: web.Request) -> web.Response:
        return web.json_response([user.to_json() for user in await node.accounts.users()])

    async def add(request: web.Request) -> web.Response:
        data = await body(request)
        issued = await node.accounts.add_user(
            text(data, "login"),
            display_name=text(data, "display_name"),
            department=text(data, "department", ""),
            role=text(data, "role", StaffRole.STAFF.value),
            password=optional_password(data),
        )
        return web.json_response(issued.to_json())

    async def import_csv(request: web.Request) -> web.Response:
        data = await body(request)
        try:
            raw = base64.b64decode(text(data, "csv"), validate=True)
        except binascii.Error as exc:
            raise ProtocolError("csv must be base64", code="bad_request") from exc
        issued = await node.accounts.import_users(raw)
        return web.json_response([item.to_json() for item in issued])

    def switch(disabled: bool) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            data = await body(request)
            user, revoked = await node.accounts.set_disabled(text(data, "login"), disabled)
            return web.json_response({**user.to_json(), "sessions_revoked": revoked})

        return handler

    async def reset(request: web.Request) -> web.Response:
        data = await body(request)
        issued, revoked = await node.accounts.reset_password(
            text(data, "login"), optional_password(data)
        )
        return web.json_response({**issued.to_json(), "sessions_revoked": revoked})

    return [
        web.get("/v1/users", list_users),
        web.post("/v1/users", add),
        web.post("/v1/users/import", import_csv),
        web.post("/v1/users/disable", switch(True)),
        web.post("/v1/users/enable", switch(False)),
        web.post("/v1/users/reset-password", reset),
    ]


def node_answers(path: Path) -> bool:
    """True if a running node answers on the admin socket `path` (a stale socket does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def claim_admin_socket(path: Path) -> None:
    """Refuse if a node already answers on `path`; remove a stale socket left by a crash."""
    if path.exists():
        if node_answers(path):
            raise ConfigError(
                f"a node is already running on this home ({path})",
                code="already_running",
                hint="stop it first, or use another --home",
            )
        path.unlink()


async def serve_admin(runner: web.AppRunner, path: Path) -> None:
    """Listen on the admin socket with mode 0600; refuse if another node answers on it."""
    claim_admin_socket(path)
    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
