"""Convergence: replicas that receive the same envelopes in any order reach the same room.

A random causal history is made by four simulated nodes (the home node 'mie-pref' and three
members), each with its own partial knowledge: before sending, a node receives a random
subset of what others have sealed, and names its own version vector as the new envelope's
dependencies. The home node mixes in state changes (users and nodes come and go), so
whether an envelope is accepted depends on the state its dependencies name. Senders seal
their envelopes in batches of random sizes.

Three receiver replicas then get every wire envelope in their own order, with duplicates,
and with some envelopes lost and retransmitted at the end. Each decodes, verifies with a
`RootCache`, orders with a `CausalBuffer` and judges with a `RoomHistory`. They must agree
with each other, and with a reference that judged everything in the order it was made.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.causal import CausalBuffer, OfferStatus, hlc_receive, hlc_send, timeline_key
from federation.envelope import Content, Envelope, Kind, RootCache, seal_batch
from federation.rooms import RoomHistory, Verdict, judge
from federation.signing import SigningKey

HOME = "mie-pref"
MEMBERS = ("tsu", "ise", "nabari")
NODES = (HOME, *MEMBERS)
ROOM = "!kaigi2024:mie-pref"
NOW_MS = 1_714_521_600_000
SIGNING = {
    node: SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32))
    for i, node in enumerate(NODES)
}
PUBLIC = {node: key.public_raw for node, key in SIGNING.items()}


def staff(node: str) -> str:
    return f"staff@{node}"


CREATION_BODY = {
    "name": "防災連絡室",
    "add_nodes": list(MEMBERS),
    "set_users": {staff(node): "member" for node in NODES} | {"chiji@mie-pref": "admin"},
}


@dataclass
class SimNode:
    """A sending node: what it has received, its clock, its unsealed envelopes."""

    node: str
    buffer: CausalBuffer = field(default_factory=CausalBuffer)
    seq: int = 0
    clock: int = 0
    unsealed: list[Content] = field(default_factory=list)

    def receive(self, env: Envelope, now_ms: int) -> None:
        self.buffer.offer(env)
        self.clock = hlc_receive(self.clock, env.content.hlc, now_ms)

    def compose(self, kind: Kind, body: dict[str, Any], sender: str, now_ms: int) -> Content:
        self.seq += 1
        deps = self.buffer.vector(ROOM)  # everything it has processed ...
        deps.pop(self.node, None)
        if self.seq > 1:
            deps[self.node] = self.seq - 1  # ... and its own previous, sealed or not
        self.clock = hlc_send(self.clock, now_ms)
        content = Content(
            room=ROOM,
            origin=self.node,
            seq=self.seq,
            kind=kind,
            sender=sender,
            hlc=self.clock,
            deps=deps,
            key_id=SIGNING[self.node].key_id,
            body=body,
        )
        self.unsealed.append(content)
        return content

    def seal(self) -> list[Envelope]:
        envelopes = seal_batch(self.unsealed, SIGNING[self.node])
        self.unsealed = []
        for env in envelopes:
            assert self.buffer.offer(env).status is OfferStatus.READY
        return envelopes


def _action(data: st.DataObject, sim: SimNode) -> tuple[Kind, dict[str, Any], str]:
    """What `sim` sends next: kind, body, sender."""
    node = sim.node
    if node == HOME:
        choice = data.draw(
            st.sampled_from(
                ["message", "admin", "add_user", "remove_user", "add_node", "remove_node"]
            )
        )
        other = data.draw(st.sampled_from(MEMBERS))
        if choice == "message":
            return Kind.MESSAGE, {"text": f"{node} {sim.seq + 1}"}, staff(node)
        if choice == "admin":
            return Kind.STATE, {"topic": f"topic {sim.seq + 1}"}, "chiji@mie-pref"
        if choice == "add_user":
            return Kind.STATE, {"set_users": {staff(other): "member"}}, ""
        if choice == "remove_user":
            return Kind.STATE, {"remove_users": [staff(other)]}, ""
        if choice == "add_node":
            return Kind.STATE, {"add_nodes": [other]}, ""
        return Kind.STATE, {"remove_nodes": [other]}, ""
    choice = data.draw(
        st.sampled_from(["message", "message", "node", "ghost", "bad", "request", "forged"])
    )
    if choice == "message":
        return Kind.MESSAGE, {"text": f"{node} {sim.seq + 1}"}, staff(node)
    if choice == "node":
        return Kind.REACTION, {"target": bytes(32), "emoji": "👍"}, ""
    if choice == "ghost":
        return Kind.MESSAGE, {"text": "?"}, f"ghost@{node}"  # never a member
    if choice == "bad":
        return Kind.MESSAGE, {"text": ""}, staff(node)
    if choice == "request":
        return Kind.STATE_REQUEST, {"topic": "変更希望"}, staff(node)
    return Kind.STATE, {"name": "乗っ取り"}, ""  # a member cannot issue state


@dataclass
class History:
    made: list[Content]  # in the order they were composed: a causal order
    sealed: list[Envelope]  # in the order they were sealed


def make_history(data: st.DataObject) -> History:
    sims = {node: SimNode(node) for node in NODES}
    made: list[Content] = []
    sealed: list[Envelope] = []
    now = NOW_MS

    made.append(sims[HOME].compose(Kind.STATE, CREATION_BODY, "", now))
    sealed.extend(sims[HOME].seal())
    for node in MEMBERS:
        sims[node].receive(sealed[0], now)

    for _ in range(data.draw(st.integers(1, 24), label="steps")):
        sim = sims[data.draw(st.sampled_from(NODES), label="sender")]
        if sealed:
            for index in data.draw(st.lists(st.integers(0, len(sealed) - 1), max_size=8)):
                sim.receive(sealed[index], now)
        now += data.draw(st.integers(-50, 50))  # wall clocks disagree and step back
        kind, body, sender = _action(data, sim)
        made.append(sim.compose(kind, body, sender, now))
        if data.draw(st.booleans(), label="seal now"):
            sealed.extend(sim.seal())
    for sim in sims.values():
        sealed.extend(sim.seal())
    assert len(sealed) == len(made)
    return History(made=made, sealed=sealed)


def reference_verdicts(made: list[Content]) -> dict[bytes, Verdict]:
    """Judge every envelope once, in the order it was made."""
    history = RoomHistory()
    verdicts: dict[bytes, Verdict] = {}
    for content in made:
        verdict, state = judge(history, content)
        if verdict is Verdict.ACCEPTED and state is not None:
            history.add(state)
        verdicts[hashlib.sha256(content.to_bytes()).digest()] = verdict
    return verdicts


@dataclass
class Replica:
    """A receiving node."""

    cache: RootCache = field(default_factory=RootCache)
    buffer: CausalBuffer = field(default_factory=CausalBuffer)
    history: RoomHistory = field(default_factory=RoomHistory)
    processed: set[tuple[str, int]] = field(default_factory=set)
    applied: list[Envelope] = field(default_factory=list)
    verdicts: dict[bytes, Verdict] = field(default_factory=dict)

    def deliver(self, data: bytes) -> None:
        env = Envelope.from_bytes(data)
        self.cache.verify(env, PUBLIC[env.content.origin])
        for ready in self.buffer.offer(env).ready:
            content = ready.content
            for dep in content.deps.items():
                assert dep in self.processed, (
                    f"{content.origin}/{content.seq} released before {dep}"
                )
            verdict, state = judge(self.history, content)
            if verdict is Verdict.ACCEPTED:
                if state is not None:
                    self.history.add(state)
                self.applied.append(ready)
            assert ready.id not in self.verdicts, "released twice"
            self.verdicts[ready.id] = verdict
            self.processed.add((content.origin, content.seq))


def delivery_order(data: st.DataObject, count: int) -> list[int]:
    """A permutation of 0..count-1 with duplicates inserted, lost ones moved to the end."""
    order = list(data.draw(st.permutations(range(count)), label="order"))
    duplicates = st.tuples(st.integers(0, count - 1), st.integers(0, 2 * count))
    for index, position in data.draw(st.lists(duplicates, max_size=count // 2), label="dups"):
        order.insert(position, index)
    lost = data.draw(st.sets(st.integers(0, count - 1), max_size=count // 2), label="lost")
    retransmitted = data.draw(st.permutations(sorted(lost)), label="retransmission")
    return [index for index in order if index not in lost] + list(retransmitted)


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_replicas_converge_whatever_the_order_duplicates_and_losses(data: st.DataObject) -> None:
    history = make_history(data)
    wire = [env.to_bytes() for env in history.sealed]
    expected = reference_verdicts(history.made)
    all_ids = set(expected)
    assert all_ids == {env.id for env in history.sealed}

    outcomes = []
    for _ in range(3):
        replica = Replica()
        for index in delivery_order(data, len(wire)):
            replica.deliver(wire[index])
        applied_ids = [env.id for env in replica.applied]
        assert len(applied_ids) == len(set(applied_ids)), "an envelope was applied twice"
        assert replica.verdicts == expected  # every envelope released once, judged the same
        assert replica.buffer.pending_count() == 0
        rejected = {i for i, v in replica.verdicts.items() if v is not Verdict.ACCEPTED}
        assert set(applied_ids) | rejected == all_ids
        assert not set(applied_ids) & rejected
        timeline = [env.id for env in sorted(replica.applied, key=timeline_key)]
        state = replica.history.current
        outcomes.append((set(applied_ids), rejected, timeline, state))

    first = outcomes[0]
    for other in outcomes[1:]:
        assert other[0] == first[0]  # same applied set
        assert other[1] == first[1]  # same rejected set
        assert other[2] == first[2]  # same timeline
        assert other[3] == first[3]  # same room state


def test_a_fixed_history_shows_verdicts_depend_on_the_state_each_sender_saw() -> None:
    # tsu sends before and after learning that home removed its user: one accepted, one not,
    # and a replica receiving everything backwards still reaches those verdicts.
    home, tsu = SimNode(HOME), SimNode("tsu")
    creation = home.compose(Kind.STATE, CREATION_BODY, "", NOW_MS)
    (sealed_creation,) = home.seal()
    tsu.receive(sealed_creation, NOW_MS)
    before = tsu.compose(Kind.MESSAGE, {"text": "a"}, staff("tsu"), NOW_MS + 1)
    removal = home.compose(Kind.STATE, {"remove_users": [staff("tsu")]}, "", NOW_MS + 2)
    (sealed_removal,) = home.seal()
    tsu.receive(sealed_removal, NOW_MS + 2)
    after = tsu.compose(Kind.MESSAGE, {"text": "b"}, staff("tsu"), NOW_MS + 3)
    sealed_tsu = tsu.seal()
    verdicts = reference_verdicts([creation, before, removal, after])
    assert list(verdicts.values()) == [
        Verdict.ACCEPTED,
        Verdict.ACCEPTED,
        Verdict.ACCEPTED,
        Verdict.SENDER_NOT_MEMBER,
    ]
    replica = Replica()
    for env in reversed([sealed_creation, sealed_removal, *sealed_tsu]):
        replica.deliver(env.to_bytes())
    assert replica.verdicts == verdicts
