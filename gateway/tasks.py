"""Stopping the node's background tasks.

Every long-lived task is owned by one object, which cancels it on stop. A task
that already died has had its failure logged by its owner; stopping must go on
regardless, or a node that stops halfway keeps its port, client and database open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_all"]


async def cancel_all(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task, then wait for each to end, whatever it ends with."""
    owned = [task for task in tasks if task is not None]
    for task in owned:
        task.cancel()
    for task in owned:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
