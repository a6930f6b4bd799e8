"""A relay that tampers: a test double, never shipped.

Runs the real `kakehashi` command with one change: every envelope this node
forwards has one bit of its signed content flipped on the way out (the lowest bit
of its timestamp: the envelope stays well formed, only its signature no longer
matches). Destinations must
refuse every one of them (and log why); nothing it forwards may be applied.

    python tests/system/tampering_relay.py run --home DIR
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from federation import codec
from federation.routing import Route
from gateway import cli
from gateway.outbox import _Sender

_genuine_post = _Sender._post


def _flip(wire: bytes) -> bytes:
    raw = codec.decode_map(wire)
    content = codec.decode_map(raw["c"])
    content["hlc"] ^= 0x01
    raw["c"] = codec.encode(content)
    return codec.encode(raw)


async def _tampering_post(self: _Sender, route: Route | None, wires: Sequence[bytes]) -> Any:
    return await _genuine_post(self, route, [_flip(wire) for wire in wires])


_Sender._post = _tampering_post  # type: ignore[method-assign]

if __name__ == "__main__":
    cli.main()
