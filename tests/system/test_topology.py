"""The LGWAN/Internet separation holds for real sockets, and topologies always clean up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from examples.segments.topology import (
    DEFAULT_NODES,
    NodeSpec,
    Topology,
    TopologyError,
    cleanup_stale,
    list_namespaces,
)

from .conftest import ECHO_PORT, EchoServers

_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as conn:
            conn.settimeout(1.0)
            conn.sendall(b"kakehashi")
            print(json.dumps({"ok": True, "reply": conn.recv(1024).decode()}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": repr(exc)}))
    """
)


def tcp_echo(topology: Topology, node: str, address: str) -> tuple[bool, str]:
    """Open a TCP connection from `node` to `address`; (True, reply) or (False, error)."""
    argv = topology.exec_argv(node, [sys.executable, "-c", _CLIENT, address, str(ECHO_PORT)])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
    result = json.loads(done.stdout)
    return (True, result["reply"]) if result["ok"] else (False, result["error"])


def ours(prefix: str) -> list[str]:
    return [name for name in list_namespaces() if name.startswith(f"{prefix}-")]


def test_addresses_are_numbered_per_segment_in_node_order() -> None:
    topo = Topology((*DEFAULT_NODES, NodeSpec("relay2", ("lgwan", "internet"))), prefix="kk-plan")
    assert topo.address("pref", "lgwan") == "10.20.0.1"
    assert topo.address("town-a", "lgwan") == "10.20.0.2"
    assert topo.address("town-c", "lgwan") == "10.20.0.3"
    assert topo.address("relay2", "lgwan") == "10.20.0.4"
    assert topo.address("pref", "internet") == "10.30.0.1"
    assert topo.address("town-b", "internet") == "10.30.0.2"
    assert topo.address("relay2", "internet") == "10.30.0.3"
    assert topo.namespace("town-a") == "kk-plan-town-a"
    assert topo.exec_argv("pref", ["true"]) == ["ip", "netns", "exec", "kk-plan-pref", "true"]
    with pytest.raises(ValueError, match="not on segment"):
        topo.address("town-a", "internet")


def test_lgwan_nodes_reach_pref_and_each_other(
    topology: Topology, echo_servers: EchoServers
) -> None:
    echo_servers("pref", "town-c")
    assert tcp_echo(topology, "town-a", topology.address("pref", "lgwan")) == (True, "kakehashi")
    assert tcp_echo(topology, "town-a", topology.address("town-c", "lgwan")) == (True, "kakehashi")


def test_internet_node_reaches_pref_on_the_internet_side(
    topology: Topology, echo_servers: EchoServers
) -> None:
    echo_servers("pref")
    assert tcp_echo(topology, "town-b", topology.address("pref", "internet")) == (True, "kakehashi")


def test_lgwan_only_and_internet_only_nodes_cannot_reach_each_other(
    topology: Topology, echo_servers: EchoServers
) -> None:
    # Servers listen everywhere, so a failure means "no path", never "nobody listening".
    echo_servers("pref", "town-a", "town-b", "town-c")
    for node, target in [
        ("town-a", topology.address("town-b", "internet")),
        ("town-a", topology.address("pref", "internet")),  # pref does not forward
        ("town-b", topology.address("town-c", "lgwan")),
        ("town-b", topology.address("pref", "lgwan")),
    ]:
        ok, error = tcp_echo(topology, node, target)
        assert not ok, f"{node} reached {target}"
        assert "refused" not in error.lower(), error


def test_link_down_cuts_town_a_from_pref_and_link_up_restores_it(
    topology: Topology, echo_servers: EchoServers
) -> None:
    echo_servers("pref")
    pref = topology.address("pref", "lgwan")
    topology.link_down("town-a", "lgwan")
    assert topology.link_state("town-a", "lgwan") == "DOWN"
    ok, error = tcp_echo(topology, "town-a", pref)
    assert not ok, "town-a reached pref over a cut link"
    assert "unreachable" in error.lower(), error
    # An address lost while the link was down must not keep it dead: link_up restores it.
    flush = ["ip", "-n", topology.namespace("town-a"), "address", "flush", "dev", "lgwan"]
    subprocess.run(flush, check=True)
    topology.link_up("town-a", "lgwan")
    assert topology.link_state("town-a", "lgwan") == "UP"
    assert tcp_echo(topology, "town-a", pref) == (True, "kakehashi")


def test_nodes_have_no_default_route_and_do_not_forward(topology: Topology) -> None:
    for node in ("pref", "town-a", "town-b", "town-c"):
        ns = topology.namespace(node)
        routes = subprocess.run(
            ["ip", "-n", ns, "route", "show", "default"], capture_output=True, text=True, check=True
        )
        assert routes.stdout.strip() == "", f"{node}: {routes.stdout}"
        forward = subprocess.run(
            topology.exec_argv(node, ["cat", "/proc/sys/net/ipv4/ip_forward"]),
            capture_output=True,
            text=True,
            check=True,
        )
        assert forward.stdout.strip() == "0", node


def test_destroy_removes_every_namespace_and_is_idempotent(topology: Topology) -> None:
    assert sorted(ours(topology.prefix)) == sorted(topology.namespaces())
    topology.destroy()
    assert ours(topology.prefix) == []
    topology.destroy()


def test_exit_removes_namespaces_when_the_body_raises(netns_available: None) -> None:
    topo = Topology()
    with pytest.raises(RuntimeError, match="body failed"), topo:
        assert len(ours(topo.prefix)) == 6
        raise RuntimeError("body failed")
    assert ours(topo.prefix) == []


def test_failed_create_removes_what_it_made_and_names_the_command(
    netns_available: None,
) -> None:
    topo = Topology()
    squatter = topo.namespace("town-c")  # someone else's namespace, in the way
    subprocess.run(["ip", "netns", "add", squatter], check=True)
    try:
        with pytest.raises(TopologyError) as caught:
            topo.create()
        assert caught.value.command == ("ip", "netns", "add", squatter)
        assert "exists" in caught.value.stderr
        assert ours(topo.prefix) == [squatter], "left its own namespaces, or removed another's"
    finally:
        subprocess.run(["ip", "netns", "delete", squatter], check=True)


def test_cleanup_stale_removes_namespaces_of_dead_processes_only(
    netns_available: None,
) -> None:
    # A stem of this run's own, so parallel runs neither see nor remove these names.
    stem = f"kt{os.getpid()}s"
    finished = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead_pid = subprocess.run(finished, capture_output=True, text=True, check=True).stdout.strip()
    stale = f"{stem}{dead_pid}.0-town-a"
    alive = f"{stem}{os.getpid()}.0-town-a"
    fixed = f"{stem}-demo-pref"
    try:
        for name in (stale, alive, fixed):
            subprocess.run(["ip", "netns", "add", name], check=True)
        assert cleanup_stale(stem) == [stale]
        remaining = list_namespaces()
        assert stale not in remaining
        assert alive in remaining
        assert fixed in remaining
    finally:
        for name in (stale, alive, fixed):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def test_extra_node_on_both_segments_is_reachable_from_each_side(netns_available: None) -> None:
    nodes = (*DEFAULT_NODES, NodeSpec("relay2", ("lgwan", "internet")))
    with Topology(nodes) as topo:
        servers = EchoServers(topo)
        try:
            servers("relay2")
            assert tcp_echo(topo, "town-a", topo.address("relay2", "lgwan"))[0]
            assert tcp_echo(topo, "town-b", topo.address("relay2", "internet"))[0]
        finally:
            servers.close()
