"""Judging a node's health: what `/healthz` and `kakehashi doctor` report, and the fix.

A `Check` is one finding: what was looked at, how bad it is (ok, warn, critical),
what was found, and what the operator should do. The judgments here take values
(days left, clock offsets, the peer views of `Node.peer_views`, `now`) and return
checks; they read no node state and no clock, so every threshold is tested
without running a node. Gathering the values from a running node is
`gateway/monitoring.py`; reading a stopped node's files is `offline_checks`.

The person reading a check is a town's IT staff member, years after the vendor
left: every problem names the peer, segment or file, and a fix they can type.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from federation.errors import KakehashiError

from . import tls
from .config import DiskThresholds, Home, load_config

__all__ = [
    "CERTIFICATE_CRITICAL_DAYS",
    "CERTIFICATE_WARN_DAYS",
    "CLOCK_CRITICAL_MS",
    "CLOCK_WARN_MS",
    "DISK_DEFAULTS",
    "OUTBOX_CRITICAL_DEPTH",
    "OUTBOX_CRITICAL_LAG_S",
    "OUTBOX_WARN_DEPTH",
    "OUTBOX_WARN_LAG_S",
    "Check",
    "Severity",
    "certificate",
    "certificate_file",
    "clock_skew",
    "config_file",
    "database",
    "disk_space",
    "home_disk",
    "key_files",
    "maintenance",
    "offline_checks",
    "outbox",
    "outbox_lag",
    "overall",
    "peers_reachable",
    "roster",
    "roster_lag",
    "routes",
    "segments",
    "worst",
]

CERTIFICATE_WARN_DAYS = 30
"""A certificate with fewer days left than this is a warning: renew it in good time."""
CERTIFICATE_CRITICAL_DAYS = 7
"""Fewer days than this is critical: once it expires, every peer refuses this node."""
CLOCK_WARN_MS = 2_000
"""Clock difference with a peer above which envelope times start to look wrong."""
CLOCK_CRITICAL_MS = 30_000
"""Above this, invitation and token expiry and timeline order are at risk."""
OUTBOX_WARN_LAG_S = 300.0
"""Oldest envelope waiting for a peer longer than this (5 minutes) is a warning."""
OUTBOX_CRITICAL_LAG_S = 3600.0
"""An hour behind with a peer is critical (for `doctor`; `/healthz` only warns)."""
OUTBOX_WARN_DEPTH = 10_000
"""Envelopes queued for one peer above which its outbox is a warning."""
OUTBOX_CRITICAL_DEPTH = 100_000
"""Envelopes queued for one peer above which its outbox is critical."""


DISK_DEFAULTS = DiskThresholds()
"""Free space under 10% or 2 GiB is a warning; under 2% or 256 MiB critical."""

_KEY_FILES = ("signing.key", "tls.key", "federation.key", "ca.key", "token.key")
# The authority's only, and the staff token key (made at the first login).
_MISSING_OK = frozenset({"federation.key", "ca.key", "token.key"})


class Severity(StrEnum):
    """How bad a finding is, in increasing order."""

    OK = "ok"
    WARN = "warn"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Severity.OK: 0, Severity.WARN: 1, Severity.CRITICAL: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One finding about a node."""

    check: str
    """What was checked: 'certificate', or 'clock/tsu' for one peer."""
    status: Severity
    """ok, warn or critical."""
    detail: str
    """What was found, in a sentence."""
    fix: str | None = None
    """What to do about it (None when nothing is to be done)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Check:
        return cls(
            check=str(data["check"]),
            status=Severity(data["status"]),
            detail=str(data["detail"]),
            fix=None if data.get("fix") is None else str(data["fix"]),
        )


def worst(checks: Iterable[Check]) -> Severity:
    """The most severe status among `checks` (ok when there are none)."""
    return max((c.status for c in checks), key=lambda s: s.rank, default=Severity.OK)


def overall(checks: Sequence[Check], *, in_maintenance: bool) -> tuple[str, int]:
    """`/healthz` status word and HTTP status: 503 when critical or in maintenance,
    so a load balancer drains the node; 200 for ok and warn."""
    if in_maintenance:
        return "maintenance", 503
    status = worst(checks)
    return status.value, 503 if status is Severity.CRITICAL else 200


def _span(seconds: float) -> str:
    """'2 days 23 hours', '5 hours', '12 minutes': remaining time as people say it."""
    seconds = max(0.0, seconds)
    days, rest = divmod(int(seconds), 86_400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60

    def unit(count: int, name: str) -> str:
        return f"{count} {name}{'' if count == 1 else 's'}"

    if days >= 7:
        return unit(days, "day")
    if days:
        return unit(days, "day") + (f" {unit(hours, 'hour')}" if hours else "")
    if hours:
        return unit(hours, "hour")
    return unit(minutes, "minute")


# --------------------------------------------------------------------------- this node


def certificate(not_after: datetime, now: datetime, *, where: str = "") -> Check:
    """The node's TLS certificate: warn under 30 days, critical under 7 or expired."""
    remaining = (not_after - now).total_seconds()
    when = not_after.strftime("%Y-%m-%d %H:%M UTC")
    fix = (
        "run `kakehashi keys rotate --tls` on the running node (no restart needed; renewal "
        "also runs by itself [tls] renew_before_days before expiry)" + where
    )
    if remaining <= 0:
        return Check(
            check="certificate",
            status=Severity.CRITICAL,
            detail=f"certificate expired {_span(-remaining)} ago ({when}): "
            "every peer refuses this node",
            fix=fix,
        )
    days = int(remaining // 86_400)
    detail = f"certificate expires in {_span(remaining)} ({when})"
    if days < CERTIFICATE_CRITICAL_DAYS:
        return Check(check="certificate", status=Severity.CRITICAL, detail=detail, fix=fix)
    if days < CERTIFICATE_WARN_DAYS:
        return Check(check="certificate", status=Severity.WARN, detail=detail, fix=fix)
    return Check(check="certificate", status=Severity.OK, detail=detail)


def database(error: str | None) -> Check:
    """The result of a write and read-back in one transaction (None: it worked)."""
    if error is None:
        return Check(check="database", status=Severity.OK, detail="database is writable")
    return Check(
        check="database",
        status=Severity.CRITICAL,
        detail=f"database write failed: {error}",
        fix="check free disk space (`df -h`) and that the node's account owns HOME/node.db; "
        "the logs name the error",
    )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def disk_space(free: int, total: int, limits: DiskThresholds = DISK_DEFAULTS) -> Check:
    """Free space on the filesystem of the node's home (database, files, backups): a
    warning, or critical, under a share of the whole or under a size (`limits`; by
    default under 10% or 2 GiB, and under 2% or 256 MiB)."""
    share = free / total if total else 0.0
    detail = f"{_size(free)} free of {_size(total)} ({share:.0%})"
    fix = (
        "free space on the node's filesystem (old backups, logs) or give it more; when it "
        "is full the node refuses sends and deliveries with disk_full, and peers keep "
        "what they could not deliver until there is room"
    )
    mib = 1024**2
    if share * 100 < limits.critical_percent or free < limits.critical_mib * mib:
        return Check(check="disk", status=Severity.CRITICAL, detail=detail, fix=fix)
    if share * 100 < limits.warn_percent or free < limits.warn_mib * mib:
        return Check(check="disk", status=Severity.WARN, detail=detail, fix=fix)
    return Check(check="disk", status=Severity.OK, detail=detail)


def home_disk(home: Home, limits: DiskThresholds = DISK_DEFAULTS) -> Check:
    """`disk_space` of the filesystem holding the node's database."""
    usage = shutil.disk_usage(home.database.parent)
    return disk_space(usage.free, usage.total, limits)


def maintenance(on: bool, reason: str | None, since: str | None) -> Check:
    """Maintenance mode is deliberate, but one forgotten keeps the node out of rotation."""
    if not on:
        return Check(check="maintenance", status=Severity.OK, detail="maintenance mode is off")
    why = f": {reason}" if reason else ""
    return Check(
        check="maintenance",
        status=Severity.WARN,
        detail=f"maintenance mode is on since {since}{why} (/healthz answers 503)",
        fix="when the work is done: `kakehashi maintenance off`",
    )


# --------------------------------------------------------------------------- peers

# `views` below are `Node.peer_views` rows: node_id, status, health ('self', 'up',
# 'down', 'no route', or the member status), segments, route, last_error, outbox,
# delivery_lag_s, clock_offset_ms.


def _others(views: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [v for v in views if not v["self"] and v["status"] == "active"]


def peers_reachable(views: Sequence[Mapping[str, Any]]) -> Check:
    """At least one active peer answers (when the federation has any)."""
    others = _others(views)
    if not others:
        return Check(check="peers", status=Severity.OK, detail="no other active member yet")
    up = [v["node_id"] for v in others if v["health"] == "up"]
    if up:
        return Check(
            check="peers",
            status=Severity.OK,
            detail=f"{len(up)} of {len(others)} active peers reachable",
        )
    return Check(
        check="peers",
        status=Severity.CRITICAL,
        detail=f"none of the {len(others)} active peers is reachable",
        fix="check this node's network (routes, firewall, proxy) towards its peers; "
        "`kakehashi peer list` shows each peer's last error",
    )


def segments(own_segments: Sequence[str], views: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Per segment this node sits on: which active peers on it do not answer."""
    others = _others(views)
    checks = []
    for segment in own_segments:
        on = [v for v in others if segment in v["segments"]]
        down = [v for v in on if v["health"] != "up"]
        if not on:
            checks.append(
                Check(
                    check=f"segment/{segment}",
                    status=Severity.OK,
                    detail=f"no other active member on segment {segment}",
                )
            )
            continue
        if not down:
            checks.append(
                Check(
                    check=f"segment/{segment}",
                    status=Severity.OK,
                    detail=f"all {len(on)} peers on segment {segment} reachable",
                )
            )
            continue
        errors = "; ".join(
            f"{v['node_id']}: {v.get('last_error') or 'no answer yet'}" for v in down
        )
        checks.append(
            Check(
                check=f"segment/{segment}",
                status=Severity.CRITICAL if len(down) == len(on) else Severity.WARN,
                detail=f"{len(down)} of {len(on)} peers on segment {segment} down ({errors})",
                fix=f"check the network path on {segment} (firewall, routing) to "
                + ", ".join(v["node_id"] for v in down)
                + "; ask their IT whether the node runs. Envelopes for them stay queued",
            )
        )
    return checks


def routes(views: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Active peers on no segment of ours that no relay reaches."""
    stranded = [v["node_id"] for v in _others(views) if v["health"] == "no route"]
    if not stranded:
        return []
    return [
        Check(
            check="routes",
            status=Severity.WARN,
            detail="no route to " + ", ".join(stranded) + ": they share no segment with this "
            "node and no relay reaches them",
            fix="at the authority flag a node on both segments as relay: "
            "`kakehashi peer update NODE_ID --relay`; `kakehashi route NODE_ID` explains",
        )
    ]


def clock_skew(views: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Each peer's clock against ours (> 2 s warn, > 30 s critical)."""
    measured = [
        (v["node_id"], int(v["clock_offset_ms"]))
        for v in _others(views)
        if v.get("clock_offset_ms") is not None
    ]
    problems = []
    for node_id, offset in measured:
        size = abs(offset)
        if size <= CLOCK_WARN_MS:
            continue
        direction = "ahead of" if offset > 0 else "behind"
        problems.append(
            Check(
                check=f"clock/{node_id}",
                status=Severity.CRITICAL if size > CLOCK_CRITICAL_MS else Severity.WARN,
                detail=f"{node_id}'s clock is {size / 1000:.1f} s {direction} this node's: "
                "envelope timestamps and token expiry depend on synchronised clocks",
                fix="enable NTP on both nodes (chrony: `systemctl enable --now chronyd`; "
                "`chronyc tracking` shows the offset)",
            )
        )
    if len(problems) >= 2 and len(problems) == len(measured):
        # Every peer disagrees with us: the odd one out is most likely this node.
        problems = [
            Check(
                check=p.check,
                status=p.status,
                detail=p.detail + " (every peer differs: this node's clock is the likely culprit)",
                fix=p.fix,
            )
            for p in problems
        ]
    if problems:
        return problems
    return [
        Check(
            check="clock",
            status=Severity.OK,
            detail=f"clocks agree within {CLOCK_WARN_MS / 1000:.0f} s with "
            f"{len(measured)} peer{'' if len(measured) == 1 else 's'}"
            if measured
            else "no peer clock measured yet",
        )
    ]


def roster(own_version: int, seen: Mapping[str, int], authority: str) -> Check:
    """`/healthz`: is this node's roster older than one a peer serves (the authority's
    newest version spreads through every peer)?"""
    newest = max(seen.values(), default=own_version)
    if newest <= own_version:
        return Check(
            check="roster", status=Severity.OK, detail=f"roster version {own_version} is current"
        )
    holders = sorted(node for node, version in seen.items() if version == newest)
    return Check(
        check="roster",
        status=Severity.WARN,
        detail=f"this node holds roster version {own_version}; "
        f"{', '.join(holders)} serve{'s' if len(holders) == 1 else ''} version {newest}",
        fix=f"the node fetches newer rosters by itself; if this persists, check that it "
        f"reaches the authority ({authority}): `kakehashi peer list`",
    )


def roster_lag(own_version: int, seen: Mapping[str, int], authority: str) -> list[Check]:
    """`doctor`: every peer whose last health answer carried another roster version."""
    checks = []
    for node_id, version in sorted(seen.items()):
        if version > own_version:
            checks.append(
                Check(
                    check=f"roster/{node_id}",
                    status=Severity.WARN,
                    detail=f"{node_id} has roster version {version}, this node {own_version}: "
                    "this node is behind",
                    fix=f"the node fetches it by itself; if this persists, check that it "
                    f"reaches {node_id} and the authority ({authority}): `kakehashi peer list`",
                )
            )
        elif version < own_version:
            checks.append(
                Check(
                    check=f"roster/{node_id}",
                    status=Severity.WARN,
                    detail=f"{node_id} still has roster version {version}, this node {own_version}",
                    fix=f"{node_id} fetches it at its next exchange; if it stays behind, "
                    f"run `kakehashi doctor` on {node_id}",
                )
            )
    if checks:
        return checks
    return [
        Check(
            check="roster",
            status=Severity.OK,
            detail=f"roster version {own_version}, the same at {len(seen)} "
            f"peer{'' if len(seen) == 1 else 's'} checked",
        )
    ]


def _outbox_fix(node_id: str) -> str:
    return (
        f"{node_id} does not take deliveries: `kakehashi peer list` shows its last error; "
        "nothing is lost, the queue drains when it answers again"
    )


def outbox(views: Sequence[Mapping[str, Any]]) -> list[Check]:
    """`doctor`: per peer, a queue that grows (depth) or waits too long (lag)."""
    checks = []
    for view in views:
        depth, lag = int(view.get("outbox") or 0), float(view.get("delivery_lag_s") or 0.0)
        if not depth:
            continue
        if lag > OUTBOX_CRITICAL_LAG_S or depth > OUTBOX_CRITICAL_DEPTH:
            status = Severity.CRITICAL
        elif lag > OUTBOX_WARN_LAG_S or depth > OUTBOX_WARN_DEPTH:
            status = Severity.WARN
        else:
            continue
        checks.append(
            Check(
                check=f"outbox/{view['node_id']}",
                status=status,
                detail=f"{depth} envelope{' waits' if depth == 1 else 's wait'} for "
                f"{view['node_id']}, the oldest for {_span(lag)}",
                fix=_outbox_fix(view["node_id"]),
            )
        )
    if checks:
        return checks
    queued = sum(int(v.get("outbox") or 0) for v in views)
    return [
        Check(
            check="outbox",
            status=Severity.OK,
            detail=f"{queued} envelopes queued, none waiting over {_span(OUTBOX_WARN_LAG_S)}",
        )
    ]


def outbox_lag(views: Sequence[Mapping[str, Any]]) -> Check:
    """`/healthz`: the longest delivery lag, warn over 5 minutes. Never critical: a town
    that is offline must not take this node out of its load balancer."""
    waiting = [v for v in views if v.get("outbox")]
    if not waiting:
        return Check(check="outbox", status=Severity.OK, detail="nothing waits for delivery")
    slowest = max(waiting, key=lambda v: float(v["delivery_lag_s"]))
    lag = float(slowest["delivery_lag_s"])
    detail = f"oldest undelivered envelope waits {_span(lag)} (for {slowest['node_id']})"
    if lag > OUTBOX_WARN_LAG_S:
        return Check(
            check="outbox",
            status=Severity.WARN,
            detail=detail,
            fix=_outbox_fix(slowest["node_id"]),
        )
    return Check(check="outbox", status=Severity.OK, detail=detail)


# --------------------------------------------------------------------------- files


def key_files(home: Home) -> list[Check]:
    """Private keys must be mode 0600 (and the keys directory 0700), owned by the node."""
    checks = []
    if home.keys.is_dir() and stat.S_IMODE(home.keys.stat().st_mode) & 0o077:
        mode = stat.S_IMODE(home.keys.stat().st_mode)
        checks.append(
            Check(
                check="keys",
                status=Severity.CRITICAL,
                detail=f"{home.keys} is mode {mode:04o}: other accounts can list the keys",
                fix=f"chmod 700 {home.keys}",
            )
        )
    for name in _KEY_FILES:
        path = home.keys / name
        if not path.exists():
            if name not in _MISSING_OK:
                checks.append(
                    Check(
                        check=f"keys/{name}",
                        status=Severity.CRITICAL,
                        detail=f"{path} is missing: the node cannot start",
                        fix="restore the home from a backup (keys cannot be recreated "
                        "without the federation's consent)",
                    )
                )
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            checks.append(
                Check(
                    check=f"keys/{name}",
                    status=Severity.CRITICAL,
                    detail=f"{path} is mode {mode:04o}: other accounts can read a private key",
                    fix=f"chmod 600 {path} (and consider the key exposed: rotate it)",
                )
            )
    if checks:
        return checks
    return [Check(check="keys", status=Severity.OK, detail="private keys are mode 0600")]


def certificate_file(home: Home, now: datetime) -> Check:
    """The certificate on disk (for a node that is not running)."""
    try:
        cert = tls.load_certificate_pem(home.tls_cert.read_bytes())
    except FileNotFoundError:
        return Check(
            check="certificate",
            status=Severity.CRITICAL,
            detail=f"no certificate at {home.tls_cert}: this node has not joined a federation",
            fix="`kakehashi federation create` (prefecture) or `kakehashi federation join "
            "TOKEN` (town)",
        )
    except (OSError, KakehashiError) as exc:
        return Check(
            check="certificate",
            status=Severity.CRITICAL,
            detail=f"cannot read {home.tls_cert}: {exc}",
            fix="restore the home from a backup",
        )
    return certificate(cert.not_valid_after_utc, now)


def config_file(home: Home) -> Check:
    """Does config.toml load? (Edited since the node started, it may not any more.)"""
    try:
        load_config(home)
    except KakehashiError as exc:
        return Check(
            check="config",
            status=Severity.CRITICAL,
            detail=f"{exc} — the node will not start with it",
            fix=exc.hint or f"correct {home.config} (the message names the field)",
        )
    return Check(check="config", status=Severity.OK, detail=f"{home.config} is valid")


def offline_checks(home: Home, now: datetime, *, running: bool) -> list[Check]:
    """What `doctor` checks on the files of the home, with or without a running node."""
    checks = [config_file(home), *key_files(home)]
    if not running:
        checks.append(certificate_file(home, now))
        try:
            limits = load_config(home).disk
        except KakehashiError:
            limits = DISK_DEFAULTS  # the config check above says what is wrong with it
        checks.append(home_disk(home, limits))  # a full disk can keep a node from starting
    return checks
