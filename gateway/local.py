"""A federation of several nodes on one machine (127.0.0.1), in one process.

For the tests and the benchmarks: every node is formed through the same
functions the CLI calls (`init_home`, `create_federation`, `join_federation`),
runs real mutual TLS on loopback, and has its own adjustable clock so a test
can move it through time without sleeping.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from federation.invites import Approval

from .config import Home
from .membership import create_federation, init_home, join_federation
from .node import Node

__all__ = ["Clock", "LocalFederation", "free_port"]


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000
_pick = secrets.SystemRandom()  # not `random`: a test that seeds it must not make runs agree
_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1, free now, for a node that will listen on it in a moment.

    Picked at random below the kernel's ephemeral range, never twice in one process. A
    port from `bind(0)` lies inside that range, where every outgoing connection also takes
    its local port; with the thousands a test run opens, one of them now and then took the
    port between this probe and the node's own bind, and the node could not start.
    """
    ceiling = _ephemeral_floor()
    if ceiling - _LOWEST_PORT < 1000:
        return _kernel_port()
    for _ in range(200):
        port = _pick.randrange(_LOWEST_PORT, ceiling)
        if port in _given:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    return _kernel_port()


def _ephemeral_floor() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _kernel_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Clock:
    """Wall clock with an adjustable offset in seconds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class LocalFederation:
    """Nodes of one federation, each in its own home under `root`."""

    def __init__(self, root: Path, *, health_interval: float = 1.0, api: bool = False) -> None:
        self.root = root
        self.health_interval = health_interval
        self.api = api
        """Give every node a client API listener on a free port of 127.0.0.1."""
        self.nodes: dict[str, Node] = {}
        self.clocks: dict[str, Clock] = {}

    def home(self, node_id: str) -> Home:
        return Home(self.root / node_id)

    async def init(
        self,
        node_id: str,
        name: str,
        code: str | None = None,
        *,
        segments: Sequence[str] = (),
    ) -> Home:
        """Make a node's home. `segments` names the (simulated) network segments the node
        sits on; on loopback every node can reach every other, so only routing sees them."""
        home = self.home(node_id)
        port = free_port()
        await init_home(
            home,
            node_id=node_id,
            name=name,
            code=code,
            listen_host="127.0.0.1",
            listen_port=port,
            segments={segment: f"https://127.0.0.1:{port}" for segment in segments},
        )
        text = home.config.read_text().replace(
            "interval_seconds = 5.0", f"interval_seconds = {self.health_interval}"
        )
        if self.api:
            text += f'\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
        home.config.write_text(text)
        return home

    async def start(self, node_id: str) -> Node:
        clock = self.clocks.setdefault(node_id, Clock())
        node = Node(self.home(node_id), clock=clock)
        await node.start()
        self.nodes[node_id] = node
        return node

    async def stop(self, node_id: str) -> None:
        node = self.nodes.pop(node_id)
        await node.stop()

    async def authority(
        self,
        node_id: str = "mie-pref",
        name: str = "三重県",
        code: str | None = "240001",
        *,
        segments: Sequence[str] = (),
    ) -> Node:
        """Init, create the federation, run."""
        await self.init(node_id, name, code, segments=segments)
        await create_federation(self.home(node_id), name="三重県 市町連携")
        return await self.start(node_id)

    @property
    def authority_node(self) -> Node:
        return next(n for n in self.nodes.values() if n.authority is not None)

    async def invite(
        self,
        node_id: str,
        *,
        expires_in: int = 3600,
        approval: Approval | str = Approval.AUTO,
        relay: bool = False,
    ) -> str:
        authority = self.authority_node.authority
        assert authority is not None
        issued = await authority.invite(
            node_id, expires_in=expires_in, approval=Approval(approval), relay=relay
        )
        return issued.token

    async def member(
        self,
        node_id: str,
        name: str,
        code: str | None = None,
        *,
        segments: Sequence[str] = (),
        relay: bool = False,
    ) -> Node:
        """init + invite + join + run, as an operator would with the CLI."""
        await self.init(node_id, name, code, segments=segments)
        token = await self.invite(node_id, relay=relay)
        await join_federation(self.home(node_id), token)
        return await self.start(node_id)

    async def stop_all(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)
