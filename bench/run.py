"""`make bench`: Kakehashi's figures, each beside a baseline measured in the same run.

These machines are noisy, so every figure is printed next to a baseline taken
moments before on the same machine, and the ratio is what to compare across runs.
Results go to bench/results.json as a list of {name, value, unit, baseline, ratio}.

Trust layer (bench/trust.py): roster_verify_per_s, mtls_request_p50_ms,
mtls_request_p99_ms, join_to_known_everywhere_ms.

Delivery (bench/flow.py; node processes on loopback, 1 KiB messages, durable
commits, real mutual TLS; baseline = one core doing encode + Merkle + verify with
no I/O, bench/baseline.py): two_node_throughput_eps, one_hop_latency_p50_ms,
one_hop_latency_p99_ms, fanout30_p99_ms, catchup_eps, outbox_1m_rss_mb.

Client API (bench/clientapi.py; node processes serving the staff API over HTTPS and
WebSocket): ws_delivery_p50_ms (baseline: the plain one-hop latency, same run),
ws_fanout2000_p99_ms (baseline: the same with one WebSocket client).
Files (bench/transfer.py; a 200 MB file uploaded to one node process, fetched by
another over mutual TLS; baseline = one core reading, hashing, writing and fsyncing
the same bytes): file_transfer_mbps, file_upload_mbps.
Storage (bench/storage.py; the node's store alone, batches of 1,500 envelopes
committed as a receiver commits them; baseline = the same with an index on envelope
ids written by every commit, as before ids were indexed in bulk):
envelope_commit_us_first_50k, envelope_commit_us_at_250k.

    python bench/run.py                      # everything (about 10 minutes)
    python bench/run.py --quick              # every size about a tenth: a smoke run
    python bench/run.py --only catchup_eps,fanout30_p99_ms
    python bench/run.py --only one_hop_latency --profile   # py-spy the nodes meanwhile

Progress lines go to standard error; the figures to standard output. With
--profile, py-spy samples the node processes during each measured phase and
summaries (top functions per thread) are written to bench/profiles/ and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clientapi
import flow
import storage
import structlog
import transfer
import trust
from common import progress, show

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"
QUICK_RESULTS = BENCH / "results.quick.json"


def _groups(
    args: argparse.Namespace, sizes: flow.Sizes, base: flow.Baselines, prof: flow.Profiler
) -> list[tuple[str, tuple[str, ...], Callable[[], list[dict[str, Any]]]]]:
    """(group, figure names, run) in the order they run."""
    requests = max(20, args.requests // 10) if args.quick else args.requests
    groups: list[tuple[str, tuple[str, ...], Callable[[], list[dict[str, Any]]]]] = [
        ("roster_verify", ("roster_verify_per_s",), lambda: [trust.bench_roster_verify()]),
        (
            "trust_federation",
            ("mtls_request_p50_ms", "mtls_request_p99_ms", "join_to_known_everywhere_ms"),
            lambda: asyncio.run(trust.bench_federation(requests)),
        ),
    ]
    for group, (names, figure) in {
        **flow.FIGURES,
        **clientapi.FIGURES,
        **transfer.FIGURES,
        **storage.FIGURES,
    }.items():
        groups.append((group, names, lambda figure=figure: figure(sizes, base, prof)))
    return groups


def main() -> int:
    parser = argparse.ArgumentParser(description="Kakehashi benchmarks")
    parser.add_argument("--requests", type=int, default=500, help="requests per latency figure")
    parser.add_argument("--quick", action="store_true", help="every size about 10x smaller")
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME[,NAME]",
        help="run only these figures (figure names as in results.json, or group names: "
        + ", ".join(
            [
                "roster_verify",
                "trust_federation",
                *flow.FIGURES,
                *clientapi.FIGURES,
                *transfer.FIGURES,
            ]
        )
        + ")",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the node processes of the delivery figures"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the node homes and logs (under /tmp)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"where to write results (default {RESULTS.name}; {QUICK_RESULTS.name} with --quick)",
    )
    args = parser.parse_args()
    # Nodes run in this process for the trust figures: keep their logs to errors.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    flow.KEEP = args.keep
    sizes = flow.QUICK if args.quick else flow.FULL
    base = flow.Baselines(sizes)
    prof = flow.Profiler(args.profile)
    groups = _groups(args, sizes, base, prof)
    known = {name for _, names, _ in groups for name in names} | {g for g, _, _ in groups}
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - known
    if unknown:
        parser.error(f"unknown figure(s) {sorted(unknown)}; known: {sorted(known)}")

    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    started = time.monotonic()
    # The interpreter's build moves every figure and its baseline (Makefile, PYTHON).
    progress(f"python {platform.python_version()} at {os.path.realpath(sys.executable)}")
    print(
        f"{'figure':28} {'value':>12} {'unit':8} {'':9}{'baseline':>12}   {'ratio':>11}", flush=True
    )
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for group, names, run in groups:
        selected = set(names) if not wanted or group in wanted else set(names) & wanted
        if not selected:
            continue
        progress(f"{group}: starting")
        group_started = time.monotonic()
        try:
            rows = run()
        except Exception as exc:  # one broken figure must not lose the others
            progress(f"{group}: FAILED: {exc!r}")
            failed.append(group)
            continue
        for row in rows:
            if row["name"] in selected:
                show(row)
                results.append(row)
        progress(f"{group}: done in {time.monotonic() - group_started:.1f}s")

    if wanted and output.exists():
        # A partial run updates its figures and keeps the others of the last run.
        previous = [r for r in json.loads(output.read_text()) if isinstance(r, dict)]
        fresh = {r["name"] for r in results}
        order = [r["name"] for r in previous]
        merged = {r["name"]: r for r in previous if r["name"] not in fresh}
        merged.update({r["name"]: r for r in results})
        results = sorted(
            merged.values(),
            key=lambda r: order.index(r["name"]) if r["name"] in order else len(order),
        )
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {output} (run took {time.monotonic() - started:.0f}s)", flush=True)
    for summary in prof.summaries:
        print("\n" + summary, end="")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
