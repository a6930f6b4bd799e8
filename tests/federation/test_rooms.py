"""Rooms: every node reaches the same verdict on an envelope, judged in the state it names."""

from __future__ import annotations

from typing import Any

import pytest

from federation.envelope import Content, Kind
from federation.errors import ProtocolError
from federation.rooms import (
    MAX_ROOM_NODES,
    Role,
    RoomHistory,
    RoomKind,
    RoomState,
    Verdict,
    check_body,
    check_sender_name,
    check_user_id,
    decide_request,
    judge,
    sender_name,
)

HOME = "mie-pref"
ROOM = "!kaigi2024:mie-pref"
TARGET = bytes(range(32))
FILE: dict[str, Any] = {
    "sha256": bytes(range(1, 33)),
    "size": 52_428_800,
    "name": "浸水被害.jpg",
    "mime": "image/jpeg",
}

CREATION_BODY: dict[str, Any] = {
    "name": "防災連絡室",
    "add_nodes": ["tsu", "ise"],
    "set_users": {
        "tanaka@mie-pref": "admin",
        "suzuki@tsu": "member",
        "sato@ise": "admin",
    },
}


def make(
    origin: str,
    seq: int,
    kind: Kind = Kind.MESSAGE,
    body: dict[str, Any] | None = None,
    *,
    sender: str = "",
    home_seq: int = 1,
    room: str = ROOM,
) -> Content:
    """A content whose deps name the origin's previous envelope and home seq `home_seq`."""
    home = room.rpartition(":")[2]
    deps: dict[str, int] = {}
    if origin != home or seq > 1:
        deps[home] = home_seq
    if seq > 1:
        deps[origin] = seq - 1
    return Content(
        room=room,
        origin=origin,
        seq=seq,
        kind=kind,
        sender=sender,
        hlc=seq,
        deps=deps,
        key_id="0123456789abcdef",
        body={"text": "こんにちは"} if body is None else body,
    )


def creation(body: dict[str, Any] | None = None) -> Content:
    return make(HOME, 1, Kind.STATE, CREATION_BODY if body is None else body)


def history_of(*state_contents: Content) -> RoomHistory:
    """Judge `state_contents` in order (all must be accepted) into a history."""
    history = RoomHistory()
    for content in state_contents:
        verdict, state = judge(history, content)
        assert verdict is Verdict.ACCEPTED, (content, verdict)
        assert state is not None
        history.add(state)
    return history


@pytest.fixture
def room() -> RoomHistory:
    return history_of(creation())


def verdict(history: RoomHistory | None, content: Content) -> Verdict:
    return judge(history, content)[0]


# --- creation -------------------------------------------------------------------------------


def test_first_home_state_envelope_creates_the_room() -> None:
    result, state = judge(None, creation())
    assert result is Verdict.ACCEPTED
    assert state is not None
    assert state.room == ROOM
    assert state.version == 1
    assert state.name == "防災連絡室"
    assert state.kind is RoomKind.STANDARD
    assert state.nodes == {HOME, "tsu", "ise"}
    assert state.users == {
        "tanaka@mie-pref": Role.ADMIN,
        "suzuki@tsu": Role.MEMBER,
        "sato@ise": Role.ADMIN,
    }
    assert state.home == HOME


