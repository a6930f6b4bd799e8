"""Separated municipal networks (LGWAN and Internet) built from Linux network namespaces.

Japanese municipalities keep the closed government network (LGWAN) apart from the
Internet side. This module rebuilds that separation on one machine so the system
tests, and municipal IT trying Kakehashi out, can run nodes that really cannot
reach each other except where a network says so:

    kk-demo-lgwan     bridge namespace of segment `lgwan`    (bridge `br-lgwan`)
    kk-demo-internet  bridge namespace of segment `internet` (bridge `br-internet`)
    kk-demo-pref      node on both segments   lgwan 10.20.0.1   internet 10.30.0.1
    kk-demo-town-a    node on LGWAN only      lgwan 10.20.0.2
    kk-demo-town-b    node on Internet only                     internet 10.30.0.2
    kk-demo-town-c    node on LGWAN only      lgwan 10.20.0.3

Invariants:
- Every namespace is named `{prefix}-{name}`: one per segment (holding its bridge)
  and one per node. Node names and segment names never clash.
- A node has one veth pair per segment. Its end sits in the node namespace and is
  named after the segment (`lgwan`, `internet`), with a /24 address; the peer end
  is a port of the segment's bridge. Addresses are given per segment in node order,
  starting at .1.
- No default route and `net.ipv4.ip_forward=0` everywhere, so a node only reaches
  the nodes sharing one of its segments.
- Veths are created directly inside the namespaces (`ip -n node link add ... peer
  ... netns bridge`): nothing ever appears in the root namespace, so interface
  names only have to be unique inside one namespace, and the host's interfaces,
  routes and firewall are never touched.

The default prefix is `kk{pid}.{n}`, so parallel runs never collide and
`cleanup_stale()` can remove what a killed run left behind (its pid is gone).

Run from the repository root (needs root):

    python -m examples.segments.topology up      # build kk-demo-* and print the table
    python -m examples.segments.topology show    # the table, with each link's state
    python -m examples.segments.topology down    # remove it
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType

__all__ = [
    "DEFAULT_NODES",
    "DEFAULT_SEGMENTS",
    "NodeSpec",
    "Topology",
    "TopologyError",
    "cleanup_stale",
    "list_namespaces",
    "main",
]

DEFAULT_SEGMENTS: Mapping[str, str] = MappingProxyType({"lgwan": "10.20.0", "internet": "10.30.0"})
"""Segment name -> first three octets of its /24."""

DEMO_PREFIX = "kk-demo"
IP_TIMEOUT = 10.0
"""Seconds one `ip` call may take before it counts as failed."""

MAX_IFNAME = 15
"""Longest interface name the kernel accepts (IFNAMSIZ less the NUL)."""

_NODE_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SEGMENT_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")  # `br-` + segment must fit in MAX_IFNAME
_PREFIX = re.compile(r"[a-z0-9][a-z0-9.-]{0,31}")
_counter = itertools.count()


class TopologyError(RuntimeError):
    """An `ip` command failed; carries the command and what it printed."""

    def __init__(self, command: Sequence[str], stderr: str) -> None:
        self.command = tuple(command)
        self.stderr = stderr.strip()
        super().__init__(f"`{' '.join(self.command)}` failed: {self.stderr or 'no output'}")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One machine of the municipal network."""

    name: str
    """Short name (`pref`, `town-a`); the namespace is `{prefix}-{name}`."""
    segments: tuple[str, ...]
    """Segments it has an interface on, in order (`("lgwan", "internet")`)."""

    def __post_init__(self) -> None:
        if not _NODE_NAME.fullmatch(self.name):
            raise ValueError(f"node name {self.name!r}: use a-z, 0-9 and '-', at most 32")
        if not self.segments or len(set(self.segments)) != len(self.segments):
            raise ValueError(f"node {self.name!r}: give each segment once, at least one")


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("pref", ("lgwan", "internet")),
    NodeSpec("town-a", ("lgwan",)),
    NodeSpec("town-b", ("internet",)),
    NodeSpec("town-c", ("lgwan",)),
)


