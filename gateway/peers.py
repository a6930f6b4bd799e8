"""Health of the links to every peer: periodic checks, round-trip times, last contact.

One `PeerMonitor` owns one background task. Each round it asks every active
peer, concurrently, for `/health`; the answer carries the peer's clock (for skew)
and roster version (so a node that is behind learns it within one round). A
round can be started at once with `kick()`: the authority does that after every
roster change, which is how a new member becomes known to every running node in
well under the 5 seconds promised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from federation import codec
from federation.errors import KakehashiError
from federation.roster import Roster, RosterEntry

from .store import PeerHealth, Store
from .tasks import cancel_all
from .transport import PeerClient

__all__ = ["PeerMonitor", "is_up"]

log = structlog.get_logger("kakehashi.peers")


def is_up(health: PeerHealth | None, now_ms: int, interval: float) -> bool:
    """A peer is up if the last attempt succeeded and was recent (three intervals)."""
    if health is None or health.last_contact_ms is None or health.failures:
        return False
    return now_ms - health.last_contact_ms <= int(interval * 3000) + 1000


@dataclass(slots=True)
class _Link:
    """What we know of one peer right now (in memory; persisted after each check)."""

    health: PeerHealth
    clock_offset_ms: int | None = None
    roster_version: int | None = None
    """The roster version the peer's last health answer carried."""


class PeerMonitor:
    """Checks every active peer each `interval` seconds, or at once when kicked."""

    def __init__(
        self,
        *,
        node_id: str,
        client: PeerClient,
        store: Store,
        roster: Callable[[], Roster],
        on_roster_version: Callable[[int, RosterEntry], Awaitable[None]],
        interval: float,
        clock: Callable[[], float] = time.time,
        on_peer_up: Callable[[str], None] | None = None,
        direct: Callable[[], frozenset[str]] | None = None,
        on_refused: Callable[[RosterEntry, str], Awaitable[None]] | None = None,
    ) -> None:
        self._node_id = node_id
        self._client = client
        self._store = store
        self._roster = roster
        self._on_roster_version = on_roster_version
        self._interval = interval
        self._clock = clock
        self._on_peer_up = on_peer_up
        self._direct = direct
        self._on_refused = on_refused
        self._links: dict[str, _Link] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._links = {
            node: _Link(health) for node, health in (await self._store.peer_health()).items()
        }
        self._task = asyncio.create_task(self._run(), name="peer-monitor")

    async def stop(self) -> None:
        await cancel_all([self._task])
        self._task = None

    def kick(self) -> None:
        """Start a round now (after a roster change)."""
        self._kick.set()

    def note_inbound(self, node_id: str) -> None:
        """A peer just reached us; if we think it is down, check it now rather than next round."""
        link = self._links.get(node_id)
        if link is None or link.health.failures or link.health.last_contact_ms is None:
            self.kick()

    def health(self, node_id: str) -> PeerHealth | None:
        link = self._links.get(node_id)
        return link.health if link else None

    def clock_offset_ms(self, node_id: str) -> int | None:
        """Peer clock minus ours, estimated at the middle of the last round trip."""
        link = self._links.get(node_id)
        return link.clock_offset_ms if link else None

    def roster_version(self, node_id: str) -> int | None:
        """The roster version the peer served at its last successful health check."""
        link = self._links.get(node_id)
        return link.roster_version if link else None

    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except KakehashiError as exc:  # recording the results failed (a full disk)
                log.error("health_round_failed", code=exc.code, error=str(exc))
            except Exception:  # a round must never kill the monitor; say why and go on
                log.exception("health_round_failed")
            # Not wait_for: on 3.11 it swallows a cancel that races a kick, and stop() hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._kick.wait()
            self._kick.clear()

    async def round(self) -> None:
        """Check every active peer we can reach directly (share a segment with), concurrently.

        Peers on other segments are reached through relays; their health is the relay's.
        """
        direct = self._direct() if self._direct is not None else None
        peers = [
            m
            for m in self._roster().members
            if m.active and m.node_id != self._node_id and (direct is None or m.node_id in direct)
        ]
        await asyncio.gather(*(self._check(peer) for peer in peers))

    async def _check(self, peer: RosterEntry) -> None:
        sent_ms = int(self._clock() * 1000)
        previous = self._links.get(peer.node_id)
        body = codec.encode({"node": self._node_id, "sent_ms": sent_ms})
        try:
            response = await self._client.request(peer, "POST", "/health", body)
            answer = codec.decode_map(response.body)
        except KakehashiError as exc:
            if exc.code in ("peer_suspended", "peer_revoked") and self._on_refused is not None:
                # The peer refuses *us*: our roster may not know yet.
                await self._on_refused(peer, exc.code)
            failures = previous.health.failures + 1 if previous else 1
            health = PeerHealth(
                node_id=peer.node_id,
                last_contact_ms=previous.health.last_contact_ms if previous else None,
                rtt_ms=previous.health.rtt_ms if previous else None,
                last_attempt_ms=sent_ms,
                failures=failures,
                last_error=f"{exc.code}: {exc}",
            )
            if failures == 1:
                log.warning("peer_down", peer=peer.node_id, code=exc.code, error=str(exc))
            self._links[peer.node_id] = _Link(
                health,
                previous.clock_offset_ms if previous else None,
                previous.roster_version if previous else None,
            )
            await self._store.record_health(health)
            return
        if previous is None or previous.health.failures:
            log.info("peer_up", peer=peer.node_id, rtt_ms=round(response.rtt_ms, 2))
            if self._on_peer_up is not None:
                self._on_peer_up(peer.node_id)
        peer_time = answer.get("time_ms")
        offset = (
            int(peer_time - (sent_ms + response.rtt_ms / 2)) if isinstance(peer_time, int) else None
        )
        health = PeerHealth(
            node_id=peer.node_id,
            last_contact_ms=int(self._clock() * 1000),
            rtt_ms=round(response.rtt_ms, 3),
            last_attempt_ms=sent_ms,
            failures=0,
            last_error=None,
        )
        self._links[peer.node_id] = _Link(health, offset, response.roster_version)
        await self._store.record_health(health)
        if response.roster_version > self._roster().version:
            await self._on_roster_version(response.roster_version, peer)
