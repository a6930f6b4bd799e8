"""A relay deployment across separated networks (三層分離), on one machine. Needs root.

Builds LGWAN and Internet segments from network namespaces (see `topology.py`):
the prefecture (`pref`) on both, acting as the relay; 津市 (`town-a`) and 亀山市
(`town-c`) on LGWAN only; 伊勢市 (`town-b`) on the Internet side only. Then, with
the `kakehashi` command only, it forms the federation, shows that town-a cannot
even open a TCP connection to town-b, opens a room for all four, lets each post,
and shows that every node holds the same timeline: town-a and town-b talk through
the prefecture's relay, which verifies every envelope before it forwards it.

    make segments                                   # or, from the repository root:
    .venv/bin/python -m examples.segments.run [--keep] [--dir DIR]

`--keep` leaves everything running until Ctrl-C, to try `kakehashi` by hand, e.g.
`kakehashi peer list --home DIR/town-a` or `kakehashi route town-b --home DIR/town-a`.
Namespaces and node processes are always removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .federation import PORT, SegmentFederation
from .topology import Topology, cleanup_stale

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = ("pref", "town-a", "town-b", "town-c")
REPORTS = {
    "pref": "【県】県内で大雨警報。各市町の状況を報告してください",
    "town-a": "津市 (LGWAN): 市内の避難所 3 か所を開設",
    "town-b": "伊勢市 (インターネット側): 宮川の水位は通常",
    "town-c": "亀山市 (LGWAN): 国道1号の一部で通行止め",
}


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def reachable(topology: Topology, node: str, address: str) -> str:
    probe = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {PORT}), timeout=2).close()\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        topology.exec_argv(node, [sys.executable, "-c", probe]),
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    return result.stdout.strip()


def show(fed: SegmentFederation) -> bool:
    """Walk through the deployment; whether every node ended with the same timeline."""
    topology = fed.topology
    step("town-a (LGWAN) tries to open a TCP connection to town-b (Internet side)")
    print(f"  town-a -> town-b {topology.address('town-b', 'internet')}:{PORT}: ", end="")
    print(reachable(topology, "town-a", topology.address("town-b", "internet")))
    print(f"  town-a -> pref   {topology.address('pref', 'lgwan')}:{PORT}: ", end="")
    print(reachable(topology, "town-a", topology.address("pref", "lgwan")))

    step("pref opens a room for all four; each posts a report")
    room = fed.create_room("大雨 警戒 連絡室", ["town-a", "town-b", "town-c"])
    print(f"  room id: {room}")
    for node, text in REPORTS.items():
        fed.send(node, room, [text])
    started = time.monotonic()
    fed.wait(
        lambda: all(
            len([r for r in fed.timeline(node, room) if r["kind"] == "message"]) == len(REPORTS)
            for node in MEMBERS
        ),
        "every report at every node",
    )
    took = time.monotonic() - started
    print(f"  every report at every node {took:.1f} s after the last was posted (polled)")

    for node in ("town-a", "town-b"):
        step(f"kakehashi room history --home {fed.home(node)} ROOM")
        print(fed.cli("room", "history", room, node=node), end="")
    timelines = {
        tuple(r["id"] for r in fed.timeline(node, room) if r["kind"] == "message")
        for node in MEMBERS
    }
    same = len(timelines) == 1
    print("\nthe same timeline on all four nodes" if same else "\nTIMELINES DIFFER (a bug)")

    step(f"kakehashi peer list --home {fed.home('town-a')}")
    print(fed.cli("peer", "list", node="town-a"), end="")
    step(f"kakehashi route town-b --home {fed.home('town-a')}")
    print(fed.cli("route", "town-b", node="town-a"), end="")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    parser.add_argument("--dir", default=str(ROOT / ".segments"), help="where node homes go")
    parser.add_argument("--prefix", default="kk-demo", help="namespace name prefix")
    args = parser.parse_args()
    reason = Topology.available()
    if reason is not None:
        print(f"segments example: cannot build network namespaces here: {reason}", file=sys.stderr)
        return 1
    cleanup_stale()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    topology = Topology(prefix=args.prefix)
    topology.destroy()  # what an interrupted earlier run left
    step(f"building the networks (namespaces {args.prefix}-*)")
    with topology, SegmentFederation(topology, base) as fed:
        for node in topology.nodes:
            where = ", ".join(f"{s} {topology.address(node.name, s)}" for s in node.segments)
            print(f"  {node.name:<7} {where}")
        step("forming the federation with `kakehashi` (init, create, invite, join, run)")
        fed.form(relays=("pref",))
        print(f"  {len(fed.processes)} nodes running; logs in {base}/*.log")
        same = show(fed)
        if args.keep:
            print("\nRunning. Ctrl-C stops every node and removes the namespaces.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        step("stopping every node and removing the namespaces")
    print("done")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
