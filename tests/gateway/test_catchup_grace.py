"""Tests for the grace period before catch-up pulls what a pushing peer may still bring."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from gateway.catchup import CatchUp
from gateway.rooms import RoomService

ROOM = "!kaigi2024:mie-pref"


class _Waiting:
    """Stands in for `RoomService`'s view of the causal buffer (the only part used here)."""

    def __init__(self) -> None:
        self.keys: set[tuple[str, str, int]] = set()

    def pending_count(self) -> int:
        return len(self.keys)

    def pending_keys(self) -> set[tuple[str, str, int]]:
        return set(self.keys)

    def still_pending(self, keys: set[tuple[str, str, int]]) -> bool:
        return bool(self.keys & keys)


@pytest.fixture
def catch_up() -> tuple[CatchUp, _Waiting, list[str]]:
    waiting = _Waiting()
    catchup = CatchUp(
        node_id="tsu",
        rooms=cast(RoomService, waiting),
        client=cast(Any, None),
        roster=cast(Any, None),
        interval=60.0,
    )
    requested: list[str] = []
    catchup.request = requested.append  # type: ignore[method-assign]
    return catchup, waiting, requested


async def test_envelopes_still_waiting_after_the_grace_period_are_pulled(
    catch_up: tuple[CatchUp, _Waiting, list[str]],
) -> None:
    catchup, waiting, requested = catch_up
    waiting.keys = {(ROOM, "mie-pref", 7)}
    catchup.request_if_still_waiting("mie-pref", grace=0.05)
    catchup.request_if_still_waiting("mie-pref", grace=0.05)  # one period at a time
    await asyncio.sleep(0.15)
    assert requested == ["mie-pref"]


async def test_a_steady_stream_whose_waits_are_short_is_never_pulled(
    catch_up: tuple[CatchUp, _Waiting, list[str]],
) -> None:
    catchup, waiting, requested = catch_up
    for seq in range(1, 6):
        # Each round something waits, but what waited at the start of a period was
        # released before it ended (the batch before it arrived).
        waiting.keys = {(ROOM, "mie-pref", seq)}
        catchup.request_if_still_waiting("mie-pref", grace=0.03)
        await asyncio.sleep(0.01)
        waiting.keys = {(ROOM, "mie-pref", seq + 1)}
        await asyncio.sleep(0.04)
    assert requested == []
    await catchup.stop()
