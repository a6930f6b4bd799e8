"""Rooms: their state, and whether an envelope is valid in the state it claims.

A room's **home** node (the one in its id, `!<random>:<home>`) is the only
issuer of `state` envelopes, so the state is one linear sequence per room and
needs no conflict resolution. The first state envelope (home seq 1) creates the
room. Other member nodes ask for changes with `state-request` envelopes; the home
node decides (`decide_request`) and, if it agrees, issues the `state` envelope.

Validity depends only on the envelope and the room's state history, so every
node reaches the same verdict: an envelope is judged under the state as of its
dependency on the home node (`deps[home]`): the latest state envelope the sender
had seen. Its origin node must be a member then; its sender, if any, a member
user of that node; a `state` envelope must come from the home node.

Bodies are checked here against the same rules as `schemas/envelope-bodies/`; a
message's `files` are file references (`federation.files.FileRef`).

Display names: a message, reaction or receipt may carry its sender's display name
(`name`), set by the sender's own node, which is the only authority on its users.
`sender_name` gives it only where the sender is a user of the origin node (an
accepted envelope always fits: `judge` refuses a sender of another node), so a node
can never name another node's users. A name is plain text: no control characters,
none of the invisible or direction-changing ones that would hide or reorder it in a
list of people.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from .envelope import Content, Kind, room_home
from .errors import ProtocolError
from .files import check_file_refs
from .identity import check_node_id

__all__ = [
    "MAX_SENDER_NAME",
    "Role",
    "RoomHistory",
    "RoomKind",
    "RoomState",
    "Verdict",
    "check_body",
    "check_sender_name",
    "check_user_id",
    "decide_request",
    "judge",
    "sender_name",
]

MAX_TEXT = 32 * 1024
MAX_ROOM_NODES = 256
"""Nodes in one room at most: every node of the largest prefecture (Hokkaido: 179
municipalities and the prefecture) fits. A state change beyond it is refused
(`bad_state_change`), since every envelope names each origin of its room."""
MAX_SENDER_NAME = 100
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
"""Characters a display name may not hold (mirrored in the body schemas)."""
_NAMED = frozenset({Kind.MESSAGE, Kind.REACTION, Kind.RECEIPT})
_USER = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,63}@[a-z][a-z0-9-]{0,30}[a-z0-9]\Z")


class Role(StrEnum):
    """A user's role in a room."""

    ADMIN = "admin"
    MEMBER = "member"


class RoomKind(StrEnum):
    """Ordinary rooms, or announcement rooms where only admins post."""

    STANDARD = "standard"
    ANNOUNCEMENT = "announcement"


def check_user_id(user: object) -> str:
    """`login@node`, lowercase."""
    if not isinstance(user, str) or not _USER.match(user):
        raise ProtocolError(f"invalid user id {user!r}: expected login@node", code="bad_user_id")
    check_node_id(user.rpartition("@")[2])
    return user


@dataclass(frozen=True, slots=True, kw_only=True)
class RoomState:
    """A room's state after one state envelope."""

    room: str
    """Room id."""
    version: int
    """Home seq of the state envelope that produced this state."""
    name: str
    """Display name."""
    topic: str = ""
    """Optional topic."""
    kind: RoomKind = RoomKind.STANDARD
    """standard or announcement (fixed at creation)."""
    nodes: frozenset[str] = field(default_factory=frozenset)
    """Member nodes."""
    users: Mapping[str, Role] = field(default_factory=dict)
    """Member users and their roles."""

    @property
    def home(self) -> str:
        return room_home(self.room)

    def role(self, user: str) -> Role | None:
        return self.users.get(user)


class Verdict(StrEnum):
    """The decision on an envelope whose dependencies are met."""

    ACCEPTED = "accepted"
    ORIGIN_NOT_MEMBER = "origin_not_member"
    SENDER_NOT_MEMBER = "sender_not_member"
    SENDER_NOT_OF_ORIGIN = "sender_not_of_origin"
    STATE_NOT_FROM_HOME = "state_not_from_home"
    NOT_ALLOWED_TO_POST = "not_allowed_to_post"
    UNKNOWN_ROOM = "unknown_room"
    BAD_BODY = "bad_body"
    BAD_STATE_CHANGE = "bad_state_change"
    """A state change whose room would span more than `MAX_ROOM_NODES` nodes."""


def _text(body: Mapping[str, Any], name: str, *, required: bool, limit: int = MAX_TEXT) -> None:
    if name not in body and not required:
        return
    value = body.get(name)
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise ProtocolError(
            f"body field {name!r} must be text of 1-{limit} characters", code="bad_body"
        )


def _target(body: Mapping[str, Any], name: str = "target") -> None:
    value = body.get(name)
    if not isinstance(value, bytes) or len(value) != 32:
        raise ProtocolError(f"body field {name!r} must be a 32-byte envelope id", code="bad_body")


