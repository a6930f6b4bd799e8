"""The federation API over mutual TLS: the server's gatekeeping and the client to peers.

Server: TLS 1.3 only. The TLS layer checks that a presented client certificate
chains to the federation CA; `authenticate` then checks, for every route but the
two open ones (`/ca`, `/join`), that a certificate was presented, that its
SHA-256 fingerprint is the one the roster publishes for the node id the request
claims, and that the node is active. A refusal answers with a typed msgpack
error and is logged with its reason; the connection is closed and the server goes
on serving.

Client: presents this node's certificate and checks the server's: chain to the
CA (the TLS context) and the fingerprint the roster publishes for the node it
meant to reach (aiohttp's `Fingerprint`, applied after the handshake by a
connector that keeps our own mutual-TLS context). Host names are not checked:
peers are identified by the roster, not by DNS.

Every request and response carries the sender's roster version
(`Kakehashi-Roster-Version`), so whichever side is behind learns it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict

from federation import codec
from federation.errors import KakehashiError, ProtocolError, TransportError, TrustError
from federation.roster import Roster, RosterEntry

from . import tls

__all__ = [
    "FEDERATION_PREFIX",
    "HEADER_NODE",
    "HEADER_ROSTER",
    "MSGPACK",
    "PEER",
    "FederationService",
    "PeerClient",
    "PeerResponse",
    "PinnedConnector",
    "client_errors",
    "error_body",
    "federation_app",
    "raise_for_error",
]

FEDERATION_PREFIX = "/federation/v1"
HEADER_NODE = "Kakehashi-Node"
HEADER_ROSTER = "Kakehashi-Roster-Version"
MSGPACK = "application/msgpack"
PEER = web.RequestKey("peer", RosterEntry)
"""The authenticated roster entry of the client, set on every request but the open ones."""
OPEN_ROUTES = frozenset({f"{FEDERATION_PREFIX}/ca", f"{FEDERATION_PREFIX}/join"})
ROSTER_ROUTE = f"{FEDERATION_PREFIX}/roster"
MAX_REQUEST_BYTES = 1024 * 1024
# Envelope batches may be larger (a sender bounds them at 4 MiB of envelopes).
MAX_BATCH_REQUEST_BYTES = 8 * 1024 * 1024
LARGE_ROUTES = frozenset({f"{FEDERATION_PREFIX}/envelopes", f"{FEDERATION_PREFIX}/relay"})

log = structlog.get_logger("kakehashi.transport")


def error_body(code: str, message: str, hint: str | None = None) -> bytes:
    """The msgpack body of every refusal: {error, message, hint}."""
    return codec.encode({"error": code, "message": message, "hint": hint})


def raise_for_error(status: int, body: bytes) -> None:
    """Turn a peer's refusal into the matching typed error."""
    try:
        raw = codec.decode_map(body)
        code, message, hint = str(raw["error"]), str(raw["message"]), raw.get("hint")
    except (KakehashiError, KeyError):
        raise TransportError(f"peer answered HTTP {status} without a readable error") from None
    hint = hint if isinstance(hint, str) else None
    if status in (401, 403):
        raise TrustError(message, code=code, hint=hint)
    if status in (400, 404, 409, 413, 416, 422):
        raise ProtocolError(message, code=code, hint=hint, status=status)
    raise TransportError(f"peer answered HTTP {status}: {message}", code=code, hint=hint)


def _refusal(status: int, code: str, message: str, hint: str | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(code, message, hint),
        content_type=MSGPACK,
        headers={"Connection": "close"} if status in (401, 403) else None,
    )


class FederationService(Protocol):
    """What the server needs from the node."""

    @property
    def node_id(self) -> str: ...

    @property
    def roster(self) -> Roster: ...

    def routes(self) -> list[web.RouteDef]: ...

    async def roster_hint(self, version: int, peer: RosterEntry | None) -> None:
        """A peer showed roster `version`; sync if ours is older (peer None: unauthenticated)."""

    def record_refusal(self, reason: str, **fields: Any) -> None:
        """Count and log a refused peer request."""

    def now(self) -> float:
        """Unix seconds (the node's clock)."""


def _peer_certificate(request: web.Request) -> bytes | None:
    transport = request.transport
    if transport is None:
        return None
    return tls.peer_certificate_der(transport.get_extra_info("ssl_object"))


def _claimed_version(request: web.Request) -> int:
    try:
        return max(0, int(request.headers.get(HEADER_ROSTER, "0")))
    except ValueError:
        return 0


