"""Client API figures: node processes on loopback serving the staff API over HTTPS + WebSocket.

- ws_delivery_p50_ms: two node processes, A (mie-pref) and B (tsu). A staff
  user of A posts 1 KiB messages through A's API (`POST /api/v1/rooms/{room}/messages`,
  HTTPS, one at a time, the next after the last arrived); each is timed from the
  moment its request is issued until a WebSocket client of a user of B, connected to
  B's `/api/v1/events`, has received it. p50 over `ws_messages` messages. Baseline,
  same processes, same run: the plain one-hop latency, a message posted to A's
  admin socket until B committed it (B's worker reports the commit), closed loop.
  The progress lines also give the API post's own round trip.
- ws_fanout2000_p99_ms: one node process; `ws_clients` WebSocket connections (as
  `ws_users` staff users, several connections each, like open tabs) to its
  `/api/v1/events`, all members of one room; a message posted through the API is
  timed from the request until the last connection received it; p99 over
  `ws_fanout_messages` messages. Baseline: the same with one connection, measured
  first in the same run. The connections live in this benchmark process, so the
  client's own work (TLS, frames) of 2,000 receptions is inside the figure.
"""

from __future__ import annotations

import asyncio
import base64
import resource
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import baseline
import flow
from cluster import Cluster, CpuMeter, NodeFailed, Worker
from common import percentile, progress, result

A, B = "mie-pref", "tsu"
PASSWORD = "benchmark-password-0001"
WARM = 10


def _client_ssl(worker: Worker) -> ssl.SSLContext:
    """Trust the federation CA (the API presents the node's certificate by default)."""
    context = ssl.create_default_context(cafile=str(worker.home.ca_cert))
    context.check_hostname = False
    return context


def _session(worker: Worker) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=_client_ssl(worker), limit=0)
    return aiohttp.ClientSession(connector=connector)


def _add_user(worker: Worker, login: str, name: str, role: str = "staff") -> None:
    worker.admin.request(
        "POST",
        "/v1/users",
        {"login": login, "display_name": name, "role": role, "password": PASSWORD},
    )


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, token: str | None, body: Any = None
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, json=body, headers=headers) as response:
        data = await response.json()
        if response.status >= 300:
            raise NodeFailed(f"{method} {url}: {response.status} {data}")
        return data


async def _login(session: aiohttp.ClientSession, base: str, login: str, password: str) -> str:
    answer = await _call(
        session, "POST", f"{base}/auth/login", None, {"login": login, "password": password}
    )
    return str(answer["access_token"])


async def _until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise NodeFailed(f"{what} within {seconds:.0f}s")
        await asyncio.sleep(0.1)


def _message_id(frame: str) -> str | None:
    """The id of a `message` event, without parsing the whole frame (2,000 of them)."""
    if not frame.startswith('{"type":"message"'):
        return None
    start = frame.find('"id":"')
    return frame[start + 6 : start + 70] if start >= 0 else None


# ws_delivery_p50_ms ------------------------------------------------------------------


async def _ws_delivery(a: Worker, b: Worker, count: int) -> tuple[list[float], list[float]]:
    """(post -> received on B's WebSocket, post answered) in ms, one message at a time."""
    async with _session(a) as session:
        poster = await _login(session, a.api_base, "tanaka", PASSWORD)
        reader = await _login(session, b.api_base, "suzuki", PASSWORD)
        created = await _call(
            session,
            "POST",
            f"{a.api_base}/rooms",
            poster,
            {"name": "bench", "members": [f"suzuki@{B}"]},
        )
        room = created["id"]

        async def known_at_b() -> bool:
            rooms = await _call(session, "GET", f"{b.api_base}/rooms", reader)
            return any(r["id"] == room for r in rooms["rooms"])

        await _until(known_at_b, f"the room did not reach {B}")
        arrivals: dict[str, float] = {}
        waiting: dict[str, asyncio.Future[None]] = {}
        async with session.ws_connect(f"{b.api_base}/events?access_token={reader}") as ws:
            await ws.receive(timeout=30)  # ready

            async def read() -> None:
                async for frame in ws:
                    if frame.type is not aiohttp.WSMsgType.TEXT:
                        continue
                    message_id = _message_id(frame.data)
                    if message_id is not None:
                        arrivals[message_id] = time.monotonic()
                        future = waiting.pop(message_id, None)
                        if future is not None and not future.done():
                            future.set_result(None)

            reading = asyncio.create_task(read())
            delivered: list[float] = []
            posted: list[float] = []
            url = f"{a.api_base}/rooms/{room}/messages"
            try:
                for index in range(count + WARM):
                    issued = time.monotonic()
                    sent = await _call(
                        session, "POST", url, poster, {"text": baseline.text(f"ws-{index}")}
                    )
                    answered = time.monotonic()
                    message_id = sent["id"]
                    if message_id not in arrivals:
                        future = asyncio.get_running_loop().create_future()
                        waiting[message_id] = future
                        await asyncio.wait_for(future, 30)
                    if index >= WARM:
                        delivered.append((arrivals[message_id] - issued) * 1000)
                        posted.append((answered - issued) * 1000)
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        return delivered, posted


