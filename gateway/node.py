"""A running node: serves the federation API, keeps the roster current, watches its peers.

`Node` owns every long-lived resource of a running gateway (database, servers,
client session, background tasks) and creates and cancels all of them; nothing
runs that it does not hold a reference to. The roster it serves is swapped
atomically (one reference) after the update was verified and persisted.

Roster sync is single-flight: however many requests reveal that a newer roster
exists, one fetch runs at a time, and callers that arrive meanwhile wait for it.

A node restored from a backup (`kakehashi restore` leaves the `restored_at` meta
flag) starts with local sends held, pulls from every peer it reaches directly the
roster and everything those peers hold for it, its own later envelopes included,
then clears the flag and allows sends (see `_recover`).
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
from federation.backoff import Backoff
from federation.causal import hlc_to_ms
from federation.envelope import Envelope, Kind, check_room_id, room_home
from federation.errors import ConfigError, KakehashiError, ProtocolError, TrustError
from federation.roster import (
    MemberStatus,
    Roster,
    RosterChange,
    RosterEntry,
    SignedRoster,
    check_update,
    rotation_chain,
    verify_roster,
)
from federation.routing import Route, RouteExplanation, direct_peers, explain, plan
from federation.signing import SigningKey

from . import tls
from .accounts import Accounts
from .admin import admin_app, claim_admin_socket, serve_admin
from .api import ClientApi, api_ssl_context
from .api_files import file_routes
from .audit import AuditLog
from .authority import Authority
from .backup import RESTORED_AT
from .catchup import SYNC_ROOMS, CatchUp
from .config import Home, NodeConfig, load_config
from .decoder import Decoder
from .filefetch import Fetcher
from .files import FileSettings, FileStore
from .keys import KeyManager, KeySettings, recover_interrupted
from .metrics import NodeMetrics
from .monitoring import Maintenance, monitoring_app
from .names import RemoteNames
from .outbox import DeliverySettings, Outbox
from .peers import PeerMonitor, is_up
from .rooms import BATCH_LIMITS, RoomService
from .store import Store
from .stream import STREAM_ROUTE, PeerStreams, StreamServer
from .tasks import cancel_all
from .timeline import Timeline
from .transport import (
    FEDERATION_PREFIX,
    MAX_BATCH_REQUEST_BYTES,
    MSGPACK,
    PEER,
    PeerClient,
    federation_app,
)
from .webclient import web_client_routes

__all__ = ["Node"]

log = structlog.get_logger("kakehashi.node")


SYNC_LIMITS = codec.Limits(max_bytes=1024 * 1024, max_depth=4, max_map=5 * SYNC_ROOMS)
"""A catch-up request names many rooms (a prefecture's node is in many; pullers send at
most SYNC_ROOMS a request, more after a restore rediscovers rooms)."""


class Node:
    """One Kakehashi gateway node."""

    def __init__(self, home: Home, *, clock: Callable[[], float] = time.time) -> None:
        self.home = home
        self.config: NodeConfig = load_config(home)
        self.stop_requested = asyncio.Event()
        """Set to ask whoever runs the node (`kakehashi run`) to stop it, as SIGTERM does."""
        self.store = Store(home.database)
        self.clock = clock
        self.authority: Authority | None = None
        self.refusals: Counter[str] = Counter()
        self.maintenance = Maintenance(self.store, clock)
        self.accounts = Accounts(
            store=self.store, node_id=self.node_id, token_key_path=home.token_key, clock=clock
        )
        self.metrics = NodeMetrics(self)
        self._audit: AuditLog | None = None
        self._audit_started = False
        self._signed: SignedRoster | None = None
        self._client: PeerClient | None = None
        self._streams: PeerStreams | None = None
        self._stream_server = StreamServer(
            self,
            {"/envelopes": self._receive_batch, "/relay": self._relay_batch},
            max_frame_bytes=MAX_BATCH_REQUEST_BYTES,
        )
        self._monitor: PeerMonitor | None = None
        self._rooms: RoomService | None = None
        self._outbox: Outbox | None = None
        self._catchup: CatchUp | None = None
        self._files: FileStore | None = None
        self._keys: KeyManager | None = None
        self._refused_as: str | None = None
        self._timeline: Timeline | None = None
        self._names: RemoteNames | None = None
        self._api: ClientApi | None = None
        self.api_routes: list[web.AbstractRouteDef] = []
        """More client API routes (mounted under the same authentication), added before start."""
        self._runners: list[web.BaseRunner] = []
        self._monitoring: web.BaseRunner | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._started_at = 0.0

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
    def audit(self) -> AuditLog:
        """The node's audit log (created in `start`)."""
        if self._audit is None:
            raise ConfigError("node has not started", code="not_started")
        return self._audit

    @property
    def monitor(self) -> PeerMonitor:
        assert self._monitor is not None
        return self._monitor

    @property
    def client(self) -> PeerClient:
        assert self._client is not None
        return self._client

    @property
    def streams(self) -> PeerStreams:
        """This node's streams to peers (batches go on them; POST when a peer has none)."""
        assert self._streams is not None
        return self._streams

    @property
    def stream_server(self) -> StreamServer:
        """The streams peers hold open to this node."""
        return self._stream_server

    @property
    def rooms(self) -> RoomService:
        assert self._rooms is not None
        return self._rooms

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None
        return self._outbox

    @property
    def catchup(self) -> CatchUp:
        assert self._catchup is not None
        return self._catchup

    @property
    def timeline(self) -> Timeline:
        """What staff see of each room (messages, edits, reactions, 既読)."""
        assert self._timeline is not None
        return self._timeline

    @property
    def names(self) -> RemoteNames:
        """Display names of other nodes' users, from their envelopes."""
        assert self._names is not None
        return self._names

    @property
    def api(self) -> ClientApi | None:
        """The staff client API, when `[api] listen` is configured."""
        return self._api

    @property
    def api_port(self) -> int | None:
        """The client API's bound port (None when it is off)."""
        return None if self._api is None else self._api.port

    @property
    def keys(self) -> KeyManager:
        assert self._keys is not None
        return self._keys

    @property
    def files(self) -> FileStore:
        """Files shared in rooms (created in `start`)."""
        if self._files is None:
            raise ConfigError("node has not started", code="not_started")
        return self._files

    @property
    def federation_port(self) -> int:
        """The port actually bound (useful when the config asks for port 0)."""
        for runner in self._runners:
            if runner is self._monitoring:
                continue
            for address in runner.addresses:
                if isinstance(address, tuple):
                    return int(address[1])
        return self.config.listen_port

    @property
    def started_at(self) -> float:
        """Unix time (by the node's clock) at which the node finished starting."""
        return self._started_at

    # lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the database, load and check the roster, start servers and the monitor."""
        claim_admin_socket(self.home.admin_socket)  # before touching anything a running node owns
        await self.store.open()
        self.store.checkpoint_in_background()
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
        await self._verify_held(signed)
        recover_interrupted(self.home)
        me = signed.roster.member(self.node_id)
        certificate = tls.load_certificate_pem(self.home.tls_cert.read_bytes())
        if me is None or tls.fingerprint(certificate) not in me.certificates(int(self.clock())):
            raise ConfigError(
                "this node's certificate is not the one the roster publishes for it",
                code="certificate_not_in_roster",
            )
        self._signed = signed
        await self.maintenance.load()
        try:
            signing = SigningKey.from_pem(self.home.signing_key.read_bytes())
        except OSError as exc:
            raise ConfigError(
                f"cannot read {self.home.signing_key}: {exc}", code="bad_key"
            ) from exc
        self._audit = AuditLog(self.store, signing_key=signing, clock=self.clock)
        await self._audit.start()
        self.accounts.audit = self._audit.note  # staff logins and account changes
        if (await self.store.get_meta("role")) == b"authority":
            self.authority = Authority(
                home=self.home,
                config=self.config,
                store=self.store,
                current=lambda: self.signed_roster,
                publish=self.publish,
                clock=self.clock,
                audit=self._audit,
            )
        client_ssl = tls.client_context(self.home.tls_cert, self.home.tls_key, self.home.ca_cert)
        server_ssl = tls.server_context(
            self.home.tls_cert, self.home.tls_key, self.home.ca_cert, require_client_cert=False
        )
        contexts = [client_ssl, server_ssl]
        api_ssl = None
        if self.config.api_listen is not None:
            if self.config.api_tls_cert is not None and self.config.api_tls_key is not None:
                api_ssl = api_ssl_context(self.config.api_tls_cert, self.config.api_tls_key)
            else:
                api_ssl = api_ssl_context(self.home.tls_cert, self.home.tls_key)
                contexts.append(api_ssl)  # the node's own certificate: renewed with it
        self._keys = KeyManager(
            self,
            contexts=tuple(contexts),
            settings=KeySettings(renew_before_days=self.config.renew_before_days),
            clock=self.clock,
        )
        self._client = PeerClient(
            client_ssl,
            node_id=self.node_id,
            roster_version=lambda: self.roster.version,
            timeout=self.config.request_timeout,
            segments=tuple(e.segment for e in self.config.endpoints),
            clock=self.clock,
        )
        self._rooms = RoomService(
            node_id=self.node_id,
            store=self.store,
            signing_key=signing,
            roster=lambda: self.roster,
            clock=self.clock,
            on_enqueued=lambda queued: self.outbox.enqueued(queued),
            decoder=Decoder(use_helper=self.config.decode_helper),
        )
        self._rooms.audit_refusal = self._audit.refused  # an origin that signed twice
        self._streams = PeerStreams(self._client, enabled=self.config.streams)
        self._outbox = Outbox(
            store=self._rooms.store,
            streams=self._streams,
            roster=lambda: self.roster,
            router=self.route,
            settings=DeliverySettings(
                backoff=Backoff(base=0.2, cap=self.config.retry_cap, jitter=0.2)
            ),
        )
        self._files = FileStore(
            root=self.home.files,
            store=self.store,
            rooms=self._rooms,
            node_id=self.node_id,
            settings=FileSettings(max_upload_bytes=self.config.files_max_upload_mb * 1024 * 1024),
            clock=self.clock,
        )
        Fetcher(
            files=self._files,
            rooms=self._rooms,
            client=self._client,
            roster=lambda: self.roster,
            direct=self.direct_peers,
        )
        self._rooms.write_with(self._files.index)
        self._names = RemoteNames(store=self.store, node_id=self.node_id)
        await self._names.load()
        self._rooms.write_with(self._names.write)
        self._rooms.listen(self._names.on_accepted)
        await self._rooms.load()
        self._timeline = Timeline(store=self.store, rooms=self._rooms)
        self._rooms.listen(self._timeline.on_accepted)  # before any envelope can arrive
        await self._timeline.start()
        restored_at = await self.store.get_meta(RESTORED_AT)
        if restored_at is not None:
            self._rooms.hold_local()  # before the admin socket serves a single send
        self._catchup = CatchUp(
            node_id=self.node_id,
            rooms=self._rooms,
            client=self._client,
            roster=lambda: self.roster,
            interval=self.config.catch_up_interval,
            direct=self.direct_peers,
        )
        self._monitor = PeerMonitor(
            node_id=self.node_id,
            client=self._client,
            store=self.store,
            roster=lambda: self.roster,
            on_roster_version=self.roster_hint,
            interval=self.config.health_interval,
            clock=self.clock,
            on_peer_up=self._peer_up,
            direct=self.direct_peers,
            on_refused=self._refused_by,
        )
        await self._files.start()
        app = federation_app(self)
        app.on_shutdown.append(self._stream_server.shutdown)
        federation = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await federation.setup()
        self._runners.append(federation)
        try:
            await web.TCPSite(
                federation,
                self.config.listen_host,
                self.config.listen_port,
                ssl_context=server_ssl,
                reuse_address=True,
            ).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                f"{exc.strerror or exc}",
                code="listen_failed",
                hint=f"is another program using port {self.config.listen_port}? "
                f"change [listen] in {self.home.config}",
            ) from exc
        admin = web.AppRunner(admin_app(self), access_log=None, shutdown_timeout=1.0)
        await admin.setup()
        self._runners.append(admin)
        await serve_admin(admin, self.home.admin_socket)
        await self._monitor.start()
        await self._outbox.start()
        self._catchup.start()
        self._keys.start()
        self._rooms.resume()
        self._rooms.remove_revoked()
        if restored_at is not None:
            self._recovery = asyncio.create_task(self._recover(restored_at), name="restore")
            self._recovery.add_done_callback(_log_failure)
        self._started_at = self.clock()
        if self.config.api_listen is not None and api_ssl is not None:
            routes = [*file_routes(self), *web_client_routes(), *self.api_routes]
            self._api = ClientApi(self, timeline=self._timeline, extra_routes=routes)
            await self._api.start(*self.config.api_listen, api_ssl)
        await self._serve_monitoring()
        await self._audit.append(
            "node_started",
            node=self.node_id,
            federation=self.roster.federation_id,
            roster_version=self.roster.version,
            role="authority" if self.authority is not None else "member",
            signing_key_id=signing.key_id,
            listen=f"{self.config.listen_host}:{self.federation_port}",
        )
        self._audit_started = True
        log.info(
            "node_started",
            node=self.node_id,
            federation=self.roster.federation_id,
            roster_version=self.roster.version,
            listen=f"{self.config.listen_host}:{self.federation_port}",
            authority=self.authority is not None,
            monitoring=self.config.monitoring_listen,
            api=self.config.api_listen and f"{self.config.api_listen[0]}:{self.api_port}",
            maintenance=self.maintenance.on,
        )

    async def _serve_monitoring(self) -> None:
        """The optional plain-HTTP listener for Prometheus and load balancers (last, so it
        answers only once the node is fully up)."""
        if self.config.monitoring_listen is None:
            return
        host, port = self.config.monitoring_listen
        runner = web.AppRunner(monitoring_app(self), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        self._monitoring = runner
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for monitoring on {host}:{port}: {exc.strerror or exc}",
                code="listen_failed",
                hint=f"is another program using port {port}? change [monitoring] listen "
                f"in {self.home.config}",
            ) from exc

    async def stop(self) -> None:
        """Stop everything this node started, in reverse order. Safe to call twice."""
        # Each step runs even if an earlier one failed: a node that stops halfway would
        # keep its port, its client session and its database open.
        await cancel_all([self._recovery])
        if self._api is not None:
            try:
                await self._api.stop()  # first: its clients are told before anything stops
            except Exception:
                log.exception("stop_step_failed", part="ClientApi")
            self._api = None
        parts = (
            self._files,
            self._keys,
            self._catchup,
            self._outbox,
            self._monitor,
            self._rooms,
            self._timeline,
        )
        for part in parts:
            if part is not None:
                try:
                    await part.stop()
                except Exception:
                    log.exception("stop_step_failed", part=type(part).__name__)
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self._rooms is not None:
            # Batches that came in while the servers closed are written before the database
            # closes: their senders had no answer, and send them again as duplicates.
            await self._rooms.settle()
        self._monitoring = None
        if self._streams is not None:
            await self._streams.close()
            self._streams = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._audit is not None:
            # Last: nothing else can add a record now, and the final head covers them all.
            try:
                if self._audit_started:
                    await self._audit.append("node_stopped", node=self.node_id)
            except Exception:
                log.exception("stop_step_failed", part="AuditLog")
            await self._audit.stop()
            self._audit_started = False
        with contextlib.suppress(OSError):
            self.home.admin_socket.unlink()
        await self.store.close()
        log.info("node_stopped", node=self.node_id)

    # after a restore ----------------------------------------------------------

    async def _recover(self, restored_at: bytes) -> None:
        """Catch up with every peer reached directly before allowing local sends.

        The backup predates envelopes this node made before its disk died; peers hold
        them. Sending before they are back would reuse their sequence numbers with other
        content, which peers would drop as duplicates (equivocation). So each peer is
        asked for the roster and for everything it holds for this node, in every room it
        counts this node a member of; unreached peers are retried until all answered or
        `restore_timeout` passed. Then sends are allowed even if some peer never answered:
        an isolated node must keep working, at the risk that a peer reached later holds
        envelopes of ours whose sequence numbers get used again (logged as a warning).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.restore_timeout
        reached: set[str] = set()
        told: set[str] = set()  # peers already logged as unreachable (retried every second)
        pulled = 0
        log.info("restore_catch_up_started", restored_at=restored_at.decode(errors="replace"))
        try:
            while True:
                peers = sorted(self.direct_peers() - reached)
                results = await asyncio.gather(
                    *(self._recover_from(peer) for peer in peers), return_exceptions=True
                )
                for peer, result in zip(peers, results, strict=True):
                    if isinstance(result, int):
                        reached.add(peer)
                        pulled += result
                    elif isinstance(result, KakehashiError):
                        if peer not in told:
                            told.add(peer)
                            log.info("restore_peer_unreachable", peer=peer, code=result.code)
                    else:
                        log.error("restore_peer_failed", peer=peer, error=repr(result))
                unreached = sorted(self.direct_peers() - reached)
                if not unreached:
                    break
                if loop.time() >= deadline:
                    log.warning(
                        "restore_catch_up_timed_out",
                        reached=sorted(reached),
                        unreached=unreached,
                        risk="envelopes of this node held only by unreached peers may see "
                        "their sequence numbers reused",
                    )
                    break
                await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
            await self.store.delete_meta(RESTORED_AT)
            log.info("restore_caught_up", peers=sorted(reached), envelopes=pulled)
        finally:
            self.rooms.release_local()

    async def _recover_from(self, peer: str) -> int:
        """The roster, then every envelope `peer` holds for this node; raises if unreachable."""
        entry = self.roster.member(peer)
        if entry is None:
            return 0
        # First the roster: a restored authority must not issue a version it issued before.
        response = await self.client.request(entry, "GET", "/roster")
        await self.adopt(SignedRoster.from_bytes(response.body))
        return await self.catchup.recover(peer)

    # roster ----------------------------------------------------------------

    async def adopt(self, signed: SignedRoster) -> RosterChange | None:
        """Verify `signed` against the held roster, persist it, serve it. None if not newer."""
        current = self.roster
        if signed.version <= current.version:
            return None
        change = check_update(current, signed)
        changes = {
            "joined": list(change.joined),
            "status_changed": [
                f"{node}={entry.status.value}"
                for node in change.status_changed
                if (entry := signed.roster.member(node)) is not None
            ],
            "rekeyed": list(change.rekeyed),
            "relay_changed": [
                f"{m.node_id}={'on' if m.relay else 'off'}"
                for m in signed.roster.members
                if (before := current.member(m.node_id)) is not None and before.relay != m.relay
            ],
        }
        async with self.store.transaction() as db:
            await self.store.insert_roster(
                db, signed.version, signed.to_bytes(), int(self.clock() * 1000)
            )
            await self.audit.append_in(
                db,
                "roster_adopted",
                version=change.version,
                previous=change.previous_version,
                **{name: nodes for name, nodes in changes.items() if nodes},
            )
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
        for node_id in change.status_changed:
            entry = signed.roster.member(node_id)
            if entry is None or self._outbox is None:
                continue
            if entry.active:
                # Resumed: what was kept for it goes now, not after the backoff.
                self._outbox.retry_now(node_id)
                self._outbox.wake(node_id)
            elif entry.status is MemberStatus.REVOKED:
                self._outbox.drop(node_id)  # for good: what was kept for it never goes
        revoked = any(signed.roster.revoked(node) for node in change.status_changed)
        if revoked and self._rooms is not None:
            self._rooms.remove_revoked()
        return change

    async def _verify_held(self, signed: SignedRoster) -> None:
        """The stored roster is signed by the key its predecessor names (itself, unless it
        announced a new federation key: then by the previous version's key)."""
        try:
            verify_roster(signed, signed.roster.federation_key)
            return
        except TrustError:
            previous = await self.store.roster(signed.version - 1)
            if previous is None:
                raise
        verify_roster(signed, SignedRoster.from_bytes(previous).roster.federation_key)

    async def _adopt_chain(self, source: RosterEntry) -> RosterChange | None:
        response = await self.client.request(
            source, "GET", f"/roster/chain?after={self.roster.version}"
        )
        body = codec.decode_map(response.body, canonical=False)
        rosters = body.get("rosters")
        if not isinstance(rosters, list) or not rosters:
            raise TrustError("the peer sent no roster chain", code="bad_roster_signature")
        change = None
        for raw in rosters:
            if not isinstance(raw, bytes):
                raise ProtocolError("a roster chain holds signed rosters", code="bad_roster")
            change = await self.adopt(SignedRoster.from_bytes(raw)) or change
        log.info("roster_chain_followed", versions=len(rosters), version=self.roster.version)
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
                    try:
                        change = await self.adopt(SignedRoster.from_bytes(response.body))
                    except TrustError as exc:
                        if exc.code != "bad_roster_signature":
                            raise
                        # The federation key may have changed while we were away: follow
                        # the chain of versions that announced each new key. If the source
                        # has no such chain, the roster was simply badly signed.
                        try:
                            change = await self._adopt_chain(source)
                        except KakehashiError as chain_error:
                            log.debug("roster_chain_failed", code=chain_error.code)
                            raise exc from chain_error
                except KakehashiError as exc:
                    log.warning(
                        "roster_sync_failed", source=source.node_id, code=exc.code, error=str(exc)
                    )
                    continue
                if change is not None or self.roster.version >= version:
                    return

    # routing ------------------------------------------------------------------

    def direct_peers(self) -> frozenset[str]:
        """Active members on a segment this node sits on."""
        return direct_peers(self.roster, self.node_id)

    def down_relays(self) -> frozenset[str]:
        """Relays the last delivery to failed, or whose last health check failed."""
        down = set(self.outbox.down)
        for member in self.roster.members:
            health = self.monitor.health(member.node_id)
            if member.relay and health is not None and health.failures:
                down.add(member.node_id)
        return frozenset(down)

    def route(self, destination: str) -> Route | None:
        """The path envelopes for `destination` take now (direct, or via relays)."""
        return plan(self.roster, self.node_id, destination, down=self.down_relays())

    def explain_route(self, destination: str) -> RouteExplanation:
        return explain(self.roster, self.node_id, destination, down=self.down_relays())

    # federation API ---------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{FEDERATION_PREFIX}/ca", self._handle_ca),
            web.post(f"{FEDERATION_PREFIX}/join", self._handle_join),
            web.get(f"{FEDERATION_PREFIX}/roster", self._handle_roster),
            web.get(f"{FEDERATION_PREFIX}/roster/chain", self._handle_roster_chain),
            web.post(f"{FEDERATION_PREFIX}/keys/certificate", self._handle_new_certificate),
            web.post(f"{FEDERATION_PREFIX}/keys/signing", self._handle_new_signing_key),
            web.post(f"{FEDERATION_PREFIX}/health", self._handle_health),
            web.post(f"{FEDERATION_PREFIX}/envelopes", self._handle_envelopes),
            web.post(f"{FEDERATION_PREFIX}/sync", self._handle_sync),
            web.post(f"{FEDERATION_PREFIX}/relay", self._handle_relay),
            web.get(STREAM_ROUTE, self._stream_server.handle),
            web.get(f"{FEDERATION_PREFIX}/files/{{sha256}}", self._handle_file),
        ]

    def _peer_up(self, peer: str) -> None:
        """A peer answered again: resume delivery at once and catch up with it."""
        if self._outbox is not None:
            self._outbox.retry_now(peer)
        if self._catchup is not None:
            self._catchup.request(peer)

    async def _refused_by(self, peer: RosterEntry, code: str) -> None:
        """`peer` refuses this node as suspended or revoked: read the roster from the
        authority (a suspended node may) so this node knows, says so, and stops sending."""
        me = self.roster.member(self.node_id)
        if (me is not None and not me.active) or code == self._refused_as:
            return  # already known (said once)
        self._refused_as = code
        log.warning(
            "refused_by_peer",
            peer=peer.node_id,
            code=code,
            hint="the federation authority suspended or revoked this node; ask the prefecture",
        )
        if code == "peer_suspended":
            await self.roster_hint(
                self.roster.version + 1, self.roster.member(self.roster.authority)
            )

    def certificate_changed(self) -> None:
        """This node presents a new certificate from now on: streams opened with the old
        one are replaced, before the roster stops accepting it."""
        if self._client is not None:
            self._client.certificate_changed()
        if self._streams is not None:
            self._streams.renew()

    def now(self) -> float:
        return self.clock()

    def record_refusal(self, reason: str, **fields: Any) -> None:
        self.refusals[reason] += 1
        log.warning("peer_refused", reason=reason, **fields)
        if self._audit is not None:
            self._audit.refused(reason, **fields)

    async def _handle_ca(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.home.ca_cert.read_bytes(), content_type="application/x-pem-file"
        )

    async def _handle_join(self, request: web.Request) -> web.Response:
        if self.authority is None:
            raise TrustError("this node is not the federation authority", code="not_authority")
        self.rooms.require_caught_up()  # admitting a node issues a roster version
        reply = await self.authority.join(await request.read())
        status = 200 if reply.status.value == "admitted" else 202
        return web.Response(status=status, body=reply.to_bytes(), content_type=MSGPACK)

    async def _handle_roster(self, request: web.Request) -> web.Response:
        return web.Response(body=self.signed_roster.to_bytes(), content_type=MSGPACK)

    async def _handle_roster_chain(self, request: web.Request) -> web.Response:
        """The stored versions a node holding version `after` needs to reach ours."""
        try:
            after = int(request.query.get("after", ""))
        except ValueError as exc:
            raise ProtocolError("chain needs ?after=VERSION", code="bad_request") from exc
        held_raw = await self.store.roster(after)
        if held_raw is None:
            raise ProtocolError(f"this node does not hold roster version {after}", code="no_roster")
        held = SignedRoster.from_bytes(held_raw).roster
        stored = [SignedRoster.from_bytes(raw) for raw in await self.store.rosters_after(after)]
        chain = rotation_chain(held, stored)
        body = codec.encode_frame({"rosters": [signed.to_bytes() for signed in chain]})
        return web.Response(body=body, content_type=MSGPACK)

    def _authority_for(self, request: web.Request) -> Authority:
        if self.authority is None:
            raise TrustError("this node is not the federation authority", code="not_authority")
        return self.authority

    async def _handle_new_certificate(self, request: web.Request) -> web.Response:
        """At the authority: a member renews its certificate (authenticated by the current)."""
        authority = self._authority_for(request)
        body = codec.decode_map(await request.read())
        csr = body.get("csr")
        if not isinstance(csr, bytes):
            raise ProtocolError("a certificate request needs csr (PEM)", code="bad_request")
        pem = await authority.renew_certificate(
            request[PEER].node_id, csr, overlap=self.keys.settings.tls_overlap
        )
        answer = codec.encode({"certificate": pem, "roster_version": self.roster.version})
        return web.Response(body=answer, content_type=MSGPACK)

    async def _handle_new_signing_key(self, request: web.Request) -> web.Response:
        """At the authority: a member publishes a new signing key it proves it holds."""
        authority = self._authority_for(request)
        body = codec.decode_map(await request.read())
        key, proof = body.get("key"), body.get("proof")
        if not isinstance(key, bytes) or not isinstance(proof, bytes):
            raise ProtocolError("a signing key request needs key and proof", code="bad_request")
        version = await authority.add_signing_key(
            request[PEER].node_id, key, proof, overlap=self.keys.settings.signing_overlap
        )
        return web.Response(body=codec.encode({"roster_version": version}), content_type=MSGPACK)

    async def _handle_health(self, request: web.Request) -> web.Response:
        codec.decode_map(await request.read())
        self.monitor.note_inbound(request[PEER].node_id)
        body = codec.encode({"node": self.node_id, "time_ms": int(self.clock() * 1000)})
        return web.Response(body=body, content_type=MSGPACK)

    async def _handle_envelopes(self, request: web.Request) -> web.Response:
        """A batch pushed by a peer; answered only after it is durably committed."""
        answer = await self._receive_batch(request[PEER], await request.read())
        return web.Response(body=answer, content_type=MSGPACK)

    async def _receive_batch(self, peer: RosterEntry, raw: bytes) -> bytes:
        """The work of `/envelopes`, by POST or on a stream: the answer's body."""
        body = codec.decode_map(raw, BATCH_LIMITS, canonical=False)
        wires = body.get("envelopes")
        if not isinstance(wires, list) or not all(isinstance(w, bytes) for w in wires):
            raise ProtocolError("envelopes must be a list of encoded envelopes", code="bad_batch")
        self.catchup.note_push(peer.node_id)
        accepted, duplicates, refused = await self.rooms.receive(peer.node_id, wires)
        if self.rooms.pending_count():
            # Fetch the dependencies we still lack, unless the next batch brings them.
            self.catchup.request_if_still_waiting(peer.node_id)
        if any(refusal.code == "unknown_room" for refusal in refused):
            # Most likely the state adding us to the room is in a batch still on its way:
            # once it is in, catch-up brings what was refused.
            self.catchup.request_later(peer.node_id)
        answer = {
            "accepted": accepted,
            "duplicates": duplicates,
            "refused": [[r.envelope_id, r.code] for r in refused],
        }
        return codec.encode_frame(answer)

    async def _handle_relay(self, request: web.Request) -> web.Response:
        """As a relay: verify a batch for another node, queue it durably, then acknowledge."""
        answer = await self._relay_batch(request[PEER], await request.read())
        return web.Response(body=answer, content_type=MSGPACK)

    async def _relay_batch(self, peer: RosterEntry, raw: bytes) -> bytes:
        """The work of `/relay`, by POST or on a stream: the answer's body."""
        me = self.roster.member(self.node_id)
        if me is None or not me.relay:
            raise TrustError(f"{self.node_id} is not a relay in the roster", code="not_a_relay")
        body = codec.decode_map(raw, BATCH_LIMITS, canonical=False)
        wires, destination = body.get("envelopes"), body.get("to")
        if not isinstance(wires, list) or not all(isinstance(w, bytes) for w in wires):
            raise ProtocolError("envelopes must be a list of encoded envelopes", code="bad_batch")
        if not isinstance(destination, str):
            raise ProtocolError("relay needs the destination node id (to)", code="bad_batch")
        target = self.roster.member(destination)
        if target is None or not target.active or destination == peer.node_id:
            raise TrustError(
                f"cannot relay to {destination!r}: not an active member other than the sender",
                code="bad_destination",
            )
        if destination == self.node_id:
            accepted, duplicates, refused = await self.rooms.receive(peer.node_id, wires)
        else:
            accepted, refused = await self.rooms.relay(peer.node_id, destination, wires)
            duplicates = 0
        answer = {
            "accepted": accepted,
            "duplicates": duplicates,
            "refused": [[r.envelope_id, r.code] for r in refused],
        }
        return codec.encode_frame(answer)

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        """A file's bytes (Range honoured), to a member node of a room that shares it."""
        return await self.files.serve_peer(request, request[PEER].node_id)

    async def _handle_sync(self, request: web.Request) -> web.Response:
        """Catch-up: everything beyond the peer's vectors in rooms it is a member of; with
        `discover`, also the ids of those rooms (`member_of`)."""
        peer = request[PEER]
        body = codec.decode_map(await request.read(), SYNC_LIMITS)
        rooms, limit = body.get("rooms"), body.get("limit", 2000)
        if not isinstance(rooms, dict) or not isinstance(limit, int) or not 0 < limit <= 5000:
            raise ProtocolError("sync needs rooms (map) and limit (1-5000)", code="bad_sync")
        vectors: dict[str, dict[str, int]] = {}
        for room, vector in rooms.items():
            if not isinstance(vector, dict) or not all(
                isinstance(o, str) and isinstance(q, int) for o, q in vector.items()
            ):
                raise ProtocolError("a vector maps origin to seq", code="bad_sync")
            vectors[room] = vector
        discover, through = body.get("discover", False), body.get("through", False)
        if not isinstance(discover, bool) or not isinstance(through, bool):
            raise ProtocolError("discover and through must be true or false", code="bad_sync")

        served = await self.rooms.missing_for(peer.node_id, vectors, limit, 4 * 1024 * 1024)
        answer: dict[str, Any] = {"envelopes": served.wires, "more": served.more}
        if served.more:
            # For the puller's progress bar: what it still lacks after this page.
            backlog = await self.rooms.backlog_for(peer.node_id, vectors)
            answer["remaining"] = max(0, backlog - len(served.wires))
            if through:
                # Where the next page starts, so the puller can ask for it at once.
                answer["through"] = {
                    room: dict(sorted(vector.items()))
                    for room, vector in sorted(served.through.items())
                }
        if discover:
            # A peer restored from a backup asks which rooms it is in (it may not know them).
            answer["member_of"] = self.rooms.member_rooms(peer.node_id)
        frame = codec.encode_frame(dict(sorted(answer.items())))  # keys in canonical order
        return web.Response(body=frame, content_type=MSGPACK)

    # views for the CLI --------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        now = datetime.fromtimestamp(self.clock(), UTC)
        certificate = tls.load_certificate_pem(self.home.tls_cert.read_bytes())
        peers = await self.peer_report()
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
            "rooms": len(self.rooms.room_ids()),
            "pending_envelopes": self.rooms.pending_count(),
            "catching_up": self.rooms.catching_up,
        }

    async def room_views(self) -> list[dict[str, Any]]:
        counts = await self.rooms.store.counts()
        roster = self.roster
        views = []
        for room in self.rooms.room_ids():
            state = self.rooms.state(room)
            accepted, pending = counts.get(room, (0, 0))
            home = room_home(room)
            views.append(
                {
                    "room_id": room,
                    "name": state.name if state else None,
                    "kind": state.kind.value if state else None,
                    "home": home,
                    "home_revoked": roster.revoked(home),  # its state can no longer change
                    "nodes": sorted(state.nodes) if state else [],
                    "member": bool(state and self.node_id in state.nodes),
                    "envelopes": accepted,
                    "pending": pending,
                    "vector": self.rooms.vector(room),
                }
            )
        return views

    async def history_view(self, room: str, limit: int) -> list[dict[str, Any]]:
        check_room_id(room)
        if self.rooms.state(room) is None:
            raise ProtocolError(f"this node knows no room {room}", code="unknown_room", status=404)
        rows = await self.rooms.store.history(room, limit)
        entries = []
        for envelope_id, wire in reversed(rows):
            content = Envelope.from_bytes(wire).content
            entries.append(
                {
                    "id": envelope_id.hex(),
                    "origin": content.origin,
                    "seq": content.seq,
                    "kind": content.kind.value,
                    "sender": content.sender,
                    "time": datetime.fromtimestamp(hlc_to_ms(content.hlc) / 1000, UTC).isoformat(
                        timespec="milliseconds"
                    ),
                    "text": content.body.get("text") if content.kind is Kind.MESSAGE else None,
                    "body": _jsonable(content.body),
                }
            )
        return entries

    async def peer_report(self) -> list[dict[str, Any]]:
        """`peer_views` with each peer's outbox depth and delivery lag."""
        return self.peer_views(await self.rooms.store.outbox_depths())

    def peer_views(self, depths: dict[str, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        now_ms = int(self.clock() * 1000)
        depths = depths or {}
        views = []
        for member in self.roster.members:
            health = self.monitor.health(member.node_id)
            own = member.node_id == self.node_id
            route = None if own or not member.active else self.route(member.node_id)
            if route is not None and not route.direct:
                # Reached through relays: as healthy as the first of them.
                health = self.monitor.health(route.next_hop)
            if own:
                state = "self"
            elif not member.active:
                state = member.status.value
            elif route is None:
                state = "no route"
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
                    "stream": self._streams is not None and self._streams.is_open(member.node_id),
                    "route": None
                    if route is None
                    else "direct"
                    if route.direct
                    else "via " + ",".join(route.relays),
                    "last_contact": None
                    if last is None
                    else datetime.fromtimestamp(last / 1000, UTC).isoformat(timespec="seconds"),
                    "rtt_ms": health.rtt_ms if health else None,
                    "clock_offset_ms": self.monitor.clock_offset_ms(member.node_id),
                    "last_error": health.last_error if health else None,
                    "outbox": depths.get(member.node_id, (0, 0))[0],
                    "delivery_lag_s": round((now_ms - depths[member.node_id][1]) / 1000, 1)
                    if member.node_id in depths
                    else 0.0,
                }
            )
        return views


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("node_task_failed", task=task.get_name(), error=repr(task.exception()))


def _jsonable(value: Any) -> Any:
    """Body values for JSON output: bytes (envelope ids) as hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value
