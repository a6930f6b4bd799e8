"""Monitoring a running node: /metrics, /healthz, maintenance mode and `kakehashi doctor`.

Real nodes on 127.0.0.1 with mutual TLS. The admin socket is read with the standard
library's HTTP client in a worker thread (as the CLI does), the monitoring listener over
plain TCP, and the CLI verbs run as the real `kakehashi` command in a subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import re
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation import codec
from federation.envelope import Envelope
from federation.errors import KakehashiError
from gateway import tls
from gateway.config import DiskThresholds, load_config, write_config
from gateway.membership import create_federation
from gateway.node import Node
from gateway.transport import FEDERATION_PREFIX

from .conftest import Cluster, eventually, free_port
from .test_admin import cli

pytestmark = pytest.mark.integration

Answer = tuple[int, str, bytes]


# --------------------------------------------------------------------------- helpers


def _unix_get(path: Path, route: str) -> Answer:
    connection = http.client.HTTPConnection("node", timeout=30)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    connection.sock = sock
    try:
        connection.request("GET", route)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


async def admin_get(node: Node, route: str) -> Answer:
    """GET over the node's admin socket (in a thread, so the node answers meanwhile)."""
    return await asyncio.to_thread(_unix_get, node.home.admin_socket, route)


def _tcp_request(url: str, method: str = "GET") -> Answer:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"] or "", response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"] or "", exc.read()


async def tcp_get(port: int, route: str, method: str = "GET") -> Answer:
    return await asyncio.to_thread(_tcp_request, f"http://127.0.0.1:{port}{route}", method)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def scrape(node: Node) -> str:
    status, content_type, body = await admin_get(node, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    return body.decode()


async def healthz(node: Node) -> tuple[int, dict[str, Any]]:
    status, content_type, body = await admin_get(node, "/healthz")
    assert content_type.startswith("application/json")
    return status, json.loads(body)


def configure(cluster: Cluster, node_id: str, **changes: Any) -> None:
    """Edit a node's config.toml the way an operator would (before it starts)."""
    home = cluster.home(node_id)
    write_config(home, dataclasses.replace(load_config(home), **changes))


async def authority(cluster: Cluster, **changes: Any) -> Node:
    """mie-pref, created with config `changes` (e.g. a monitoring listener)."""
    await cluster.init("mie-pref", "三重県", "240001")
    configure(cluster, "mie-pref", **changes)
    await create_federation(cluster.home("mie-pref"), name="三重県 市町連携")
    return await cluster.start("mie-pref")


async def pair(cluster: Cluster, **changes: Any) -> tuple[Node, Node]:
    """mie-pref (with config `changes`) and tsu, each seeing the other up."""
    mie = await authority(cluster, **changes)
    tsu = await cluster.member("tsu", "津市", "242012")
    await eventually(lambda: mie.roster.version == tsu.roster.version == 2, timeout=30)
    await eventually(lambda: up(mie, "tsu") and up(tsu, "mie-pref"), timeout=30)
    return mie, tsu


ANY_DISK = DiskThresholds(warn_percent=0, warn_mib=0, critical_percent=0, critical_mib=0)
"""Disk thresholds no disk falls under: where a test expects every check ok, the free space
of the machine it runs on must not decide it (the disk check has tests of its own)."""


def up(node: Node, peer: str) -> bool:
    return any(v["node_id"] == peer and v["health"] == "up" for v in node.peer_views())


async def doctor(node_home: Path) -> tuple[int, dict[str, dict[str, Any]], str]:
    """`kakehashi doctor --json`: exit code, findings by check, and the human output."""
    code, out, err = await cli("doctor", "--home", str(node_home), "--json")
    assert code in (0, 1), err
    findings = {row["check"]: row for row in json.loads(out)}
    assert all(set(row) == {"check", "status", "detail", "fix"} for row in findings.values())
    _, human, _ = await cli("doctor", "--home", str(node_home))
    return code, findings, human


# --------------------------------------------------------------------------- /metrics


async def test_metrics_show_a_stopped_peers_outbox_growing_and_delivery_after_it_returns(
    cluster: Cluster,
) -> None:
    mie, tsu = await pair(cluster)
    room = await mie.rooms.create("防災", nodes=["tsu"])
    await mie.rooms.send(room, ["ようこそ"])
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 2)

    async def drained(expected: float) -> bool:
        text = await scrape(mie)
        return (
            value(text, "kakehashi_outbox_depth", peer="tsu") == 0
            and value(text, "kakehashi_envelopes_delivered_total", peer="tsu") == expected
        )

    await eventually(lambda: drained(2), timeout=30)
    text = await scrape(mie)
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("kakehashi_") and f.documentation for f in families)
    assert {f.name: f.type for f in families}["kakehashi_outbox_depth"] == "gauge"
    assert {f.name: f.type for f in families}["kakehashi_envelopes_delivered"] == "counter"
    assert value(text, "kakehashi_rooms") == 1
    assert value(text, "kakehashi_roster_version") == 2
    assert value(text, "kakehashi_peer_up", peer="tsu") == 1
    assert value(text, "kakehashi_peers_up") == 1
    assert value(text, "kakehashi_peer_stream_open", peer="tsu") == 1  # batches went on it
    free, size = value(text, "kakehashi_disk_free_bytes"), value(text, "kakehashi_disk_size_bytes")
    usage = shutil.disk_usage(mie.home.root)
    assert size == usage.total and free is not None and abs(free - usage.free) < 256 * 1024**2

    await cluster.stop("tsu")
    await mie.rooms.send(room, ["一", "二", "三"])
    text = await scrape(mie)
    assert value(text, "kakehashi_outbox_depth", peer="tsu") == 3
    await asyncio.sleep(0.3)
    await mie.rooms.send(room, ["四", "五"])
    text = await scrape(mie)
    assert value(text, "kakehashi_outbox_depth", peer="tsu") == 5
    assert (value(text, "kakehashi_outbox_lag_seconds", peer="tsu") or 0) >= 0.25
    assert value(text, "kakehashi_envelopes_delivered_total", peer="tsu") == 2
    await eventually(
        lambda: _metric_is(mie, "kakehashi_peer_up", 0, peer="tsu"), timeout=30, interval=0.3
    )
    assert value(await scrape(mie), "kakehashi_peer_stream_open", peer="tsu") == 0

    tsu = await cluster.start("tsu")
    await eventually(lambda: drained(7), timeout=60, interval=0.3)
    assert value(await scrape(mie), "kakehashi_outbox_lag_seconds", peer="tsu") == 0
    # tsu counts what it took in from mie-pref since it restarted: the five, once each
    await eventually(
        lambda: _metric_is(tsu, "kakehashi_envelopes_received_total", 5, peer="mie-pref"),
        timeout=30,
    )


