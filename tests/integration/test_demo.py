"""`make demo` forms the federation through the CLI alone and stops cleanly."""

from __future__ import annotations

import os
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.local import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}


def run_demo(directory: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`examples/demo.py --once` with its homes in `directory`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--once", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


def _wait_for_log_event(node: subprocess.Popen[bytes], event: str, *, timeout: float) -> None:
    """Read the node's log (JSON lines on standard error) until it logs `event`."""
    assert node.stderr is not None
    deadline = time.monotonic() + timeout
    logged = b""
    while f'"event": "{event}"'.encode() not in logged:
        left = deadline - time.monotonic()
        assert left > 0, f"no {event} within {timeout} s: {logged[-2000:]!r}"
        readable, _, _ = select.select([node.stderr], [], [], left)
        if readable:
            chunk = os.read(node.stderr.fileno(), 65536)
            assert chunk, f"the node exited before {event}: {logged[-2000:]!r}"
            logged += chunk


def _run_authority(home: Path) -> subprocess.Popen[bytes]:
    """`kakehashi run` of a new authority node in `home`, once it has started."""
    env = _env()
    port = free_port()
    init = [KAKEHASHI, "init", "--home", str(home), "--node-id", "mie-pref", "--name", "三重県"]
    init += ["--code", "240001", "--listen", f"127.0.0.1:{port}"]
    subprocess.run(init, check=True, capture_output=True, env=env, timeout=60)
    create = [KAKEHASHI, "federation", "create", "--home", str(home), "--name", "三重県 市町連携"]
    subprocess.run(create, check=True, capture_output=True, env=env, timeout=60)
    node = subprocess.Popen(
        [KAKEHASHI, "run", "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _wait_for_log_event(node, "node_started", timeout=30)
    except BaseException:
        node.kill()
        node.wait(timeout=30)
        raise
    return node


def test_demo_forms_four_node_federation_through_the_cli_and_stops_cleanly(tmp_path: Path) -> None:
    result = run_demo(tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    for node_id in ("mie-pref", "tsu", "yokkaichi", "ise"):
        assert f"kakehashi peer list --home .demo/{node_id}" in out
    # Every node printed a table in which the other three are up.
    assert out.count("│ up") >= 12, out
    assert "the same 5 messages, in the same order, on all 4 nodes" in out
    assert out.count("四日市市: 沿岸部で約1,200戸が停電") == 4  # printed by every node's history
    assert "stopped cleanly" in out
    urls = re.findall(r"^(\w[\w-]*): web client (https://127\.0\.0\.1:\d+/)$", out, re.M)
    assert [node for node, _ in urls] == ["mie-pref", "tsu", "yokkaichi", "ise"], out
    assert out.count("login tanaka / password ") == 4
    assert out.count("serves the login page (ログイン)") == 4  # fetched while each node ran
    for node_id in ("mie-pref", "tsu", "yokkaichi", "ise"):
        home = tmp_path / node_id
        assert not (home / "admin.sock").exists(), "the node did not clean up its admin socket"
        log = (tmp_path / f"{node_id}.log").read_text()
        assert '"event": "node_stopped"' in log, log[-1000:]
        assert "Traceback" not in log
        for key in (home / "keys").iterdir():
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_demo_refuses_to_wipe_the_homes_of_nodes_that_still_run(tmp_path: Path) -> None:
    # A demo started while an earlier one still runs in the same directory (two
    # terminals) must not delete the homes of running nodes.
    env = _env()
    home = tmp_path / "mie-pref"
    node = _run_authority(home)
    try:
        status = [KAKEHASHI, "status", "--home", str(home), "--json"]
        result = run_demo(tmp_path, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "nodes of an earlier demo still run" in result.stderr
        assert "(mie-pref)" in result.stderr
        # What to do when the earlier demo's terminal is gone: a command that stops them.
        assert f"kakehashi stop --home {home}" in result.stderr
        assert result.stdout == ""  # refused before anything was made
        assert node.poll() is None
        assert subprocess.run(status, capture_output=True, env=env).returncode == 0
        assert (home / "config.toml").exists()
    finally:
        node.terminate()
        node.wait(timeout=30)


def test_stop_stops_the_running_node_cleanly_and_then_says_it_is_not_running(
    tmp_path: Path,
) -> None:
    home = tmp_path / "mie-pref"
    node = _run_authority(home)
    stop = [KAKEHASHI, "stop", "--home", str(home)]
    try:
        result = subprocess.run(stop, capture_output=True, text=True, env=_env(), timeout=90)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"stopped mie-pref (pid {node.pid})"
        assert node.wait(timeout=30) == 0  # it had already exited when stop returned
        assert node.stderr is not None
        log = node.stderr.read().decode()
        assert '"event": "stop_requested"' in log and '"event": "node_stopped"' in log
        assert "Traceback" not in log
        assert not (home / "admin.sock").exists()
        again = subprocess.run(stop, capture_output=True, text=True, env=_env(), timeout=60)
        assert again.returncode == 1
        assert "the node is not running" in again.stderr
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=30)
