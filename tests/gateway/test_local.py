"""Ports for nodes started by the tests, the benchmarks and the demo."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import local


def _ephemeral_floor() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_lie_below_the_range_outgoing_connections_take_theirs_from() -> None:
    floor = _ephemeral_floor()
    ports = [local.free_port() for _ in range(200)]
    assert all(local._LOWEST_PORT <= port < floor for port in ports), (floor, ports)
    assert len(set(ports)) == len(ports), "a port was given twice"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports[-1]))


def test_a_port_someone_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", local.free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        after = local.free_port()
        draws: Iterator[int] = iter([busy, after])
        monkeypatch.setattr(local._pick, "randrange", lambda low, high: next(draws))
        local._given.discard(after)
        assert local.free_port() == after


def test_without_room_below_the_range_the_kernel_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("10500\t60999\n")
    monkeypatch.setattr(local, "_EPHEMERAL_RANGE", narrow)
    port = local.free_port()
    assert port >= 10500
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
