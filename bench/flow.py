"""Delivery figures: node processes on loopback, 1 KiB messages, durable commits, real mTLS.

Each figure is printed beside a same-run baseline (bench/baseline.py): what one
core does of encode + Merkle + verify with no I/O.

- two_node_throughput_eps: two node processes, A sends to B. The benchmark posts
  messages to A's admin socket (`POST /v1/rooms/send`, 1000 texts a request, as
  `kakehashi room send -` does) as fast as A takes them; the figure is messages
  over the time from the first post to B's commit of the last. Baseline: the
  one-core pipeline rate in batches of 1000.
- one_hop_latency_p50_ms / _p99_ms: processes again; messages posted to A one per
  request at a fixed offered rate (500/s, open loop), each timed from the moment
  its request is issued to A's admin socket to B's commit of it (B's worker
  reports each commit with CLOCK_MONOTONIC, shared by every process). Baseline:
  the one-core pipeline for a lone envelope (p50 / p99).
- fanout30_p99_ms: one room of 30 node processes; a message posted to the home
  node, timed until the last of the 29 others committed it; p99 over the
  messages. Baseline: p99 of one core sealing a lone envelope and decoding +
  verifying it 29 times.
- catchup_eps: B stopped, messages sent on A, B started; messages over the time
  from B having started (serving) to B's commit of the last. Baseline: the
  one-core pipeline rate.
- relay_throughput_eps / relay_throughput_ratio / relay_added_latency_p50_ms:
  four processes, a relay R on two segments, A and C on one, B on the other. A
  sends to C directly and to B through R (not a room member: verify, store,
  forward). Throughput as above; latency one message at a time (closed loop),
  A's post to the receiver's commit. Baseline: the direct A -> C figures from the
  same processes in the same run.
- outbox_1m_rss_mb: messages sent on A to a room with B, which is down (never
  started), so they all stay queued in B's outbox; the figure is A's peak RSS
  (VmHWM) while it queues them and after a restart with them queued. Baseline:
  RSS of the idle node before the first send.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import baseline
from cluster import PY_SPY, Cluster, CpuMeter, NodeFailed, Spy, Worker
from common import percentile, progress, result
from spy import summarize
from tracing import format_rows

A, B = "mie-pref", "tsu"
PROFILES = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each figure's run is (full, or about a tenth with --quick)."""

    chunk: int = 1000
    """Messages per admin send request (what `kakehashi room send -` posts)."""
    throughput: int = 100_000
    latency_rate: int = 500
    latency_seconds: float = 10.0
    fanout_nodes: int = 30
    fanout_messages: int = 50
    catchup: int = 100_000
    outbox: int = 1_000_000
    relay: int = 30_000
    ws_messages: int = 200
    """Messages timed for ws_delivery_p50_ms (and its one-hop baseline)."""
    ws_clients: int = 2000
    ws_users: int = 100
    """Staff users the ws_clients connections log in as (several tabs each)."""
    ws_fanout_messages: int = 20
    file_mb: int = 200
    """Size of the file of the transfer figures (bench/transfer.py), in MiB."""
    storage: int = 250_000
    """Envelopes committed by each run of the storage figures (bench/storage.py)."""


FULL = Sizes()
QUICK = Sizes(
    throughput=10_000,
    latency_seconds=1.0,
    fanout_nodes=6,
    fanout_messages=10,
    catchup=10_000,
    outbox=100_000,
    relay=5_000,
    ws_messages=50,
    ws_clients=200,
    ws_users=20,
    ws_fanout_messages=10,
    file_mb=20,
    storage=50_000,
)


class Baselines:
    """Same-run baselines, each measured once when first needed."""

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self._eps: float | None = None
        self._single: list[float] | None = None
        self._fanout: dict[int, list[float]] = {}

    def eps(self) -> float:
        if self._eps is None:
            progress(
                f"baseline: one core, seal + to_bytes + from_bytes + verify, batches of "
                f"{self.sizes.chunk}"
            )
            self._eps = baseline.throughput_eps(self.sizes.chunk)
            progress(f"baseline: {self._eps:,.0f} envelopes/s on one core")
        return self._eps

    def single(self) -> list[float]:
        if self._single is None:
            self._single = baseline.single_ms(2000)
            progress(
                f"baseline: lone envelope p50 {statistics.median(self._single):.3f} ms, "
                f"p99 {percentile(self._single, 0.99):.3f} ms on one core"
            )
        return self._single

    def fanout(self, receivers: int) -> list[float]:
        if receivers not in self._fanout:
            self._fanout[receivers] = baseline.fanout_ms(receivers, 200)
        return self._fanout[receivers]