def ws_delivery(
    sizes: flow.Sizes, base: flow.Baselines, prof: flow.Profiler
) -> list[dict[str, Any]]:
    count = sizes.ws_messages
    with flow.workdir() as tmp:
        cluster = Cluster(Path(tmp), ids=True, api=True, trace=prof.enabled)
        progress(f"forming a federation of 2 node processes ({A}, {B}) with the client API")
        cluster.form(A, [B])
        try:
            a, b = cluster.workers[A], cluster.workers[B]
            _add_user(a, "tanaka", "田中太郎", "room_admin")
            _add_user(b, "suzuki", "鈴木次郎")
            room = cluster.create_room(A, [B])
            progress(
                f"ws delivery: baseline, {count} messages one at a time, {A} admin socket -> "
                f"committed on {B}"
            )
            hop = flow._closed_loop(a, b, room, count, "hop")
            progress(
                f"ws delivery: {count} messages one at a time through {A}'s API to a WebSocket "
                f"client of {B}"
            )
            meter = CpuMeter([a, b])
            spies = prof.attach("ws_delivery", [a, b], count / 50)
            delivered, posted = asyncio.run(_ws_delivery(a, b, count))
            meter.report("ws_delivery")
            prof.finish("ws_delivery", spies)
            progress(
                "ws delivery (p50/p99 ms): API post -> WebSocket at "
                f"{B} {statistics.median(delivered):.2f}/{percentile(delivered, 0.99):.2f}; "
                f"API post answered {statistics.median(posted):.2f}/"
                f"{percentile(posted, 0.99):.2f}; "
                f"admin post -> committed on {B} (baseline) {statistics.median(hop):.2f}/"
                f"{percentile(hop, 0.99):.2f}"
            )
            return [
                result(
                    "ws_delivery_p50_ms", statistics.median(delivered), "ms", statistics.median(hop)
                )
            ]
        finally:
            cluster.stop_all()


# ws_fanout2000_p99_ms ----------------------------------------------------------------


class _Receivers:
    """WebSocket connections that count, per message id, how many of them received it."""

    def __init__(self) -> None:
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.done: dict[str, asyncio.Event] = {}

    async def connect(self, session: aiohttp.ClientSession, url: str) -> None:
        ws = await session.ws_connect(url, heartbeat=None)
        await ws.receive(timeout=60)  # ready
        self.sockets.append(ws)
        self.tasks.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                continue
            message_id = _message_id(frame.data)
            if message_id is None:
                continue
            count = self.counts.get(message_id, 0) + 1
            self.counts[message_id] = count
            if count == len(self.sockets):
                self.last[message_id] = time.monotonic()
                self.done.setdefault(message_id, asyncio.Event()).set()

    async def wait(self, message_id: str, seconds: float) -> float:
        """When the last connection received `message_id`."""
        if message_id not in self.last:
            event = self.done.setdefault(message_id, asyncio.Event())
            await asyncio.wait_for(event.wait(), seconds)
        return self.last[message_id]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


