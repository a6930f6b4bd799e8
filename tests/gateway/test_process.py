"""The node process's settings: a batch of live objects no longer triggers young
collections, as it does with CPython's defaults; batch-sized buffers no longer cost a
page fault per page each time one is made."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.process import tune_collector

ROOT = Path(__file__).resolve().parents[2]


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


# The allocator's settings are process-wide and cannot be undone, so each case runs in a
# process of its own: the buffers a batch goes through, made and freed in growing sizes
# up to 8 MiB, three of each; zero-filled, so every page is touched. Prints what
# `tune_allocator` did and the page faults the buffers took.
_BUFFERS = """
import resource, sys
from gateway.process import tune_allocator
outcome = tune_allocator() if sys.argv[1] == "tuned" else "untouched"
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in range(1, 9):
    for _ in range(3):
        buffer = bytearray(mib << 20)
        del buffer
print(outcome, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _buffers(mode: str, **env: str) -> tuple[str, int]:
    environment = {
        k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
    }
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _BUFFERS, mode],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome, faults = done.stdout.rsplit(maxsplit=1)
    return outcome, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_allocator_reuses_batch_sized_buffers_instead_of_faulting_them_in() -> None:
    _, untouched = _buffers("untouched")
    outcome, tuned = _buffers("tuned")
    assert outcome == "tuned"
    # 36 MiB of buffers are 9,216 pages: by default most are given back and faulted in
    # again; tuned, the heap grows once to the largest (8 MiB, 2,048 pages) and stays.
    assert untouched > 6_000
    assert tuned < untouched / 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_an_operators_own_malloc_settings_are_kept() -> None:
    outcome, faults = _buffers("tuned", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert outcome == "set by the operator"
    assert faults > 6_000  # the operator's 128 KiB fixed threshold: every buffer faults
    outcome, _ = _buffers("tuned", MALLOC_TRIM_THRESHOLD_="1048576")
    assert outcome == "set by the operator"
