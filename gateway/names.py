"""Display names of other nodes' users, as their own nodes last gave them.

A node knows the names of its own users from its accounts. For users of other
nodes it keeps the name their node put in their latest message, reaction or
receipt (the body's `name`). Only `federation.rooms.sender_name` is trusted to
read it: it gives a name only for a sender who is a user of the envelope's origin
node, so no node can name another node's users (the room rules refuse such an
envelope anyway). Names of this node's own users are never taken from envelopes.

"Latest" is by the envelope's hybrid clock time: one node's clock only moves
forward, so a user's envelopes arriving in any order (catch-up, relays) leave the
same name at every node.

Names are written in the transaction that accepts their envelopes (`write`, a
`RoomService.write_with` writer), so they are kept exactly as long as the
envelopes are; the copy in memory follows once that transaction committed
(`on_accepted`, a `RoomService.listen` callback), and is read at start (`load`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from federation.envelope import Envelope
from federation.rooms import sender_name

if TYPE_CHECKING:
    from .store import Statements, Store

__all__ = ["RemoteNames", "latest_names"]


def latest_names(envelopes: Iterable[Envelope], node_id: str) -> dict[str, tuple[int, str]]:
    """user id -> (hlc, name) of the latest envelope among `envelopes` naming each user of
    a node other than `node_id`."""
    latest: dict[str, tuple[int, str]] = {}
    for envelope in envelopes:
        content = envelope.content
        name = sender_name(content)
        if name is None or content.origin == node_id:
            continue
        known = latest.get(content.sender)
        if known is None or content.hlc > known[0]:
            latest[content.sender] = (content.hlc, name)
    return latest


class RemoteNames:
    """The latest display name of every user of another node seen in an accepted envelope
    (owned by `Node`)."""

    def __init__(self, *, store: Store, node_id: str) -> None:
        self._store = store
        self._node_id = node_id
        self._names: dict[str, tuple[int, str]] = {}

    async def load(self) -> None:
        """Read the names kept so far (at start, before any envelope is taken in)."""
        rows = await self._store.read_all("SELECT user_id, hlc, display_name FROM remote_user")
        self._names = {str(user): (int(hlc), str(name)) for user, hlc, name in rows}

    def write(self, envelopes: Iterable[Envelope]) -> Statements:
        """For the transaction accepting `envelopes`: keep the names they carry, where
        newer."""
        latest = latest_names(envelopes, self._node_id)
        return [
            (
                "INSERT INTO remote_user (user_id, hlc, display_name) VALUES (?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET hlc = excluded.hlc, "
                "display_name = excluded.display_name WHERE excluded.hlc > remote_user.hlc",
                [(user, hlc, name) for user, (hlc, name) in latest.items()],
            )
        ]

    def on_accepted(self, envelopes: list[Envelope]) -> None:
        """After the commit: the same names, in memory."""
        for user, (hlc, name) in latest_names(envelopes, self._node_id).items():
            known = self._names.get(user)
            if known is None or hlc > known[0]:
                self._names[user] = (hlc, name)

    def get(self, user_id: str) -> str | None:
        """The display name of a user of another node, if one of their envelopes gave it."""
        known = self._names.get(user_id)
        return None if known is None else known[1]