class Profiler:
    """With --profile: py-spy on chosen node processes during a measured phase, and the
    wall-clock timing of their storage and delivery steps (bench/tracing.py)."""

    def __init__(self, enabled: bool) -> None:
        if enabled and not PY_SPY.exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[profile]'")
        self.enabled = enabled
        self.summaries: list[str] = []

    def attach(self, figure: str, workers: list[Worker], seconds: float) -> list[Spy]:
        if not self.enabled:
            return []
        PROFILES.mkdir(exist_ok=True)
        for worker in workers:
            worker.trace_dump()  # start the timing table afresh
        self._started = time.monotonic()
        return [
            # py-spy runs until `finish` interrupts it; the duration is only a distant cap.
            Spy(w, PROFILES / f"{figure}-{w.node_id}.raw", 10 * seconds + 120)
            for w in workers
            if w.running
        ]

    def finish(self, figure: str, spies: list[Spy]) -> None:
        if not self.enabled:
            return
        wall = time.monotonic() - self._started
        for spy in spies:
            rows = spy.worker.trace_dump()
            path = spy.finish()
            text = f"== {figure}, node {spy.worker.node_id}\n"
            text += summarize(path) if path is not None else "no py-spy output\n"
            if rows:
                text += "  wall-clock timing of storage and delivery steps:\n"
                text += format_rows(rows, wall)
            out = PROFILES / f"{figure}-{spy.worker.node_id}.txt"
            out.write_text(text)
            self.summaries.append(text)
            progress(f"profile written to {out}")


KEEP = False  # --keep: leave node homes and logs behind for a look


