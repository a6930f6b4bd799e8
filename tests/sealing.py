"""Sealed messages for tests: one origin's messages in one room, sealed as one batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from federation.envelope import Content, Envelope, Kind, seal_batch
from federation.signing import SigningKey


def sealed_messages(
    room: str,
    origin: str,
    seqs: range,
    *,
    key: SigningKey,
    sender: str = "",
    text: Callable[[int], str] = "message {}".format,
    others: dict[str, int] | None = None,
    hlc0: int = 1 << 40,
    extra: dict[str, Any] | None = None,
) -> list[Envelope]:
    """Messages of `origin` with the seqs `seqs` (seq 1 its first in the room), each
    depending on the one before and on `others`, at hlc `hlc0 + seq`, with the text
    `text(seq)` and the body fields `extra`."""
    return seal_batch(
        [
            Content(
                room=room,
                origin=origin,
                seq=seq,
                kind=Kind.MESSAGE,
                sender=sender,
                hlc=hlc0 + seq,
                deps=(others or {}) | ({origin: seq - 1} if seq > 1 else {}),
                key_id=key.key_id,
                body={"text": text(seq), **(extra or {})},
            )
            for seq in seqs
        ],
        key,
    )
