"""One long-lived stream per peer for envelope batches: a WebSocket over the same mutual TLS.

Why: an HTTP exchange costs aiohttp about 0.3 ms of CPU on the two nodes together
(request line, headers, a response object on each side), about a quarter of what
one message costs end to end when messages come one at a time. A frame on an
open WebSocket costs a tenth of that. Nothing about trust changes: the stream is
opened by a request that passes the same gatekeeping as every other one.

Frames are msgpack maps, one per WebSocket binary message:

    request  {"body": bytes, "id": int, "path": str, "roster": int}
    answer   {"body": bytes, "id": int, "roster": int, "status": int}

(keys in sorted order, as in every map Kakehashi puts on the wire).

`path` names a route that also exists as a POST (`/envelopes`, `/relay`); `body`
and the answer's `body` and `status` are exactly what that POST would carry, so a
refusal is the same typed msgpack error. `roster` is the sender's roster version
(the `Kakehashi-Roster-Version` header of a request).

Server (`StreamServer`): the upgrade request has passed `authenticate` (a client
certificate, the one the roster publishes for the claimed node, an active member).
A stream outlives roster changes, so every frame checks again that the peer is
still active and its certificate still published; if not, the frame is refused
with 403 and the stream closed. At most `MAX_FRAMES_IN_FLIGHT` frames of one
stream are handled at once (a receiver verifies the next batch while it commits
this one); the stream is not read further until one finishes. A frame that is not
a well-formed request, or is larger than the largest POST, closes the stream and
is counted as a refusal.

Client (`PeerStreams`): a stream per peer, opened on first use and reused; a new
one when the peer's endpoint or published certificates change, or this node's own
certificate does (the old stream closes once its exchanges are answered). Answers
are matched to requests by id. When the stream breaks or an answer is late, every
exchange on it fails with `TransportError` (as a broken connection fails a POST),
the stream is closed, and the next exchange opens a new one. A refused upgrade makes
that exchange a POST, whose answer carries the typed refusal, if any; a peer that
does not offer the stream (404 from an older version, or any other refusal that is
not one of trust, e.g. from a proxy that does not pass upgrades) is sent POSTs for
`FALLBACK_S`. `[delivery] streams = false` sends POSTs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import structlog
from aiohttp import web

from federation import codec
from federation.errors import KakehashiError, ProtocolError, TransportError, TrustError
from federation.roster import RosterEntry

from . import tls
from .transport import (
    FEDERATION_PREFIX,
    HEADER_NODE,
    HEADER_ROSTER,
    MAX_BATCH_REQUEST_BYTES,
    PEER,
    FederationService,
    PeerClient,
    PeerResponse,
    client_errors,
    error_body,
    raise_for_error,
)

__all__ = [
    "FALLBACK_S",
    "MAX_FRAMES_IN_FLIGHT",
    "STREAM_PATH",
    "STREAM_ROUTE",
    "FrameHandler",
    "PeerStreams",
    "StreamServer",
    "answer_frame",
    "request_frame",
]

STREAM_PATH = "/stream"
"""Under the federation prefix."""
STREAM_ROUTE = FEDERATION_PREFIX + STREAM_PATH
MAX_FRAMES_IN_FLIGHT = 4
"""Frames of one stream handled at once on the server."""
FRAME_OVERHEAD = 1024
"""Bytes a frame may add to the body it carries (id, path, roster version)."""
FALLBACK_S = 300.0
"""How long a peer whose upgrade failed is sent POSTs before the stream is tried again."""
HEARTBEAT_S = 30.0
"""Ping interval: a stream whose peer stopped answering is closed within 1.5 times this."""

FrameHandler = Callable[[RosterEntry, bytes], Awaitable[bytes]]
"""A route's work on a stream: the authenticated peer and the body, to the answer's body."""

log = structlog.get_logger("kakehashi.stream")


def request_frame(ident: int, path: str, body: bytes, roster: int) -> bytes:
    """A request on a stream (schemas/stream-frame.schema.json)."""
    return codec.encode_frame({"body": body, "id": ident, "path": path, "roster": roster})


def answer_frame(ident: int, status: int, body: bytes, roster: int) -> bytes:
    """The answer to request `ident` (schemas/stream-frame.schema.json)."""
    return codec.encode_frame({"body": body, "id": ident, "roster": roster, "status": status})


def _frame_limits(max_bytes: int) -> codec.Limits:
    """A frame: a flat map whose body is decoded (and bounded again) by whoever reads it
    (the route for a request, the asker for an answer)."""
    return codec.Limits(max_bytes=max_bytes, max_depth=1, max_bin=max_bytes, max_map=8)


ANSWER_LIMITS = _frame_limits(MAX_BATCH_REQUEST_BYTES)


class StreamServer:
    """Serves the streams peers open; the frames' work is the node's `handlers`."""

    def __init__(
        self,
        service: FederationService,
        handlers: Mapping[str, FrameHandler],
        *,
        max_frame_bytes: int,
    ) -> None:
        self._service = service
        self._handlers = dict(handlers)
        self._max_frame_bytes = max_frame_bytes + FRAME_OVERHEAD
        self._limits = _frame_limits(self._max_frame_bytes)
        self._open: set[web.WebSocketResponse] = set()

    @property
    def open_count(self) -> int:
        """Streams peers hold open to this node now."""
        return len(self._open)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The upgrade (already authenticated by the federation app's middleware)."""
        peer = request[PEER]
        transport = request.transport
        der = tls.peer_certificate_der(
            transport.get_extra_info("ssl_object") if transport is not None else None
        )
        if der is None:  # authenticate let it through, so it cannot happen; fail closed
            raise TrustError("a client certificate is required", code="client_certificate_required")
        fingerprint = tls.fingerprint_der(der)
        ws = web.WebSocketResponse(
            max_msg_size=self._max_frame_bytes, compress=False, heartbeat=HEARTBEAT_S
        )
        await ws.prepare(request)
        self._open.add(ws)
        bound = log.bind(peer=peer.node_id, remote=request.remote)
        bound.info("stream_opened")
        slots = asyncio.Semaphore(MAX_FRAMES_IN_FLIGHT)
        working: set[asyncio.Task[None]] = set()
        reason = "closed"
        try:
            while True:
                await slots.acquire()
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    slots.release()
                    reason = self._ended(peer.node_id, request.remote, msg)
                    break
                frame = self._parse(msg.data, self._limits)
                if frame is None:
                    slots.release()
                    self._service.record_refusal(
                        "bad_frame", remote=request.remote, peer=peer.node_id
                    )
                    reason = "bad_frame"
                    await ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR, message=b"bad frame")
                    break
                task = asyncio.create_task(self._serve(ws, peer.node_id, fingerprint, *frame))
                working.add(task)
                task.add_done_callback(working.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            # Work already started finishes (a batch being committed is committed); its
            # answer is lost if the stream is gone, and the sender sends it again.
            if working:
                await asyncio.gather(*working, return_exceptions=True)
            self._open.discard(ws)
            bound.info("stream_closed", reason=reason)
        return ws

    def _ended(self, peer: str, remote: str | None, msg: aiohttp.WSMessage) -> str:
        if msg.type is aiohttp.WSMsgType.ERROR:
            error = msg.data
            if isinstance(error, aiohttp.WebSocketError) and (
                error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            ):
                self._service.record_refusal("too_large", remote=remote, peer=peer)
                return "too_large"
            self._service.record_refusal("bad_frame", remote=remote, peer=peer, error=str(error))
            return "bad_frame"
        if msg.type is aiohttp.WSMsgType.TEXT:
            self._service.record_refusal("bad_frame", remote=remote, peer=peer, error="text frame")
            return "bad_frame"
        return "closed"

    @staticmethod
    def _parse(data: bytes, limits: codec.Limits) -> tuple[int, str, bytes, int] | None:
        try:
            frame = codec.decode_map(data, limits, canonical=False)
        except KakehashiError:
            return None
        ident, path, body, roster = (
            frame.get("id"),
            frame.get("path"),
            frame.get("body"),
            frame.get("roster", 0),
        )
        if (
            not isinstance(ident, int)
            or not isinstance(path, str)
            or not isinstance(body, bytes)
            or not isinstance(roster, int)
        ):
            return None
        return ident, path, body, max(0, roster)

    async def _serve(
        self,
        ws: web.WebSocketResponse,
        node_id: str,
        fingerprint: bytes,
        ident: int,
        path: str,
        body: bytes,
        version: int,
    ) -> None:
        service = self._service
        status, answer, close = 200, b"", False
        try:
            entry = service.roster.member(node_id)
            if entry is None or fingerprint not in entry.certificates(int(service.now())):
                raise TrustError(
                    f"the certificate of {node_id!r} is no longer the one the roster publishes",
                    code="certificate_replaced",
                )
            service.roster.active_member(node_id)
            if version > service.roster.version:
                await service.roster_hint(version, entry)
            handler = self._handlers.get(path)
            if handler is None:
                raise ProtocolError(f"no stream route {path!r}", code="unknown_route", status=404)
            answer = await handler(entry, body)
        except KakehashiError as exc:
            status = getattr(exc, "status", 400)  # as the federation app answers a POST
            close = status in (401, 403)  # as a refused POST closes its connection
            service.record_refusal(
                exc.code, peer=node_id, path=FEDERATION_PREFIX + path, message=str(exc)
            )
            answer = error_body(exc.code, str(exc), exc.hint)
        except Exception:  # a bug must not take the stream down unanswered
            log.exception("handler_failed", path=path, peer=node_id)
            status = 500
            answer = error_body("internal_error", "the node failed to handle the request")
        frame = answer_frame(ident, status, answer, service.roster.version)
        with contextlib.suppress(ConnectionError, RuntimeError):
            if not ws.closed:
                await ws.send_bytes(frame)
            if close:
                await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"refused")

    async def shutdown(self, app: web.Application | None = None) -> None:
        """Close every open stream (the node is stopping): peers reconnect elsewhere or later."""
        for ws in list(self._open):
            with contextlib.suppress(Exception):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node stopping")