@contextlib.contextmanager
def workdir() -> Iterator[str]:
    """A fresh directory for one figure's nodes (removed afterwards unless --keep)."""
    if KEEP:
        path = tempfile.mkdtemp(prefix="kakehashi-bench-")
        progress(f"keeping node homes and logs in {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="kakehashi-bench-") as path:
            yield path


def _send(worker: Worker, room: str, texts: list[str]) -> list[str]:
    return list(
        worker.admin.request("POST", "/v1/rooms/send", {"room": room, "texts": texts})["ids"]
    )


def send_many(
    worker: Worker,
    room: str,
    count: int,
    chunk: int,
    tag: str,
    *,
    label: str,
    each: Callable[[], None] | None = None,
    in_flight: int = 1,
) -> float:
    """Post `count` 1 KiB messages to `worker` in requests of `chunk`, `in_flight` requests
    at a time (each answered after its durable commit); returns seconds taken."""
    started = time.monotonic()
    step = max(chunk, count // 10 // chunk * chunk)
    firsts = iter(range(0, count, chunk))
    done = 0

    def post(first: int) -> int:
        texts = [baseline.text(f"{tag}-{i}") for i in range(first, min(count, first + chunk))]
        _send(worker, room, texts)
        return len(texts)

    with concurrent.futures.ThreadPoolExecutor(max_workers=in_flight) as pool:
        waiting = {pool.submit(post, first) for first in itertools.islice(firsts, in_flight)}
        while waiting:
            finished, waiting = concurrent.futures.wait(
                waiting, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                done += future.result()
                if each is not None:
                    each()
                if done % step == 0 and done < count:
                    elapsed = time.monotonic() - started
                    progress(f"{label}: {done:,}/{count:,} posted ({done / elapsed:,.0f}/s)")
                following = next(firsts, None)
                if following is not None:
                    waiting.add(pool.submit(post, following))
    return time.monotonic() - started


POSTS_IN_FLIGHT = 2
"""Requests the throughput figure keeps posting at once."""


def _two_nodes(
    root: Path, *, ids: bool = False, start_b: bool = True, trace: bool = False
) -> tuple[Cluster, str]:
    cluster = Cluster(root, ids=ids, trace=trace)
    progress(f"forming a federation of 2 node processes ({A}, {B}) in {root}")
    cluster.form(A, [B], start_members=start_b)
    room = cluster.create_room(A, [B])
    return cluster, room


def _timeout_for(count: int) -> float:
    return 120.0 + count / 500.0


# figures ------------------------------------------------------------------------------


def two_node_throughput(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    reference = base.eps()
    count = sizes.throughput
    with workdir() as tmp:
        cluster, room = _two_nodes(Path(tmp), trace=prof.enabled)
        try:
            a, b = cluster.workers[A], cluster.workers[B]
            warm = 2 * sizes.chunk
            send_many(a, room, warm, sizes.chunk, "warm", label="warm-up")
            if b.wait_count(warm, _timeout_for(warm)) is None:
                raise NodeFailed("warm-up messages did not arrive")
            progress(f"throughput: posting {count:,} messages to {A}, delivered to {B}")
            meter = CpuMeter([a, b])
            spies = prof.attach("two_node_throughput_eps", [a, b], count / 2000)
            started = time.monotonic()
            # Two requests in flight, as staff post concurrently: with one, A would idle
            # while the benchmark builds the next request after each durable commit.
            posting = send_many(
                a, room, count, sizes.chunk, "tp", label="throughput", in_flight=POSTS_IN_FLIGHT
            )
            progress(
                f"throughput: {A} took all posts in {posting:.1f}s ({count / posting:,.0f}/s); "
                f"waiting for {B}"
            )
            done_at = b.wait_count_alive(warm + count, _timeout_for(count), "throughput")
            used = meter.report("two_node_throughput")
            progress(
                "throughput: written per message (database, log, temporary files, sockets): "
                + ", ".join(f"{n} {used[n]['written'] / count / 1000:.1f} kB" for n in (A, B))
            )
            prof.finish("two_node_throughput_eps", spies)
            if done_at is None:
                elapsed = time.monotonic() - started
                got = b.count - warm
                progress(f"WARNING: only {got:,} of {count:,} arrived in {elapsed:.0f}s")
                value = got / elapsed
            else:
                value = count / (done_at - started)
            held_a, held_b = cluster.room_count(A, room), cluster.room_count(B, room)
            progress(
                f"throughput: room list --json envelopes: {A} {held_a:,}, {B} {held_b:,}"
                + ("" if held_a == held_b else "  MISMATCH")
            )
            return [result("two_node_throughput_eps", value, "1/s", reference)]
        finally:
            cluster.stop_all()


class _Poster:
    """A minimal HTTP/1.1 client for the admin socket: keep-alive connections, one request
    at a time on each, as many connections as requests in flight.

    The latency figure shares two cores between the two nodes and the process that
    offers them the load, so the CPU the load takes to offer is taken from the nodes.
    With an aiohttp session this process used 0.30 of a core at 500 messages/s (the
    nodes about 1.0); with this client, which writes each request in one call and reads
    the answer through an asyncio stream, 0.18. The nodes get the same requests."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            self._all.append(writer)
        writer.write(head + payload)
        status_and_headers = await reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"no Content-Length in the answer to {path}: {lines[0]}")
        data = await reader.readexactly(length)
        self._idle.append((reader, writer))
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {data[:200]!r}")
        return json.loads(data)

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
        for writer in self._all:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _offered_load(
    socket_path: Path, room: str, count: int, per_second: int
) -> list[tuple[float, str]]:
    """Post one message per request at a fixed rate (open loop); (issued, id prefix) each."""
    poster = _Poster(socket_path)

    async def one(index: int, issued: float) -> tuple[float, str]:
        body = {"room": room, "texts": [baseline.text(f"lat-{index}")]}
        data = await poster.post("/v1/rooms/send", body)
        return issued, str(data["ids"][0])[:16]

    try:
        tasks = []
        started = time.monotonic()
        for index in range(count):
            delay = started + index / per_second - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, time.monotonic())))
        return await asyncio.gather(*tasks)
    finally:
        await poster.close()


def _unloaded(a: Worker, b: Worker, room: str, count: int) -> None:
    """Closed loop, for the breakdown: one message at a time, the next after B committed it."""
    posts, local, hop, total = [], [], [], []
    for index in range(count + 10):
        issued = time.monotonic()
        prefix = _send(a, room, [baseline.text(f"probe-{index}")])[0][:16]
        answered = time.monotonic()
        at_b = b.wait_ids([prefix], 30.0).get(prefix)
        at_a = a.wait_ids([prefix], 30.0).get(prefix)
        if index < 10 or at_a is None or at_b is None:
            continue
        posts.append((answered - issued) * 1000)
        local.append((at_a - issued) * 1000)
        hop.append((at_b - at_a) * 1000)
        total.append((at_b - issued) * 1000)
    progress(
        f"latency unloaded (one message at a time, {len(total)} messages; p50/p99 ms): "
        f"post answered {statistics.median(posts):.2f}/{percentile(posts, 0.99):.2f} "
        f"(so at most ~{1000 / statistics.median(posts):,.0f} single-message posts/s); "
        f"post -> committed on A {statistics.median(local):.2f}/{percentile(local, 0.99):.2f}; "
        f"A -> committed on B {statistics.median(hop):.2f}/{percentile(hop, 0.99):.2f}; "
        f"end to end {statistics.median(total):.2f}/{percentile(total, 0.99):.2f}"
    )


def one_hop_latency(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    single = base.single()
    count = int(sizes.latency_rate * sizes.latency_seconds)
    skip = max(50, count // 10)  # warm-up, excluded
    with workdir() as tmp:
        cluster, room = _two_nodes(Path(tmp), ids=True, trace=prof.enabled)
        try:
            a, b = cluster.workers[A], cluster.workers[B]
            progress(
                f"latency: {count + skip:,} messages posted to {A} at {sizes.latency_rate}/s "
                f"(first {skip} are warm-up), each timed to its commit on {B}"
            )
            _unloaded(a, b, room, max(20, count // 25))
            meter = CpuMeter([a, b])
            spies = prof.attach("one_hop_latency", [a, b], (count + skip) / sizes.latency_rate)
            sent = asyncio.run(
                _offered_load(a.home.admin_socket, room, count + skip, sizes.latency_rate)
            )
            progress(f"latency: every post answered; waiting for {B} to commit them all")
            prefixes = [p for _, p in sent]
            at_b = b.wait_ids(prefixes, 60.0 + len(prefixes) / 100)
            at_a = a.wait_ids(prefixes, 10.0)
            meter.report("one_hop_latency")
            prof.finish("one_hop_latency", spies)
            measured = sent[skip:]
            times_b = sorted(at_b.values())
            if len(times_b) > 1:
                offered_s = len(sent) / sizes.latency_rate
                achieved = (len(times_b) - 1) / (times_b[-1] - times_b[0])
                progress(
                    f"latency: offered {sizes.latency_rate}/s for {offered_s:.1f}s; {B} committed "
                    f"them at {achieved:,.0f}/s (the last one {times_b[-1] - sent[-1][0]:.2f}s "
                    "after the last post was issued)"
                )
            lost = [p for _, p in measured if p not in at_b]
            if lost:
                progress(f"WARNING: {len(lost)} messages never committed on {B} within 60s")
            total = [(at_b[p] - t) * 1000 for t, p in measured if p in at_b]
            local = [(at_a[p] - t) * 1000 for t, p in measured if p in at_a]
            hop = [(at_b[p] - at_a[p]) * 1000 for _, p in measured if p in at_b and p in at_a]
            progress(
                "latency breakdown (p50/p99 ms): post -> committed on A "
                f"{statistics.median(local):.2f}/{percentile(local, 0.99):.2f}; "
                f"committed on A -> committed on B {statistics.median(hop):.2f}/"
                f"{percentile(hop, 0.99):.2f}; end to end {statistics.median(total):.2f}/"
                f"{percentile(total, 0.99):.2f}"
            )
            return [
                result(
                    "one_hop_latency_p50_ms",
                    statistics.median(total),
                    "ms",
                    statistics.median(single),
                ),
                result(
                    "one_hop_latency_p99_ms",
                    percentile(total, 0.99),
                    "ms",
                    percentile(single, 0.99),
                ),
            ]
        finally:
            cluster.stop_all()


def fanout(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    nodes = sizes.fanout_nodes
    reference = base.fanout(nodes - 1)
    members = [f"town-{i:02d}" for i in range(1, nodes)]
    with workdir() as tmp:
        cluster = Cluster(Path(tmp), ids=True, trace=prof.enabled)
        try:
            progress(f"fan-out: forming a federation of {nodes} node processes in {tmp}")
            formed = time.monotonic()
            cluster.form(A, members)
            progress(
                f"fan-out: {nodes} nodes running, rosters converged "
                f"({time.monotonic() - formed:.1f}s); creating the room"
            )
            room = cluster.create_room(A, members)
            home = cluster.workers[A]
            receivers = [cluster.workers[m] for m in members]
            rss = sum(w.status_kb("VmRSS") for w in cluster.workers.values()) / 1024
            progress(f"fan-out: room of {nodes} nodes ready; {rss:,.0f} MB RSS in all")
            warm = 3
            total = sizes.fanout_messages + warm
            progress(
                f"fan-out: {total} messages one at a time ({warm} warm-up), each timed "
                f"until all {nodes - 1} other nodes committed it"
            )
            meter = CpuMeter(cluster.workers.values())
            spies = prof.attach("fanout30", [home], total * 0.3)
            samples: list[float] = []
            slowest: list[str] = []
            at_home: list[float] = []  # post -> committed at the home node
            spread: list[float] = []  # committed at the home -> committed at the last receiver
            for index in range(total):
                issued = time.monotonic()
                prefix = _send(home, room, [baseline.text(f"fan-{index}")])[0][:16]
                done: list[float] = []
                for worker in receivers:
                    seen = worker.wait_ids([prefix], 30.0)
                    if prefix not in seen:
                        raise NodeFailed(f"{worker.node_id} did not commit message {index}")
                    done.append(seen[prefix])
                if index >= warm:
                    samples.append((max(done) - issued) * 1000)
                    local = home.wait_ids([prefix], 5.0).get(prefix)
                    if local is not None:
                        at_home.append((local - issued) * 1000)
                        spread.append((max(done) - local) * 1000)
                    last = receivers[done.index(max(done))].node_id
                    slowest.append(last)
                    if (index - warm + 1) % 10 == 0:
                        progress(
                            f"fan-out: {index - warm + 1}/{sizes.fanout_messages} "
                            f"(last {samples[-1]:.0f} ms, slowest {last})"
                        )
                time.sleep(0.05)
            meter.report("fanout")
            prof.finish("fanout30", spies)
            progress(
                f"fan-out: p50 {statistics.median(samples):.1f} ms, max {max(samples):.1f} ms "
                f"over {len(samples)} messages to {nodes - 1} nodes"
            )
            if at_home:
                progress(
                    f"fan-out breakdown (p50/p99 ms): post -> committed at {A} "
                    f"{statistics.median(at_home):.1f}/{percentile(at_home, 0.99):.1f}; "
                    f"then -> committed at the last of {nodes - 1} "
                    f"{statistics.median(spread):.1f}/{percentile(spread, 0.99):.1f}; "
                    f"slowest node most often: {max(set(slowest), key=slowest.count)}"
                )
            return [
                result(
                    "fanout30_p99_ms", percentile(samples, 0.99), "ms", percentile(reference, 0.99)
                )
            ]
        finally:
            progress("fan-out: stopping the nodes")
            cluster.stop_all()


def _caught_up(worker: Worker) -> int:
    """Envelopes B's catch-up pulled, from its `caught_up` log events."""
    pulled = 0
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if '"caught_up"' in line:
            try:
                pulled += int(json.loads(line).get("envelopes", 0))
            except ValueError:
                continue
    return pulled


def catchup(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    reference = base.eps()
    count = sizes.catchup
    with workdir() as tmp:
        cluster, room = _two_nodes(Path(tmp), trace=prof.enabled)
        try:
            a, b = cluster.workers[A], cluster.workers[B]
            warm = sizes.chunk
            send_many(a, room, warm, sizes.chunk, "warm", label="warm-up")
            if b.wait_count(warm, _timeout_for(warm)) is None:
                raise NodeFailed("warm-up messages did not arrive")
            b.stop()
            pulled_before = _caught_up(b)
            progress(f"catch-up: {B} stopped; posting {count:,} messages to {A}")
            send_many(a, room, count, sizes.chunk, "cu", label="catch-up")
            progress(f"catch-up: starting {B}")
            b.spawn()
            ready = b.wait_ready()
            meter = CpuMeter([a, b])
            spies = prof.attach("catchup_eps", [a, b], count / 3000)
            done_at = b.wait_count_alive(count, _timeout_for(count), "catch-up")
            meter.report("catch-up")
            prof.finish("catchup_eps", spies)
            if done_at is None:
                elapsed = time.monotonic() - ready
                progress(f"WARNING: only {b.count:,} of {count:,} caught up in {elapsed:.0f}s")
                value = b.count / elapsed
            else:
                value = count / (done_at - ready)
                deadline = time.monotonic() + 5.0  # the log line follows the last commit
                while _caught_up(b) == pulled_before and time.monotonic() < deadline:
                    time.sleep(0.1)
                progress(
                    f"catch-up: {count:,} in {done_at - ready:.2f}s from {B} serving "
                    f"({done_at - b.spawned_at:.2f}s from process start, "
                    f"{count / (done_at - b.spawned_at):,.0f}/s); "
                    f"{_caught_up(b) - pulled_before:,} pulled by catch-up, the rest pushed "
                    f"by {A}'s outbox"
                )
            held_a, held_b = cluster.room_count(A, room), cluster.room_count(B, room)
            progress(
                f"catch-up: room list --json envelopes: {A} {held_a:,}, {B} {held_b:,}"
                + ("" if held_a == held_b else "  MISMATCH")
            )
            return [result("catchup_eps", value, "1/s", reference)]
        finally:
            cluster.stop_all()


def outbox_rss(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    count = sizes.outbox
    with workdir() as tmp:
        cluster, room = _two_nodes(Path(tmp), start_b=False, trace=prof.enabled)
        try:
            a = cluster.workers[A]
            time.sleep(1.0)
            idle = a.status_kb("VmRSS") / 1024
            progress(
                f"outbox: idle {A} RSS {idle:.1f} MB; {B} is down; posting {count:,} "
                f"messages, all queued for {B}"
            )
            peak = [0]

            def sample() -> None:
                peak[0] = max(peak[0], a.status_kb("VmRSS"))

            spies = prof.attach("outbox_1m_rss_mb", [a], count / 4000)
            meter = CpuMeter([a])
            send_many(a, room, count, sizes.chunk, "ob", label="outbox", each=sample)
            meter.report("outbox fill")
            prof.finish("outbox_1m_rss_mb", spies)
            depth = next(
                p["outbox"] for p in a.admin.request("GET", "/v1/peers") if p["node_id"] == B
            )
            time.sleep(3.0)
            sample()
            first_hwm = a.status_kb("VmHWM") / 1024
            progress(
                f"outbox: {depth:,} queued for {B}; {A} RSS now {a.status_kb('VmRSS') / 1024:.1f}"
                f" MB, peak sampled {peak[0] / 1024:.1f} MB, VmHWM {first_hwm:.1f} MB; "
                "restarting it"
            )
            a.stop()
            ready = a.start()
            progress(
                f"outbox: {A} restarted in {ready - a.spawned_at:.1f}s (process start to "
                "serving, with the queue loaded)"
            )
            time.sleep(5.0)  # the sender for B starts, reads a batch, fails, backs off
            now = a.status_kb("VmRSS") / 1024
            second_hwm = a.status_kb("VmHWM") / 1024
            progress(
                f"outbox: after restart with {depth:,} queued: RSS {now:.1f} MB, "
                f"VmHWM {second_hwm:.1f} MB"
            )
            return [result("outbox_1m_rss_mb", max(first_hwm, second_hwm), "MB", idle)]
        finally:
            cluster.stop_all()


def _closed_loop(a: Worker, to: Worker, room: str, count: int, tag: str) -> list[float]:
    """One message at a time from `a`, the next after `to` committed it: ms each."""
    [samples] = _closed_loops(a, [(to, room)], count, tag)
    return samples


def _closed_loops(
    a: Worker, paths: Sequence[tuple[Worker, str]], count: int, tag: str
) -> list[list[float]]:
    """`_closed_loop` along several paths (destination, room), taking turns message by
    message, so that every path meets the same host: on a shared machine the other work
    changes within seconds, and paths measured one after the other would compare
    different moments. Ms each, per path."""
    samples: list[list[float]] = [[] for _ in paths]
    for index in range(count + 10):
        for (to, room), out in zip(paths, samples, strict=True):
            issued = time.monotonic()
            prefix = _send(a, room, [baseline.text(f"{tag}-{index}")])[0][:16]
            at = to.wait_ids([prefix], 30.0).get(prefix)
            if at is None:
                raise NodeFailed(f"{tag}: message {index} did not reach {to.node_id}")
            if index >= 10:
                out.append((at - issued) * 1000)
    return samples


def _throughput(a: Worker, to: Worker, room: str, count: int, chunk: int, tag: str) -> float:
    """Messages per second from the first post to `a` to `to`'s commit of the last."""
    before = to.count
    started = time.monotonic()
    send_many(a, room, count, chunk, tag, label=tag)
    done_at = to.wait_count_alive(before + count, _timeout_for(count), tag)
    if done_at is None:
        raise NodeFailed(f"{tag}: only {to.count - before:,} of {count:,} reached {to.node_id}")
    return count / (done_at - started)


def relay(sizes: Sizes, base: Baselines, prof: Profiler) -> list[dict[str, Any]]:
    """Through one relay between two segments, beside direct delivery in the same cluster.

    R (authority and relay) sits on both segments, A and C on `lgwan`, B on
    `internet`. A sends to C directly (they share `lgwan`) and to B through R, which
    is not a member of that room: it verifies, stores and forwards only. Same
    processes, same run: the direct figure is the baseline.
    """
    relay_id, a_id, b_id, c_id = "mie-pref", "tsu", "ise", "kameyama"
    count = sizes.relay
    with workdir() as tmp:
        cluster = Cluster(Path(tmp), ids=True, trace=prof.enabled)
        progress(
            f"forming {relay_id} (relay; lgwan+internet), {a_id} and {c_id} (lgwan), "
            f"{b_id} (internet)"
        )
        cluster.form(
            relay_id,
            [a_id, b_id, c_id],
            segments={
                relay_id: ("internet", "lgwan"),
                a_id: ("lgwan",),
                c_id: ("lgwan",),
                b_id: ("internet",),
            },
            relays=(relay_id,),
        )
        try:
            a, b, c = cluster.workers[a_id], cluster.workers[b_id], cluster.workers[c_id]
            direct_room = cluster.create_room(a_id, [c_id])
            relayed_room = cluster.create_room(a_id, [b_id])
            route = a.admin.request("GET", f"/v1/route?node_id={b_id}")["route"]
            if route is None or route["path"] != [relay_id, b_id]:
                raise NodeFailed(f"{a_id} -> {b_id} is not routed through {relay_id}: {route}")
            progress(
                f"relay latency: one message at a time, {a_id} -> {c_id} direct and {a_id} -> "
                f"{b_id} via {relay_id} in turns"
            )
            direct_ms, relayed_ms = _closed_loops(
                a, [(c, direct_room), (b, relayed_room)], 200, "lat"
            )
            progress(
                f"relay latency p50/p99 ms: direct {statistics.median(direct_ms):.2f}/"
                f"{percentile(direct_ms, 0.99):.2f}, via {relay_id} "
                f"{statistics.median(relayed_ms):.2f}/{percentile(relayed_ms, 0.99):.2f}"
            )
            progress(f"relay throughput: {count:,} messages {a_id} -> {c_id} (direct)")
            direct_eps = _throughput(a, c, direct_room, count, sizes.chunk, "tp-direct")
            progress(f"relay throughput: {count:,} messages {a_id} -> {b_id} via {relay_id}")
            meter = CpuMeter([a, cluster.workers[relay_id], b])
            relayed_eps = _throughput(a, b, relayed_room, count, sizes.chunk, "tp-relay")
            meter.report("relay_throughput")
            progress(
                f"relay throughput: direct {direct_eps:,.0f}/s, via {relay_id} {relayed_eps:,.0f}/s"
            )
            added = statistics.median(relayed_ms) - statistics.median(direct_ms)
            return [
                result("relay_throughput_eps", relayed_eps, "1/s", direct_eps),
                result("relay_throughput_ratio", relayed_eps / direct_eps, "ratio", 1.0),
                result("relay_added_latency_p50_ms", added, "ms", statistics.median(direct_ms)),
            ]
        finally:
            cluster.stop_all()


FIGURES: dict[str, tuple[tuple[str, ...], Callable[[Sizes, Baselines, Profiler], list[Any]]]] = {
    "two_node_throughput": (("two_node_throughput_eps",), two_node_throughput),
    "one_hop_latency": (("one_hop_latency_p50_ms", "one_hop_latency_p99_ms"), one_hop_latency),
    "fanout30": (("fanout30_p99_ms",), fanout),
    "catchup": (("catchup_eps",), catchup),
    "outbox_rss": (("outbox_1m_rss_mb",), outbox_rss),
    "relay": (
        ("relay_throughput_eps", "relay_throughput_ratio", "relay_added_latency_p50_ms"),
        relay,
    ),
}