def _run(argv: Sequence[str]) -> str:
    """Run one command; its stdout, or TopologyError with the command and its stderr."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(argv, str(exc)) from exc
    if done.returncode != 0:
        raise TopologyError(argv, done.stderr or done.stdout)
    return done.stdout


def _ip(*args: str) -> str:
    """`ip ARGS`; every command of this module goes through `_run`, most through here."""
    return _run(["ip", *args])


def list_namespaces() -> list[str]:
    """Names from `ip netns list` (which may append `(id: N)` to a name)."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _delete_namespaces(names: Sequence[str]) -> list[str]:
    """Delete those of `names` that exist and return them; gone ones are fine.

    Raises TopologyError if one could not be deleted and is still there (another
    process deleting it first, as parallel `cleanup_stale()` calls do, is fine).
    """
    existing = set(list_namespaces())
    deleted: list[str] = []
    failures: list[TopologyError] = []
    for name in names:
        if name not in existing:
            continue
        try:
            _ip("netns", "delete", name)
        except TopologyError as exc:
            failures.append(exc)
        else:
            deleted.append(name)
    still_there = set(list_namespaces()) if failures else set()
    if left := [exc for exc in failures if exc.command[-1] in still_there]:
        raise left[0]
    return deleted


class Topology:
    """Bridges and nodes in network namespaces; a context manager that always cleans up.

    Building is all-or-nothing: `create()` removes what it made before raising.
    `destroy()` removes every namespace of the plan that exists, so a fresh
    `Topology` with the same prefix (the `down` command) removes an earlier one.
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec] = DEFAULT_NODES,
        *,
        segments: Mapping[str, str] = DEFAULT_SEGMENTS,
        prefix: str | None = None,
    ) -> None:
        self.prefix = prefix if prefix is not None else f"kk{os.getpid()}.{next(_counter)}"
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: use a-z, 0-9, '.' and '-', at most 32")
        self.segments: dict[str, str] = {}
        for name, base in segments.items():
            if not _SEGMENT_NAME.fullmatch(name):
                raise ValueError(f"segment name {name!r}: use a-z and 0-9, at most 12")
            ipaddress.IPv4Network(f"{base}.0/24")  # raises ValueError if not three octets
            self.segments[name] = base
        self.nodes: tuple[NodeSpec, ...] = tuple(nodes)
        names = [node.name for node in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        if clash := set(names) & set(self.segments):
            raise ValueError(f"node names clash with segment names: {sorted(clash)}")
        # Per segment: node name -> host number (.1, .2, ... in node order).
        self._hosts: dict[str, dict[str, int]] = {seg: {} for seg in self.segments}
        for node in self.nodes:
            for seg in node.segments:
                if seg not in self.segments:
                    raise ValueError(f"node {node.name!r}: unknown segment {seg!r}")
                self._hosts[seg][node.name] = len(self._hosts[seg]) + 1
                if len(self._hosts[seg]) > 254:
                    raise ValueError(f"segment {seg!r}: more than 254 nodes")

    # Names and addresses (pure: usable before create()).

    def namespace(self, node: str) -> str:
        """The namespace of `node`."""
        self._node(node)
        return f"{self.prefix}-{node}"

    def bridge_namespace(self, segment: str) -> str:
        """The namespace holding the bridge of `segment`."""
        self._segment(segment)
        return f"{self.prefix}-{segment}"

    def bridge(self, segment: str) -> str:
        """The bridge's interface name inside `bridge_namespace(segment)`."""
        return f"br-{self._segment(segment)}"

    def interface(self, node: str, segment: str) -> str:
        """The node's interface on `segment` (named after the segment)."""
        self._host(node, segment)
        return segment

    def port(self, node: str, segment: str) -> str:
        """The bridge-side end of the node's veth on `segment`."""
        host = self._host(node, segment)
        return f"p{host}-{node}"[:MAX_IFNAME]  # p{host} alone is unique on the bridge

    def address(self, node: str, segment: str) -> str:
        """The node's IPv4 address on `segment`, e.g. `10.20.0.2`."""
        return f"{self.segments[segment]}.{self._host(node, segment)}"

    def subnet(self, segment: str) -> str:
        """The segment's network, e.g. `10.20.0.0/24`."""
        return f"{self.segments[self._segment(segment)]}.0/24"

    def namespaces(self) -> list[str]:
        """Every namespace of the plan: bridges first, then nodes."""
        return [self.bridge_namespace(seg) for seg in self.segments] + [
            self.namespace(node.name) for node in self.nodes
        ]

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """The command line running `argv` inside the namespace of `node`."""
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    # Building and tearing down.

    def create(self) -> None:
        """Build every namespace, bridge and link; on failure remove what it made, then raise."""
        made: list[str] = []  # only these are removed on failure, never someone else's
        try:
            for seg in self.segments:
                ns = self._add_namespace(self.bridge_namespace(seg), made)
                _ip("-n", ns, "link", "add", self.bridge(seg), "type", "bridge")
                _ip("-n", ns, "link", "set", self.bridge(seg), "up")
            for node in self.nodes:
                self._add_namespace(self.namespace(node.name), made)
                for seg in node.segments:
                    self._add_link(node.name, seg)
        except BaseException:
            _delete_namespaces(list(reversed(made)))
            raise

    def destroy(self) -> None:
        """Remove every namespace of the plan (their veths go with them). Idempotent."""
        _delete_namespaces(list(reversed(self.namespaces())))

    def __enter__(self) -> Topology:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # Cutting links.

    def link_down(self, node: str, segment: str) -> None:
        """Cut the node's link on `segment`: both veth ends down."""
        _ip("-n", self.namespace(node), "link", "set", self.interface(node, segment), "down")
        _ip("-n", self.bridge_namespace(segment), "link", "set", self.port(node, segment), "down")

    def link_up(self, node: str, segment: str) -> None:
        """Restore the link: both ends up, the address and the segment route back if missing."""
        ns, dev = self.namespace(node), self.interface(node, segment)
        _ip("-n", self.bridge_namespace(segment), "link", "set", self.port(node, segment), "up")
        _ip("-n", ns, "link", "set", dev, "up")
        address = self.address(node, segment)
        if f" {address}/24 " not in _ip("-n", ns, "-4", "-o", "address", "show", "dev", dev):
            _ip("-n", ns, "address", "add", f"{address}/24", "dev", dev)
        # The kernel re-adds the connected route when the link comes up; this covers a
        # route someone deleted by hand, and is a no-op otherwise.
        route = [self.subnet(segment), "dev", dev, "proto", "kernel", "scope", "link"]
        _ip("-n", ns, "route", "replace", *route, "src", address)

    def link_state(self, node: str, segment: str) -> str:
        """`UP`, `DOWN`, ... of the node's interface on `segment`, or `absent`."""
        try:
            out = _ip(
                "-n", self.namespace(node), "-br", "link", "show", self.interface(node, segment)
            )
        except TopologyError:
            return "absent"
        fields = out.split()
        return fields[1] if len(fields) > 1 else "absent"

    @staticmethod
    def available() -> str | None:
        """None if namespaces, bridges and veths can be made here, else the reason why not."""
        if os.geteuid() != 0:
            return "network namespaces need root (run as root or in a privileged container)"
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        probe = f"kk{os.getpid()}.probe-ns"  # cleanup_stale() recognises it
        try:
            _ip("netns", "add", probe)
        except TopologyError as exc:
            return f"cannot create a network namespace: {exc}"
        try:
            _ip("-n", probe, "link", "add", "br-probe", "type", "bridge")
            _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        except TopologyError as exc:
            return f"cannot create bridges or veths in a namespace: {exc}"
        finally:
            _delete_namespaces([probe])
        return None

    # Helpers.

    def _add_namespace(self, ns: str, made: list[str]) -> str:
        _ip("netns", "add", ns)
        made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        # New namespaces start with forwarding off; say so rather than rely on it.
        # Through /proc rather than `sysctl`, which a minimal Debian base does not have.
        _run(["ip", "netns", "exec", ns, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"])
        return ns

    def _add_link(self, node: str, segment: str) -> None:
        ns, bridge_ns = self.namespace(node), self.bridge_namespace(segment)
        dev, port = self.interface(node, segment), self.port(node, segment)
        _ip("-n", ns, "link", "add", dev, "type", "veth", "peer", "name", port, "netns", bridge_ns)
        _ip("-n", bridge_ns, "link", "set", port, "master", self.bridge(segment))
        _ip("-n", bridge_ns, "link", "set", port, "up")
        _ip("-n", ns, "address", "add", f"{self.address(node, segment)}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")

    def _node(self, node: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.name == node:
                return spec
        raise ValueError(f"unknown node {node!r}")

    def _segment(self, segment: str) -> str:
        if segment not in self.segments:
            raise ValueError(f"unknown segment {segment!r}")
        return segment

    def _host(self, node: str, segment: str) -> int:
        self._node(node)
        host = self._hosts[self._segment(segment)].get(node)
        if host is None:
            raise ValueError(f"node {node!r} is not on segment {segment!r}")
        return host


def cleanup_stale(prefix_stem: str = "kk") -> list[str]:
    """Remove namespaces of default-prefixed topologies whose process is gone; return them.

    Only names like `{prefix_stem}{pid}.{n}-...` are considered, and only when no
    process `pid` runs. Fixed prefixes (`kk-demo`) are never touched. A reused pid
    keeps its stale namespaces until that process ends too; nothing is lost.
    """
    pattern = re.compile(rf"{re.escape(prefix_stem)}(?P<pid>\d+)\.[a-z0-9]+-")
    stale = []
    for name in list_namespaces():
        match = pattern.match(name)
        if match is not None and not _alive(int(match["pid"])):
            stale.append(name)
    return _delete_namespaces(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rows(topology: Topology, *, live: bool) -> list[dict[str, str]]:
    rows = []
    for node in topology.nodes:
        for seg in node.segments:
            row = {
                "node": node.name,
                "namespace": topology.namespace(node.name),
                "segment": seg,
                "interface": topology.interface(node.name, seg),
                "address": f"{topology.address(node.name, seg)}/24",
            }
            if live:
                row["state"] = topology.link_state(node.name, seg)
            rows.append(row)
    return rows


def _print_table(rows: list[dict[str, str]]) -> None:
    if not rows:
        return
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]}
    print("  ".join(key.upper().ljust(width) for key, width in widths.items()).rstrip())
    for row in rows:
        print("  ".join(row[key].ljust(width) for key, width in widths.items()).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    """`up`, `down` or `show` the default LGWAN/Internet topology."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.segments.topology",
        description="Build the LGWAN/Internet demo network in namespaces (needs root).",
    )
    parser.add_argument("action", choices=("up", "down", "show"))
    parser.add_argument("--prefix", default=DEMO_PREFIX, help=f"namespace prefix ({DEMO_PREFIX})")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)

    topology = Topology(DEFAULT_NODES, prefix=args.prefix)
    try:
        if args.action == "up":
            if reason := Topology.available():
                print(f"error: {reason}", file=sys.stderr)
                return 1
            if present := set(topology.namespaces()) & set(list_namespaces()):
                print(
                    f"error: {', '.join(sorted(present))} already exist; "
                    f"run `python -m examples.segments.topology down --prefix {args.prefix}`",
                    file=sys.stderr,
                )
                return 1
            topology.create()
        elif args.action == "down":
            present = set(topology.namespaces()) & set(list_namespaces())
            topology.destroy()
            if args.json:
                print(json.dumps({"removed": sorted(present)}))
            else:
                print(f"removed {len(present)} namespaces" if present else "nothing to remove")
            return 0
        rows = _rows(topology, live=True)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("fix: run as root; `down` removes a half-built topology", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
