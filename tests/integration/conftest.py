"""Real federations on 127.0.0.1: nodes formed through the same functions the CLI calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.local import Clock, LocalFederation, free_port

__all__ = ["Clock", "Cluster", "eventually", "free_port"]

Cluster = LocalFederation


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
    timeout: float = 5.0,  # noqa: ASYNC109 - a deadline for a polled condition
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
