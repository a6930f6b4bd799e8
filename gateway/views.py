"""JSON of the staff client API: users, rooms, messages, read receipts and live events.

One function per shape, shared by the HTTP routes (`gateway.api`) and the WebSocket
events (`gateway.events`), so a message looks the same in a history page and in a
live event, and `schemas/openapi.json` describes both.

Conventions: ids are strings (envelope ids as 64 lowercase hex digits, rooms as
`!<random>:<home>`, users as `login@node`); times are ISO 8601 in UTC with
milliseconds; absent values are `null`, never left out.

**Display names**: a user of this node by the name in its accounts; a user of another
node by the name their own node put in their latest message, reaction or receipt
(`gateway.names`), beside their municipality, which the roster names: 鈴木次郎
(伊勢市). Someone whose node has sent no name yet (an older node, or nothing sent
yet) is shown by their id (`suzuki@ise`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from federation.rooms import RoomState
from federation.roster import Roster

from .timeline import (
    BoardEntry,
    MessageEdited,
    MessagePosted,
    MessageRedacted,
    MessagesRead,
    MessageView,
    Page,
    ReactionChanged,
    RoomChanged,
    TimelineEvent,
)

if TYPE_CHECKING:
    from .accounts import Principal, UserView

__all__ = [
    "Directory",
    "board_json",
    "event_json",
    "iso_time",
    "message_json",
    "page_json",
    "room_json",
    "user_json",
]

NAMES_TTL = 10.0
"""Seconds the display names of this node's users are cached."""


def iso_time(ms: int) -> str:
    """Unix milliseconds as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _no_name(user_id: str) -> str | None:
    return None


class Directory:
    """Who a user id is: display names of users, municipality names of nodes."""

    def __init__(
        self,
        *,
        node_id: str,
        users: Callable[[], Awaitable[Sequence[UserView]]],
        roster: Callable[[], Roster],
        remote: Callable[[str], str | None] = _no_name,
        ttl: float = NAMES_TTL,
    ) -> None:
        self._node_id = node_id
        self._users = users
        self._roster = roster
        self._remote = remote
        self._ttl = ttl
        self._names: dict[str, str] = {}
        self._loaded_at = float("-inf")

    async def refresh(self) -> None:
        """Reload this node's display names if the cached ones are older than the TTL."""
        if time.monotonic() - self._loaded_at >= self._ttl:
            self._names = {user.user_id: user.display_name for user in await self._users()}
            self._loaded_at = time.monotonic()

    def name(self, user_id: str) -> str:
        """A user's display name: from this node's accounts for its own users, else the
        latest their node gave (`remote`); the id when neither knows one."""
        if user_id.rpartition("@")[2] == self._node_id:
            return self._names.get(user_id, user_id)
        return self._remote(user_id) or user_id

    def municipality(self, node_id: str) -> str:
        """The node's name in the roster (津市), or its id if the roster does not know it."""
        member = self._roster().member(node_id)
        return member.name if member is not None else node_id

    def person(self, user_id: str) -> dict[str, Any]:
        """{user, display_name, node, municipality}."""
        node = user_id.rpartition("@")[2]
        return {
            "user": user_id,
            "display_name": self.name(user_id),
            "node": node,
            "municipality": self.municipality(node),
        }


def user_json(principal: Principal, directory: Directory) -> dict[str, Any]:
    """The signed-in user."""
    node = principal.user_id.rpartition("@")[2]
    return {
        "id": principal.user_id,
        "login": principal.login,
        "display_name": principal.display_name,
        "department": principal.department,
        "role": principal.role.value,
        "node": node,
        "municipality": directory.municipality(node),
    }