def federation_app(service: FederationService) -> web.Application:
    """The aiohttp application of the federation API."""

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        remote = request.remote
        limit = MAX_BATCH_REQUEST_BYTES if request.path in LARGE_ROUTES else MAX_REQUEST_BYTES
        if request.content_length is not None and request.content_length > limit:
            service.record_refusal("too_large", remote=remote, size=request.content_length)
            return _refusal(413, "too_large", f"request body over {limit} bytes")
        if request.path not in OPEN_ROUTES:
            refused = await _check_peer(request, service)
            if refused is not None:
                return refused
        try:
            # The app's cap is the largest route's; a chunked body must meet this route's.
            response = await handler(request.clone(client_max_size=limit))
        except KakehashiError as exc:
            status = getattr(exc, "status", 400)
            service.record_refusal(exc.code, remote=remote, path=request.path, message=str(exc))
            response = _refusal(status, exc.code, str(exc), exc.hint)
        except web.HTTPRequestEntityTooLarge:
            service.record_refusal("too_large", remote=remote, path=request.path)
            response = _refusal(413, "too_large", f"request body over {limit} bytes")
        except web.HTTPException as exc:
            response = _refusal(exc.status, "http_" + str(exc.status), exc.reason)
        except Exception:  # a bug must not take the node down; answer, and say where
            log.exception("handler_failed", path=request.path, remote=remote)
            response = _refusal(500, "internal_error", "the node failed to handle the request")
        response.headers[HEADER_ROSTER] = str(service.roster.version)
        response.headers[HEADER_NODE] = service.node_id
        return response

    app = web.Application(middlewares=[authenticate], client_max_size=MAX_BATCH_REQUEST_BYTES)
    app.add_routes(service.routes())
    return app


async def _check_peer(request: web.Request, service: FederationService) -> web.Response | None:
    """None if the client is an active member presenting its roster certificate; else a refusal."""
    remote = request.remote
    der = _peer_certificate(request)
    if der is None:
        service.record_refusal("client_certificate_required", remote=remote, path=request.path)
        return _refusal(
            401,
            "client_certificate_required",
            "a client certificate issued by the federation CA is required",
        )
    claimed = request.headers.get(HEADER_NODE, "")
    fingerprint = tls.fingerprint_der(der)
    version = _claimed_version(request)
    entry = service.roster.by_fingerprint(fingerprint)
    if entry is None and version > service.roster.version:
        # A node that joined after our roster was fetched: catch up, then look again.
        await service.roster_hint(version, None)
        entry = service.roster.by_fingerprint(fingerprint)
    if entry is not None and fingerprint not in entry.certificates(int(service.now())):
        service.record_refusal(
            "certificate_replaced", remote=remote, peer=entry.node_id, claimed=claimed
        )
        return _refusal(
            403,
            "certificate_replaced",
            f"this certificate of {entry.node_id!r} was replaced by a rotation",
            "the node must use the certificate the roster publishes for it",
        )
    if entry is None or entry.node_id != claimed:
        service.record_refusal(
            "unknown_certificate",
            remote=remote,
            claimed=claimed,
            fingerprint=fingerprint.hex()[:16],
        )
        return _refusal(
            403,
            "unknown_certificate",
            f"the certificate is not the one the roster publishes for {claimed or 'any node'!r}",
        )
    try:
        service.roster.active_member(entry.node_id)
    except TrustError as exc:
        # A suspended node may still read the roster: that is how it learns it is
        # suspended (and, later, resumed). Nothing else it asks is served.
        reads_roster = request.method == "GET" and request.path == ROSTER_ROUTE
        if not (exc.code == "peer_suspended" and reads_roster):
            service.record_refusal(exc.code, remote=remote, peer=entry.node_id)
            return _refusal(403, exc.code, str(exc))
    request[PEER] = entry
    if version > service.roster.version:
        await service.roster_hint(version, entry)
    return None


