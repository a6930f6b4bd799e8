"""Tests for gateway.throttle: failed-login decisions as a function of failures and `now`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.throttle import Decision, ThrottlePolicy, decide

POLICY = ThrottlePolicy(limit=5, window=900.0)


def test_four_failures_still_allow_an_attempt() -> None:
    assert decide([100, 110, 120, 130], 140, POLICY) == Decision(True)


def test_fifth_failure_locks_until_the_oldest_leaves_the_window() -> None:
    failures = [100, 110, 120, 130, 140]
    assert decide(failures, 141, POLICY) == Decision(False, 859)  # 100 + 900 - 141
    assert decide(failures, 999.5, POLICY) == Decision(False, 1)
    assert decide(failures, 1000, POLICY) == Decision(True)


def test_failures_older_than_the_window_do_not_count() -> None:
    assert decide([0, 1, 2, 3, 104, 105], 1000, POLICY) == Decision(True)


def test_with_more_failures_the_lock_lasts_until_enough_have_aged_out() -> None:
    failures = [100, 200, 300, 400, 500, 600, 700]
    # Unlocked when fewer than 5 remain: after 300 + 900 (then 400..700 are four).
    assert decide(failures, 1199, POLICY) == Decision(False, 1)
    assert decide(failures, 1200, POLICY) == Decision(True)


def test_failures_stamped_in_the_future_still_count() -> None:
    """A clock set back must not open a locked login."""
    assert not decide([5000] * 5, 1000, POLICY).allowed


def test_order_of_failures_does_not_matter() -> None:
    assert decide([140, 100, 130, 110, 120], 141, POLICY) == Decision(False, 859)


def test_policy_must_be_sensible() -> None:
    with pytest.raises(ValueError):
        ThrottlePolicy(limit=0)
    with pytest.raises(ValueError):
        ThrottlePolicy(window=0)


@given(
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    st.integers(min_value=0, max_value=12_000),
)
def test_refused_attempts_are_allowed_after_retry_after_seconds(
    failures: list[int], now: int
) -> None:
    decision = decide(failures, now, POLICY)
    if decision.allowed:
        assert decision.retry_after == 0
        assert sum(1 for t in failures if t > now - POLICY.window) < POLICY.limit
    else:
        assert decision.retry_after >= 1
        later = now + decision.retry_after
        assert decide([t for t in failures if t <= now], later, POLICY).allowed
        assert not decide(failures, later - 1, POLICY).allowed or decision.retry_after == 1
