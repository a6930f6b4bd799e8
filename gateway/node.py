"""A running node: serves the federation API, keeps the roster current, watches its peers.

`Node` owns every long-lived resource of a running gateway (database, servers,
client session, background tasks) and creates and cancels all of them; nothing
runs that it does not hold a reference to. The roster it serves is swapped
atomically (one reference) after the update was verified and persisted.

Roster sync is single-flight: however many requests reveal that a newer roster
exists, one fetch runs at a time, and callers that arrive meanwhile wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from federation import codec
from federation.errors import ConfigError, KakehashiError, TrustError
from federation.roster import (
    Roster,
    RosterChange,
    RosterEntry,
    SignedRoster,
    check_update,
    verify_roster,
)

from . import tls
from .admin import admin_app, serve_admin
from .authority import Authority
from .config import Home, NodeConfig, load_config
from .peers import PeerMonitor, is_up
from .store import Store
from .transport import FEDERATION_PREFIX, MSGPACK, PEER, PeerClient, federation_app

__all__ = ["Node"]

log = structlog.get_logger("kakehashi.node")


class Node:
    """One Kakehashi gateway node."""

    def __init__(self, home: Home, *, clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.config: NodeConfig = load_config(home)
        self.store = Store(home.database)
        self.clock = clock
        self.authority: Authority | None = None
        self.refusals: Counter[str] = Counter()
        self._signed: SignedRoster | None = None
        self._client: PeerClient | None = None
        self._monitor: PeerMonitor | None = None
        self._runners: list[web.BaseRunner] = []
        self._sync_lock = asyncio.Lock()
        self._started_at = 0.0
        self._stopped = asyncio.Event()

    # state ---------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def signed_roster(self) -> SignedRoster:
        if self._signed is None:
            raise ConfigError("node has not started", code="not_started")
        return self._signed

    @property
    def roster(self) -> Roster:
        return self.signed_roster.roster

    @property
    def monitor(self) -> PeerMonitor:
        assert self._monitor is not None
        return self._monitor

    @property
    def client(self) -> PeerClient:
        assert self._client is not None
        return self._client

    @property
    def federation_port(self) -> int:
        """The port actually bound (useful when the config asks for port 0)."""
        for runner in self._runners:
            for address in runner.addresses:
                if isinstance(address, tuple):
                    return int(address[1])
        return self.config.listen_port

    # lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the database, load and check the roster, start servers and the monitor."""
        await self.store.open()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        raw = await self.store.latest_roster()
        if raw is None:
            raise ConfigError(
                f"node {self.node_id} is not a member of any federation yet",
                code="not_a_member",
                hint="at the prefecture run `kakehashi federation create`; at a town run "
                "`kakehashi federation join TOKEN`",
            )
        signed = SignedRoster.from_bytes(raw)
        verify_roster(signed, signed.roster.federation_key)
        me = signed.roster.member(self.node_id)
        certificate = tls.load_certificate_pem(self.home.tls_cert.read_bytes())
        if me is None or me.tls_fingerprint != tls.fingerprint(certificate):
            raise ConfigError(
                "this node's certificate is not the one the roster publishes for it",
                code="certificate_not_in_roster",
            )
        self._signed = signed
        if (await self.store.get_meta("role")) == b"authority":
            self.authority = Authority(
                home=self.home,
                config=self.config,
                store=self.store,
                current=lambda: self.signed_roster,
                publish=self.publish,
                clock=self.clock,
            )
        self._client = PeerClient(
            tls.client_context(self.home.tls_cert, self.home.tls_key, self.home.ca_cert),
            node_id=self.node_id,
            roster_version=lambda: self.roster.version,
            timeout=self.config.request_timeout,
            segments=tuple(e.segment for e in self.config.endpoints),
        )
        self._monitor = PeerMonitor(
            node_id=self.node_id,
            client=self._client,
            store=self.store,
            roster=lambda: self.roster,
            on_roster_version=self.roster_hint,
            interval=self.config.health_interval,
            clock=self.clock,
        )
        server_ssl = tls.server_context(
            self.home.tls_cert, self.home.tls_key, self.home.ca_cert, require_client_cert=False
        )
        federation = web.AppRunner(federation_app(self), access_log=None, shutdown_timeout=2.0)
        await federation.setup()
        self._runners.append(federation)
        await web.TCPSite(
            federation,
            self.config.listen_host,
            self.config.listen_port,
            ssl_context=server_ssl,
            reuse_address=True,
        ).start()
        admin = web.AppRunner(admin_app(self), access_log=None, shutdown_timeout=1.0)
        await admin.setup()
        self._runners.append(admin)
        await serve_admin(admin, self.home.admin_socket)
        await self._monitor.start()
        self._started_at = self.clock()
        log.info(
            "node_started",
            node=self.node_id,
            federation=self.roster.federation_id,
            roster_version=self.roster.version,
            listen=f"{self.config.listen_host}:{self.federation_port}",
            authority=self.authority is not None,
        )

    async def stop(self) -> None:
        """Stop everything this node started, in reverse order. Safe to call twice."""
        if self._monitor is not None:
            await self._monitor.stop()
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None
        with contextlib.suppress(OSError):
            self.home.admin_socket.unlink()
        await self.store.close()
        self._stopped.set()
        log.info("node_stopped", node=self.node_id)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # roster ----------------------------------------------------------------

    async def adopt(self, signed: SignedRoster) -> RosterChange | None:
        """Verify `signed` against the held roster, persist it, serve it. None if not newer."""
        current = self.roster
        if signed.version <= current.version:
            return None
        change = check_update(current, signed)
        await self.store.save_roster(signed.version, signed.to_bytes(), int(self.clock() * 1000))
        self._signed = signed
        log.info(
            "roster_updated",
            version=change.version,
            previous=change.previous_version,
            joined=list(change.joined),
            status_changed=list(change.status_changed),
            rekeyed=list(change.rekeyed),
        )
        me = signed.roster.member(self.node_id)
        if me is not None and not me.active:
            log.warning("own_status_changed", status=me.status.value, reason=me.status_reason)
        if change.joined:
            self.monitor.kick()
        return change

    async def publish(self, signed: SignedRoster) -> None:
        """Authority: serve a roster version it just issued and tell every peer at once."""
        await self.adopt(signed)
        self.monitor.kick()

    async def roster_hint(self, version: int, peer: RosterEntry | None) -> None:
        """A peer showed a newer roster `version`: fetch it (from that peer, else the authority)."""
        if version <= self.roster.version:
            return
        async with self._sync_lock:
            if version <= self.roster.version:
                return  # another request fetched it while we waited
            sources = [peer] if peer is not None else []
            authority = self.roster.member(self.roster.authority)
            if (
                authority is not None
                and authority not in sources
                and authority.node_id != self.node_id
            ):
                sources.append(authority)
            for source in sources:
                try:
                    response = await self.client.request(source, "GET", "/roster")
                    change = await self.adopt(SignedRoster.from_bytes(response.body))
                except KakehashiError as exc:
                    log.warning(
                        "roster_sync_failed", source=source.node_id, code=exc.code, error=str(exc)
                    )
                    continue
                if change is not None or self.roster.version >= version:
                    return

    # federation API ---------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{FEDERATION_PREFIX}/ca", self._handle_ca),
            web.post(f"{FEDERATION_PREFIX}/join", self._handle_join),
            web.get(f"{FEDERATION_PREFIX}/roster", self._handle_roster),
            web.post(f"{FEDERATION_PREFIX}/health", self._handle_health),
        ]

    def record_refusal(self, reason: str, **fields: Any) -> None:
        self.refusals[reason] += 1
        log.warning("peer_refused", reason=reason, **fields)

    async def _handle_ca(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.home.ca_cert.read_bytes(), content_type="application/x-pem-file"
        )

    async def _handle_join(self, request: web.Request) -> web.Response:
        if self.authority is None:
            raise TrustError("this node is not the federation authority", code="not_authority")
        reply = await self.authority.join(await request.read())
        status = 200 if reply.status.value == "admitted" else 202
        return web.Response(status=status, body=reply.to_bytes(), content_type=MSGPACK)

    async def _handle_roster(self, request: web.Request) -> web.Response:
        return web.Response(body=self.signed_roster.to_bytes(), content_type=MSGPACK)

    async def _handle_health(self, request: web.Request) -> web.Response:
        codec.decode_map(await request.read())
        self.monitor.note_inbound(request[PEER].node_id)
        body = codec.encode({"node": self.node_id, "time_ms": int(self.clock() * 1000)})
        return web.Response(body=body, content_type=MSGPACK)

    # views for the CLI --------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = datetime.fromtimestamp(self.clock(), UTC)
        certificate = tls.load_certificate_pem(self.home.tls_cert.read_bytes())
        peers = self.peer_views()
        others = [p for p in peers if not p["self"] and p["status"] == "active"]
        return {
            "node_id": self.node_id,
            "name": self.config.name,
            "code": self.config.code,
            "federation_id": self.roster.federation_id,
            "federation_name": self.roster.federation_name,
            "role": "authority" if self.authority is not None else "member",
            "authority": self.roster.authority,
            "roster_version": self.roster.version,
            "listen": f"{self.config.listen_host}:{self.federation_port}",
            "endpoints": {e.segment: e.url for e in self.config.endpoints},
            "certificate_expires": certificate.not_valid_after_utc.isoformat(),
            "certificate_days_left": tls.days_left(certificate, now),
            "peers_up": sum(1 for p in others if p["health"] == "up"),
            "peers_down": sum(1 for p in others if p["health"] != "up"),
            "uptime_seconds": int(self.clock() - self._started_at),
            "refusals": dict(self.refusals),
        }

    def peer_views(self) -> list[dict[str, Any]]:
        now_ms = int(self.clock() * 1000)
        views = []
        for member in self.roster.members:
            health = self.monitor.health(member.node_id)
            own = member.node_id == self.node_id
            if own:
                state = "self"
            elif not member.active:
                state = member.status.value
            else:
                state = "up" if is_up(health, now_ms, self.config.health_interval) else "down"
            last = health.last_contact_ms if health else None
            views.append(
                {
                    "node_id": member.node_id,
                    "name": member.name,
                    "code": member.code,
                    "status": member.status.value,
                    "status_reason": member.status_reason,
                    "self": own,
                    "health": state,
                    "segments": list(member.segments),
                    "relay": member.relay,
                    "last_contact": None
                    if last is None
                    else datetime.fromtimestamp(last / 1000, UTC).isoformat(timespec="seconds"),
                    "rtt_ms": health.rtt_ms if health else None,
                    "clock_offset_ms": self.monitor.clock_offset_ms(member.node_id),
                    "last_error": health.last_error if health else None,
                }
            )
        return views