def test_a_room_spans_every_node_of_the_largest_prefecture_and_no_more_than_the_limit() -> None:
    # Hokkaido: 179 municipalities and the prefecture, all in one room.
    towns = [f"town-{n:03d}" for n in range(1, 180)]
    hokkaido = history_of(creation({"name": "全道連絡室", "add_nodes": towns}))
    assert hokkaido.current is not None and len(hokkaido.current.nodes) == 180
    # Up to the limit in later changes (at most 256 nodes named per change).
    more = [f"extra-{n:03d}" for n in range(MAX_ROOM_NODES - 180)]
    full = make(HOME, 2, Kind.STATE, {"add_nodes": more})
    result, state = judge(hokkaido, full)
    assert result is Verdict.ACCEPTED and state is not None
    assert len(state.nodes) == MAX_ROOM_NODES
    hokkaido.add(state)
    # One more is refused: every envelope of the room names each of its origins.
    one_more = make(HOME, 3, Kind.STATE, {"add_nodes": ["one-more"]}, home_seq=2)
    result, state = judge(hokkaido, one_more)
    assert (result, state) == (Verdict.BAD_STATE_CHANGE, None)
    # So is a creation beyond it, and a change that removes as many as it adds is not.
    too_big = creation({"name": "大きすぎ", "add_nodes": [f"n-{n:03d}" for n in range(256)]})
    assert verdict(None, too_big) is Verdict.BAD_STATE_CHANGE
    swap_body = {"add_nodes": ["one-more"], "remove_nodes": ["extra-000"]}
    swap = make(HOME, 3, Kind.STATE, swap_body, home_seq=2)
    assert verdict(hokkaido, swap) is Verdict.ACCEPTED


def test_creation_keeps_the_home_node_even_if_the_body_removes_it() -> None:
    _, state = judge(None, creation({"name": "x", "remove_nodes": [HOME]}))
    assert state is not None and HOME in state.nodes


def test_creation_drops_users_of_nodes_outside_the_room() -> None:
    _, state = judge(None, creation({"name": "x", "set_users": {"kato@nabari": "member"}}))
    assert state is not None and state.users == {}


def test_creation_needs_a_name() -> None:
    assert verdict(None, creation({"add_nodes": ["tsu"]})) is Verdict.BAD_BODY


def test_creation_may_make_an_announcement_room() -> None:
    _, state = judge(None, creation({"name": "お知らせ", "room_kind": "announcement"}))
    assert state is not None and state.kind is RoomKind.ANNOUNCEMENT


# --- verdicts -------------------------------------------------------------------------------


def test_member_user_of_a_member_node_is_accepted(room: RoomHistory) -> None:
    assert judge(room, make("tsu", 1, sender="suzuki@tsu")) == (Verdict.ACCEPTED, None)


def test_node_itself_may_send_without_a_sender(room: RoomHistory) -> None:
    assert verdict(room, make("ise", 1)) is Verdict.ACCEPTED


def test_envelope_from_a_node_outside_the_room_is_refused(room: RoomHistory) -> None:
    assert verdict(room, make("nabari", 1)) is Verdict.ORIGIN_NOT_MEMBER


def test_envelope_from_a_user_outside_the_room_is_refused(room: RoomHistory) -> None:
    assert verdict(room, make("tsu", 1, sender="yamada@tsu")) is Verdict.SENDER_NOT_MEMBER


def test_sender_of_another_node_is_refused_even_if_a_member(room: RoomHistory) -> None:
    # sato@ise is a member, but tsu cannot speak for ise's users.
    assert verdict(room, make("tsu", 1, sender="sato@ise")) is Verdict.SENDER_NOT_OF_ORIGIN


def test_state_envelope_from_a_member_node_is_refused(room: RoomHistory) -> None:
    content = make("tsu", 1, Kind.STATE, {"topic": "乗っ取り"})
    assert verdict(room, content) is Verdict.STATE_NOT_FROM_HOME
    assert verdict(None, make("tsu", 1, Kind.STATE, {"name": "偽"})) is (
        Verdict.STATE_NOT_FROM_HOME
    )


def test_envelope_for_a_room_never_created_is_refused() -> None:
    assert verdict(None, make("tsu", 1)) is Verdict.UNKNOWN_ROOM
    assert verdict(RoomHistory(), make("tsu", 1)) is Verdict.UNKNOWN_ROOM
    assert verdict(RoomHistory(), make(HOME, 2, Kind.STATE, {"topic": "t"})) is (
        Verdict.UNKNOWN_ROOM
    )


