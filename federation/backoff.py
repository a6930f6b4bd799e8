"""Retry timing: exponential backoff with jitter, as a pure function.

The delay before retry number `attempt` (1 for the first retry) grows as
`base * 2**(attempt-1)`, capped at `cap`, and is spread by `jitter` (a fraction)
using a random value the caller supplies, so many nodes that lost the same peer
do not all reconnect in the same instant, and tests need no sleeping or seeding.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Backoff settings."""

    base: float = 0.2
    """Seconds before the first retry."""
    cap: float = 30.0
    """Longest wait between retries, in seconds."""
    jitter: float = 0.2
    """Fraction by which a delay is spread (0.2: between 80% and 100% of the nominal)."""

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs 0 < base <= cap and 0 <= jitter < 1")

    def delay(self, attempt: int, random_value: float) -> float:
        """Seconds to wait before retry `attempt` (>= 1); `random_value` in [0, 1)."""
        if attempt < 1:
            return 0.0
        nominal = min(self.cap, self.base * float(2 ** min(attempt - 1, 62)))
        return nominal * (1 - self.jitter * random_value)
