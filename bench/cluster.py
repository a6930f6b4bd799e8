"""Node processes on loopback for the delivery benchmarks.

Every node is formed through the same functions the CLI calls (`init_home`,
`create_federation`, `join_federation`; invitations through the authority's
admin socket, like `kakehashi peer invite`), with real mutual TLS on 127.0.0.1
and the default durable SQLite settings. Each node then runs in its own process
(`bench/node_worker.py`, which is `kakehashi run` plus one line on standard output
per committed step), so the nodes use every core and the benchmark times commits
from those lines instead of polling the node.

Also here: what the kernel says about a node process (RSS, CPU by thread) and
py-spy sampling of a node for the profile summaries.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from common import progress

from gateway.admin_client import AdminClient
from gateway.config import Home, load_config
from gateway.local import free_port
from gateway.membership import create_federation, init_home, join_federation

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORKER = BENCH / "node_worker.py"
PY_SPY = Path(sys.executable).parent / "py-spy"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


class NodeFailed(RuntimeError):
    pass


class Worker:
    """One node process and what it reported."""

    def __init__(
        self,
        node_id: str,
        home: Home,
        log_dir: Path,
        *,
        ids: bool,
        trace: bool = False,
        api: bool = False,
    ) -> None:
        self.node_id = node_id
        self.home = home
        self.api_port = free_port() if api else None
        """With `api`: the port of the node's file routes (plain HTTP on 127.0.0.1)."""
        self.log_path = log_dir / f"{node_id}.log"
        self.trace_path = log_dir / f"{node_id}.trace.json" if trace else None
        self.ids = ids
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = AdminClient(home.admin_socket, timeout=120.0)
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self.ready_at: float | None = None
        self.stopped_at: float | None = None
        self.count = 0  # messages committed since this process started
        self.steps: list[tuple[float, int]] = []  # (time, cumulative count)
        self.seen: dict[str, float] = {}  # message id prefix -> commit time (with ids)
        self.traced = 0
        self.spawned_at = 0.0

    @property
    def api_base(self) -> str:
        """https://127.0.0.1:PORT/api/v1 of the node's client API (from its config)."""
        listen = load_config(self.home).api_listen
        if listen is None:
            raise NodeFailed(f"{self.node_id} has no [api] listen")
        return f"https://127.0.0.1:{listen[1]}/api/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        self._reset()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        args = [sys.executable, str(WORKER), str(self.home.root)]
        if self.ids:
            args.append("--ids")
        if self.trace_path is not None:
            args += ["--trace", str(self.trace_path)]
        if self.api_port is not None:
            args += ["--api-port", str(self.api_port)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        self.spawned_at = time.monotonic()
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(ROOT)
        )
        log.close()
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), daemon=True, name=f"read-{self.node_id}"
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            parts = raw.decode().split()
            if not parts:
                continue
            with self._cond:
                if parts[0] == "C":
                    at, count = float(parts[1]), int(parts[2])
                    self.count += count
                    self.steps.append((at, self.count))
                    for prefix in parts[3:]:
                        self.seen[prefix] = at
                elif parts[0] == "READY":
                    self.ready_at = float(parts[1])
                elif parts[0] == "TRACED":
                    self.traced += 1
                elif parts[0] == "STOPPED":
                    self.stopped_at = float(parts[1])
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.ready_at is None:
                if not self.running:
                    raise NodeFailed(f"node {self.node_id} exited; see {self.log_path}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeFailed(f"node {self.node_id} did not start; see {self.log_path}")
                self._cond.wait(min(left, 0.5))
            return self.ready_at

    def start(self) -> float:
        self.spawn()
        return self.wait_ready()

    def wait_count(self, target: int, timeout: float) -> float | None:
        """The time at which the committed message count reached `target` (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    return None
                self._cond.wait(min(left, 0.5))
            for at, cumulative in self.steps:
                if cumulative >= target:
                    return at
        return None

    def wait_count_alive(self, target: int, timeout: float, label: str) -> float | None:
        """`wait_count`, saying every 10 seconds how far it got."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            done = self.wait_count(target, min(10.0, max(0.0, left)))
            if done is not None or left <= 10.0 or not self.running:
                return done
            progress(f"{label}: {self.node_id} has committed {self.count:,}/{target:,}")

    def wait_ids(self, prefixes: Sequence[str], timeout: float) -> dict[str, float]:
        """Commit times of the messages with these id prefixes (those seen before the timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(p in self.seen for p in prefixes):
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    break
                self._cond.wait(min(left, 0.5))
            return {p: self.seen[p] for p in prefixes if p in self.seen}

    def trace_dump(self, timeout: float = 10.0) -> list[dict[str, Any]] | None:
        """With tracing: the timing table since the last dump (and start a new one)."""
        if self.trace_path is None or not self.running or self.ready_at is None:
            return None  # (before READY the handler is not installed: SIGUSR1 would kill it)
        with self._cond:
            before = self.traced
        self.process.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.traced == before:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
        return list(json.loads(self.trace_path.read_text()))

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                progress(f"{self.node_id} did not stop in {timeout:.0f}s; killing it")
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    # what the kernel says ---------------------------------------------------

    def _proc_field(self, name: str, field: str) -> int:
        """The first number of a `field:` line of /proc/PID/NAME, 0 if there is none."""
        try:
            with open(f"/proc/{self.pid}/{name}") as lines:
                for line in lines:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def status_kb(self, field: str) -> int:
        """A /proc/PID/status field in kB (VmRSS, VmHWM)."""
        return self._proc_field("status", field)

    def bytes_written(self) -> int:
        """Bytes the process has handed the kernel to write (`wchar`: files, log and
        sockets alike)."""
        return self._proc_field("io", "wchar")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user+system) of the event-loop thread and of all other threads."""
        main, other = 0, 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:
                continue
            ticks = int(fields[11]) + int(fields[12])
            if int(task) == self.pid:
                main += ticks
            else:
                other += ticks
        return {"loop": main / CLOCK_TICKS, "threads": other / CLOCK_TICKS}


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine spent busy (from /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this benchmark process (the client posting messages)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU used by some node processes over a phase, against its wall time, and by the rest
    of the machine (other people's tests share these cores: the figures are only as good
    as the cores they got)."""

    def __init__(self, workers: Iterable[Worker]) -> None:
        self.workers = [w for w in workers if w.running]
        self.started = time.monotonic()
        self.before = {w.node_id: w.cpu_seconds() for w in self.workers}
        self.written_before = {w.node_id: w.bytes_written() for w in self.workers}
        self.machine_before = machine_busy_seconds()
        self.own_before = own_cpu_seconds()

    def report(self, label: str) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        lines, data = [], {}
        total = 0.0
        for worker in self.workers:
            if not worker.running:
                continue
            now = worker.cpu_seconds()
            then = self.before[worker.node_id]
            loop = now["loop"] - then["loop"]
            threads = now["threads"] - then["threads"]
            total += loop + threads
            written = worker.bytes_written() - self.written_before[worker.node_id]
            data[worker.node_id] = {"loop_s": loop, "threads_s": threads, "written": written}
            if len(self.workers) <= 3:
                lines.append(
                    f"{worker.node_id}: {(loop + threads) / wall:4.0%} of a core "
                    f"(event loop {loop / wall:4.0%}, sqlite/other threads {threads / wall:4.0%}"
                    f", wrote {written / 1e6:,.0f} MB)"
                )
        if len(self.workers) > 3:
            lines.append(f"{len(self.workers)} nodes: {total / wall:4.0%} of a core in all")
        own = own_cpu_seconds() - self.own_before
        machine = machine_busy_seconds() - self.machine_before
        others = max(0.0, machine - total - own)
        progress(f"cpu during {label} ({wall:.1f}s wall): " + "; ".join(lines))
        progress(
            f"  machine: {machine / wall:.2f} of {CORES} cores busy: nodes {total / wall:.2f}, "
            f"benchmark client {own / wall:.2f}, other processes {others / wall:.2f}"
            + ("  (CONTENDED: figures are pessimistic)" if others / wall > 0.25 else "")
        )
        data["wall_s"] = wall
        data["others_cores"] = others / wall
        return data


class Spy:
    """py-spy sampling one node process for a while (only with --profile)."""

    def __init__(self, worker: Worker, out: Path, seconds: float, rate: int = 250) -> None:
        self.worker = worker
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(worker.pid),
                "--duration",
                str(max(1, int(seconds + 0.999))),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--threads",
                "--output",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def finish(self) -> Path | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.out if self.out.exists() else None


class Cluster:
    """A federation whose nodes run as processes under `root`."""

    def __init__(
        self, root: Path, *, ids: bool = False, trace: bool = False, api: bool = False
    ) -> None:
        self.root = root
        self.ids = ids
        self.trace = trace
        self.api = api  # give every node a client API listener ([api] listen) on 127.0.0.1
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, Worker] = {}
        self.authority_id: str | None = None

    def home(self, node_id: str) -> Home:
        return Home(self.root / node_id)

    def _init(self, node_id: str, name: str, segments: Sequence[str] = ()) -> None:
        port = free_port()
        asyncio.run(
            init_home(
                self.home(node_id),
                node_id=node_id,
                name=name,
                code=None,
                listen_host="127.0.0.1",
                listen_port=port,
                segments={segment: f"https://127.0.0.1:{port}" for segment in segments},
            )
        )
        if self.api:
            config = self.home(node_id).config
            config.write_text(config.read_text() + f'\n[api]\nlisten = "127.0.0.1:{free_port()}"\n')
        if self.api:  # the file figures upload more than the default 100 MiB
            with self.home(node_id).config.open("a", encoding="utf-8") as config:
                config.write("\n[files]\nmax_upload_mb = 4096\n")

    def form(
        self,
        authority: str,
        members: Sequence[str],
        *,
        start_members: bool = True,
        segments: Mapping[str, Sequence[str]] | None = None,
        relays: Sequence[str] = (),
    ) -> None:
        """Authority: init, create, run. Members: init, invite, join (then run them all).

        `segments` names each node's (simulated) segments; on loopback only routing
        sees them. `relays` are flagged as relays (the authority too)."""
        segments = segments or {}
        self._init(authority, authority, segments.get(authority, ()))
        asyncio.run(create_federation(self.home(authority), name="bench federation"))
        self.authority_id = authority
        self.workers[authority] = Worker(
            authority, self.home(authority), self.logs, ids=self.ids, trace=self.trace, api=self.api
        )
        self.workers[authority].start()
        admin = self.workers[authority].admin
        for index, node_id in enumerate(members):
            self._init(node_id, node_id, segments.get(node_id, ()))
            invite = {"node_id": node_id, "relay": node_id in relays}
            token = admin.request("POST", "/v1/peers/invite", invite)["token"]
            asyncio.run(join_federation(self.home(node_id), token))
            self.workers[node_id] = Worker(
                node_id, self.home(node_id), self.logs, ids=self.ids, trace=self.trace, api=self.api
            )
            if len(members) > 5 and (index + 1) % 10 == 0:
                progress(f"{index + 1}/{len(members)} members joined")
        if authority in relays:
            admin.request("POST", "/v1/peers/update", {"node_id": authority, "relay": True})
        if start_members:
            self.start(members)

    def start(self, node_ids: Iterable[str]) -> None:
        workers = [self.workers[n] for n in node_ids]
        if len(workers) > 3:
            progress(f"starting {len(workers)} node processes")
        for worker in workers:
            worker.spawn()
        for index, worker in enumerate(workers):
            worker.wait_ready(timeout=180.0)
            if len(workers) > 3 and (index + 1) % 10 == 0:
                progress(f"{index + 1}/{len(workers)} node processes serving")
        self.converge()

    def converge(self, timeout: float = 180.0) -> None:
        """Wait until every running node holds the authority's roster version."""
        assert self.authority_id is not None
        deadline = time.monotonic() + timeout
        said = time.monotonic()
        while True:
            version = self.workers[self.authority_id].admin.request("GET", "/v1/status")[
                "roster_version"
            ]
            behind = [
                w.node_id
                for w in self.workers.values()
                if w.running and w.admin.request("GET", "/v1/status")["roster_version"] < version
            ]
            if not behind:
                return
            if time.monotonic() - said > 10:
                said = time.monotonic()
                progress(f"waiting for {len(behind)} nodes to fetch roster v{version}")
            if time.monotonic() > deadline:
                raise NodeFailed(f"rosters did not converge: {behind} behind v{version}")
            time.sleep(0.2)

    def create_room(self, on: str, nodes: Sequence[str], timeout: float = 60.0) -> str:
        """Create a room at `on` with `nodes`; wait until every running member node has it."""
        room = self.workers[on].admin.request(
            "POST", "/v1/rooms", {"name": "bench", "nodes": list(nodes)}
        )["room_id"]
        deadline = time.monotonic() + timeout
        waiting = [self.workers[n] for n in nodes if self.workers[n].running]
        while waiting:
            waiting = [
                w
                for w in waiting
                if not any(
                    r["room_id"] == room and r["member"]
                    for r in w.admin.request("GET", "/v1/rooms")
                )
            ]
            if waiting and time.monotonic() > deadline:
                raise NodeFailed(f"room not known at {[w.node_id for w in waiting]}")
            if waiting:
                time.sleep(0.1)
        return room

    def room_count(self, node_id: str, room: str) -> int:
        """Accepted envelopes of `room` at a node, as `kakehashi room list --json` shows them."""
        for row in self.workers[node_id].admin.request("GET", "/v1/rooms"):
            if row["room_id"] == room:
                return int(row["envelopes"])
        return 0

    def stop_all(self) -> None:
        for worker in reversed(list(self.workers.values())):
            worker.stop()

    def describe_logs(self) -> str:
        return str(self.logs)


def send_body(room: str, texts: list[str]) -> bytes:
    """The JSON body of `POST /v1/rooms/send` (what `kakehashi room send -` posts)."""
    return json.dumps({"room": room, "texts": texts}).encode()