def test_home_message_before_any_state_leaves_the_room_unknown() -> None:
    assert verdict(None, make(HOME, 1)) is Verdict.UNKNOWN_ROOM


def test_later_home_state_change_produces_the_next_state(room: RoomHistory) -> None:
    change = make(
        HOME,
        2,
        Kind.STATE,
        {"topic": "台風10号", "set_users": {"suzuki@tsu": "admin"}, "remove_users": ["sato@ise"]},
    )
    result, state = judge(room, change)
    assert result is Verdict.ACCEPTED
    assert state is not None
    assert state.version == 2
    assert (state.name, state.topic) == ("防災連絡室", "台風10号")
    assert state.users == {"tanaka@mie-pref": Role.ADMIN, "suzuki@tsu": Role.ADMIN}
    assert room.current is not None and room.current.version == 1  # judge does not add


def test_removing_a_node_drops_its_users_and_cannot_remove_home(room: RoomHistory) -> None:
    _, state = judge(room, make(HOME, 2, Kind.STATE, {"remove_nodes": ["tsu", HOME]}))
    assert state is not None
    assert state.nodes == {HOME, "ise"}
    assert "suzuki@tsu" not in state.users


def test_state_change_cannot_change_the_room_kind(room: RoomHistory) -> None:
    change = make(HOME, 2, Kind.STATE, {"room_kind": "announcement"})
    assert verdict(room, change) is Verdict.BAD_BODY


def test_state_change_setting_the_topic_to_nil_is_a_bad_body(room: RoomHistory) -> None:
    # A nil topic once passed the check and became the text "None" on every node.
    assert verdict(room, make(HOME, 2, Kind.STATE, {"topic": None})) is Verdict.BAD_BODY
    assert verdict(room, make(HOME, 2, Kind.STATE, {"name": None})) is Verdict.BAD_BODY


# --- bodies ---------------------------------------------------------------------------------

