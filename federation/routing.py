"""Routing: which hops an envelope takes from one member to another.

Members sit on named network segments (`lgwan`, `internet`, ...). Two members
can talk directly only when they share a segment; members the roster flags as
`relay` forward envelopes between the segments they sit on. Routes are a pure
function of the roster and of the set of relays the caller believes down, so
every node that holds the same roster computes the same route.

Invariants:
- Only active members take part: a suspended or revoked member is neither a
  destination nor a relay, and an inactive source has no route.
- Every hop shares a segment with the one before it; every hop but the last is
  an active relay other than the source and the destination; no node repeats.
- Members that share a segment always talk directly, whatever is believed down.

Strategy: breadth-first search from the destination over segments (each segment
is expanded once, so a roster of a few hundred members costs members x
segments), then a walk from the source that takes the smallest node id at each
step, which yields the lexicographically smallest of the shortest paths. Relays
believed down are left out of the first search; only when no path avoids them is
the search repeated with them and the route marked `degraded` (deliver later).

`explain` also lists alternatives for people reading `kakehashi route`: paths
with no shortcut (no two hops that are not consecutive share a segment), best
first, found by a best-first search with a fixed budget.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .roster import Roster, RosterEntry

__all__ = [
    "MAX_ALTERNATIVES",
    "Route",
    "RouteExplanation",
    "direct_peers",
    "explain",
    "plan",
]

MAX_ALTERNATIVES = 5

# Partial paths `explain` may examine; the bound keeps a dense roster's explanation cheap.
_SEARCH_BUDGET = 5_000


@dataclass(frozen=True, slots=True)
class Route:
    """The hops from a source to a destination."""

    destination: str
    """Node id the envelope is for."""
    path: tuple[str, ...]
    """Hops after the source, ending with the destination; `(destination,)` when direct."""
    degraded: bool = False
    """Whether every path goes through a relay believed down (deliver later, retry)."""

    def __post_init__(self) -> None:
        if not self.path or self.path[-1] != self.destination:
            raise ValueError("a route's path must end with its destination")
        if len(set(self.path)) != len(self.path):
            raise ValueError("a route must not visit a node twice")

    @property
    def direct(self) -> bool:
        """Whether the source talks to the destination without a relay."""
        return len(self.path) == 1

    @property
    def next_hop(self) -> str:
        """The node the source hands the envelope to."""
        return self.path[0]

    @property
    def relays(self) -> tuple[str, ...]:
        """The relays on the way, in order."""
        return self.path[:-1]

    def to_json(self) -> dict[str, object]:
        return {
            "destination": self.destination,
            "path": list(self.path),
            "direct": self.direct,
            "next_hop": self.next_hop,
            "relays": list(self.relays),
            "degraded": self.degraded,
        }


@dataclass(frozen=True, slots=True)
class RouteExplanation:
    """Why a route was chosen, or why there is none, for people and scripts."""

    source: str
    """Node id the route starts from."""
    destination: str
    """Node id the route is for."""
    route: Route | None
    """What `plan` returns."""
    shared_segments: tuple[str, ...]
    """Segments the source and the destination both sit on."""
    reason: str
    """One sentence saying why."""
    alternatives: tuple[Route, ...]
    """Other relay paths without a shortcut, best first, at most `MAX_ALTERNATIVES`."""

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "route": None if self.route is None else self.route.to_json(),
            "shared_segments": list(self.shared_segments),
            "reason": self.reason,
            "alternatives": [route.to_json() for route in self.alternatives],
        }


def direct_peers(roster: Roster, source: str) -> frozenset[str]:
    """Active members other than `source` that share a segment with it (whatever its status)."""
    entry = roster.member(source)
    if entry is None:
        return frozenset()
    on_segment = _active_by_segment(roster)
    return frozenset(
        peer for segment in entry.segments for peer in on_segment.get(segment, ()) if peer != source
    )


def plan(
    roster: Roster, source: str, destination: str, *, down: frozenset[str] = frozenset()
) -> Route | None:
    """The route from `source` to `destination`, avoiding relays in `down` if possible."""
    if _refusal(roster, source, destination) is not None:
        return None
    on_segment = _active_by_segment(roster)
    path = _shortest_path(roster, on_segment, source, destination, avoid=down)
    if path is not None:
        return Route(destination, path)
    path = _shortest_path(roster, on_segment, source, destination, avoid=frozenset())
    return None if path is None else Route(destination, path, degraded=True)


def explain(
    roster: Roster, source: str, destination: str, *, down: frozenset[str] = frozenset()
) -> RouteExplanation:
    """The route `plan` gives, the segments involved, a reason and the alternatives."""
    refusal = _refusal(roster, source, destination)
    if refusal is not None:
        return RouteExplanation(source, destination, None, (), f"no route: {refusal}", ())
    src = _entry(roster, source)
    dst = _entry(roster, destination)
    shared = tuple(segment for segment in src.segments if segment in dst.segments)
    route = plan(roster, source, destination, down=down)
    if route is None:
        reason = f"no route: {_unreachable(src, dst)}"
        return RouteExplanation(source, destination, None, shared, reason, ())
    alternatives = tuple(
        other
        for other in _shortcut_free_routes(roster, source, destination, down)
        if other != route
    )[:MAX_ALTERNATIVES]
    reason = _reason(roster, source, route, shared, down)
    return RouteExplanation(source, destination, route, shared, reason, alternatives)


def _active_by_segment(roster: Roster) -> dict[str, tuple[str, ...]]:
    """Active member ids per segment, sorted (roster members are sorted by node id)."""
    on_segment: dict[str, list[str]] = {}
    for entry in roster.members:
        if entry.active:
            for segment in entry.segments:
                on_segment.setdefault(segment, []).append(entry.node_id)
    return {segment: tuple(ids) for segment, ids in on_segment.items()}


def _entry(roster: Roster, node_id: str) -> RosterEntry:
    entry = roster.member(node_id)
    assert entry is not None, f"{node_id} was checked to be a member"
    return entry


def _refusal(roster: Roster, source: str, destination: str) -> str | None:
    """Why no route can exist whatever the segments, or None."""
    src = roster.member(source)
    dst = roster.member(destination)
    if src is None:
        return f"source {source} is not in the roster"
    if not src.active:
        return f"source {source} is {src.status.value}"
    if destination == source:
        return f"{destination} is the source itself"
    if dst is None:
        return f"{destination} is not in the roster"
    if not dst.active:
        return f"{destination} is {dst.status.value}"
    return None


def _can_relay(roster: Roster, node_id: str, source: str, destination: str) -> bool:
    entry = roster.member(node_id)
    return (
        entry is not None
        and entry.active
        and entry.relay
        and node_id != source
        and node_id != destination
    )


def _shortest_path(
    roster: Roster,
    on_segment: Mapping[str, tuple[str, ...]],
    source: str,
    destination: str,
    *,
    avoid: frozenset[str],
) -> tuple[str, ...] | None:
    """The lexicographically smallest shortest path, relays in `avoid` left out."""
    source_segments = set(_entry(roster, source).segments)
    hops_left = {destination: 0}
    queue = deque([destination])
    expanded: set[str] = set()
    while queue:
        node = queue.popleft()
        for segment in _entry(roster, node).segments:
            if segment in expanded:
                continue
            expanded.add(segment)
            if segment in source_segments:
                return _walk(roster, on_segment, source, hops_left, hops_left[node] + 1)
            for neighbour in on_segment.get(segment, ()):
                if (
                    neighbour not in hops_left
                    and neighbour not in avoid
                    and _can_relay(roster, neighbour, source, destination)
                ):
                    hops_left[neighbour] = hops_left[node] + 1
                    queue.append(neighbour)
    return None


def _walk(
    roster: Roster,
    on_segment: Mapping[str, tuple[str, ...]],
    source: str,
    hops_left: Mapping[str, int],
    length: int,
) -> tuple[str, ...]:
    """From `source`, step each time to the smallest node id one hop closer."""
    path: list[str] = []
    current = source
    for remaining in range(length - 1, -1, -1):
        current = min(
            node
            for segment in _entry(roster, current).segments
            for node in on_segment.get(segment, ())
            if hops_left.get(node) == remaining
        )
        path.append(current)
    return tuple(path)


def _shortcut_free_routes(
    roster: Roster, source: str, destination: str, down: frozenset[str]
) -> list[Route]:
    """Paths with no shortcut, ordered by (degraded, length, node ids), within the budget.

    A path may only move onto a node that shares no segment with any hop before
    the last one; so the segments behind a path are closed to it, and a path is
    never longer than the number of segments.
    """
    on_segment = _active_by_segment(roster)
    found: list[Route] = []
    start: tuple[bool, int, tuple[str, ...], frozenset[str]] = (False, 0, (), frozenset())
    heap = [start]
    budget = _SEARCH_BUDGET
    while heap and budget > 0 and len(found) <= MAX_ALTERNATIVES:
        degraded, length, path, closed = heapq.heappop(heap)
        budget -= 1
        last = path[-1] if path else source
        if last == destination:
            found.append(Route(destination, path, degraded=degraded))
            continue
        last_segments = _entry(roster, last).segments
        now_closed = closed | frozenset(last_segments)
        candidates = {
            node
            for segment in last_segments
            if segment not in closed
            for node in on_segment.get(segment, ())
            if node != last
        }
        for node in sorted(candidates):
            if closed.intersection(_entry(roster, node).segments):
                continue
            if node != destination and not _can_relay(roster, node, source, destination):
                continue
            heapq.heappush(
                heap,
                (
                    degraded or (node in down and node != destination),
                    length + 1,
                    (*path, node),
                    now_closed,
                ),
            )
    return found


def _listing(items: Iterable[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c'."""
    words = list(items)
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def _reason(
    roster: Roster, source: str, route: Route, shared: tuple[str, ...], down: frozenset[str]
) -> str:
    if route.direct:
        return f"direct: both on {_listing(shared)}"
    head = f"via {' then '.join(route.relays)}"
    if route.degraded:
        head = f"degraded, {head} ({_listing(r for r in route.relays if r in down)} believed down)"
    else:
        best = plan(roster, source, route.destination)
        avoided = () if best is None else tuple(r for r in best.relays if r in down)
        if avoided:
            head = f"{head} (avoiding {_listing(avoided)}, believed down)"
    hops = "; ".join(
        f"{relay} is on {_listing(_entry(roster, relay).segments)}" for relay in route.relays
    )
    segments = _listing(_entry(roster, route.destination).segments)
    return f"{head}: {hops}; {route.destination} is on {segments} only"


def _unreachable(source: RosterEntry, destination: RosterEntry) -> str:
    for entry in (source, destination):
        if not entry.segments:
            return f"{entry.node_id} is on no network segment"
    return (
        f"no active relay connects {_listing(source.segments, 'or')} "
        f"to {_listing(destination.segments, 'or')}"
    )