def check_sender_name(name: object) -> str:
    """`name` if a body may carry it as its sender's display name, else `ProtocolError`
    (code bad_body): 1-100 characters, none of them control, invisible or
    direction-changing."""
    if not isinstance(name, str) or not name or len(name) > MAX_SENDER_NAME or _HIDDEN.search(name):
        raise ProtocolError(
            f"body field 'name' must be the sender's display name: 1-{MAX_SENDER_NAME} "
            "characters, none of them control or invisible",
            code="bad_body",
        )
    return name


def _sender_name(body: Mapping[str, Any]) -> None:
    if "name" in body:
        check_sender_name(body["name"])


def _only(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    if not body.keys() <= allowed:  # no set built for a body that passes
        extra = set(body) - allowed
        raise ProtocolError(f"unexpected body fields {sorted(extra, key=str)}", code="bad_body")


_MESSAGE_FIELDS = frozenset({"text", "format", "files", "announcement", "name"})
_EDIT_FIELDS = frozenset({"target", "text"})
_REDACT_FIELDS = frozenset({"target", "reason"})
_REACTION_FIELDS = frozenset({"target", "emoji", "name"})
_RECEIPT_FIELDS = frozenset({"up_to", "name"})


_STATE_FIELDS = frozenset(
    {
        "name",
        "topic",
        "room_kind",
        "add_nodes",
        "remove_nodes",
        "set_users",
        "remove_users",
    }
)
_STATE_FIELDS_ANSWERING = _STATE_FIELDS | {"answers"}
MAX_ANSWERS = 64


def _check_state_ops(
    body: Mapping[str, Any], *, creation: bool, answers_allowed: bool = False
) -> None:
    _only(body, _STATE_FIELDS_ANSWERING if answers_allowed else _STATE_FIELDS)
    answers = body.get("answers", [])
    if not isinstance(answers, list) or len(answers) > MAX_ANSWERS:
        raise ProtocolError(f"answers must be a list of at most {MAX_ANSWERS} ids", code="bad_body")
    for answered in answers:
        if not isinstance(answered, bytes) or len(answered) != 32:
            raise ProtocolError("answers must hold 32-byte envelope ids", code="bad_body")
    _text(body, "name", required=creation, limit=200)
    _text(body, "topic", required=False, limit=2000)
    if "room_kind" in body:
        if not creation:
            raise ProtocolError("a room's kind is fixed at creation", code="bad_body")
        if body["room_kind"] not in RoomKind.__members__.values():
            raise ProtocolError("room_kind must be standard or announcement", code="bad_body")
    for name in ("add_nodes", "remove_nodes"):
        value = body.get(name, [])
        if not isinstance(value, list) or len(value) > 256:
            raise ProtocolError(f"{name} must be a list of node ids", code="bad_body")
        for node in value:
            check_node_id(node)
    users = body.get("set_users", {})
    if not isinstance(users, dict) or len(users) > 4096:
        raise ProtocolError("set_users must map user ids to roles", code="bad_body")
    for user, role in users.items():
        check_user_id(user)
        if role not in Role.__members__.values():
            raise ProtocolError(f"unknown role {role!r}", code="bad_body")
    removed = body.get("remove_users", [])
    if not isinstance(removed, list):
        raise ProtocolError("remove_users must be a list", code="bad_body")
    for user in removed:
        check_user_id(user)


def check_body(kind: Kind, body: Mapping[str, Any], *, creation: bool = False) -> None:
    """`ProtocolError` (code bad_body) unless `body` fits the schema of `kind`."""
    if kind is Kind.STATE:
        _check_state_ops(body, creation=creation, answers_allowed=not creation)
    elif kind is Kind.STATE_REQUEST:
        _check_state_ops(body, creation=False)
    elif kind is Kind.MESSAGE:
        _only(body, _MESSAGE_FIELDS)
        _text(body, "text", required=True)
        _sender_name(body)
        if body.get("format", "plain") not in ("plain", "markdown"):
            raise ProtocolError("format must be plain or markdown", code="bad_body")
        if "files" in body:
            check_file_refs(body["files"])
    elif kind is Kind.EDIT:
        _only(body, _EDIT_FIELDS)
        _target(body)
        _text(body, "text", required=True)
    elif kind is Kind.REDACT:
        _only(body, _REDACT_FIELDS)
        _target(body)
        _text(body, "reason", required=False, limit=500)
    elif kind is Kind.REACTION:
        _only(body, _REACTION_FIELDS)
        _target(body)
        _text(body, "emoji", required=True, limit=32)
        _sender_name(body)
    elif kind is Kind.RECEIPT:
        _only(body, _RECEIPT_FIELDS)
        _target(body, "up_to")
        _sender_name(body)


def sender_name(content: Content) -> str | None:
    """The display name `content` gives its sender, or None: only a message, reaction or
    receipt names its sender, and only a sender who is a user of the origin node."""
    if content.kind not in _NAMED or not content.sender or content.sender_node != content.origin:
        return None
    if "name" not in content.body:
        return None
    try:
        return check_sender_name(content.body["name"])
    except ProtocolError:
        return None


def apply_state(previous: RoomState | None, content: Content) -> RoomState:
    """The state after a `state` envelope from the home node (checked by the caller)."""
    body = content.body
    if previous is None:
        nodes = {content.origin}
        users: dict[str, Role] = {}
        state = RoomState(
            room=content.room,
            version=content.seq,
            name=str(body["name"]),
            kind=RoomKind(body.get("room_kind", RoomKind.STANDARD)),
        )
    else:
        nodes = set(previous.nodes)
        users = dict(previous.users)
        state = replace(previous, version=content.seq)
    nodes.update(body.get("add_nodes", []))
    nodes.difference_update(body.get("remove_nodes", []))
    nodes.add(state.home)  # the home node cannot leave its own room
    for user, role in body.get("set_users", {}).items():
        users[user] = Role(role)
    for user in body.get("remove_users", []):
        users.pop(user, None)
    users = {u: r for u, r in users.items() if u.rpartition("@")[2] in nodes}
    return replace(
        state,
        name=str(body.get("name", state.name)),
        topic=str(body.get("topic", state.topic)),
        nodes=frozenset(nodes),
        users=users,
    )


class RoomHistory:
    """Every state of one room, by home seq, so any envelope can be judged in its own state."""

    def __init__(self) -> None:
        self._versions: list[int] = []
        self._states: list[RoomState] = []

    @property
    def current(self) -> RoomState | None:
        return self._states[-1] if self._states else None

    def state_at(self, home_seq: int) -> RoomState | None:
        """The state produced by the latest state envelope with home seq <= `home_seq`."""
        index = bisect.bisect_right(self._versions, home_seq) - 1
        return self._states[index] if index >= 0 else None

    def add(self, state: RoomState) -> None:
        if self._versions and state.version <= self._versions[-1]:
            raise ValueError("room states must be added in increasing home seq")
        self._versions.append(state.version)
        self._states.append(state)


def judge(history: RoomHistory | None, content: Content) -> tuple[Verdict, RoomState | None]:
    """Decide an envelope whose dependencies are processed. Returns the verdict and, for an
    accepted `state` envelope, the new state (the caller adds it to the history)."""
    home = room_home(content.room)
    if content.kind is Kind.STATE and content.origin != home:
        return Verdict.STATE_NOT_FROM_HOME, None
    creation = content.kind is Kind.STATE and content.seq == 1
    try:
        check_body(content.kind, content.body, creation=creation)
    except ProtocolError:
        return Verdict.BAD_BODY, None
    if creation:
        return _within_limits(apply_state(None, content))
    if history is None or history.current is None:
        return Verdict.UNKNOWN_ROOM, None
    state = history.state_at(content.deps.get(home, 0))
    if state is None:
        return Verdict.UNKNOWN_ROOM, None
    if content.origin not in state.nodes:
        return Verdict.ORIGIN_NOT_MEMBER, None
    if content.sender:
        if content.sender_node != content.origin:
            return Verdict.SENDER_NOT_OF_ORIGIN, None
        if content.sender not in state.users:
            return Verdict.SENDER_NOT_MEMBER, None
    if content.kind is Kind.STATE:
        return _within_limits(apply_state(history.current, content))
    if (
        state.kind is RoomKind.ANNOUNCEMENT
        and content.kind is Kind.MESSAGE
        and content.sender
        and state.role(content.sender) is not Role.ADMIN
    ):
        return Verdict.NOT_ALLOWED_TO_POST, None
    return Verdict.ACCEPTED, None


def _within_limits(state: RoomState) -> tuple[Verdict, RoomState | None]:
    if len(state.nodes) > MAX_ROOM_NODES:
        return Verdict.BAD_STATE_CHANGE, None
    return Verdict.ACCEPTED, state


def decide_request(current: RoomState, content: Content) -> dict[str, Any] | None:
    """At the home node: the `state` body to issue for an accepted `state-request`, or None.

    A request is granted when it comes from a member node's operator (no sender)
    or from a room admin. A node operator may add nodes and users, remove its own
    users, and take its own node out of the room (leave); removing other nodes or
    other nodes' users takes a room admin. Nobody removes the home node.
    """
    if content.kind is not Kind.STATE_REQUEST or content.origin not in current.nodes:
        return None
    admin = not content.sender or current.role(content.sender) is Role.ADMIN
    body = dict(content.body)
    if not admin:
        return None
    removed_nodes = body.get("remove_nodes", [])
    if current.home in removed_nodes:
        return None
    if not content.sender and (
        any(node != content.origin for node in removed_nodes)
        or any(u.rpartition("@")[2] != content.origin for u in body.get("remove_users", []))
    ):
        return None  # a node operator (not a room admin) removes only its own node and users
    return body or None