BAD_BODIES: list[tuple[Kind, dict[str, Any]]] = [
    (Kind.STATE, {"colour": "red"}),
    (Kind.STATE, {"name": "x" * 201}),
    (Kind.STATE, {"topic": "x" * 2001}),
    (Kind.STATE, {"topic": 5}),
    (Kind.STATE, {"room_kind": "standard"}),
    (Kind.STATE, {"add_nodes": "tsu"}),
    (Kind.STATE, {"add_nodes": ["Tsu"]}),
    (Kind.STATE, {"add_nodes": ["nabari"] * 257}),
    (Kind.STATE, {"remove_nodes": ["mie--pref"]}),
    (Kind.STATE, {"set_users": ["suzuki@tsu"]}),
    (Kind.STATE, {"set_users": {"suzuki@tsu": "owner"}}),
    (Kind.STATE, {"set_users": {"Suzuki@tsu": "member"}}),
    (Kind.STATE, {"set_users": {"suzuki": "member"}}),
    (Kind.STATE, {"remove_users": "suzuki@tsu"}),
    (Kind.STATE, {"remove_users": ["suzuki@TSU"]}),
    (Kind.STATE_REQUEST, {"room_kind": "announcement"}),
    (Kind.STATE_REQUEST, {"add_nodes": [5]}),
    (Kind.STATE_REQUEST, {"extra": True}),
    (Kind.MESSAGE, {}),
    (Kind.MESSAGE, {"text": ""}),
    (Kind.MESSAGE, {"text": "x" * (32 * 1024 + 1)}),
    (Kind.MESSAGE, {"text": b"bytes"}),
    (Kind.MESSAGE, {"text": "hi", "format": "html"}),
    (Kind.MESSAGE, {"text": "hi", "format": None}),
    (Kind.MESSAGE, {"text": "hi", "files": {}}),
    (Kind.MESSAGE, {"text": "hi", "files": [{}] * 33}),
    (Kind.MESSAGE, {"text": "hi", "files": [{**FILE, "sha256": FILE["sha256"].hex()}]}),
    (Kind.MESSAGE, {"text": "hi", "files": [{**FILE, "name": "../secret.pdf"}]}),
    (Kind.MESSAGE, {"text": "hi", "files": [{**FILE, "size": -5}]}),
    (Kind.MESSAGE, {"text": "hi", "files": [{k: v for k, v in FILE.items() if k != "mime"}]}),
    (Kind.MESSAGE, {"text": "hi", "html": "<b>hi</b>"}),
    (Kind.EDIT, {"text": "new"}),
    (Kind.EDIT, {"target": TARGET}),
    (Kind.EDIT, {"target": TARGET[:31], "text": "new"}),
    (Kind.EDIT, {"target": TARGET, "text": "new", "reason": "typo"}),
    (Kind.REDACT, {}),
    (Kind.REDACT, {"target": TARGET, "reason": "x" * 501}),
    (Kind.REDACT, {"target": TARGET, "reason": None}),
    (Kind.REACTION, {"target": TARGET}),
    (Kind.REACTION, {"target": TARGET, "emoji": ""}),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍" * 33}),
    (Kind.REACTION, {"target": TARGET + b"\x00", "emoji": "👍"}),
    (Kind.RECEIPT, {}),
    (Kind.RECEIPT, {"target": TARGET}),
    (Kind.RECEIPT, {"up_to": TARGET.hex()}),
    (Kind.RECEIPT, {"up_to": TARGET, "at": 5}),
    (Kind.MESSAGE, {"text": "hi", "name": ""}),
    (Kind.MESSAGE, {"text": "hi", "name": "名" * 101}),
    (Kind.MESSAGE, {"text": "hi", "name": b"suzuki"}),
    (Kind.MESSAGE, {"text": "hi", "name": None}),
    (Kind.MESSAGE, {"text": "hi", "name": "鈴木\r\n次郎"}),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍", "name": 7}),
    (Kind.RECEIPT, {"up_to": TARGET, "name": "\u202e郎次木鈴"}),
    (Kind.RECEIPT, {"up_to": TARGET, "name": {"ja": "鈴木"}}),
    (Kind.EDIT, {"target": TARGET, "text": "new", "name": "鈴木次郎"}),
]


@pytest.mark.parametrize(("kind", "body"), BAD_BODIES, ids=lambda v: repr(v)[:40])
def test_bad_body_is_refused_by_check_body_and_judged_bad_body(
    room: RoomHistory, kind: Kind, body: dict[str, Any]
) -> None:
    with pytest.raises(ProtocolError):
        check_body(kind, body)
    origin = HOME if kind is Kind.STATE else "tsu"
    seq = 2 if kind is Kind.STATE else 1
    assert verdict(room, make(origin, seq, kind, body)) is Verdict.BAD_BODY


GOOD_BODIES: list[tuple[Kind, dict[str, Any]]] = [
    (Kind.STATE, {}),
    (Kind.STATE, {"name": "x" * 200, "topic": ""}),
    (Kind.STATE, {"add_nodes": ["nabari"], "set_users": {"kato@nabari": "member"}}),
    (Kind.STATE_REQUEST, {"add_nodes": ["nabari"]}),
    (Kind.MESSAGE, {"text": "x" * (32 * 1024)}),
    (Kind.MESSAGE, {"text": "**至急**", "format": "markdown", "files": [], "announcement": True}),
    (Kind.MESSAGE, {"text": "被害写真", "files": [FILE, {**FILE, "name": "避難所一覧.csv"}]}),
    (Kind.EDIT, {"target": TARGET, "text": "訂正"}),
    (Kind.REDACT, {"target": TARGET}),
    (Kind.REDACT, {"target": TARGET, "reason": "x" * 500}),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍"}),
    (Kind.RECEIPT, {"up_to": TARGET}),
    (Kind.MESSAGE, {"text": "了解", "name": "鈴木次郎"}),
    (Kind.REACTION, {"target": TARGET, "emoji": "👍", "name": "名" * 100}),
    (Kind.RECEIPT, {"up_to": TARGET, "name": "鈴木　次郎"}),
]


