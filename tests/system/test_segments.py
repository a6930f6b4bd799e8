"""Rooms across separated networks, with real network namespaces and real node processes.

Topology (see examples/segments/topology.py): `pref` (authority and relay) and
`relay2` sit on both LGWAN and the Internet side; `town-a` and `town-c` on LGWAN
only; `town-b` on the Internet side only. Nothing forwards IP between segments, so
the only way across is a Kakehashi relay.

One federation serves the whole module (forming it takes a while); each test uses
rooms of its own and leaves the federation as it found it (relay flags, processes,
links), also when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from examples.segments.federation import PORT, SegmentFederation
from examples.segments.topology import DEFAULT_NODES, NodeSpec, Topology, cleanup_stale

from .conftest import require_namespaces

MEMBERS = ("pref", "town-a", "town-b", "town-c")
TAMPERER = [sys.executable, str(Path(__file__).with_name("tampering_relay.py"))]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SegmentFederation]:
    require_namespaces()
    cleanup_stale()
    nodes = (*DEFAULT_NODES, NodeSpec("relay2", ("internet", "lgwan")))
    with (
        Topology(nodes) as topology,
        SegmentFederation(topology, tmp_path_factory.mktemp("segments")) as federation,
    ):
        federation.form(relays=("pref",))
        yield federation


def messages(fed: SegmentFederation, node: str, room: str) -> list[dict[str, object]]:
    return [row for row in fed.timeline(node, room) if row["kind"] == "message"]


def texts(fed: SegmentFederation, node: str, room: str) -> list[str]:
    return [str(row["text"]) for row in messages(fed, node, room)]


def converged(fed: SegmentFederation, room: str, nodes: Sequence[str], count: int) -> bool:
    """Every node holds `count` messages of `room`, in one and the same order."""
    timelines = {tuple(row["id"] for row in messages(fed, node, room)) for node in nodes}
    return len(timelines) == 1 and len(next(iter(timelines))) == count


def assert_same_timeline_exactly_once(
    fed: SegmentFederation, room: str, nodes: Sequence[str], expected: set[str]
) -> None:
    seen = {node: texts(fed, node, room) for node in nodes}
    reference = seen[nodes[0]]
    assert sorted(reference) == sorted(expected)  # every message, none twice
    assert len(set(reference)) == len(reference)
    for node in nodes:
        assert seen[node] == reference, f"{node} orders the room differently"


def can_connect(topology: Topology, node: str, address: str, port: int = PORT) -> bool:
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), timeout=2).close()\n"
        "except OSError as exc:\n"
        "    print(exc); sys.exit(1)\n"
    )
    result = subprocess.run(
        topology.exec_argv(node, [sys.executable, "-c", probe]),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return result.returncode == 0


def outbox_for(fed: SegmentFederation, node: str, peer: str) -> int:
    rows = fed.json("peer", "list", node=node)
    return int(next(row["outbox"] for row in rows if row["node_id"] == peer))


def set_relays(fed: SegmentFederation, flags: dict[str, bool]) -> None:
    for node, relay in flags.items():
        fed.cli("peer", "update", node, "--relay" if relay else "--no-relay", node="pref")
    fed.wait_roster()


# --------------------------------------------------------------------------- tests


def test_town_a_cannot_reach_town_b_yet_a_room_spans_them(fed: SegmentFederation) -> None:
    topology = fed.topology
    town_b = topology.address("town-b", "internet")
    assert not can_connect(topology, "town-a", town_b)
    assert not can_connect(topology, "town-b", topology.address("town-c", "lgwan"))
    assert can_connect(topology, "town-a", topology.address("pref", "lgwan"))
    assert can_connect(topology, "town-b", topology.address("pref", "internet"))

    room = fed.create_room("停電情報 連絡室", ["town-a", "town-b", "town-c"])
    expected = set()
    for node in MEMBERS:
        batch = [f"{node}: 報告 {i}" for i in range(25)]
        fed.send(node, room, batch)
        expected.update(batch)
    fed.wait(lambda: converged(fed, room, MEMBERS, len(expected)), "every member has all")
    assert_same_timeline_exactly_once(fed, room, MEMBERS, expected)

    routes = {row["node_id"]: row["route"] for row in fed.json("peer", "list", node="town-a")}
    assert routes["town-b"] == "via pref" and routes["town-c"] == "direct"
    explained = fed.json("route", "town-b", node="town-a")
    assert explained["route"]["path"] == ["pref", "town-b"]
    assert explained["shared_segments"] == []


def test_relay_down_messages_wait_and_all_arrive_after_it_restarts(
    fed: SegmentFederation,
) -> None:
    room = fed.create_room("断水対応", ["town-a", "town-b", "town-c"])
    fed.kill("pref")
    try:
        batch = [f"town-b: 給水所 {i}" for i in range(100)]
        fed.send("town-b", room, batch)
        fed.wait(lambda: outbox_for(fed, "town-b", "town-a") == 100, "queued for town-a")
        assert texts(fed, "town-a", room) == []  # nothing can cross while the relay is down
        assert outbox_for(fed, "town-b", "pref") == 100
    finally:
        fed.start("pref")
    fed.wait(lambda: converged(fed, room, MEMBERS, 100), "everything after the restart")
    assert_same_timeline_exactly_once(fed, room, MEMBERS, set(batch))
    assert outbox_for(fed, "town-b", "town-a") == 0


def test_with_a_second_relay_delivery_goes_on_without_waiting(fed: SegmentFederation) -> None:
    room = fed.create_room("防災 連絡", ["town-a", "town-b"])
    set_relays(fed, {"relay2": True})
    try:
        fed.kill("pref")
        try:
            batch = [f"town-b: 避難所 {i}" for i in range(50)]
            fed.send("town-b", room, batch)
            took = fed.wait(
                lambda: len(texts(fed, "town-a", room)) == 50, "delivery via relay2", timeout=15
            )
            assert took < 8, f"took {took:.1f} s"
            routes = {r["node_id"]: r["route"] for r in fed.json("peer", "list", node="town-b")}
            assert routes["town-a"] == "via relay2"
        finally:
            fed.start("pref")
        fed.wait(lambda: converged(fed, room, ["pref", "town-a", "town-b"], 50), "pref too")
        assert_same_timeline_exactly_once(fed, room, ["town-a", "town-b", "pref"], set(batch))
    finally:
        set_relays(fed, {"relay2": False})


def test_link_cut_and_restored_loses_nothing(fed: SegmentFederation) -> None:
    room = fed.create_room("道路情報", ["town-a", "town-b", "town-c"])
    fed.topology.link_down("town-a", "lgwan")
    try:
        expected = set()
        for node in ("pref", "town-b", "town-c"):
            batch = [f"{node}: 通行止め {i}" for i in range(30)]
            fed.send(node, room, batch)
            expected.update(batch)
        others = ["pref", "town-b", "town-c"]
        fed.wait(lambda: converged(fed, room, others, 90), "the others, while town-a is cut off")
        assert texts(fed, "town-a", room) == []
    finally:
        fed.topology.link_up("town-a", "lgwan")
    fed.wait(lambda: converged(fed, room, MEMBERS, 90), "town-a after the link is back")
    assert_same_timeline_exactly_once(fed, room, MEMBERS, expected)


def refusals_from(fed: SegmentFederation, node: str, peer: str, since: int) -> list[dict[str, Any]]:
    """The `envelope_refused` events `node` logged for `peer`'s batches after byte `since`."""
    with fed.log(node).open("rb") as log:
        log.seek(since)
        events = [json.loads(line) for line in log if line.startswith(b"{")]
    return [e for e in events if e.get("event") == "envelope_refused" and e.get("peer") == peer]


