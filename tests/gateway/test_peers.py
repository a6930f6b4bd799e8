"""Tests for gateway.peers.is_up: when a peer counts as up, as a pure function of its health."""

from __future__ import annotations

import pytest

from gateway.peers import is_up
from gateway.store import PeerHealth

NOW_MS = 1_750_000_000_000
INTERVAL = 5.0
# Three health intervals plus one second of grace.
LIMIT_MS = int(INTERVAL * 3000) + 1000


def _health(*, contact_ago_ms: int | None, failures: int = 0) -> PeerHealth:
    return PeerHealth(
        node_id="tsu",
        last_contact_ms=None if contact_ago_ms is None else NOW_MS - contact_ago_ms,
        rtt_ms=None if contact_ago_ms is None else 1.5,
        last_attempt_ms=NOW_MS - (contact_ago_ms or 0),
        failures=failures,
        last_error="transport_error: refused" if failures else None,
    )


def test_peer_without_any_health_record_is_down() -> None:
    assert is_up(None, NOW_MS, INTERVAL) is False


def test_peer_never_contacted_is_down() -> None:
    assert is_up(_health(contact_ago_ms=None), NOW_MS, INTERVAL) is False


@pytest.mark.parametrize("failures", [1, 7])
def test_peer_whose_last_attempt_failed_is_down_even_after_recent_contact(failures: int) -> None:
    assert is_up(_health(contact_ago_ms=100, failures=failures), NOW_MS, INTERVAL) is False


@pytest.mark.parametrize("ago_ms", [0, 4_000, LIMIT_MS])
def test_peer_contacted_within_three_intervals_plus_one_second_is_up(ago_ms: int) -> None:
    assert is_up(_health(contact_ago_ms=ago_ms), NOW_MS, INTERVAL) is True


@pytest.mark.parametrize("ago_ms", [LIMIT_MS + 1, 60_000])
def test_peer_contacted_longer_ago_than_three_intervals_plus_one_second_is_down(
    ago_ms: int,
) -> None:
    assert is_up(_health(contact_ago_ms=ago_ms), NOW_MS, INTERVAL) is False


def test_up_window_scales_with_the_health_interval() -> None:
    health = _health(contact_ago_ms=5_000)  # fine at 5 s intervals, stale at 1 s (limit 4 s)
    assert is_up(health, NOW_MS, 5.0) is True
    assert is_up(health, NOW_MS, 1.0) is False