@pytest.mark.parametrize(("kind", "body"), GOOD_BODIES, ids=lambda v: repr(v)[:40])
def test_good_body_passes_check_body_and_is_accepted(
    room: RoomHistory, kind: Kind, body: dict[str, Any]
) -> None:
    check_body(kind, body)
    origin = HOME if kind is Kind.STATE else "tsu"
    seq = 2 if kind is Kind.STATE else 1
    assert verdict(room, make(origin, seq, kind, body)) is Verdict.ACCEPTED


def test_bad_sender_name_is_a_protocol_error_with_a_stable_code() -> None:
    for name in ("", "名" * 101, 5, "鈴木\x00", "\u202e鈴木"):
        with pytest.raises(ProtocolError) as refused:
            check_body(Kind.RECEIPT, {"up_to": TARGET, "name": name})
        assert refused.value.code == "bad_body"
        assert "'name'" in str(refused.value)
        with pytest.raises(ProtocolError):
            check_sender_name(name)
    assert check_sender_name("鈴木 次郎") == "鈴木 次郎"


# --- sender names ---------------------------------------------------------------------------


def test_sender_name_of_a_user_of_the_origin_node_is_given(room: RoomHistory) -> None:
    for kind, body in [
        (Kind.MESSAGE, {"text": "了解", "name": "鈴木次郎"}),
        (Kind.REACTION, {"target": TARGET, "emoji": "👍", "name": "鈴木次郎"}),
        (Kind.RECEIPT, {"up_to": TARGET, "name": "鈴木次郎"}),
    ]:
        content = make("tsu", 1, kind, body, sender="suzuki@tsu")
        assert verdict(room, content) is Verdict.ACCEPTED
        assert sender_name(content) == "鈴木次郎"


def test_sender_name_is_absent_without_a_name_or_a_sender(room: RoomHistory) -> None:
    assert sender_name(make("tsu", 1, sender="suzuki@tsu")) is None  # older nodes send none
    node_itself = make("tsu", 1, Kind.MESSAGE, {"text": "保守", "name": "津市"})
    assert verdict(room, node_itself) is Verdict.ACCEPTED
    assert sender_name(node_itself) is None  # no user to name


def test_name_for_a_user_of_another_node_is_refused_and_never_given(room: RoomHistory) -> None:
    # tsu claims a name for sato@ise, a member user of the room, but of ise.
    spoof = make("tsu", 1, Kind.MESSAGE, {"text": "x", "name": "偽名"}, sender="sato@ise")
    assert verdict(room, spoof) is Verdict.SENDER_NOT_OF_ORIGIN
    assert sender_name(spoof) is None
    receipt = make("tsu", 1, Kind.RECEIPT, {"up_to": TARGET, "name": "偽名"}, sender="sato@ise")
    assert verdict(room, receipt) is Verdict.SENDER_NOT_OF_ORIGIN
    assert sender_name(receipt) is None


def test_sender_name_is_given_only_for_kinds_that_carry_one() -> None:
    # Not an accepted body (check_body refuses a name on an edit): still never a name.
    body = {"target": TARGET, "text": "x", "name": "鈴木"}
    edit = make("tsu", 1, Kind.EDIT, body, sender="a@tsu")
    assert sender_name(edit) is None
    bad = make("tsu", 1, Kind.MESSAGE, {"text": "x", "name": "鈴木\u202e"}, sender="a@tsu")
    assert sender_name(bad) is None


def test_empty_name_is_refused_at_creation() -> None:
    with pytest.raises(ProtocolError):
        check_body(Kind.STATE, {"name": ""}, creation=True)
    assert verdict(None, creation({"name": ""})) is Verdict.BAD_BODY