class _Stream:
    """One open stream to a peer: its socket, its reader and the exchanges awaiting answers."""

    def __init__(
        self, peer: str, key: tuple[str, tuple[bytes, ...]], ws: aiohttp.ClientWebSocketResponse
    ) -> None:
        self.peer = peer
        self.key = key
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[tuple[int, bytes, int]]] = {}
        self.closed = False
        self.retiring = False
        """Replaced (a certificate or endpoint changed): closes once nothing waits on it."""
        self.closer: asyncio.Task[None] | None = None
        self.reader = asyncio.create_task(self._read(), name=f"stream-{peer}")

    async def _read(self) -> None:
        reason = "closed by the peer"
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    reason = f"unexpected {msg.type.name} frame"
                    break
                try:
                    frame = codec.decode_map(msg.data, ANSWER_LIMITS, canonical=False)
                    ident, status, body = frame["id"], frame["status"], frame["body"]
                    version = frame.get("roster", 0)
                except (KakehashiError, KeyError):
                    reason = "unreadable answer"
                    break
                waiter = self.waiting.pop(ident, None) if isinstance(ident, int) else None
                if waiter is not None and not waiter.done():
                    good = isinstance(status, int) and isinstance(body, bytes)
                    roster = version if isinstance(version, int) else 0
                    waiter.set_result((status, body, roster) if good else (502, b"", 0))
        except (aiohttp.ClientError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self.fail(reason)

    def fail(self, reason: str) -> None:
        """Every exchange still waiting fails; the stream is not used again."""
        self.closed = True
        waiting, self.waiting = self.waiting, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(
                    TransportError(
                        f"stream to {self.peer} broke: {reason}", code="peer_unreachable"
                    )
                )

    async def exchange(self, path: str, body: bytes, roster: int) -> tuple[int, bytes, int]:
        if self.closed:
            raise TransportError(f"stream to {self.peer} is closed", code="peer_unreachable")
        ident = next(self.ids)
        waiter: asyncio.Future[tuple[int, bytes, int]] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = waiter
        try:
            await self.ws.send_bytes(request_frame(ident, path, body, roster))
            return await waiter
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self.fail(str(exc) or type(exc).__name__)
            raise TransportError(
                f"stream to {self.peer} broke: {exc or type(exc).__name__}",
                code="peer_unreachable",
            ) from exc
        finally:
            self.waiting.pop(ident, None)
            if self.retiring:
                self._close_when_idle()

    def retire(self) -> None:
        """Take no new exchange; close once the ones on their way have their answers."""
        self.retiring = True
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if not self.waiting and self.closer is None:
            self.closer = asyncio.create_task(self.close(), name=f"stream-close-{self.peer}")

    async def close(self) -> None:
        self.fail("closed")
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


class PeerStreams:
    """The client side: exchanges with peers on their streams, by POST when there is none."""

    def __init__(self, client: PeerClient, *, enabled: bool = True) -> None:
        self._client = client
        self._enabled = enabled
        self._streams: dict[str, _Stream] = {}
        self._retired: list[_Stream] = []
        self._opening: dict[str, asyncio.Lock] = {}
        self._no_stream_until: dict[str, float] = {}

    def is_open(self, peer: str) -> bool:
        """Whether a stream to `peer` is open now."""
        stream = self._streams.get(peer)
        return stream is not None and not stream.closed

    async def exchange(self, peer: RosterEntry, path: str, body: bytes) -> PeerResponse:
        """What `PeerClient.request(peer, "POST", path, body)` does, on the peer's stream.

        Refusals raise their typed error, a broken stream or a late answer
        `TransportError`; a peer not reached through a stream now is sent a POST."""
        stream = None
        if self._enabled and self._no_stream_until.get(peer.node_id, 0.0) <= time.monotonic():
            stream = await self._stream(peer)
        if stream is None:
            return await self._client.request(peer, "POST", path, body)
        started = time.perf_counter()
        limit = self._client.timeout.total
        try:
            async with asyncio.timeout(limit):
                status, answer, version = await stream.exchange(
                    path, body, self._client.roster_version()
                )
        except TimeoutError:
            # As a POST's timeout drops its connection: the late answer is not waited for.
            await self._drop(peer.node_id, stream, "answer too late")
            raise TransportError(
                f"{peer.node_id} did not answer within {limit} s", code="peer_unreachable"
            ) from None
        if status >= 300:
            raise_for_error(status, answer)
        return PeerResponse(
            status=status,
            body=answer,
            roster_version=version,
            rtt_ms=(time.perf_counter() - started) * 1000,
        )

    async def _stream(self, peer: RosterEntry) -> _Stream | None:
        url = self._client.endpoint_for(peer)
        fingerprints = self._client.published(peer)
        key = (url, fingerprints)
        stream = self._streams.get(peer.node_id)
        if stream is not None and not stream.closed and stream.key == key:
            return stream
        async with self._opening.setdefault(peer.node_id, asyncio.Lock()):
            if self._no_stream_until.get(peer.node_id, 0.0) > time.monotonic():
                return None  # a call waiting here behind one that found no stream offered
            stream = self._streams.get(peer.node_id)
            if stream is not None and not stream.closed and stream.key == key:
                return stream
            if stream is not None and not stream.closed:
                # The peer moved or rotated its certificate: what is on its way on the old
                # stream is answered there (its certificate is accepted during the overlap).
                del self._streams[peer.node_id]
                self._retire(stream)
                log.info("stream_replaced", peer=peer.node_id)
            ws = await self._connect(peer, url, fingerprints)
            if ws is None:
                return None
            stream = self._streams[peer.node_id] = _Stream(peer.node_id, key, ws)
            log.info("stream_connected", peer=peer.node_id)
            return stream

    async def _connect(
        self, peer: RosterEntry, url: str, fingerprints: tuple[bytes, ...]
    ) -> aiohttp.ClientWebSocketResponse | None:
        target = f"{url}{STREAM_ROUTE}"
        with client_errors(peer.node_id, url):
            try:
                return await self._client.session.ws_connect(
                    target,
                    ssl=self._client.pin(fingerprints),
                    headers={
                        HEADER_NODE: self._client.node_id,
                        HEADER_ROSTER: str(self._client.roster_version()),
                    },
                    max_msg_size=MAX_BATCH_REQUEST_BYTES,
                    compress=0,
                    heartbeat=HEARTBEAT_S,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
            except aiohttp.WSServerHandshakeError as exc:
                # The POST that follows carries the typed refusal, if any. A refusal of trust
                # (401/403) is the peer's answer to this node, not to streams: the stream is
                # tried again as soon as it is lifted.
                if exc.status not in (401, 403):
                    # A peer of an older version (404), or a proxy that does not pass
                    # upgrades: POSTs serve it until the stream is tried again.
                    self._no_stream_until[peer.node_id] = time.monotonic() + FALLBACK_S
                    log.info(
                        "stream_not_offered",
                        peer=peer.node_id,
                        status=exc.status,
                        retry_in_s=FALLBACK_S,
                    )
                return None

    async def _drop(self, peer: str, stream: _Stream, reason: str) -> None:
        if self._streams.get(peer) is stream:
            del self._streams[peer]
        log.info("stream_dropped", peer=peer, reason=reason)
        await stream.close()

    def renew(self) -> None:
        """This node's certificate changed: the next exchange with each peer opens a new
        stream (a handshake with the new certificate); the open ones carry on with what
        they carry, then close. Left open, a stream would present the replaced certificate
        until the roster stops accepting it, and its next batch would be refused."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._retire(stream)
        if streams:
            log.info("streams_renewed", count=len(streams))

    def _retire(self, stream: _Stream) -> None:
        self._retired = [old for old in self._retired if not old.closed]
        stream.retire()
        self._retired.append(stream)

    async def close(self) -> None:
        """Close every stream (the node is stopping)."""
        streams, self._streams = self._streams, {}
        for stream in [*streams.values(), *self._retired]:
            await stream.close()
            if stream.closer is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stream.closer
        self._retired.clear()