@contextlib.contextmanager
def client_errors(peer: str, url: str) -> Iterator[None]:
    """Translate aiohttp's client errors on a request to `peer` at `url` into typed ones."""
    try:
        yield
    except aiohttp.ServerFingerprintMismatch as exc:
        raise TrustError(
            f"the server at {url} is not {peer} (certificate fingerprint differs)",
            code="server_certificate_mismatch",
        ) from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        raise TrustError(
            f"the server at {url} has no certificate from the federation CA",
            code="untrusted_server",
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        raise TransportError(
            f"{peer} unreachable at {url}: {reason}", code="peer_unreachable"
        ) from exc
    except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
        raise TransportError(
            f"{peer} unreachable at {url}: {exc or type(exc).__name__}",
            code="peer_unreachable",
        ) from exc


class AnyFingerprint(aiohttp.Fingerprint):
    """A pin that accepts any of a peer's published certificates (two during a rotation)."""

    def __init__(self, fingerprints: tuple[bytes, ...]) -> None:
        super().__init__(fingerprints[0])
        self._accepted = frozenset(fingerprints)

    def check(self, transport: asyncio.Transport) -> None:
        if not transport.get_extra_info("sslcontext"):
            return
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        got = hashlib.sha256(der).digest()
        if got not in self._accepted:
            host, port, *_ = transport.get_extra_info("peername")
            raise aiohttp.ServerFingerprintMismatch(self.fingerprint, got, host, port)


class PinnedConnector(aiohttp.TCPConnector):
    """A connector that always uses our mutual-TLS context, even when a request pins a fingerprint.

    aiohttp falls back to an unverified context without a client certificate when
    `ssl=Fingerprint(...)`; we want both: the chain check and client certificate
    of our context, and the per-peer fingerprint pin from the roster.
    """

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(ssl=context, **kwargs)
        self._mtls_context = context

    def _get_ssl_context(self, req: Any) -> ssl.SSLContext:
        return self._mtls_context


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerResponse:
    """A peer's successful answer."""

    status: int
    body: bytes
    roster_version: int
    """The peer's roster version, from its response header."""
    rtt_ms: float
    """Time from sending the request to reading the whole answer."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """The response's headers (e.g. Content-Range of a file chunk)."""


class PeerClient:
    """Requests to peers over mutual TLS, each pinned to the peer's roster fingerprint."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        node_id: str,
        roster_version: Callable[[], int],
        timeout: float,
        segments: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0))
        self._session = aiohttp.ClientSession(
            connector=PinnedConnector(context, limit_per_host=8, keepalive_timeout=30),
            timeout=self._timeout,
        )
        self._node_id = node_id
        self._roster_version = roster_version
        self._segments = segments
        # aiohttp pools connections by a key that includes the Fingerprint object, which
        # compares by identity: one object per set of certificates, or every request
        # handshakes anew.
        self._pins: dict[tuple[bytes, ...], AnyFingerprint] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session every request to peers goes through."""
        return self._session

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        return self._timeout

    def roster_version(self) -> int:
        """This node's roster version now, as requests announce it."""
        return self._roster_version()

    def published(self, peer: RosterEntry) -> tuple[bytes, ...]:
        """The certificate fingerprints `peer` may present now (two during a rotation)."""
        return peer.certificates(int(self._clock()))

    def pin(self, fingerprints: tuple[bytes, ...]) -> AnyFingerprint:
        """The pin accepting `fingerprints`: one object per set, so connections are reused."""
        pin = self._pins.get(fingerprints)
        if pin is None:
            pin = self._pins[fingerprints] = AnyFingerprint(fingerprints)
        return pin

    def certificate_changed(self) -> None:
        """This node presents a new certificate from now on: new pins, so that requests
        and streams no longer reuse pooled connections handshaken with the old one
        (pooled by pin; the old ones close as they idle out). A stream opened afresh on
        such a connection would present the replaced certificate, refused once the
        roster stops accepting it."""
        self._pins = {}

    def endpoint_for(self, peer: RosterEntry) -> str:
        """Direct endpoint: one on a segment we share, else the peer's first."""
        for endpoint in peer.endpoints:
            if endpoint.segment in self._segments:
                return endpoint.url
        if not peer.endpoints:
            raise TransportError(f"peer {peer.node_id} publishes no endpoint", code="no_route")
        return peer.endpoints[0].url

    async def request(
        self,
        peer: RosterEntry,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        time_limit: float | None = None,
    ) -> PeerResponse:
        """Send one request; `TrustError` if the server is not `peer`, typed errors for refusals.

        `headers` adds request headers (e.g. Range); the answer is read whole, so a caller
        asking for large content asks for it in ranges. `time_limit` (seconds) replaces the
        client's for this request (a file range on a slow link takes longer than a batch)."""
        url = f"{self.endpoint_for(peer)}{FEDERATION_PREFIX}{path}"
        sent = {
            **(headers or {}),
            HEADER_NODE: self._node_id,
            HEADER_ROSTER: str(self._roster_version()),
        }
        if body is not None:
            sent["Content-Type"] = MSGPACK
        started = time.perf_counter()
        with client_errors(peer.node_id, url):
            async with self._session.request(
                method,
                url,
                data=body,
                headers=sent,
                ssl=self.pin(self.published(peer)),
                timeout=self._timeout
                if time_limit is None
                else aiohttp.ClientTimeout(total=time_limit, connect=self._timeout.connect),
            ) as response:
                payload = await response.read()
                status = response.status
                version = response.headers.get(HEADER_ROSTER, "0")
                answer_headers = CIMultiDict(response.headers)
        rtt_ms = (time.perf_counter() - started) * 1000
        if status >= 300:
            raise_for_error(status, payload)
        try:
            roster_version = max(0, int(version))
        except ValueError:
            roster_version = 0
        return PeerResponse(
            status=status,
            body=payload,
            roster_version=roster_version,
            rtt_ms=rtt_ms,
            headers=answer_headers,
        )

    async def close(self) -> None:
        await self._session.close()
