"""Real node processes on 127.0.0.1, formed and driven through the `kakehashi` CLI only.

The reliability tests kill these processes with SIGKILL at random moments, so
nothing here shares memory with a node: every node is a `kakehashi run`
subprocess with its own home and log file, and everything the tests know about
a node they learn from the CLI (`status`, `peer list`, `room list`,
`room history`), exactly as an operator would.

A federation is formed once per session and per set of nodes, through the CLI
as operators do it (`init`, `federation create`, `peer invite`, `federation
join`, `run`), then stopped cleanly (SIGTERM); each test (each round) runs on a
fresh copy of those stopped homes, so rounds are independent (own databases,
own logs) without paying about ten seconds of CLI set-up each. The copies keep
the listening ports of the original, so rounds must not run in parallel.

Timings are shortened in each node's config.toml (health checks every 0.5 s,
delivery retries capped at 1 s, catch-up every 2 s) so that recovery is quick
enough to repeat many times; the mechanisms are the production ones.

Every process a test started is killed at teardown, also when the test failed;
the tail of every node's log is printed when it did.

Environment:
    KAKEHASHI_CHAOS_ROUNDS  rounds per kill test (default 5; `make chaos` sets more)
    KAKEHASHI_CHAOS_SEED    base seed of the random kill moments (default: random, printed)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from gateway.local import free_port

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
ROUNDS = max(1, int(os.environ.get("KAKEHASHI_CHAOS_ROUNDS") or "5"))
_SEED_FROM_ENV = os.environ.get("KAKEHASHI_CHAOS_SEED")
BASE_SEED = int(_SEED_FROM_ENV) if _SEED_FROM_ENV else random.SystemRandom().randrange(10**6)

NAMES = {
    "mie-pref": ("三重県", "240001"),
    "tsu": ("津市", "242012"),
    "yokkaichi": ("四日市市", "242021"),
    "ise": ("伊勢市", "242039"),
}

# Shortened timings written into every node's config.toml.
HEALTH_INTERVAL = 0.5
RETRY_CAP = 1.0
CATCH_UP_INTERVAL = 2.0

# Every node process started by this test run, so that none outlives it (even on Ctrl-C).
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    for process in list(_LIVE.values()):
        if process.poll() is None:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
    _LIVE.clear()


atexit.register(_kill_leftovers)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: real node processes killed and restarted (slow)"
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures know at teardown if the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def round_seed(round_index: int) -> int:
    return BASE_SEED + round_index


def seed_note(seed: int) -> str:
    return f"seed {seed} (replay: KAKEHASHI_CHAOS_SEED={BASE_SEED}, same round)"


def numbered(origin: str, count: int, start: int = 1) -> list[str]:
    """Message texts whose order is visible in the text: 'tsu #00001', 'tsu #00002', ..."""
    return [f"{origin} #{number:05d}" for number in range(start, start + count)]


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.3,
    what: Callable[[], str] | str = "condition",
) -> float:
    """Wait until `check()` holds; return the seconds it took. Fails the test on timeout."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            detail = what() if callable(what) else what
            pytest.fail(f"not reached within {timeout:.0f} s: {detail}")
        time.sleep(interval)


