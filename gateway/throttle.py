"""Login throttling: whether another password attempt may be made, and when.

A pure decision over the recorded failures and `now` (seconds), so it is tested
without sleeping and gives the same answer after a restart, because the node
keeps the failures in its database (`gateway.accounts`).

Rule: once `limit` failures fall within the last `window` seconds, attempts are
refused, even with the right password, until the oldest of those failures
leaves the window. Refused attempts are not failures themselves: a locked login
opens again `window` seconds after the failure that locked it, whatever happens
meanwhile, and a refused attempt costs the node no password hash.

Each login and each source address is judged separately (see `ThrottlePolicy`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Decision", "ThrottlePolicy", "decide"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottlePolicy:
    """How many failures within how long lock a login or a source."""

    limit: int = 5
    """Failures within the window that lock."""
    window: float = 15 * 60.0
    """Seconds a failure counts for."""

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window <= 0:
            raise ValueError("a throttle needs limit >= 1 and a positive window")


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether an attempt may go ahead."""

    allowed: bool
    """True when the attempt may check the password."""
    retry_after: int = 0
    """Whole seconds until the next attempt may be made (0 when allowed)."""


def decide(failures: Iterable[float], now: float, policy: ThrottlePolicy) -> Decision:
    """The decision for an attempt at `now`, given the times of earlier failures."""
    # Failures stamped after `now` (the clock was set back) still count: fail closed.
    recent = sorted(t for t in failures if t > now - policy.window)
    if len(recent) < policy.limit:
        return Decision(True)
    # The attempt opens when fewer than `limit` failures remain in the window, i.e.
    # when the failure `limit` places from the newest has aged out.
    opens = recent[-policy.limit] + policy.window
    return Decision(False, max(1, math.ceil(opens - now)))