async def _metric_is(node: Node, name: str, expected: float, **labels: str) -> bool:
    return value(await scrape(node), name, **labels) == expected


def _client_without_certificate(url: str, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the certificate names the node id, not 127.0.0.1
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_metrics_count_refused_requests_and_refused_envelopes_by_reason(
    cluster: Cluster,
) -> None:
    mie, tsu = await pair(cluster)
    text = await scrape(mie)
    assert (
        value(text, "kakehashi_requests_refused_total", reason="client_certificate_required")
        is None
    )

    url = f"https://127.0.0.1:{mie.federation_port}{FEDERATION_PREFIX}/health"
    status = await asyncio.to_thread(_client_without_certificate, url, mie.home.ca_cert)
    assert status == 401
    text = await scrape(mie)
    assert (
        value(text, "kakehashi_requests_refused_total", reason="client_certificate_required") == 1
    )

    garbage = b"\x93not an envelope"
    with pytest.raises(KakehashiError) as decoded:
        Envelope.from_bytes(garbage)
    entry = tsu.roster.member("mie-pref")
    assert entry is not None
    body = codec.encode({"envelopes": [garbage, garbage]})
    answer = codec.decode_map((await tsu.client.request(entry, "POST", "/envelopes", body)).body)
    assert [code for _, code in answer["refused"]] == [decoded.value.code] * 2
    text = await scrape(mie)
    assert value(text, "kakehashi_envelopes_refused_total", reason=decoded.value.code) == 2
    assert value(text, "kakehashi_envelopes_received_total", peer="tsu") == 0


# --------------------------------------------------------------------------- /healthz


async def test_healthy_node_answers_healthz_200_listing_every_check(cluster: Cluster) -> None:
    mie, _ = await pair(cluster, disk=ANY_DISK)
    await eventually(lambda: mie.monitor.roster_version("tsu") == 2, timeout=30)
    status, body = await healthz(mie)
    assert status == 200, body
    assert body["status"] == "ok" and body["node_id"] == "mie-pref"
    assert body["maintenance"] == {"on": False, "reason": None, "since": None}
    checks = {c["check"]: c for c in body["checks"]}
    assert list(checks) == ["database", "disk", "certificate", "peers", "roster", "outbox"]
    assert {c["status"] for c in checks.values()} == {"ok"}
    assert checks["peers"]["detail"] == "1 of 1 active peers reachable"
    assert checks["database"]["detail"] == "database is writable"


async def test_disk_thresholds_in_the_config_decide_the_disk_check_of_healthz_and_doctor(
    cluster: Cluster,
) -> None:
    # Warn under 100% free: any disk holding this node's files is under it.
    warn = DiskThresholds(warn_percent=100, warn_mib=0, critical_percent=0, critical_mib=0)
    mie, _ = await pair(cluster, disk=warn)
    status, body = await healthz(mie)
    disk = {c["check"]: c for c in body["checks"]}["disk"]
    assert (status, body["status"], disk["status"]) == (200, "warn", "warn"), body
    assert "free of" in disk["detail"] and "disk_full" in disk["fix"]
    code, findings, _ = await doctor(mie.home.root)
    assert code == 1 and findings["disk"]["status"] == "warn"
    # Critical under 100% free as well: /healthz takes the node out of rotation.
    await cluster.stop("mie-pref")
    configure(cluster, "mie-pref", disk=dataclasses.replace(warn, critical_percent=100))
    mie = await cluster.start("mie-pref")
    status, body = await healthz(mie)
    disk = {c["check"]: c for c in body["checks"]}["disk"]
    assert (status, body["status"], disk["status"]) == (503, "critical", "critical"), body
    code, findings, _ = await doctor(mie.home.root)
    assert code == 1 and findings["disk"]["status"] == "critical"
    # Stopped, doctor checks the disk from the files, with the thresholds of the config.
    await cluster.stop("mie-pref")
    code, findings, _ = await doctor(mie.home.root)
    assert findings["node"]["status"] == "critical"
    assert findings["disk"]["status"] == "critical" and "free of" in findings["disk"]["detail"]


async def test_maintenance_mode_drains_healthz_survives_restart_and_lifts(
    cluster: Cluster,
) -> None:
    mie, tsu = await pair(cluster)
    home = str(mie.home.root)
    code, out, err = await cli("maintenance", "on", "--home", home, "--reason", "OS更新", "--json")
    assert code == 0, err
    assert json.loads(out)["on"] is True
    status, body = await healthz(mie)
    assert status == 503
    assert body["status"] == "maintenance"
    assert body["maintenance"]["reason"] == "OS更新"

    # The node keeps working: a message still reaches tsu.
    room = await mie.rooms.create("保守中", nodes=["tsu"])
    await mie.rooms.send(room, ["通常どおり"])
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 2, timeout=30)

    await cluster.stop("mie-pref")
    mie = await cluster.start("mie-pref")
    status, body = await healthz(mie)
    assert status == 503 and body["status"] == "maintenance"
    code, out, _ = await cli("maintenance", "status", "--home", home)
    assert code == 0 and "on since" in out and "OS更新" in out
    text = await scrape(mie)
    assert value(text, "kakehashi_maintenance") == 1

    code, out, _ = await cli("maintenance", "off", "--home", home, "--json")
    assert code == 0 and json.loads(out)["on"] is False

    async def back() -> bool:
        return (await healthz(mie))[0] == 200

    await eventually(back, timeout=30, interval=0.3)
    code, out, _ = await cli("maintenance", "status", "--home", home, "--json")
    assert json.loads(out) == {"on": False, "reason": None, "since": None}