@dataclass(slots=True)
class NodeProcess:
    """One node: its home, its log, and its `kakehashi run` process when running."""

    node_id: str
    home: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Federation:
    """A federation of node processes under `root`, driven through the CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, NodeProcess] = {}
        self.authority: str | None = None

    # the CLI --------------------------------------------------------------------

    def cli(
        self,
        *args: str,
        stdin: str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if key != "KAKEHASHI_HOME"}
        result = subprocess.run(
            [KAKEHASHI, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"`kakehashi {' '.join(args[:4])}` exited {result.returncode}: "
                f"{result.stderr.strip()[-2000:]}"
            )
        return result

    def cli_json(self, *args: str, timeout: float = 60.0) -> Any:
        return json.loads(self.cli(*args, "--json", timeout=timeout).stdout)

    def home(self, node_id: str) -> str:
        return str(self.nodes[node_id].home)

    # forming ----------------------------------------------------------------------

    def init(self, node_id: str) -> NodeProcess:
        name, code = NAMES[node_id]
        home = self.root / node_id
        node = self.nodes[node_id] = NodeProcess(node_id, home, self.root / f"{node_id}.log")
        self.cli(
            "init",
            "--home",
            str(home),
            "--node-id",
            node_id,
            "--name",
            name,
            "--code",
            code,
            "--listen",
            f"127.0.0.1:{free_port()}",
        )
        path = home / "config.toml"
        config = tomllib.loads(path.read_text(encoding="utf-8"))
        config.setdefault("health", {})["interval_seconds"] = HEALTH_INTERVAL
        delivery = config.setdefault("delivery", {})
        delivery["retry_cap_seconds"] = RETRY_CAP
        delivery["catch_up_interval_seconds"] = CATCH_UP_INTERVAL
        path.write_text(tomli_w.dumps(config), encoding="utf-8")
        return node

    def create(self, node_id: str = "mie-pref") -> None:
        """The authority (already initialised): `federation create`, run."""
        self.cli("federation", "create", "--home", self.home(node_id), "--name", "三重県 市町連携")
        self.authority = node_id
        self.start(node_id)

    def join(self, node_id: str, *, wait: bool = True) -> None:
        """A town (already initialised): invited by the authority, `federation join`, run."""
        assert self.authority is not None, "create the federation first"
        token = self.cli("peer", "invite", "--home", self.home(self.authority), node_id)
        self.cli("federation", "join", "--home", self.home(node_id), token.stdout.strip())
        self.start(node_id, wait=wait)

    def form(self, *node_ids: str) -> None:
        """The first node creates the federation, the others join; wait until all see all up.

        The homes are initialised in parallel and each town's process is started without
        waiting for it to answer before the next town joins, to keep the set-up short.
        """
        with ThreadPoolExecutor(len(node_ids)) as pool:
            list(pool.map(self.init, node_ids))
        self.create(node_ids[0])
        for node_id in node_ids[1:]:
            self.join(node_id, wait=False)
        for node_id in node_ids[1:]:
            self.wait_ready(node_id)
        self.wait_all_up(timeout=30)

    def copy_to(self, root: Path) -> Federation:
        """The same federation in copies of these (stopped) homes under `root`."""
        assert not any(node.running for node in self.nodes.values()), "stop the nodes first"
        root.mkdir(parents=True, exist_ok=True)
        copy = Federation(root)
        copy.authority = self.authority
        for node_id, node in self.nodes.items():
            shutil.copytree(node.home, root / node_id, symlinks=True)
            copy.nodes[node_id] = NodeProcess(node_id, root / node_id, root / f"{node_id}.log")
        return copy

    def start_all(self) -> None:
        """Start every node, wait until each answers and all see each other up."""
        for node_id in self.nodes:
            self.start(node_id, wait=False)
        for node_id in self.nodes:
            self.wait_ready(node_id)
        self.wait_all_up(timeout=30)

    # processes ----------------------------------------------------------------------

    def start(self, node_id: str, *, wait: bool = True, timeout: float = 30.0) -> float:
        """Start `kakehashi run`; with `wait`, return once its admin socket answers (seconds)."""
        node = self.nodes[node_id]
        assert not node.running, f"{node_id} is already running"
        node.starts += 1
        started = time.monotonic()
        with node.log.open("ab") as log:
            log.write(f"=== test harness: start #{node.starts} ===\n".encode())
            log.flush()
            node.process = subprocess.Popen(
                [KAKEHASHI, "run", "--home", str(node.home)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _LIVE[node.process.pid] = node.process
        if wait:
            self.wait_ready(node_id, timeout=timeout)
        return time.monotonic() - started

    def wait_ready(self, node_id: str, *, timeout: float = 30.0) -> None:
        """Wait until the node's admin socket answers `status`; fail if the process exits."""
        node = self.nodes[node_id]
        assert node.process is not None
        started = time.monotonic()
        while True:
            if node.process.poll() is not None:
                pytest.fail(
                    f"{node_id} exited with {node.process.returncode} at start:\n"
                    + self.log_tail(node_id)
                )
            probe = self.cli("status", "--home", str(node.home), "--json", check=False)
            if probe.returncode == 0:
                return
            if time.monotonic() - started > timeout:
                pytest.fail(
                    f"{node_id} did not answer within {timeout} s:\n{self.log_tail(node_id)}"
                )
            time.sleep(0.1)

    def _note(self, node_id: str, text: str) -> None:
        with self.nodes[node_id].log.open("ab") as log:
            log.write(f"=== test harness: {text} ===\n".encode())

    def kill9(self, node_id: str) -> None:
        """SIGKILL: the process gets no chance to finish anything."""
        node = self.nodes[node_id]
        assert node.process is not None and node.running, f"{node_id} is not running"
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)
        _LIVE.pop(node.process.pid, None)
        self._note(node_id, "SIGKILL")

    def stop(self, node_id: str, *, timeout: float = 20.0) -> None:
        """SIGTERM and wait for a clean exit."""
        node = self.nodes[node_id]
        assert node.process is not None and node.running, f"{node_id} is not running"
        node.process.send_signal(signal.SIGTERM)
        try:
            code = node.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=10)
            pytest.fail(f"{node_id} did not stop within {timeout} s of SIGTERM")
        finally:
            _LIVE.pop(node.process.pid, None)
        self._note(node_id, f"stopped (SIGTERM, exit {code})")
        assert code == 0, f"{node_id} exited {code} on SIGTERM:\n{self.log_tail(node_id)}"

    def close(self) -> None:
        """Kill every process still running (teardown)."""
        for node in self.nodes.values():
            if node.process is not None and node.running:
                node.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=10)
            if node.process is not None:
                _LIVE.pop(node.process.pid, None)

    def log_tail(self, node_id: str, lines: int = 40) -> str:
        path = self.nodes[node_id].log
        if not path.exists():
            return f"({path} does not exist)"
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text[-lines:])

    def log_problems(self) -> dict[str, list[str]]:
        """Lines of node logs that mean a bug rather than a crash: tracebacks, failed tasks,
        an envelope taken for a second one its origin signed for the same place (no node
        here signs twice, however it is killed)."""
        markers = (
            "Traceback",
            '"envelope_equivocation"',
            '"sender_failed"',
            '"catch_up_failed"',
            '"handler_failed"',
            '"decode_helper_failed"',
        )
        found: dict[str, list[str]] = {}
        for node_id, node in self.nodes.items():
            if node.log.exists():
                lines = node.log.read_text(encoding="utf-8", errors="replace").splitlines()
                bad = [line[:300] for line in lines if any(m in line for m in markers)]
                if bad:
                    found[node_id] = bad[:5]
        return found

    # views ---------------------------------------------------------------------------

    def peers(self, node_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.cli_json("peer", "list", "--home", self.home(node_id))
        return rows

    def sees_all_up(self, node_id: str, others: Sequence[str]) -> bool:
        health = {row["node_id"]: row["health"] for row in self.peers(node_id)}
        return all(health.get(other) == "up" for other in others if other != node_id)

    def wait_all_up(self, nodes: Sequence[str] | None = None, *, timeout: float = 30.0) -> float:
        group = list(nodes or self.nodes)

        def all_up() -> bool:
            return all(self.sees_all_up(node_id, group) for node_id in group)

        return wait_until(
            all_up,
            timeout=timeout,
            what=lambda: (
                "peers not all up: "
                + "; ".join(
                    f"{n}: {[(r['node_id'], r['health']) for r in self.peers(n)]}" for n in group
                )
            ),
        )

    # rooms ------------------------------------------------------------------------------

    def room_create(self, node_id: str, name: str, nodes: Sequence[str]) -> str:
        args = ["room", "create", "--home", self.home(node_id), name]
        for member in nodes:
            args += ["--node", member]
        room: str = self.cli_json(*args)["room_id"]
        return room

    def room_view(self, node_id: str, room: str) -> dict[str, Any] | None:
        rows = self.cli_json("room", "list", "--home", self.home(node_id))
        return next((row for row in rows if row["room_id"] == room), None)

    def envelope_count(self, node_id: str, room: str) -> int:
        """Accepted envelopes of `room` at `node_id` (cheap: no history is read)."""
        view = self.room_view(node_id, room)
        return 0 if view is None else int(view["envelopes"])

    def wait_room_known(self, room: str, nodes: Sequence[str], *, timeout: float = 20.0) -> None:
        def known() -> bool:
            views = [self.room_view(node_id, room) for node_id in nodes]
            return all(view is not None and view["member"] for view in views)

        wait_until(
            known, timeout=timeout, what=f"room {room} not known as member at all of {nodes}"
        )

    def history(self, node_id: str, room: str) -> list[dict[str, Any]]:
        """The room's whole timeline at `node_id`, oldest first."""
        rows: list[dict[str, Any]] = self.cli_json(
            "room", "history", "--home", self.home(node_id), room, "--limit", "100000", timeout=120
        )
        return rows

    def histories(self, room: str, nodes: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """`history` of several nodes, read concurrently."""
        with ThreadPoolExecutor(len(nodes)) as pool:
            return dict(zip(nodes, pool.map(lambda n: self.history(n, room), nodes), strict=True))

    def send(
        self, node_id: str, room: str, texts: Sequence[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`room send ROOM -` with one message per line on standard input."""
        return self.cli(
            "room",
            "send",
            "--home",
            self.home(node_id),
            room,
            "-",
            "--json",
            stdin="".join(f"{text}\n" for text in texts),
            timeout=120,
            check=check,
        )

    def wait_envelopes(
        self, room: str, nodes: Sequence[str], expected: int, *, timeout: float
    ) -> float | None:
        """Seconds until every node in `nodes` holds `expected` accepted envelopes of `room`
        (counted cheaply, without reading history); None if not within `timeout`."""
        started = time.monotonic()
        while True:
            counts = {node_id: self.envelope_count(node_id, room) for node_id in nodes}
            if all(count >= expected for count in counts.values()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                print(f"after {timeout:.0f} s: expected {expected} envelopes, have {counts}")
                return None
            time.sleep(0.5)


@pytest.fixture(scope="session")
def formed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Federation]]:
    """Federations formed through the CLI, once per set of nodes, then stopped cleanly."""
    templates: dict[tuple[str, ...], Federation] = {}

    def template(*node_ids: str) -> Federation:
        if node_ids not in templates:
            group = Federation(tmp_path_factory.mktemp("formed-" + "-".join(node_ids)))
            try:
                started = time.monotonic()
                group.form(*node_ids)
                for node_id in node_ids:
                    group.stop(node_id)
                print(f"formed {node_ids} through the CLI in {time.monotonic() - started:.1f} s")
            finally:
                group.close()
            templates[node_ids] = group
        return templates[node_ids]

    try:
        yield template
    finally:
        for group in templates.values():
            group.close()


@pytest.fixture
def federation_of(
    formed: Callable[..., Federation], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Federation]]:
    """`federation_of(*node_ids)`: a running copy of the formed federation of those nodes
    (the first is the authority). Every process is killed at teardown."""
    made: list[Federation] = []

    def make(*node_ids: str) -> Federation:
        group = formed(*node_ids).copy_to(tmp_path / f"federation{len(made)}")
        made.append(group)
        group.start_all()
        return group

    try:
        yield make
    finally:
        for group in made:
            group.close()
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            for group in made:
                for node_id in group.nodes:
                    print(group.log_tail(node_id))
        print(f"node homes and logs: {tmp_path}")


# checks ----------------------------------------------------------------------------------


def _first(items: Sequence[str] | set[str], count: int = 5) -> str:
    ordered = sorted(items) if isinstance(items, set) else list(items)
    more = f" (+{len(ordered) - count} more)" if len(ordered) > count else ""
    return ", ".join(ordered[:count]) + more


def short(envelope_id: str) -> str:
    """An envelope id as printed in failure messages (the first 16 hex digits)."""
    return envelope_id[:16]


def timeline_problems(
    node_id: str, history: list[dict[str, Any]], expected: dict[str, list[str]]
) -> list[str]:
    """What is wrong with one node's timeline, given each origin's texts in send order.

    Exactly once: every expected text present once, nothing else, no (origin, seq) or id
    twice, each origin's seqs gap-free from 1. Causal order: in the timeline, each
    origin's messages come in seq order, and seq order is the order they were sent in.
    """
    problems: list[str] = []
    messages = [entry for entry in history if entry["kind"] == "message"]
    wanted = {text for texts in expected.values() for text in texts}
    counts = Counter(entry["text"] for entry in messages)
    missing = wanted - set(counts)
    if missing:
        problems.append(f"{node_id}: {len(missing)} of {len(wanted)} missing: {_first(missing)}")
    doubled = {text for text, count in counts.items() if count > 1}
    if doubled:
        problems.append(
            f"{node_id}: {len(doubled)} texts more than once: "
            + _first([f"{t} x{counts[t]}" for t in sorted(doubled)])
        )
    unexpected = set(counts) - wanted
    if unexpected:
        problems.append(f"{node_id}: {len(unexpected)} unexpected texts: {_first(unexpected)}")
    ids = Counter(entry["id"] for entry in history)
    doubled_ids = [key for key, count in ids.items() if count > 1]
    if doubled_ids:
        listed = _first([short(i) for i in doubled_ids])
        problems.append(f"{node_id}: envelope ids more than once: {listed}")
    places = Counter((entry["origin"], entry["seq"]) for entry in history)
    doubled_places = [f"{o}/{s}" for (o, s), count in places.items() if count > 1]
    if doubled_places:
        problems.append(f"{node_id}: (origin, seq) more than once: {_first(doubled_places)}")
    for origin, texts in expected.items():
        own = [entry for entry in messages if entry["origin"] == origin]
        seqs = [entry["seq"] for entry in own]
        backwards = [f"seq {a} before {b}" for a, b in itertools.pairwise(seqs) if b <= a]
        if backwards:
            problems.append(f"{node_id}: {origin}'s messages out of order: {_first(backwards)}")
        by_seq = [entry["text"] for entry in sorted(own, key=lambda entry: entry["seq"])]
        if not missing and not doubled and by_seq != texts:
            at = next(
                (i for i, (a, b) in enumerate(zip(by_seq, texts, strict=False)) if a != b),
                min(len(by_seq), len(texts)),
            )
            problems.append(
                f"{node_id}: {origin}'s seq order differs from its send order at position {at}: "
                f"{by_seq[at : at + 3]} instead of {texts[at : at + 3]}"
            )
        all_seqs = sorted(entry["seq"] for entry in history if entry["origin"] == origin)
        if all_seqs and all_seqs != list(range(1, len(all_seqs) + 1)):
            gaps = sorted(set(range(1, all_seqs[-1] + 1)) - set(all_seqs))
            problems.append(
                f"{node_id}: {origin}'s seqs have gaps: {_first([str(g) for g in gaps])}"
            )
    return problems


def agreement_problems(histories: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every node holds the same envelopes in the same timeline order."""
    problems: list[str] = []
    reference_node, reference = next(iter(histories.items()))
    reference_ids = [entry["id"] for entry in reference]
    for node_id, history in histories.items():
        ids = [entry["id"] for entry in history]
        if ids == reference_ids:
            continue
        lacking = {short(i) for i in set(reference_ids) - set(ids)}
        extra = {short(i) for i in set(ids) - set(reference_ids)}
        if lacking or extra:
            problems.append(
                f"{node_id} differs from {reference_node}: lacks {len(lacking)} ids"
                + (f" ({_first(lacking)})" if lacking else "")
                + f", has {len(extra)} extra"
                + (f" ({_first(extra)})" if extra else "")
            )
        elif len(ids) != len(reference_ids):
            problems.append(
                f"{node_id} has {len(ids)} timeline entries, {reference_node} {len(reference_ids)}"
            )
        else:
            at = next(i for i, (a, b) in enumerate(zip(ids, reference_ids, strict=True)) if a != b)
            problems.append(
                f"{node_id}: timeline order differs from {reference_node} at position {at}: "
                f"{short(ids[at])} where {reference_node} has {short(reference_ids[at])}"
            )
    return problems


def assert_exactly_once_in_causal_order(
    histories: dict[str, list[dict[str, Any]]], expected: dict[str, list[str]], context: str
) -> None:
    problems: list[str] = []
    for node_id, history in histories.items():
        problems += timeline_problems(node_id, history, expected)
    problems += agreement_problems(histories)
    assert not problems, f"{context}:\n  " + "\n  ".join(problems)