def test_unknown_room_kind_is_refused_at_creation() -> None:
    assert verdict(None, creation({"name": "x", "room_kind": "secret"})) is Verdict.BAD_BODY


@pytest.mark.parametrize("user", ["suzuki@tsu", "a@mie-pref", "k.ito_2-b@ise", "9@ab"])
def test_valid_user_ids_are_accepted(user: str) -> None:
    assert check_user_id(user) == user


@pytest.mark.parametrize(
    "user",
    ["suzuki", "@tsu", "Suzuki@tsu", "suzuki@tsu@ise", "suzuki@t", "suzuki@mie--pref", 5, ""],
)
def test_invalid_user_ids_are_refused(user: object) -> None:
    with pytest.raises(ProtocolError) as info:
        check_user_id(user)
    assert info.value.code in {"bad_user_id", "bad_node_id"}


# --- announcement rooms ---------------------------------------------------------------------


@pytest.fixture
def announcements() -> RoomHistory:
    return history_of(creation({**CREATION_BODY, "room_kind": "announcement"}))


def test_non_admin_message_in_an_announcement_room_is_refused(
    announcements: RoomHistory,
) -> None:
    content = make("tsu", 1, sender="suzuki@tsu")
    assert verdict(announcements, content) is Verdict.NOT_ALLOWED_TO_POST


def test_admin_message_in_an_announcement_room_is_accepted(announcements: RoomHistory) -> None:
    assert verdict(announcements, make("ise", 1, sender="sato@ise")) is Verdict.ACCEPTED


def test_non_admin_may_still_react_in_an_announcement_room(announcements: RoomHistory) -> None:
    body = {"target": TARGET, "emoji": "👍"}
    content = make("tsu", 1, Kind.REACTION, body, sender="suzuki@tsu")
    assert verdict(announcements, content) is Verdict.ACCEPTED


def test_standard_room_lets_members_post(room: RoomHistory) -> None:
    assert verdict(room, make("tsu", 1, sender="suzuki@tsu")) is Verdict.ACCEPTED


# --- judged in the state the envelope names ---------------------------------------------------


@pytest.fixture
def tsu_removed_at_3() -> RoomHistory:
    """Home seq 1 creates, 2 is a message, 3 removes tsu, 4 adds it back."""
    history = history_of(creation())
    assert verdict(history, make(HOME, 2)) is Verdict.ACCEPTED
    _, state = judge(history, make(HOME, 3, Kind.STATE, {"remove_nodes": ["tsu"]}, home_seq=2))
    assert state is not None
    history.add(state)
    readd = {"add_nodes": ["tsu"], "set_users": {"suzuki@tsu": "member"}}
    _, state = judge(history, make(HOME, 4, Kind.STATE, readd, home_seq=3))
    assert state is not None
    history.add(state)
    return history


@pytest.mark.parametrize(
    ("home_seq", "expected"),
    [
        (1, Verdict.ACCEPTED),
        (2, Verdict.ACCEPTED),
        (3, Verdict.ORIGIN_NOT_MEMBER),
        (4, Verdict.ACCEPTED),
    ],
)
def test_envelope_is_judged_under_the_state_its_home_dependency_names(
    tsu_removed_at_3: RoomHistory, home_seq: int, expected: Verdict
) -> None:
    content = make("tsu", 5, sender="suzuki@tsu", home_seq=home_seq)
    assert verdict(tsu_removed_at_3, content) is expected


def test_users_are_judged_in_the_state_named_too(room: RoomHistory) -> None:
    _, state = judge(room, make(HOME, 2, Kind.STATE, {"remove_users": ["suzuki@tsu"]}))
    assert state is not None
    room.add(state)
    before = make("tsu", 1, sender="suzuki@tsu", home_seq=1)
    after = make("tsu", 1, sender="suzuki@tsu", home_seq=2)
    assert verdict(room, before) is Verdict.ACCEPTED
    assert verdict(room, after) is Verdict.SENDER_NOT_MEMBER