async def test_monitoring_listener_serves_metrics_and_healthz_but_never_the_admin_api(
    cluster: Cluster,
) -> None:
    port = free_port()
    mie, _ = await pair(cluster, monitoring_listen=("127.0.0.1", port))
    status, content_type, body = await tcp_get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert value(body.decode(), "kakehashi_roster_version") == 2
    status, content_type, body = await tcp_get(port, "/healthz")
    assert status == 200 and content_type.startswith("application/json")
    assert json.loads(body)["node_id"] == "mie-pref"
    for route in ("/v1/status", "/v1/peers", "/v1/doctor", "/v1/maintenance"):
        status, _, _ = await tcp_get(port, route)
        assert status == 404, route
    status, _, _ = await tcp_get(port, "/v1/maintenance", method="POST")
    assert status == 404
    assert not mie.maintenance.on
    # The admin socket still has the admin API.
    status, _, _ = await admin_get(mie, "/v1/status")
    assert status == 200


async def test_a_node_refuses_to_start_when_its_monitoring_port_is_taken(
    cluster: Cluster,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(KakehashiError) as refused:
            await authority(cluster, monitoring_listen=("127.0.0.1", port))
    assert refused.value.code == "listen_failed"
    assert "[monitoring] listen" in (refused.value.hint or "")
    assert not cluster.home("mie-pref").admin_socket.exists()  # stopped cleanly


# --------------------------------------------------------------------------- doctor


async def test_doctor_finds_nothing_wrong_with_a_healthy_node_and_exits_0(
    cluster: Cluster,
) -> None:
    mie, _ = await pair(cluster, disk=ANY_DISK)
    await eventually(lambda: mie.monitor.roster_version("tsu") == 2, timeout=30)
    code, findings, human = await doctor(mie.home.root)
    assert code == 0, findings
    assert {row["status"] for row in findings.values()} == {"ok"}
    for check in ("node", "config", "keys", "database", "disk", "certificate", "maintenance"):
        assert check in findings
    assert {"segment/default", "clock", "roster", "outbox"} <= set(findings)
    assert "no problem found" in human


async def test_doctor_reports_a_certificate_expiring_in_3_days_running_and_stopped(
    cluster: Cluster,
) -> None:
    # The authority issues 3-day certificates: tsu joins through the real join flow and
    # runs with one, which its peers accept (it is valid); doctor must warn in time.
    await authority(cluster, certificate_days=3)
    tsu = await cluster.member("tsu", "津市", "242012")
    certificate = tls.load_certificate_pem(tsu.home.tls_cert.read_bytes())
    code, findings, human = await doctor(tsu.home.root)
    assert code == 1
    found = findings["certificate"]
    assert found["status"] == "critical"
    assert found["detail"].startswith("certificate expires in 2 days 23 hours")
    assert certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC") in found["detail"]
    assert "kakehashi keys rotate --tls" in found["fix"]
    assert "critical" in human and "keys rotate" in human
    assert value(await scrape(tsu), "kakehashi_certificate_days_left") == 2

    await cluster.stop("tsu")
    code, findings, human = await doctor(tsu.home.root)
    assert code == 1
    assert findings["node"]["status"] == "critical"
    assert "not running" in findings["node"]["detail"]
    assert "kakehashi run" in findings["node"]["fix"]
    assert findings["certificate"]["status"] == "critical"  # read from the file
    assert findings["config"]["status"] == "ok" and findings["keys"]["status"] == "ok"
    assert "not running" in human


async def test_doctor_reports_a_peer_whose_clock_is_2_minutes_ahead(cluster: Cluster) -> None:
    mie, _ = await pair(cluster)
    cluster.clocks["tsu"].offset = 120.0
    await eventually(
        lambda: (mie.monitor.clock_offset_ms("tsu") or 0) > 100_000, timeout=30, interval=0.2
    )
    code, findings, human = await doctor(mie.home.root)
    assert code == 1
    skew = findings["clock/tsu"]
    assert skew["status"] == "critical"
    assert re.search(r"tsu's clock is 1(19|20)\.\d s ahead of this node's", skew["detail"])
    assert "NTP" in skew["fix"] and "chrony" in skew["fix"]
    assert "clock/tsu" in human
    text = await scrape(mie)
    assert (value(text, "kakehashi_peer_clock_offset_seconds", peer="tsu") or 0) > 100


async def test_doctor_reports_a_stopped_peer_on_its_segment_and_its_growing_outbox(
    cluster: Cluster,
) -> None:
    mie, tsu = await pair(cluster)
    room = await mie.rooms.create("防災", nodes=["tsu"])
    await eventually(lambda: tsu.rooms.vector(room).get("mie-pref") == 1, timeout=30)
    await cluster.stop("tsu")
    await mie.rooms.send(room, ["届くまで待つ"])
    await eventually(lambda: not up(mie, "tsu"), timeout=30)
    cluster.clocks["mie-pref"].offset = 600.0  # ten minutes later, tsu still away
    code, findings, _ = await doctor(mie.home.root)
    assert code == 1
    segment = findings["segment/default"]
    assert segment["status"] == "critical"
    assert "1 of 1 peers on segment default down (tsu:" in segment["detail"]
    assert "tsu" in segment["fix"]
    outbox = findings["outbox/tsu"]
    assert outbox["status"] == "warn"
    assert outbox["detail"] == "1 envelope waits for tsu, the oldest for 10 minutes"
    assert "kakehashi peer list" in outbox["fix"]
    status, body = await healthz(mie)
    assert status == 503  # no peer reachable at all
    checks = {c["check"]: c for c in body["checks"]}
    assert checks["peers"]["status"] == "critical"
    assert checks["outbox"]["status"] == "warn"
