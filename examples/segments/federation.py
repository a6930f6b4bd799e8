"""Kakehashi nodes running inside a segment topology (see `topology.py`).

Every step is a `kakehashi` command, as an operator would run it: `init` with the
node's endpoint on each of its segments, `federation create` at the prefecture,
`peer update --relay` to make it the relay, `peer invite` / `federation join` for
each town. Commands that talk to the network (`join`, `run`) run inside the node's
namespace; the others talk to the node's admin socket, a file, so they run from
anywhere on the machine.

Every node listens on port 8443 inside its own namespace. Logs go to
`BASE/NODE.log`. `stop_all()` (also via the context manager) kills every node
process it started, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .topology import NodeSpec, Topology

__all__ = ["NODE_NAMES", "SegmentFederation"]

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
PORT = 8443

NODE_NAMES: Mapping[str, tuple[str, str | None]] = {
    "pref": ("三重県", "240001"),
    "town-a": ("津市", "242012"),
    "town-b": ("伊勢市", "242039"),
    "town-c": ("亀山市", "242101"),
    "relay2": ("三重県 第二中継", None),
}
"""Display name and local government code per node name (others get their name)."""


class SegmentFederation:
    """The nodes of one federation, one per topology node, the first as authority."""

    def __init__(
        self,
        topology: Topology,
        base: Path,
        *,
        authority: str = "pref",
        health_interval: float = 1.0,
        retry_cap: float = 2.0,
        catch_up_interval: float = 3.0,
    ) -> None:
        self.topology = topology
        self.base = base
        self.authority = authority
        self.health_interval = health_interval
        self.retry_cap = retry_cap
        self.catch_up_interval = catch_up_interval
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.launchers: dict[str, Sequence[str]] = {}

    # commands -----------------------------------------------------------------

    def home(self, node: str) -> str:
        return str(self.base / node)

    def _spec(self, node: str) -> NodeSpec:
        return next(spec for spec in self.topology.nodes if spec.name == node)

    def log(self, node: str) -> Path:
        return self.base / f"{node}.log"

    def cli(self, *args: str, node: str | None = None, inside: bool = False) -> str:
        """Run `kakehashi ARGS --home HOME(node)`; inside the node's namespace if asked.
        Raises RuntimeError with the command's output if it fails."""
        argv = [KAKEHASHI, *args]
        if node is not None:
            argv += ["--home", self.home(node)]
            if inside:
                argv = self.topology.exec_argv(node, argv)
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(args)}` at {node} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def json(self, *args: str, node: str) -> Any:
        return json.loads(self.cli(*args, "--json", node=node))

    # forming the federation ------------------------------------------------------

    def init(self, node: str) -> None:
        name, code = NODE_NAMES.get(node, (node, None))
        segments = [
            f"{segment}=https://{self.topology.address(node, segment)}:{PORT}"
            for segment in self._spec(node).segments
        ]
        args = ["init", "--node-id", node, "--name", name, "--listen", f"0.0.0.0:{PORT}"]
        if code is not None:
            args += ["--code", code]
        for segment in segments:
            args += ["--segment", segment]
        self.cli(*args, node=node)
        config = Path(self.home(node)) / "config.toml"
        text = config.read_text()
        text = text.replace("interval_seconds = 5.0", f"interval_seconds = {self.health_interval}")
        text = text.replace("retry_cap_seconds = 30.0", f"retry_cap_seconds = {self.retry_cap}")
        text = text.replace(
            "catch_up_interval_seconds = 30.0",
            f"catch_up_interval_seconds = {self.catch_up_interval}",
        )
        config.write_text(text)

    def form(self, *, relays: Sequence[str] = ("pref",)) -> None:
        """Init every node, create the federation at the authority, flag `relays`,
        invite and join every other node, and run them all."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.init(self.authority)
        self.cli("federation", "create", "--name", "三重県 市町連携", node=self.authority)
        self.start(self.authority)
        for node in (spec.name for spec in self.topology.nodes):
            if node == self.authority:
                continue
            args = ["peer", "invite", node] + (["--relay"] if node in relays else [])
            token = self.cli(*args, node=self.authority).strip()
            self.init(node)
            self.cli("federation", "join", token, node=node, inside=True)
            self.start(node)
        if self.authority in relays:
            self.cli("peer", "update", self.authority, "--relay", node=self.authority)
        self.wait_roster()

    def wait_roster(self, timeout: float = 20.0) -> int:
        """Wait until every running node holds the authority's roster version."""
        deadline = time.monotonic() + timeout
        while True:
            versions = {node: self.status(node)["roster_version"] for node in self.processes}
            if len(set(versions.values())) == 1:
                return next(iter(versions.values()))
            if time.monotonic() > deadline:
                raise RuntimeError(f"roster versions did not converge: {versions}")
            time.sleep(0.2)

    def status(self, node: str) -> dict[str, Any]:
        data: dict[str, Any] = self.json("status", node=node)
        return data

    # processes -----------------------------------------------------------------

    def start(self, node: str, launcher: Sequence[str] | None = None) -> None:
        """Run the node inside its namespace; wait until its admin socket answers.

        `launcher` replaces `kakehashi` (e.g. a test double's script); it is kept, so
        a restart runs the same program."""
        if launcher is not None:
            self.launchers[node] = launcher
        program = list(self.launchers.get(node, [KAKEHASHI]))
        argv = self.topology.exec_argv(node, [*program, "run", "--home", self.home(node)])
        log = open(self.log(node), "ab")  # noqa: SIM115 - owned by the child's lifetime
        self.processes[node] = subprocess.Popen(argv, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.processes[node].poll() is not None:
                raise RuntimeError(f"node {node} exited; see {self.log(node)}")
            probe = subprocess.run(
                [KAKEHASHI, "status", "--home", self.home(node), "--json"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"node {node} did not start; see {self.log(node)}")

    def kill(self, node: str) -> None:
        """kill -9: no clean shutdown, as when a machine loses power."""
        process = self.processes.pop(node)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, node: str) -> None:
        process = self.processes.pop(node)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for node in list(self.processes):
            self.stop(node)

    def __enter__(self) -> SegmentFederation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    # rooms ---------------------------------------------------------------------

    def create_room(self, name: str, nodes: Sequence[str], *, home: str | None = None) -> str:
        home = home or self.authority
        args = ["room", "create", name]
        for node in nodes:
            args += ["--node", node]
        room: str = self.json(*args, node=home)["room_id"]
        self.wait(lambda: all(self.knows(node, room) for node in [home, *nodes]), "room known")
        return room

    def knows(self, node: str, room: str) -> bool:
        return any(row["room_id"] == room for row in self.json("room", "list", node=node))

    def send(self, node: str, room: str, texts: Sequence[str]) -> None:
        argv = [KAKEHASHI, "room", "send", "--home", self.home(node), room, "-"]
        result = subprocess.run(
            argv, input="\n".join(texts) + "\n", capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"room send at {node} failed: {result.stdout}{result.stderr}")

    def timeline(self, node: str, room: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.json(
            "room", "history", room, "--limit", "100000", node=node
        )
        return rows

    def wait(self, check: Any, what: str, timeout: float = 30.0) -> float:
        """Poll `check()` until true; seconds taken. RuntimeError naming `what` on timeout."""
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"timed out after {timeout} s waiting for: {what}")
            time.sleep(0.2)
        return time.monotonic() - started
