"""The node's Prometheus metrics: read from the node's state at scrape time.

Each node has its own `CollectorRegistry` holding one custom collector, never
the library's global registry: several nodes in one process (tests, the local
demo) must not clash, and nothing is counted twice. The collector keeps no
counters of its own: it reads the counters the node already keeps (refusals,
envelopes accepted per peer, deliveries per peer) and its live state (roster,
peer health, outbox depths) when Prometheus asks, so the figures cannot drift
from what `kakehashi status` and `peer list` show.

The outbox depths live in the database; `render()` reads them (one grouped
query) and generates the text without yielding in between, so one scrape sees
one consistent reading.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import tls

if TYPE_CHECKING:
    from .node import Node

__all__ = ["CONTENT_TYPE", "NodeMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Prometheus text exposition format's content type."""


class _NodeCollector(Collector):
    """Yields every `kakehashi_` metric from the node's state as it is now."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.depths: dict[str, tuple[int, int]] = {}
        """Outbox depths read by `NodeMetrics.render` just before the collection."""

    def collect(self) -> Iterator[Metric]:
        node = self._node
        roster = node.roster
        now_ms = int(node.clock() * 1000)
        views = node.peer_views(self.depths)
        peers = [v for v in views if not v["self"]]
        active = [v for v in peers if v["status"] == "active"]

        info = InfoMetricFamily("kakehashi_node", "This node: id, federation, role.")
        info.add_metric(
            [],
            {
                "node_id": node.node_id,
                "federation_id": roster.federation_id,
                "role": "authority" if node.authority is not None else "member",
            },
        )
        yield info
        yield GaugeMetricFamily(
            "kakehashi_roster_version", "Version of the roster this node holds.", roster.version
        )
        certificate = tls.load_certificate_pem(node.home.tls_cert.read_bytes())
        now = datetime.fromtimestamp(node.clock(), UTC)
        yield GaugeMetricFamily(
            "kakehashi_certificate_days_left",
            "Whole days until this node's TLS certificate expires (negative once expired).",
            tls.days_left(certificate, now),
        )
        yield GaugeMetricFamily(
            "kakehashi_certificate_expiry_timestamp_seconds",
            "Unix time at which this node's TLS certificate expires.",
            certificate.not_valid_after_utc.timestamp(),
        )
        disk = shutil.disk_usage(node.home.database.parent)
        yield GaugeMetricFamily(
            "kakehashi_disk_free_bytes",
            "Free space on the filesystem of this node's database (sends fail at 0).",
            disk.free,
        )
        yield GaugeMetricFamily(
            "kakehashi_disk_size_bytes",
            "Size of the filesystem of this node's database.",
            disk.total,
        )
        yield GaugeMetricFamily(
            "kakehashi_peers_up",
            "Active peers that answer.",
            sum(v["health"] == "up" for v in active),
        )
        yield GaugeMetricFamily(
            "kakehashi_peers_down",
            "Active peers that do not answer, or that no route reaches.",
            sum(v["health"] != "up" for v in active),
        )
        up = GaugeMetricFamily(
            "kakehashi_peer_up",
            "1 if the active peer answers (directly or via its relay).",
            labels=["peer"],
        )
        offset = GaugeMetricFamily(
            "kakehashi_peer_clock_offset_seconds",
            "Peer's clock minus this node's, from the last health check.",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            "kakehashi_peer_rtt_seconds", "Round trip of the last health check.", labels=["peer"]
        )
        peer_roster = GaugeMetricFamily(
            "kakehashi_peer_roster_version",
            "Roster version the peer served at its last health check.",
            labels=["peer"],
        )
        for view in active:
            peer = view["node_id"]
            up.add_metric([peer], 1.0 if view["health"] == "up" else 0.0)
            if view["clock_offset_ms"] is not None:
                offset.add_metric([peer], view["clock_offset_ms"] / 1000)
            if view["rtt_ms"] is not None:
                rtt.add_metric([peer], view["rtt_ms"] / 1000)
            version = node.monitor.roster_version(peer)
            if version is not None:
                peer_roster.add_metric([peer], version)
        yield from (up, offset, rtt, peer_roster)
        streams = GaugeMetricFamily(
            "kakehashi_peer_stream_open",
            "1 while this node's stream of batches to the peer is open (batches go by POST "
            "to a peer without one).",
            labels=["peer"],
        )
        for view in peers:
            streams.add_metric([view["node_id"]], 1.0 if view["stream"] else 0.0)
        yield streams

        depth = GaugeMetricFamily(
            "kakehashi_outbox_depth", "Envelopes queued for delivery to the peer.", labels=["peer"]
        )
        lag = GaugeMetricFamily(
            "kakehashi_outbox_lag_seconds",
            "Age of the oldest envelope queued for the peer (0 when none waits).",
            labels=["peer"],
        )
        delivered = CounterMetricFamily(
            "kakehashi_envelopes_delivered",
            "Envelopes the peer acknowledged (since this node started).",
            labels=["peer"],
        )
        failures = CounterMetricFamily(
            "kakehashi_delivery_failures",
            "Failed delivery attempts to the peer (since this node started).",
            labels=["peer"],
        )
        received = CounterMetricFamily(
            "kakehashi_envelopes_received",
            "Envelopes accepted from the peer into a timeline (since this node started).",
            labels=["peer"],
        )
        names = sorted({v["node_id"] for v in peers} | set(self.depths))
        accepted = node.rooms.counts.accepted
        for peer in names:
            queued, oldest_ms = self.depths.get(peer, (0, now_ms))
            depth.add_metric([peer], queued)
            lag.add_metric([peer], max(0, now_ms - oldest_ms) / 1000 if queued else 0.0)
            stats = node.outbox.stats(peer)
            delivered.add_metric([peer], stats.delivered if stats else 0)
            failures.add_metric([peer], stats.failures if stats else 0)
            received.add_metric([peer], accepted.get(peer, 0))
        yield from (depth, lag, delivered, failures, received)

        requests = CounterMetricFamily(
            "kakehashi_requests_refused",
            "Peer requests refused at the federation API, by reason (since this node started).",
            labels=["reason"],
        )
        for reason, count in sorted(node.refusals.items()):
            requests.add_metric([reason], count)
        envelopes = CounterMetricFamily(
            "kakehashi_envelopes_refused",
            "Envelopes from peers refused, by reason (since this node started).",
            labels=["reason"],
        )
        for reason, count in sorted(node.rooms.counts.refused.items()):
            envelopes.add_metric([reason], count)
        yield from (requests, envelopes)

        yield GaugeMetricFamily(
            "kakehashi_pending_envelopes",
            "Envelopes held back until their causal dependencies arrive.",
            node.rooms.pending_count(),
        )
        yield GaugeMetricFamily(
            "kakehashi_rooms", "Rooms this node takes part in.", len(node.rooms.room_ids())
        )
        yield GaugeMetricFamily(
            "kakehashi_maintenance",
            "1 while maintenance mode is on (/healthz answers 503).",
            1.0 if node.maintenance.on else 0.0,
        )
        yield GaugeMetricFamily(
            "kakehashi_start_time_seconds", "Unix time at which the node started.", node.started_at
        )


class NodeMetrics:
    """One node's registry and collector."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _NodeCollector(node)
        self._node = node
        self.registry.register(self._collector)

    async def render(self) -> bytes:
        """The text exposition of every metric, as of now."""
        self._collector.depths = await self._node.rooms.store.outbox_depths()
        return generate_latest(self.registry)