async def _post_and_wait(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    receivers: _Receivers,
    count: int,
    tag: str,
) -> list[float]:
    samples = []
    for index in range(count + 3):
        issued = time.monotonic()
        sent = await _call(session, "POST", url, token, {"text": baseline.text(f"{tag}-{index}")})
        last = await receivers.wait(sent["id"], 120.0)
        if index >= 3:
            samples.append((last - issued) * 1000)
        await asyncio.sleep(0.05)
    return samples


async def _fanout(
    a: Worker, passwords: dict[str, str], clients: int, messages: int, prof: flow.Profiler
) -> tuple[list[float], list[float]]:
    async with _session(a) as session:
        poster = await _login(session, a.api_base, "poster", PASSWORD)
        logins = sorted(passwords)
        created = await _call(
            session,
            "POST",
            f"{a.api_base}/rooms",
            poster,
            {"name": "全庁周知", "members": [f"{login}@{A}" for login in logins]},
        )
        url = f"{a.api_base}/rooms/{created['id']}/messages"
        progress(f"ws fan-out: logging in {len(logins)} staff users")
        gate = asyncio.Semaphore(4)

        async def login(name: str) -> str:
            async with gate:
                return await _login(session, a.api_base, name, passwords[name])

        tokens = await asyncio.gather(*(login(name) for name in logins))
        events = f"{a.api_base}/events?access_token="
        one = _Receivers()
        await one.connect(session, events + tokens[0])
        progress(f"ws fan-out: baseline, 1 connection, {messages} messages")
        single = await _post_and_wait(session, url, poster, one, messages, "one")
        await one.close()
        many = _Receivers()
        started = time.monotonic()
        for first in range(0, clients, 100):
            await asyncio.gather(
                *(
                    many.connect(session, events + tokens[i % len(tokens)])
                    for i in range(first, min(clients, first + 100))
                )
            )
        progress(
            f"ws fan-out: {clients:,} connections open ({len(tokens)} users) in "
            f"{time.monotonic() - started:.1f}s; {A} RSS {a.status_kb('VmRSS') / 1024:.0f} MB; "
            f"{messages} messages"
        )
        meter = CpuMeter([a])
        spies = prof.attach("ws_fanout", [a], messages)
        try:
            spread = await _post_and_wait(session, url, poster, many, messages, "many")
        finally:
            meter.report("ws_fanout")
            prof.finish("ws_fanout", spies)
            await many.close()
        return single, spread


def ws_fanout(sizes: flow.Sizes, base: flow.Baselines, prof: flow.Profiler) -> list[dict[str, Any]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sizes.ws_clients * 2 + 1000  # this process's sockets, and the node's (inherited)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))
    with flow.workdir() as tmp:
        cluster = Cluster(Path(tmp), api=True, trace=prof.enabled)
        progress(f"forming one node process ({A}) with the client API")
        cluster.form(A, [])
        try:
            a = cluster.workers[A]
            _add_user(a, "poster", "広報課", "room_admin")
            staff = [f"staff{n:04d}" for n in range(1, sizes.ws_users + 1)]
            csv = "login,display_name\n" + "".join(f"{login},職員{login[5:]}\n" for login in staff)
            issued = a.admin.request(
                "POST", "/v1/users/import", {"csv": base64.b64encode(csv.encode()).decode()}
            )
            passwords = {user["login"]: user["initial_password"] for user in issued}
            single, spread = asyncio.run(
                _fanout(a, passwords, sizes.ws_clients, sizes.ws_fanout_messages, prof)
            )
            progress(
                f"ws fan-out (p50/p99 ms): 1 connection {statistics.median(single):.1f}/"
                f"{percentile(single, 0.99):.1f}; {sizes.ws_clients:,} connections "
                f"{statistics.median(spread):.1f}/{percentile(spread, 0.99):.1f}"
            )
            return [
                result(
                    "ws_fanout2000_p99_ms", percentile(spread, 0.99), "ms", percentile(single, 0.99)
                )
            ]
        finally:
            cluster.stop_all()


FIGURES: dict[
    str, tuple[tuple[str, ...], Callable[[flow.Sizes, flow.Baselines, flow.Profiler], list[Any]]]
] = {
    "ws_delivery": (("ws_delivery_p50_ms",), ws_delivery),
    "ws_fanout": (("ws_fanout2000_p99_ms",), ws_fanout),
}
