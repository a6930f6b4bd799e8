"""Routing: direct on a shared segment, otherwise the shortest path through active relays."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.roster import Endpoint, MemberStatus, PublishedKey, Roster, RosterEntry
from federation.routing import (
    MAX_ALTERNATIVES,
    Route,
    direct_peers,
    explain,
    plan,
)

T0 = 1_700_000_000
NO_DB = settings(database=None, deadline=None)


def member(
    node_id: str,
    *segments: str,
    relay: bool = False,
    status: MemberStatus = MemberStatus.ACTIVE,
) -> RosterEntry:
    return RosterEntry(
        node_id=node_id,
        name=node_id,
        code=None,
        endpoints=tuple(
            Endpoint(segment=s, url=f"https://{node_id}.{s}.example.lg.jp:8443")
            for s in sorted(segments)
        ),
        signing_keys=(
            PublishedKey(public_key=hashlib.sha256(node_id.encode()).digest(), not_before=T0),
        ),
        tls_fingerprint=hashlib.sha256(f"{node_id}-cert".encode()).digest(),
        status=status,
        status_since=T0,
        relay=relay,
        joined_at=T0,
    )


def roster(*members: RosterEntry) -> Roster:
    ordered = tuple(sorted(members, key=lambda m: m.node_id))
    return Roster(
        federation_id="mie-renkei-7f3a",
        federation_name="三重県 市町連携",
        version=1,
        issued_at=T0,
        authority=ordered[0].node_id,
        federation_key=hashlib.sha256(b"federation-key").digest(),
        ca_fingerprint=hashlib.sha256(b"federation-ca").digest(),
        members=ordered,
    )


def mie(*extra: RosterEntry) -> Roster:
    """Municipalities on LGWAN, an internet-only partner, the prefecture relaying between them."""
    return roster(
        member("mie-pref", "internet", "lgwan", relay=True),
        member("tsu", "lgwan"),
        member("yokkaichi", "lgwan"),
        member("nposhien", "internet"),
        *extra,
    )


# --- plan ---------------------------------------------------------------------------------


def test_members_sharing_a_segment_talk_directly() -> None:
    route = plan(mie(), "tsu", "yokkaichi")
    assert route == Route("yokkaichi", ("yokkaichi",))
    assert route.direct
    assert route.next_hop == "yokkaichi"
    assert route.relays == ()
    assert not route.degraded


def test_members_on_different_segments_go_through_the_relay_on_both() -> None:
    route = plan(mie(), "tsu", "nposhien")
    assert route == Route("nposhien", ("mie-pref", "nposhien"))
    assert route.next_hop == "mie-pref"
    assert route.relays == ("mie-pref",)
    assert not route.direct


def test_route_is_the_same_in_both_directions_through_one_relay() -> None:
    assert plan(mie(), "nposhien", "tsu") == Route("tsu", ("mie-pref", "tsu"))


def test_relay_itself_is_reached_directly() -> None:
    assert plan(mie(), "nposhien", "mie-pref") == Route("mie-pref", ("mie-pref",))


@pytest.mark.parametrize("status", [MemberStatus.SUSPENDED, MemberStatus.REVOKED])
def test_inactive_relay_is_not_used(status: MemberStatus) -> None:
    topology = roster(
        member("mie-pref", "internet", "lgwan", relay=True, status=status),
        member("tsu", "lgwan"),
        member("nposhien", "internet"),
    )
    assert plan(topology, "tsu", "nposhien") is None


def test_member_on_both_segments_without_the_relay_flag_is_never_an_intermediate() -> None:
    topology = roster(
        member("ise", "internet", "lgwan"),
        member("tsu", "lgwan"),
        member("nposhien", "internet"),
    )
    assert plan(topology, "tsu", "nposhien") is None
    assert plan(topology, "tsu", "ise") == Route("ise", ("ise",))


def test_down_relay_is_avoided_when_another_relay_connects_the_segments() -> None:
    topology = mie(member("kuwana", "internet", "lgwan", relay=True))
    assert plan(topology, "tsu", "nposhien") == Route("nposhien", ("kuwana", "nposhien"))
    route = plan(topology, "tsu", "nposhien", down=frozenset({"kuwana"}))
    assert route == Route("nposhien", ("mie-pref", "nposhien"))
    assert not route.degraded


def test_longer_path_around_a_down_relay_wins_over_a_shorter_one_through_it() -> None:
    topology = mie(
        member("dmz-a", "dmz", "lgwan", relay=True),
        member("dmz-b", "dmz", "internet", relay=True),
    )
    route = plan(topology, "tsu", "nposhien", down=frozenset({"mie-pref"}))
    assert route == Route("nposhien", ("dmz-a", "dmz-b", "nposhien"))
    assert not route.degraded


def test_only_relay_down_gives_a_degraded_route_through_it() -> None:
    route = plan(mie(), "tsu", "nposhien", down=frozenset({"mie-pref"}))
    assert route == Route("nposhien", ("mie-pref", "nposhien"), degraded=True)


def test_shortest_path_through_down_relays_is_the_degraded_route() -> None:
    topology = mie(
        member("dmz-a", "dmz", "lgwan", relay=True),
        member("dmz-b", "dmz", "internet", relay=True),
    )
    route = plan(topology, "tsu", "nposhien", down=frozenset({"mie-pref", "dmz-b"}))
    assert route == Route("nposhien", ("mie-pref", "nposhien"), degraded=True)


def test_direct_route_is_used_whatever_is_believed_down() -> None:
    route = plan(mie(), "nposhien", "mie-pref", down=frozenset({"mie-pref", "nposhien"}))
    assert route == Route("mie-pref", ("mie-pref",))


def test_multi_hop_through_two_relays_over_three_segments() -> None:
    topology = roster(
        member("kameyama", "lgwan"),
        member("gw-lgwan", "dmz", "lgwan", relay=True),
        member("gw-internet", "dmz", "internet", relay=True),
        member("nposhien", "internet"),
    )
    route = plan(topology, "kameyama", "nposhien")
    assert route == Route("nposhien", ("gw-lgwan", "gw-internet", "nposhien"))
    assert route.relays == ("gw-lgwan", "gw-internet")
    back = plan(topology, "nposhien", "kameyama")
    assert back == Route("kameyama", ("gw-internet", "gw-lgwan", "kameyama"))


def test_shorter_relay_path_is_preferred_over_a_longer_one() -> None:
    topology = mie(
        member("dmz-a", "dmz", "lgwan", relay=True),
        member("dmz-b", "dmz", "internet", relay=True),
    )
    assert plan(topology, "tsu", "nposhien") == Route("nposhien", ("mie-pref", "nposhien"))


def test_equal_length_paths_go_through_the_smaller_node_id() -> None:
    topology = roster(
        member("relay-b", "internet", "lgwan", relay=True),
        member("relay-a", "internet", "lgwan", relay=True),
        member("tsu", "lgwan"),
        member("nposhien", "internet"),
    )
    assert plan(topology, "tsu", "nposhien") == Route("nposhien", ("relay-a", "nposhien"))
    assert plan(topology, "nposhien", "tsu") == Route("tsu", ("relay-a", "tsu"))


def test_tie_break_compares_whole_paths_hop_by_hop() -> None:
    # a-first then z-second beats b-first then a-second: the first hop decides.
    topology = roster(
        member("tsu", "lgwan"),
        member("relay-a1", "lgwan", "dmz-one", relay=True),
        member("relay-z2", "dmz-one", "internet", relay=True),
        member("relay-b1", "lgwan", "dmz-two", relay=True),
        member("relay-a2", "dmz-two", "internet", relay=True),
        member("nposhien", "internet"),
    )
    route = plan(topology, "tsu", "nposhien")
    assert route == Route("nposhien", ("relay-a1", "relay-z2", "nposhien"))


@pytest.mark.parametrize(
    ("source", "destination", "reason"),
    [
        ("tsu", "ise", "no route: ise is suspended"),
        ("tsu", "kuwana", "no route: kuwana is revoked"),
        ("tsu", "nabari", "no route: nabari is not in the roster"),
        ("tsu", "tsu", "no route: tsu is the source itself"),
        ("nabari", "tsu", "no route: source nabari is not in the roster"),
        ("ise", "tsu", "no route: source ise is suspended"),
    ],
)
def test_no_route_to_or_from_a_node_that_is_not_an_active_member(
    source: str, destination: str, reason: str
) -> None:
    topology = mie(
        member("ise", "lgwan", status=MemberStatus.SUSPENDED),
        member("kuwana", "lgwan", status=MemberStatus.REVOKED),
    )
    assert plan(topology, source, destination) is None
    explanation = explain(topology, source, destination)
    assert explanation.route is None
    assert explanation.reason == reason
    assert explanation.alternatives == ()


def test_direct_peers_are_the_active_members_sharing_a_segment() -> None:
    topology = mie(
        member("ise", "lgwan", status=MemberStatus.SUSPENDED),
        member("iga", "lgwan", "private"),
    )
    assert direct_peers(topology, "tsu") == {"mie-pref", "yokkaichi", "iga"}
    assert direct_peers(topology, "mie-pref") == {"tsu", "yokkaichi", "iga", "nposhien"}
    assert direct_peers(topology, "nabari") == frozenset()


def test_route_path_must_end_with_its_destination_and_not_repeat() -> None:
    with pytest.raises(ValueError):
        Route("tsu", ())
    with pytest.raises(ValueError):
        Route("tsu", ("mie-pref",))
    with pytest.raises(ValueError):
        Route("tsu", ("mie-pref", "tsu", "mie-pref", "tsu"))


def test_a_few_hundred_members_along_a_long_chain_of_relays() -> None:
    chain = [
        member(f"relay-{i:03}", f"seg-{i:03}", f"seg-{i + 1:03}", relay=True) for i in range(40)
    ]
    towns = [member(f"town-{i:03}", f"seg-{i % 41:03}") for i in range(300)]
    topology = roster(*chain, *towns)
    route = plan(topology, "town-000", "town-040")
    assert route is not None
    assert route.relays == tuple(f"relay-{i:03}" for i in range(40))
    assert len(explain(topology, "town-000", "town-040").alternatives) == 0


def test_a_few_hundred_parallel_relays_are_explained_within_bounds() -> None:
    relays = [member(f"relay-{i:03}", "internet", "lgwan", relay=True) for i in range(300)]
    topology = roster(*relays, member("tsu", "lgwan"), member("nposhien", "internet"))
    explanation = explain(topology, "tsu", "nposhien")
    assert explanation.route == Route("nposhien", ("relay-000", "nposhien"))
    assert [r.relays for r in explanation.alternatives] == [
        (f"relay-{i:03}",) for i in range(1, MAX_ALTERNATIVES + 1)
    ]


# --- explain ------------------------------------------------------------------------------


def test_explains_a_direct_route_by_the_shared_segment() -> None:
    explanation = explain(mie(), "tsu", "yokkaichi")
    assert explanation.route == Route("yokkaichi", ("yokkaichi",))
    assert explanation.shared_segments == ("lgwan",)
    assert explanation.reason == "direct: both on lgwan"
    assert explanation.alternatives == ()


def test_explains_a_direct_route_over_several_shared_segments() -> None:
    topology = mie(member("kuwana", "internet", "lgwan"))
    explanation = explain(topology, "mie-pref", "kuwana")
    assert explanation.shared_segments == ("internet", "lgwan")
    assert explanation.reason == "direct: both on internet and lgwan"


def test_explains_a_relayed_route_by_the_segments_of_relay_and_destination() -> None:
    explanation = explain(mie(), "tsu", "nposhien")
    assert explanation.shared_segments == ()
    assert explanation.reason == (
        "via mie-pref: mie-pref is on internet and lgwan; nposhien is on internet only"
    )


def test_explains_a_multi_hop_route_hop_by_hop() -> None:
    topology = roster(
        member("kameyama", "lgwan"),
        member("gw-lgwan", "dmz", "lgwan", relay=True),
        member("gw-internet", "dmz", "internet", relay=True),
        member("nposhien", "internet"),
    )
    assert explain(topology, "kameyama", "nposhien").reason == (
        "via gw-lgwan then gw-internet: gw-lgwan is on dmz and lgwan; "
        "gw-internet is on dmz and internet; nposhien is on internet only"
    )


def test_explains_a_missing_relay_by_the_segments_it_would_connect() -> None:
    topology = roster(member("tsu", "lgwan"), member("nposhien", "internet"))
    explanation = explain(topology, "tsu", "nposhien")
    assert explanation.route is None
    assert explanation.reason == "no route: no active relay connects lgwan to internet"


def test_explains_a_member_on_no_segment() -> None:
    topology = mie(member("ise"))
    assert explain(topology, "tsu", "ise").reason == "no route: ise is on no network segment"


def test_explains_a_degraded_route_by_the_relay_believed_down() -> None:
    explanation = explain(mie(), "tsu", "nposhien", down=frozenset({"mie-pref"}))
    assert explanation.route == Route("nposhien", ("mie-pref", "nposhien"), degraded=True)
    assert explanation.reason == (
        "degraded, via mie-pref (mie-pref believed down): "
        "mie-pref is on internet and lgwan; nposhien is on internet only"
    )


def test_explains_which_down_relay_was_avoided_and_lists_it_as_an_alternative() -> None:
    topology = mie(member("kuwana", "internet", "lgwan", relay=True))
    explanation = explain(topology, "tsu", "nposhien", down=frozenset({"kuwana"}))
    assert explanation.route == Route("nposhien", ("mie-pref", "nposhien"))
    assert explanation.reason == (
        "via mie-pref (avoiding kuwana, believed down): "
        "mie-pref is on internet and lgwan; nposhien is on internet only"
    )
    assert explanation.alternatives == (Route("nposhien", ("kuwana", "nposhien"), degraded=True),)


def test_alternatives_are_other_shortcut_free_paths_best_first() -> None:
    topology = mie(
        member("kuwana", "internet", "lgwan", relay=True),
        member("dmz-a", "dmz", "lgwan", relay=True),
        member("dmz-b", "dmz", "internet", relay=True),
        member("lgwan-only", "lgwan", relay=True),
    )
    explanation = explain(topology, "tsu", "nposhien", down=frozenset({"mie-pref"}))
    assert explanation.route == Route("nposhien", ("kuwana", "nposhien"))
    assert explanation.alternatives == (
        Route("nposhien", ("dmz-a", "dmz-b", "nposhien")),
        Route("nposhien", ("mie-pref", "nposhien"), degraded=True),
    )


def test_explanation_to_json_is_plain_json() -> None:
    topology = mie(member("kuwana", "internet", "lgwan", relay=True))
    document = explain(topology, "tsu", "nposhien").to_json()
    assert json.loads(json.dumps(document)) == document
    assert document == {
        "source": "tsu",
        "destination": "nposhien",
        "route": {
            "destination": "nposhien",
            "path": ["kuwana", "nposhien"],
            "direct": False,
            "next_hop": "kuwana",
            "relays": ["kuwana"],
            "degraded": False,
        },
        "shared_segments": [],
        "reason": "via kuwana: kuwana is on internet and lgwan; nposhien is on internet only",
        "alternatives": [
            {
                "destination": "nposhien",
                "path": ["mie-pref", "nposhien"],
                "direct": False,
                "next_hop": "mie-pref",
                "relays": ["mie-pref"],
                "degraded": False,
            }
        ],
    }


def test_explanation_to_json_without_a_route() -> None:
    document = explain(mie(), "tsu", "nabari").to_json()
    assert document["route"] is None
    assert document["alternatives"] == []
    assert json.loads(json.dumps(document)) == document


# --- properties against a brute-force search ----------------------------------------------

NODE_IDS = ("na", "nb", "nc", "nd", "ne", "nf", "ng")
SEGMENTS = ("s0", "s1", "s2", "s3")


@st.composite
def topologies(draw: st.DrawFn) -> tuple[Roster, str, str, frozenset[str]]:
    ids = draw(st.lists(st.sampled_from(NODE_IDS), min_size=1, unique=True))
    members = [
        member(
            node_id,
            *draw(st.sets(st.sampled_from(SEGMENTS), max_size=3)),
            relay=draw(st.booleans()),
            status=draw(
                st.sampled_from(MemberStatus) | st.just(MemberStatus.ACTIVE),
            ),
        )
        for node_id in ids
    ]
    anyone = st.sampled_from((*ids, "unknown"))
    down = draw(st.frozensets(st.sampled_from(NODE_IDS)))
    return roster(*members), draw(anyone), draw(anyone), down


def shares_segment(topology: Roster, a: str, b: str) -> bool:
    first, second = topology.member(a), topology.member(b)
    assert first is not None and second is not None
    return bool(set(first.segments) & set(second.segments))


def all_paths(topology: Roster, source: str, destination: str) -> Iterator[tuple[str, ...]]:
    """Every loop-free path through active relays, by depth-first search."""
    src, dst = topology.member(source), topology.member(destination)
    if src is None or dst is None or not src.active or not dst.active or source == destination:
        return
    relays = [
        m.node_id
        for m in topology.members
        if m.active and m.relay and m.node_id not in (source, destination)
    ]

    def extend(path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        last = path[-1] if path else source
        if shares_segment(topology, last, destination):
            yield (*path, destination)
        for relay in relays:
            if relay not in path and shares_segment(topology, last, relay):
                yield from extend((*path, relay))

    yield from extend(())


def best(paths: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    return min(paths, key=lambda p: (len(p), p), default=None)


def check_path(topology: Roster, source: str, destination: str, path: tuple[str, ...]) -> None:
    hops = (source, *path)
    assert path[-1] == destination
    assert len(set(hops)) == len(hops)
    for a, b in pairwise(hops):
        assert shares_segment(topology, a, b)
    for relay in path[:-1]:
        entry = topology.member(relay)
        assert entry is not None and entry.active and entry.relay


@settings(NO_DB, max_examples=400)
@given(topologies())
def test_plan_is_the_smallest_shortest_path_found_by_brute_force(
    case: tuple[Roster, str, str, frozenset[str]],
) -> None:
    topology, source, destination, down = case
    paths = list(all_paths(topology, source, destination))
    avoiding = [p for p in paths if not set(p[:-1]) & down]
    route = plan(topology, source, destination, down=down)
    if not paths:
        assert route is None
        return
    assert route is not None
    check_path(topology, source, destination, route.path)
    assert route.degraded == (not avoiding)
    assert route.path == best(avoiding or paths)
    if shares_segment(topology, source, destination):
        assert route.direct


@settings(NO_DB, max_examples=300)
@given(topologies())
def test_explain_agrees_with_plan_and_lists_valid_alternatives_best_first(
    case: tuple[Roster, str, str, frozenset[str]],
) -> None:
    topology, source, destination, down = case
    explanation = explain(topology, source, destination, down=down)
    assert explanation.route == plan(topology, source, destination, down=down)
    assert explanation.reason
    assert len(explanation.alternatives) <= MAX_ALTERNATIVES
    assert explanation.route not in explanation.alternatives
    for alternative in explanation.alternatives:
        check_path(topology, source, destination, alternative.path)
        assert alternative.degraded == bool(set(alternative.relays) & down)
    ranked = [(r.degraded, len(r.path), r.path) for r in explanation.alternatives]
    assert ranked == sorted(ranked)
    json.dumps(explanation.to_json())


@settings(NO_DB, max_examples=200)
@given(topologies())
def test_direct_peers_are_exactly_the_active_members_one_hop_away(
    case: tuple[Roster, str, str, frozenset[str]],
) -> None:
    topology, source, _, _ = case
    expected = (
        set()
        if topology.member(source) is None
        else {
            m.node_id
            for m in topology.members
            if m.active and m.node_id != source and shares_segment(topology, source, m.node_id)
        }
    )
    assert direct_peers(topology, source) == expected