def message_json(view: MessageView, directory: Directory) -> dict[str, Any]:
    """A message; one a node sent itself (`kakehashi room send`) has no sender user and
    carries the node's municipality as its sender's name."""
    node = view.sender.rpartition("@")[2] if view.sender else view.position[1]
    municipality = directory.municipality(node)
    return {
        "id": view.id.hex(),
        "room": view.room,
        "sender": view.sender or None,
        "sender_name": directory.name(view.sender) if view.sender else municipality,
        "sender_municipality": municipality,
        "time": iso_time(view.time_ms),
        "text": view.text,
        "format": view.format,
        "files": list(view.files),
        "edited": view.edited_at_ms is not None,
        "edited_at": None if view.edited_at_ms is None else iso_time(view.edited_at_ms),
        "redacted": view.redacted,
        "reactions": [
            {"emoji": emoji, "count": len(users), "users": list(users)}
            for emoji, users in view.reactions
        ],
        "read_count": view.read_count,
    }


def page_json(page: Page, directory: Directory) -> dict[str, Any]:
    return {
        "messages": [message_json(view, directory) for view in page.messages],
        "next_before": None if page.next_before is None else page.next_before.hex(),
        "next_after": None if page.next_after is None else page.next_after.hex(),
    }


def room_json(
    state: RoomState,
    user: str,
    directory: Directory,
    *,
    unread: int | None = None,
    members: bool = False,
) -> dict[str, Any]:
    """A room as `user` sees it; with `members`, its users too."""
    role = state.role(user)
    data: dict[str, Any] = {
        "id": state.room,
        "name": state.name,
        "topic": state.topic,
        "kind": state.kind.value,
        "home": state.home,
        "nodes": [
            {"id": node, "municipality": directory.municipality(node)}
            for node in sorted(state.nodes)
        ],
        "role": None if role is None else role.value,
        "member_count": len(state.users),
        "unread": unread,
    }
    if members:
        data["members"] = [
            {**directory.person(member), "role": member_role.value}
            for member, member_role in sorted(state.users.items())
        ]
    return data


def board_json(
    room: str, entries: Sequence[BoardEntry], page: Page, directory: Directory
) -> dict[str, Any]:
    return {
        "room": room,
        "announcements": [
            {
                "message": message_json(entry.message, directory),
                "read": sum(n.read for n in entry.nodes),
                "members": sum(n.members for n in entry.nodes),
                "municipalities": [
                    {
                        "node": n.node,
                        "municipality": directory.municipality(n.node),
                        "read": n.read,
                        "members": n.members,
                    }
                    for n in entry.nodes
                ],
            }
            for entry in entries
        ],
        "next_before": None if page.next_before is None else page.next_before.hex(),
        "next_after": None if page.next_after is None else page.next_after.hex(),
    }


def event_json(
    event: TimelineEvent, directory: Directory, user: str | None = None
) -> dict[str, Any]:
    """A live event; `user` (the recipient) only matters for `room` events."""
    if isinstance(event, MessagePosted):
        return {"type": "message", **message_json(event.message, directory)}
    if isinstance(event, MessageEdited):
        return {
            "type": "edit",
            "room": event.room,
            "id": event.message_id.hex(),
            "sender": event.sender,
            "text": event.text,
            "time": iso_time(event.at_ms),
        }
    if isinstance(event, MessageRedacted):
        return {
            "type": "redact",
            "room": event.room,
            "id": event.message_id.hex(),
            "sender": event.sender,
            "time": iso_time(event.at_ms),
        }
    if isinstance(event, ReactionChanged):
        return {
            "type": "reaction",
            "room": event.room,
            "id": event.message_id.hex(),
            "sender": event.sender,
            "sender_name": directory.name(event.sender),
            "emoji": event.emoji,
            "added": event.added,
            "time": iso_time(event.at_ms),
        }
    if isinstance(event, MessagesRead):
        person = directory.person(event.reader)
        return {
            "type": "receipt",
            "room": event.room,
            "id": event.message_id.hex(),
            "reader": event.reader,
            "reader_name": person["display_name"],
            "municipality": person["municipality"],
            "read_count": event.read_count,
            "time": iso_time(event.at_ms),
        }
    assert isinstance(event, RoomChanged)
    state = event.state
    recipient = user or ""
    return {
        "type": "room",
        "room": state.room,
        "member": recipient in state.users,
        "state": room_json(state, recipient, directory),
    }
