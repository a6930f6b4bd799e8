"""Shared helpers: result rows, percentiles, rates and progress lines."""

from __future__ import annotations

import sys
import time
from typing import Any

_STARTED = time.monotonic()


def progress(text: str) -> None:
    """A progress line on standard error, so a long run is visibly alive."""
    elapsed = time.monotonic() - _STARTED
    sys.stderr.write(f"  [{elapsed:7.1f}s] {text}\n")
    sys.stderr.flush()


def show(row: dict[str, Any]) -> None:
    """One figure's line on standard output."""
    print(
        f"{row['name']:28} {row['value']:12.2f} {row['unit']:8} baseline "
        f"{row['baseline']:12.2f}   ratio {row['ratio']:6.3f}",
        flush=True,
    )


def result(name: str, value: float, unit: str, baseline: float) -> dict[str, Any]:
    ratio = value / baseline if baseline else 0.0
    return {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline": round(baseline, 3),
        "ratio": round(ratio, 4),
    }


def rate(func: Any, seconds: float = 1.0) -> float:
    """Calls per second of `func` over about `seconds`."""
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(50):
            func()
        count += 50
    return count / elapsed


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]
