"""The judgments behind /healthz and `kakehashi doctor`: thresholds, wording and fixes.

They take values and `now`, so every threshold is pinned here without a node.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import health
from gateway.config import DiskThresholds, Home
from gateway.health import Check, Severity
from gateway.membership import init_home

NOW = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)


def view(node_id: str, **fields: Any) -> dict[str, Any]:
    """A `Node.peer_views` row of an active, reachable peer on segment default."""
    row: dict[str, Any] = {
        "node_id": node_id,
        "self": False,
        "status": "active",
        "health": "up",
        "segments": ["default"],
        "last_error": None,
        "outbox": 0,
        "delivery_lag_s": 0.0,
        "clock_offset_ms": 0,
    }
    row.update(fields)
    return row


ME = view("mie-pref", self=True, health="self")


# --------------------------------------------------------------------------- certificate


@pytest.mark.parametrize(
    ("left", "status"),
    [
        (timedelta(days=400), Severity.OK),
        (timedelta(days=30), Severity.OK),
        (timedelta(days=29, hours=23), Severity.WARN),
        (timedelta(days=7), Severity.WARN),
        (timedelta(days=6, hours=23), Severity.CRITICAL),
        (timedelta(days=3), Severity.CRITICAL),
        (timedelta(hours=-1), Severity.CRITICAL),
    ],
)
def test_certificate_warns_under_30_days_and_is_critical_under_7(
    left: timedelta, status: Severity
) -> None:
    check = health.certificate(NOW + left, NOW)
    assert check.status is status
    assert (check.fix is None) == (status is Severity.OK)
    if check.fix is not None:
        assert "kakehashi keys rotate --tls" in check.fix


GiB = 1024**3


@pytest.mark.parametrize(
    ("free", "total", "status"),
    [
        (200 * GiB, 500 * GiB, Severity.OK),
        (40 * GiB, 500 * GiB, Severity.WARN),  # 8%: under a tenth
        (1 * GiB, 8 * GiB, Severity.WARN),  # 12%, but under 2 GiB
        (5 * GiB, 500 * GiB, Severity.CRITICAL),  # 1%
        (200 * 1024**2, 1 * GiB, Severity.CRITICAL),  # 20%, but under 256 MiB
        (0, 16 * 1024**2, Severity.CRITICAL),
    ],
)
def test_disk_warns_under_a_tenth_or_2_gib_free_and_is_critical_under_2_percent_or_256_mib(
    free: int, total: int, status: Severity
) -> None:
    check = health.disk_space(free, total)
    assert check.status is status
    assert (check.fix is None) == (status is Severity.OK)
    if check.fix is not None:
        assert "disk_full" in check.fix


@pytest.mark.parametrize(
    ("free", "total", "status"),
    [
        (80 * GiB, 200 * GiB, Severity.OK),  # 40% and over 64 GiB
        (20 * GiB, 100 * GiB, Severity.WARN),  # 20%: under a quarter
        (60 * GiB, 1000 * GiB, Severity.WARN),  # 6%, and under 64 GiB
        (4 * GiB, 100 * GiB, Severity.CRITICAL),  # under 5%
        (9 * GiB, 1000 * GiB, Severity.CRITICAL),  # 0.9%, and under 10 GiB
    ],
)
def test_disk_thresholds_given_replace_the_defaults(
    free: int, total: int, status: Severity
) -> None:
    limits = DiskThresholds(
        warn_percent=25, warn_mib=64 * 1024, critical_percent=5, critical_mib=10240
    )
    assert health.disk_space(free, total, limits).status is status


def test_disk_thresholds_of_zero_never_warn() -> None:
    none = DiskThresholds(warn_percent=0, warn_mib=0, critical_percent=0, critical_mib=0)
    assert health.disk_space(0, 16 * 1024**2, none).status is Severity.OK


def test_disk_detail_says_how_much_is_free() -> None:
    check = health.disk_space(40 * GiB + GiB // 2, 500 * GiB)
    assert check.detail == "40.5 GiB free of 500.0 GiB (8%)"
    assert health.disk_space(0, 16 * 1024**2).detail == "0 B free of 16.0 MiB (0%)"


def test_certificate_detail_says_the_time_left_as_people_say_it() -> None:
    check = health.certificate(NOW + timedelta(days=2, hours=23, minutes=50), NOW)
    assert check.detail.startswith("certificate expires in 2 days 23 hours (2025-04-04 08:50 UTC)")
    expired = health.certificate(NOW - timedelta(days=2), NOW)
    assert "expired 2 days ago" in expired.detail


# --------------------------------------------------------------------------- clocks


@pytest.mark.parametrize(
    ("offset_ms", "status"),
    [(0, None), (2_000, None), (-2_001, Severity.WARN), (30_000, Severity.WARN),
     (30_001, Severity.CRITICAL), (-120_000, Severity.CRITICAL)],
)  # fmt: skip
def test_clock_skew_warns_over_2_s_and_is_critical_over_30_s(
    offset_ms: int, status: Severity | None
) -> None:
    checks = health.clock_skew([ME, view("tsu", clock_offset_ms=offset_ms), view("ise")])
    if status is None:
        assert [c.status for c in checks] == [Severity.OK]
        return
    assert [(c.check, c.status) for c in checks] == [("clock/tsu", status)]
    assert "tsu" in checks[0].detail
    assert ("ahead of" if offset_ms > 0 else "behind") in checks[0].detail
    assert checks[0].fix is not None and "NTP" in checks[0].fix and "chrony" in checks[0].fix


def test_every_peer_skewed_alike_points_at_this_nodes_clock() -> None:
    checks = health.clock_skew(
        [ME, view("tsu", clock_offset_ms=-90_000), view("ise", clock_offset_ms=-91_000)]
    )
    assert {c.check for c in checks} == {"clock/tsu", "clock/ise"}
    assert all("this node's clock is the likely culprit" in c.detail for c in checks)


def test_unmeasured_and_inactive_peers_are_not_judged_for_skew() -> None:
    checks = health.clock_skew(
        [
            ME,
            view("tsu", clock_offset_ms=None),
            view("ise", status="suspended", clock_offset_ms=99_000),
        ]
    )
    assert [c.status for c in checks] == [Severity.OK]
    assert checks[0].detail == "no peer clock measured yet"


# --------------------------------------------------------------------------- reachability


def test_segment_with_some_peers_down_warns_and_all_down_is_critical() -> None:
    views = [
        ME,
        view("tsu", health="down", last_error="transport_failed: connection refused"),
        view("ise"),
        view("kumano", segments=["internet"], health="down"),
    ]
    checks = {c.check: c for c in health.segments(["default", "internet"], views)}
    assert checks["segment/default"].status is Severity.WARN
    assert "1 of 2 peers on segment default down" in checks["segment/default"].detail
    assert "tsu: transport_failed: connection refused" in checks["segment/default"].detail
    assert checks["segment/default"].fix is not None and "tsu" in checks["segment/default"].fix
    assert checks["segment/internet"].status is Severity.CRITICAL
    assert "kumano" in checks["segment/internet"].detail


def test_healthz_needs_one_reachable_peer_only_when_there_are_peers() -> None:
    assert health.peers_reachable([ME]).status is Severity.OK
    assert (
        health.peers_reachable([ME, view("tsu", health="down"), view("ise")]).status is Severity.OK
    )
    down = health.peers_reachable([ME, view("tsu", health="down"), view("ise", health="no route")])
    assert down.status is Severity.CRITICAL and down.fix is not None


def test_peer_no_relay_reaches_is_a_routing_warning() -> None:
    checks = health.routes([ME, view("kumano", health="no route")])
    assert [c.status for c in checks] == [Severity.WARN]
    assert checks[0].fix is not None and "--relay" in checks[0].fix


# --------------------------------------------------------------------------- roster


def test_roster_behind_a_peer_warns_and_names_who_serves_the_newer_version() -> None:
    assert health.roster(5, {"tsu": 5, "ise": 5}, "mie-pref").status is Severity.OK
    behind = health.roster(4, {"tsu": 5, "ise": 4}, "mie-pref")
    assert behind.status is Severity.WARN
    assert "version 4" in behind.detail and "tsu serves version 5" in behind.detail


def test_doctor_names_each_peer_with_another_roster_version() -> None:
    checks = {
        c.check: c for c in health.roster_lag(5, {"tsu": 4, "ise": 6, "kameyama": 5}, "mie-pref")
    }
    assert set(checks) == {"roster/tsu", "roster/ise"}
    assert "tsu still has roster version 4" in checks["roster/tsu"].detail
    assert "this node is behind" in checks["roster/ise"].detail
    assert [c.status for c in health.roster_lag(5, {"tsu": 5}, "mie-pref")] == [Severity.OK]


# --------------------------------------------------------------------------- outbox


def test_outbox_lag_over_5_minutes_warns_and_over_an_hour_is_critical_for_doctor() -> None:
    views = [
        ME,
        view("tsu", outbox=12, delivery_lag_s=301.0),
        view("ise", outbox=3, delivery_lag_s=3601.0),
        view("kameyama", outbox=2, delivery_lag_s=10.0),
    ]
    checks = {c.check: c for c in health.outbox(views)}
    assert set(checks) == {"outbox/tsu", "outbox/ise"}
    assert checks["outbox/tsu"].status is Severity.WARN
    assert checks["outbox/tsu"].detail == "12 envelopes wait for tsu, the oldest for 5 minutes"
    assert checks["outbox/ise"].status is Severity.CRITICAL
    assert "nothing is lost" in (checks["outbox/ise"].fix or "")


def test_a_deep_outbox_warns_even_while_it_drains_quickly() -> None:
    checks = health.outbox(
        [ME, view("tsu", outbox=health.OUTBOX_WARN_DEPTH + 1, delivery_lag_s=1.0)]
    )
    assert [(c.check, c.status) for c in checks] == [("outbox/tsu", Severity.WARN)]


def test_healthz_outbox_lag_only_ever_warns() -> None:
    assert health.outbox_lag([ME, view("tsu", outbox=1, delivery_lag_s=1.0)]).status is Severity.OK
    slow = health.outbox_lag([ME, view("tsu", outbox=1, delivery_lag_s=86_400.0)])
    assert slow.status is Severity.WARN and "tsu" in slow.detail


# --------------------------------------------------------------------------- overall


def test_healthz_is_503_when_critical_or_in_maintenance_and_200_otherwise() -> None:
    ok = Check(check="a", status=Severity.OK, detail="")
    warn = Check(check="b", status=Severity.WARN, detail="")
    critical = Check(check="c", status=Severity.CRITICAL, detail="")
    assert health.overall([ok], in_maintenance=False) == ("ok", 200)
    assert health.overall([ok, warn], in_maintenance=False) == ("warn", 200)
    assert health.overall([warn, critical], in_maintenance=False) == ("critical", 503)
    assert health.overall([ok], in_maintenance=True) == ("maintenance", 503)


def test_maintenance_on_is_a_warning_with_the_way_back() -> None:
    assert health.maintenance(False, None, None).status is Severity.OK
    on = health.maintenance(True, "OS patching", "2025-04-01T09:00:00+00:00")
    assert on.status is Severity.WARN and "OS patching" in on.detail
    assert on.fix == "when the work is done: `kakehashi maintenance off`"


def test_check_round_trips_through_json() -> None:
    check = Check(check="clock/tsu", status=Severity.CRITICAL, detail="d", fix="f")
    assert Check.from_json(check.to_json()) == check


# --------------------------------------------------------------------------- files


@pytest.fixture
async def home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "tsu")
    await init_home(
        home,
        node_id="tsu",
        name="津市",
        code="242012",
        listen_host="127.0.0.1",
        listen_port=8443,
        segments={},
    )
    return home


async def test_offline_checks_find_a_readable_key_and_a_missing_certificate(home: Home) -> None:
    checks = {c.check: c for c in health.offline_checks(home, NOW, running=False)}
    assert checks["config"].status is Severity.OK
    assert checks["keys"].status is Severity.OK
    assert checks["certificate"].status is Severity.CRITICAL  # not joined yet
    assert "federation join" in (checks["certificate"].fix or "")
    os.chmod(home.tls_key, 0o644)
    checks = {c.check: c for c in health.offline_checks(home, NOW, running=True)}
    assert "certificate" not in checks  # a running node reports its own
    assert checks["keys/tls.key"].status is Severity.CRITICAL
    assert "mode 0644" in checks["keys/tls.key"].detail
    assert checks["keys/tls.key"].fix is not None
    assert checks["keys/tls.key"].fix.startswith(f"chmod 600 {home.tls_key}")


async def test_a_config_that_no_longer_loads_is_critical_before_the_restart_fails(
    home: Home,
) -> None:
    home.config.write_text(home.config.read_text().replace("port = 8443", 'port = "x"'))
    check = health.config_file(home)
    assert check.status is Severity.CRITICAL
    assert "listen.port" in check.detail and "will not start" in check.detail
