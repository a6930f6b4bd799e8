"""A prefecture and its towns form a federation and see each other over mutual TLS."""

from __future__ import annotations

import time

import pytest

from federation.roster import MemberStatus
from gateway.membership import join_federation

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

TOWNS = (
    ("tsu", "津市", "242012"),
    ("yokkaichi", "四日市市", "242021"),
    ("ise", "伊勢市", "242039"),
)


def sees_all_active_and_up(cluster: Cluster, expected: set[str]) -> bool:
    for node in cluster.nodes.values():
        views = {view["node_id"]: view for view in node.peer_views()}
        if set(views) != expected:
            return False
        for node_id, view in views.items():
            if view["status"] != "active":
                return False
            if node_id != node.node_id and view["health"] != "up":
                return False
    return True


async def test_four_nodes_join_one_federation_and_each_sees_the_other_three_active(
    cluster: Cluster,
) -> None:
    await cluster.authority()
    for node_id, name, code in TOWNS:
        await cluster.member(node_id, name, code)
    expected = {"mie-pref", "tsu", "yokkaichi", "ise"}
    await eventually(lambda: sees_all_active_and_up(cluster, expected), timeout=10)
    versions = {node.roster.version for node in cluster.nodes.values()}
    assert versions == {4}, versions
    tsu = cluster.nodes["tsu"]
    entry = tsu.roster.member("ise")
    assert entry is not None and entry.name == "伊勢市" and entry.code == "242039"
    rtts = [view["rtt_ms"] for view in tsu.peer_views() if not view["self"]]
    assert all(isinstance(rtt, float) and rtt > 0 for rtt in rtts)


async def test_fifth_node_joining_later_is_known_to_all_four_within_five_seconds(
    cluster: Cluster,
) -> None:
    await cluster.authority()
    for node_id, name, code in TOWNS:
        await cluster.member(node_id, name, code)
    await eventually(
        lambda: sees_all_active_and_up(cluster, {"mie-pref", "tsu", "yokkaichi", "ise"}),
        timeout=10,
    )
    await cluster.init("matsusaka", "松阪市", "242047")
    token = await cluster.invite("matsusaka")
    await join_federation(cluster.home("matsusaka"), token)
    joined_at = time.monotonic()
    # The new node is not even running: the others learn of it from the roster alone.
    await eventually(
        lambda: all(node.roster.member("matsusaka") is not None for node in cluster.nodes.values()),
        timeout=5,
    )
    assert time.monotonic() - joined_at < 5
    await cluster.start("matsusaka")
    all_five = {"mie-pref", "tsu", "yokkaichi", "ise", "matsusaka"}
    await eventually(lambda: sees_all_active_and_up(cluster, all_five), timeout=5)


async def test_manual_approval_holds_the_join_until_an_operator_approves(cluster: Cluster) -> None:
    authority = await cluster.authority()
    assert authority.authority is not None
    await cluster.init("tsu", "津市", "242012")
    token = await cluster.invite("tsu", approval="manual")
    with pytest.raises(Exception) as refused:
        await join_federation(cluster.home("tsu"), token, wait_seconds=0.5, poll_seconds=0.2)
    assert getattr(refused.value, "code", None) == "join_pending"
    pending = await authority.authority.pending()
    assert [row.node_id for row in pending] == ["tsu"]
    assert authority.roster.member("tsu") is None
    await authority.authority.approve("tsu")
    outcome = await join_federation(cluster.home("tsu"), token, wait_seconds=5, poll_seconds=0.2)
    assert "tsu" in outcome.members
    await cluster.start("tsu")
    await eventually(lambda: sees_all_active_and_up(cluster, {"mie-pref", "tsu"}))


async def test_status_change_by_the_authority_reaches_every_node(cluster: Cluster) -> None:
    authority = await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    await cluster.member("ise", "伊勢市", "242039")
    assert authority.authority is not None
    await authority.authority.set_status("ise", MemberStatus.SUSPENDED, "maintenance")

    def tsu_sees_ise_suspended() -> bool:
        entry = cluster.nodes["tsu"].roster.member("ise")
        return entry is not None and entry.status is MemberStatus.SUSPENDED

    await eventually(tsu_sees_ise_suspended, timeout=5)
    entry = cluster.nodes["tsu"].roster.member("ise")
    assert entry is not None and entry.status_reason == "maintenance"


async def test_node_restart_keeps_membership_and_roster(cluster: Cluster) -> None:
    await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    version = cluster.nodes["tsu"].roster.version
    await cluster.stop("tsu")
    node = await cluster.start("tsu")
    assert node.roster.version == version
    await eventually(lambda: sees_all_active_and_up(cluster, {"mie-pref", "tsu"}))