def test_history_state_at_returns_the_latest_state_at_or_before_a_seq(
    tsu_removed_at_3: RoomHistory,
) -> None:
    history = tsu_removed_at_3
    assert history.state_at(0) is None
    for home_seq, version in [(1, 1), (2, 1), (3, 3), (4, 4), (99, 4)]:
        state = history.state_at(home_seq)
        assert state is not None and state.version == version
    assert history.current is history.state_at(4)
    assert "tsu" not in history.state_at(3).nodes  # type: ignore[union-attr]


def test_history_refuses_states_out_of_order(room: RoomHistory) -> None:
    state = room.current
    assert state is not None
    with pytest.raises(ValueError):
        room.add(state)


def test_empty_history_has_no_state() -> None:
    history = RoomHistory()
    assert history.current is None
    assert history.state_at(10) is None


# --- state requests ---------------------------------------------------------------------------


@pytest.fixture
def current(room: RoomHistory) -> RoomState:
    assert room.current is not None
    return room.current


def request(body: dict[str, Any], *, origin: str = "tsu", sender: str = "") -> Content:
    return make(origin, 1, Kind.STATE_REQUEST, body, sender=sender)


def test_member_node_operator_request_to_add_is_granted(current: RoomState) -> None:
    body = {"add_nodes": ["nabari"], "set_users": {"kato@nabari": "member"}}
    assert decide_request(current, request(body)) == body


def test_member_node_operator_may_remove_its_own_users(current: RoomState) -> None:
    body = {"remove_users": ["suzuki@tsu"]}
    assert decide_request(current, request(body)) == body


def test_member_node_operator_may_not_remove_other_nodes_users(current: RoomState) -> None:
    assert decide_request(current, request({"remove_users": ["sato@ise"]})) is None


def test_member_node_operator_may_not_remove_other_nodes(current: RoomState) -> None:
    assert decide_request(current, request({"remove_nodes": ["ise"]})) is None
    assert decide_request(current, request({"remove_nodes": ["tsu", "ise"]})) is None


def test_member_node_operator_may_take_its_own_node_out_of_the_room(current: RoomState) -> None:
    body = {"remove_nodes": ["tsu"]}
    assert decide_request(current, request(body)) == body


def test_room_admin_request_is_granted_even_to_remove(current: RoomState) -> None:
    body = {"remove_nodes": ["tsu"], "remove_users": ["suzuki@tsu"]}
    assert decide_request(current, request(body, origin="ise", sender="sato@ise")) == body


def test_non_admin_user_request_is_refused(current: RoomState) -> None:
    content = request({"topic": "変更"}, sender="suzuki@tsu")
    assert decide_request(current, content) is None


def test_request_to_remove_the_home_node_is_refused_even_from_an_admin(
    current: RoomState,
) -> None:
    body = {"remove_nodes": [HOME]}
    assert decide_request(current, request(body, origin="ise", sender="sato@ise")) is None
    assert decide_request(current, request(body)) is None


def test_request_from_a_node_outside_the_room_is_refused(current: RoomState) -> None:
    assert decide_request(current, request({"topic": "x"}, origin="nabari")) is None


def test_empty_request_or_another_kind_is_not_turned_into_state(current: RoomState) -> None:
    assert decide_request(current, request({})) is None
    assert decide_request(current, make("tsu", 1, Kind.MESSAGE)) is None


def test_granted_request_becomes_a_state_change_every_node_accepts(room: RoomHistory) -> None:
    assert room.current is not None
    body = decide_request(room.current, request({"add_nodes": ["nabari"]}))
    assert body is not None
    result, state = judge(room, make(HOME, 2, Kind.STATE, body))
    assert result is Verdict.ACCEPTED
    assert state is not None and "nabari" in state.nodes
