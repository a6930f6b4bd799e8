"""The CLI reaches its node only through a private Unix socket in the node's home.

These tests drive the real `kakehashi` command in a subprocess against nodes
running in the test's event loop, the way an operator's terminal reaches a node.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from federation.errors import ConfigError
from gateway.config import Home
from gateway.node import Node

from .conftest import Cluster

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


async def cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_admin_socket_is_mode_0600_and_the_cli_reads_status_through_it(
    cluster: Cluster,
) -> None:
    node = await cluster.authority()
    socket_path = node.home.admin_socket
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    code, out, _ = await cli("status", "--home", str(node.home.root), "--json")
    assert code == 0
    status = json.loads(out)
    assert status["node_id"] == "mie-pref" and status["role"] == "authority"
    assert status["roster_version"] == node.roster.version


async def test_second_node_on_the_same_home_refuses_to_start(cluster: Cluster) -> None:
    node = await cluster.authority()
    second = Node(Home(node.home.root))
    with pytest.raises(ConfigError) as refused:
        await second.start()
    assert refused.value.code == "already_running"
    code, out, _ = await cli("status", "--home", str(node.home.root), "--json")
    assert code == 0 and json.loads(out)["node_id"] == "mie-pref"


async def test_member_node_refuses_authority_commands_naming_the_authority(
    cluster: Cluster,
) -> None:
    await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    code, _, err = await cli("peer", "invite", "--home", str(tsu.home.root), "ise")
    assert code == 1
    assert "not the federation authority" in err
    assert "mie-pref" in err  # the fix names where to run it


async def test_invite_pending_approve_and_peer_list_through_the_cli(cluster: Cluster) -> None:
    authority = await cluster.authority()
    home = str(authority.home.root)
    code, token, _ = await cli("peer", "invite", "--home", home, "tsu", "--approval", "manual")
    assert code == 0 and token.count(".") == 2
    await cluster.init("tsu", "津市", "242012")
    join = asyncio.create_task(
        cli("federation", "join", "--home", str(cluster.home("tsu").root), token.strip())
    )
    for _ in range(100):
        code, out, _ = await cli("peer", "pending", "--home", home, "--json")
        if json.loads(out):
            break
        await asyncio.sleep(0.1)
    assert [row["node_id"] for row in json.loads(out)] == ["tsu"]
    code, out, _ = await cli("peer", "approve", "--home", home, "tsu", "--json")
    assert code == 0 and json.loads(out)["roster_version"] == 2
    code, out, err = await join
    assert code == 0, err
    assert "joined" in out
    await cluster.start("tsu")
    code, out, _ = await cli("peer", "list", "--home", home, "--json")
    rows = {row["node_id"]: row for row in json.loads(out)}
    assert rows["tsu"]["status"] == "active" and rows["tsu"]["name"] == "津市"
    assert rows["mie-pref"]["self"] is True
