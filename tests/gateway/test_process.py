"""The node process's collector settings: a batch of live objects no longer triggers
young collections, as it does with CPython's defaults."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.process import tune_collector


@pytest.fixture
def collector() -> Iterator[list[int]]:
    """Generations collected while the test runs; the thresholds are restored after."""
    saved = gc.get_threshold()
    collected: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield collected
    finally:
        gc.callbacks.remove(note)
        gc.set_threshold(*saved)


def _a_batch(count: int) -> list[dict[str, Any]]:
    """What planning a batch keeps alive until its commit: a few containers each."""
    return [{"body": {"text": str(k)}, "deps": {"tsu": k}} for k in range(count)]


def test_default_thresholds_collect_during_a_batch(collector: list[int]) -> None:
    gc.set_threshold(700, 10, 10)
    gc.collect()
    collector.clear()
    batch = _a_batch(3000)
    assert len(batch) == 3000
    assert collector, "the control: CPython's defaults collect under such a batch"


def test_tuned_thresholds_let_a_batch_live_without_collecting(collector: list[int]) -> None:
    tune_collector()
    gc.collect()
    collector.clear()
    batch = _a_batch(3000)
    assert len(batch) == 3000
    assert collector == []
