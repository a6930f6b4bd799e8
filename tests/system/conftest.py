"""Network-namespace topologies for the system tests (root only).

`topology` is function-scoped: each test gets a fresh LGWAN/Internet network
(building one takes a few hundredths of a second) and may cut links or destroy
it without affecting the next test. It is always destroyed afterwards, also when
the test fails. Where namespaces cannot be made the tests skip with the reason,
except on CI (`CI` set and non-empty), where they fail: there they must run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

# `examples` is not an installed package: make it importable under plain `pytest` too.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.segments.topology import Topology, cleanup_stale  # noqa: E402

ECHO_PORT = 7007

_ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys
    server = socket.create_server(("0.0.0.0", int(sys.argv[1])), reuse_port=False)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(1024))
    """
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.system)


def unavailable(reason: str) -> NoReturn:
    """What a system test does when this machine lacks what it needs (root, `ip`,
    `mount`): skip, except on CI (`CI` set and non-empty), where it fails."""
    if os.environ.get("CI"):
        pytest.fail(f"system tests must run on CI, but: {reason}")
    pytest.skip(reason)


def require_namespaces() -> None:
    """Skip (or fail on CI) when network namespaces cannot be made here."""
    reason = Topology.available()
    if reason is not None:
        unavailable(reason)


@pytest.fixture
def netns_available() -> None:
    """Skip (or fail on CI) when network namespaces cannot be made here."""
    require_namespaces()


@pytest.fixture
def topology(netns_available: None) -> Iterator[Topology]:
    """The default topology (pref, town-a, town-b, town-c), built, destroyed afterwards."""
    cleanup_stale()
    topo = Topology()
    with topo:
        yield topo


class EchoServers:
    """TCP echo servers on ECHO_PORT inside nodes of a topology; `close()` stops them all."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._procs: list[subprocess.Popen[str]] = []

    def __call__(self, *nodes: str) -> None:
        """Start one server in each of `nodes`; returns once each listens."""
        for node in nodes:
            code = [sys.executable, "-c", _ECHO_SERVER, str(ECHO_PORT)]
            proc = subprocess.Popen(
                self.topology.exec_argv(node, code),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self._procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                _, err = proc.communicate(timeout=5)
                pytest.fail(f"echo server in {node} did not start: {err}")

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.communicate(timeout=5)
        self._procs.clear()


@pytest.fixture
def echo_servers(topology: Topology) -> Iterator[EchoServers]:
    """`echo_servers("pref", "town-c")` runs an echo server in each node until the test ends."""
    servers = EchoServers(topology)
    try:
        yield servers
    finally:
        servers.close()
