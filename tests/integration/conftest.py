"""Real federations on 127.0.0.1: nodes formed through the same functions the CLI calls."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config import Home
from gateway.membership import create_federation, init_home, join_federation
from gateway.node import Node


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Clock:
    """Wall clock with an adjustable offset, so tests move a node through time without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Cluster:
    """Nodes of one federation, each in its own home under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, Node] = {}
        self.clocks: dict[str, Clock] = {}

    def home(self, node_id: str) -> Home:
        return Home(self.root / node_id)

    async def init(self, node_id: str, name: str, code: str | None = None) -> Home:
        home = self.home(node_id)
        await init_home(
            home,
            node_id=node_id,
            name=name,
            code=code,
            listen_host="127.0.0.1",
            listen_port=free_port(),
            segments={},
        )
        text = home.config.read_text().replace("interval_seconds = 5.0", "interval_seconds = 1.0")
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
        self, node_id: str = "mie-pref", name: str = "三重県", code: str | None = "240001"
    ) -> Node:
        await self.init(node_id, name, code)
        await create_federation(self.home(node_id), name="三重県 市町連携")
        return await self.start(node_id)

    @property
    def authority_node(self) -> Node:
        return next(n for n in self.nodes.values() if n.authority is not None)

    async def invite(self, node_id: str, **options: object) -> str:
        authority = self.authority_node.authority
        assert authority is not None
        expires = int(options.pop("expires_in", 3600))  # type: ignore[call-overload]
        issued = await authority.invite(node_id, expires_in=expires, **options)  # type: ignore[arg-type]
        return issued.token

    async def member(self, node_id: str, name: str, code: str | None = None) -> Node:
        """init + invite + join + run, as an operator would with the CLI."""
        await self.init(node_id, name, code)
        token = await self.invite(node_id)
        await join_federation(self.home(node_id), token)
        return await self.start(node_id)

    async def stop_all(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    group = Cluster(tmp_path)
    try:
        yield group
    finally:
        await group.stop_all()


async def eventually(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    *,
    timeout: float = 5.0,
    interval: float = 0.05,
) -> float:
    """Wait until `check()` holds; return the seconds it took. Fails the test on timeout."""
    started = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
