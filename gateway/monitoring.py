"""Watching a running node: `/metrics`, `/healthz`, maintenance mode and `doctor`'s findings.

The routes `/metrics` (Prometheus text) and `/healthz` (JSON, 200 or 503) are
served on the admin socket and, because Prometheus and load balancers come over
TCP, on an optional plain-HTTP monitoring listener (`[monitoring] listen`). That
listener serves those two routes and nothing else: the admin API never leaves
the Unix socket.

Maintenance mode is a flag in the database's meta table, so it survives a
restart: while it is on, `/healthz` answers 503 "maintenance" and a load balancer
drains the node, which otherwise goes on working (peers, delivery, catch-up).

The judgments (thresholds, wording, fixes) are in `gateway/health.py`; this
module gathers the values they judge from the node.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from federation.errors import StorageError

from . import health, tls
from .health import Check, Severity
from .metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from .node import Node
    from .store import Store

__all__ = ["Maintenance", "diagnosis", "health_report", "monitoring_app", "monitoring_routes"]

log = structlog.get_logger("kakehashi.monitoring")

MAINTENANCE_KEY = "maintenance"
DATABASE_PROBE_TIMEOUT = 5.0
"""Seconds a database probe may take before /healthz calls the database failing."""


@dataclass(frozen=True, slots=True)
class _Mode:
    reason: str
    since_ms: int


class Maintenance:
    """The node's maintenance flag, persisted in the meta table."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._mode: _Mode | None = None

    @property
    def on(self) -> bool:
        return self._mode is not None

    async def load(self) -> None:
        raw = await self._store.get_meta(MAINTENANCE_KEY)
        if raw is None:
            self._mode = None
            return
        data = json.loads(raw)
        self._mode = _Mode(reason=str(data.get("reason", "")), since_ms=int(data["since_ms"]))

    async def set(self, on: bool, reason: str = "") -> None:
        if not on:
            await self._store.delete_meta(MAINTENANCE_KEY)
            if self._mode is not None:
                log.info("maintenance_off")
            self._mode = None
            return
        mode = _Mode(reason=reason, since_ms=int(self._clock() * 1000))
        payload = {"reason": mode.reason, "since_ms": mode.since_ms}
        await self._store.set_meta(MAINTENANCE_KEY, json.dumps(payload).encode())
        self._mode = mode
        log.info("maintenance_on", reason=reason)

    def to_json(self) -> dict[str, Any]:
        mode = self._mode
        return {
            "on": mode is not None,
            "reason": mode.reason if mode else None,
            "since": None
            if mode is None
            else datetime.fromtimestamp(mode.since_ms / 1000, UTC).isoformat(timespec="seconds"),
        }


# --------------------------------------------------------------------------- gathering


async def _database(node: Node) -> Check:
    try:
        async with asyncio.timeout(DATABASE_PROBE_TIMEOUT):
            await node.store.probe(int(node.clock() * 1000))
    except TimeoutError:
        return health.database(
            f"no answer within {DATABASE_PROBE_TIMEOUT:.0f} s (locked by another process?)"
        )
    except StorageError as exc:
        return health.database(str(exc))
    return health.database(None)


def _certificate(node: Node) -> Check:
    certificate = tls.load_certificate_pem(node.home.tls_cert.read_bytes())
    return health.certificate(
        certificate.not_valid_after_utc, datetime.fromtimestamp(node.clock(), UTC)
    )


def _seen_versions(node: Node, views: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Roster versions served by the peers that answer now."""
    seen = {}
    for view in views:
        if view["self"] or view["health"] != "up":
            continue
        version = node.monitor.roster_version(view["node_id"])
        if version is not None:
            seen[view["node_id"]] = version
    return seen


async def health_report(node: Node) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of `/healthz`: 200 when ok or warn, 503 when a check is
    critical or the node is in maintenance."""
    views = await node.peer_report()
    checks = [
        await _database(node),
        health.home_disk(node.home, node.config.disk),
        _certificate(node),
        health.peers_reachable(views),
        health.roster(node.roster.version, _seen_versions(node, views), node.roster.authority),
        health.outbox_lag(views),
    ]
    status, code = health.overall(checks, in_maintenance=node.maintenance.on)
    return code, {
        "status": status,
        "node_id": node.node_id,
        "maintenance": node.maintenance.to_json(),
        "checks": [check.to_json() for check in checks],
    }


async def diagnosis(node: Node) -> list[Check]:
    """Everything `kakehashi doctor` asks a running node, each finding with its fix."""
    views = await node.peer_report()
    uptime = int(node.clock() - node.started_at)
    mode = node.maintenance.to_json()
    return [
        Check(
            check="node",
            status=Severity.OK,
            detail=f"{node.node_id} is running (roster version {node.roster.version}, "
            f"up {uptime} s)",
        ),
        await _database(node),
        health.home_disk(node.home, node.config.disk),
        _certificate(node),
        health.maintenance(mode["on"], mode["reason"], mode["since"]),
        *health.segments([e.segment for e in node.config.endpoints], views),
        *health.routes(views),
        *health.clock_skew(views),
        *health.roster_lag(node.roster.version, _seen_versions(node, views), node.roster.authority),
        *health.outbox(views),
    ]


# --------------------------------------------------------------------------- routes


def monitoring_routes(node: Node) -> list[web.RouteDef]:
    """`/metrics` and `/healthz`: for the admin socket and the monitoring listener."""

    async def metrics(request: web.Request) -> web.Response:
        body = await node.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        status, body = await health_report(node)
        return web.json_response(body, status=status)

    return [web.get("/metrics", metrics), web.get("/healthz", healthz)]


def monitoring_app(node: Node) -> web.Application:
    """The plain-HTTP monitoring listener: `/metrics` and `/healthz`, nothing else."""
    app = web.Application(client_max_size=1024)
    app.add_routes(monitoring_routes(node))
    return app