def test_a_tampering_relay_is_refused_and_catch_up_fills_the_gap(
    fed: SegmentFederation,
) -> None:
    room = fed.create_room("観光連携", ["town-a", "town-b"])
    set_relays(fed, {"pref": False, "relay2": True})
    fed.kill("relay2")
    fed.start("relay2", launcher=TAMPERER)
    try:
        explained = fed.json("route", "town-a", node="town-b")
        assert explained["route"]["path"] == ["relay2", "town-a"]
        log_start = fed.log("town-a").stat().st_size
        batch = [f"town-b: 観光客数 {i}" for i in range(20)]
        # pref, the only other holder of genuine copies town-a can reach, is down until
        # the tampered copies are in: each is refused on its signature alone, with no
        # genuine copy held to compare it with, and none is applied meanwhile.
        fed.kill("pref")
        try:
            fed.send("town-b", room, batch)
            fed.wait(
                lambda: len(refusals_from(fed, "town-a", "relay2", log_start)) >= 20,
                "town-a refusing the tampered copies",
            )
            assert texts(fed, "town-a", room) == []
        finally:
            fed.start("pref")
        # pref gets them from town-b's outbox; town-a pulls the genuine ones from pref.
        fed.wait(lambda: converged(fed, room, ["pref", "town-a", "town-b"], 20), "catch-up")
        assert_same_timeline_exactly_once(fed, room, ["pref", "town-a", "town-b"], set(batch))
        reasons = {e["reason"] for e in refusals_from(fed, "town-a", "relay2", log_start)}
        assert reasons == {"bad_envelope_signature"}
    finally:
        fed.kill("relay2")
        fed.launchers.pop("relay2")
        fed.start("relay2")
        set_relays(fed, {"pref": True, "relay2": False})


def test_the_segments_example_runs_as_documented(tmp_path: Path) -> None:
    require_namespaces()
    prefix = f"kkx{os.getpid()}"
    result = subprocess.run(
        [sys.executable, "-m", "examples.segments.run", "--dir", str(tmp_path), "--prefix", prefix],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Network is unreachable" in result.stdout
    assert "the same timeline on all four nodes" in result.stdout
    assert "via pref" in result.stdout
    assert not [
        ns
        for ns in subprocess.check_output(["ip", "netns", "list"], text=True).split()
        if ns.startswith(prefix)
    ]
