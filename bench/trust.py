"""Trust-layer figures (the original `make bench`).

- roster_verify_per_s: decode + signature check of a 30-member signed roster,
  against the raw Ed25519 verify rate (the crypto limit).
- mtls_request_p50_ms / _p99_ms: a health request between two nodes over pooled
  mutual TLS with roster authentication, against the same request to a bare
  aiohttp TLS 1.3 server with no authentication (the transport limit).
- join_to_known_everywhere_ms: from a town starting `federation join` to every
  one of the running nodes holding the roster that lists it (CA fetch, join over
  TLS, certificate issue, roster signing, push to peers, their fetch), against
  one mTLS round trip.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from common import percentile, rate, result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import codec
from federation.roster import (
    Endpoint,
    PublishedKey,
    Roster,
    RosterEntry,
    SignedRoster,
    sign_roster,
    verify_roster,
)
from federation.signing import SigningKey
from gateway import tls
from gateway.local import LocalFederation, free_port
from gateway.membership import join_federation


def bench_roster_verify() -> dict[str, Any]:
    key = SigningKey.generate()
    members = tuple(
        RosterEntry(
            node_id=f"town-{i:02d}",
            name=f"町 {i}",
            code=None,
            endpoints=(Endpoint(segment="lgwan", url=f"https://10.20.0.{i}:8443"),),
            signing_keys=(PublishedKey(public_key=SigningKey.generate().public_raw, not_before=1),),
            tls_fingerprint=bytes([i]) * 32,
        )
        for i in range(30)
    )
    roster = Roster(
        federation_id="bench-0000",
        federation_name="bench",
        version=7,
        issued_at=1,
        authority="town-00",
        federation_key=key.public_raw,
        ca_fingerprint=bytes(32),
        members=members,
    )
    wire = sign_roster(roster, key).to_bytes()
    raw_key = Ed25519PrivateKey.generate()
    message = b"x" * len(wire)
    signature = raw_key.sign(message)
    public = raw_key.public_key()
    baseline = rate(lambda: public.verify(signature, message))
    value = rate(lambda: verify_roster(SignedRoster.from_bytes(wire), key.public_raw))
    return result("roster_verify_per_s", value, "1/s", baseline)


async def bare_tls_rtts(home: Path, count: int) -> list[float]:
    """Round trips to a bare aiohttp TLS 1.3 server with the same certificate, no auth."""

    async def health(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=codec.encode({"node": "bare", "time_ms": 0}))

    app = web.Application()
    app.router.add_post("/federation/v1/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    server = tls.server_context(
        home / "certs/node.crt", home / "keys/tls.key", home / "certs/ca.crt", False
    )
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server).start()
    client = tls.client_context(None, None, home / "certs/ca.crt")
    body = codec.encode({"node": "bench", "sent_ms": 0})
    samples = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as session:
        for index in range(count + 20):
            started = time.perf_counter()
            async with session.post(
                f"https://127.0.0.1:{port}/federation/v1/health", data=body
            ) as response:
                await response.read()
            if index >= 20:  # warm-up excluded, as for the measured figure
                samples.append((time.perf_counter() - started) * 1000)
    await runner.cleanup()
    return samples


async def bench_federation(count: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kakehashi-bench-") as tmp:
        federation = LocalFederation(Path(tmp), health_interval=30.0)
        try:
            authority = await federation.authority()
            tsu = await federation.member("tsu", "津市", "242012")
            await federation.member("yokkaichi", "四日市市", "242021")
            baseline = await bare_tls_rtts(federation.home("mie-pref").root, count)
            peer = tsu.roster.member("mie-pref")
            assert peer is not None
            body = codec.encode({"node": "tsu", "sent_ms": 0})
            samples = []
            for index in range(count + 20):
                started = time.perf_counter()
                await tsu.client.request(peer, "POST", "/health", body)
                if index >= 20:
                    samples.append((time.perf_counter() - started) * 1000)
            figures = [
                result(
                    "mtls_request_p50_ms",
                    statistics.median(samples),
                    "ms",
                    statistics.median(baseline),
                ),
                result(
                    "mtls_request_p99_ms",
                    percentile(samples, 0.99),
                    "ms",
                    percentile(baseline, 0.99),
                ),
            ]
            propagation = []
            for index in range(5):
                node_id = f"ise-{index}"
                await federation.init(node_id, "伊勢市")
                token = await federation.invite(node_id)
                started = time.perf_counter()
                joining = asyncio.create_task(join_federation(federation.home(node_id), token))
                while not all(n.roster.member(node_id) for n in federation.nodes.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0.0005)
                propagation.append((time.perf_counter() - started) * 1000)
                await joining
            figures.append(
                result(
                    "join_to_known_everywhere_ms",
                    statistics.median(propagation),
                    "ms",
                    statistics.median(samples),
                )
            )
            del authority
            return figures
        finally:
            await federation.stop_all()
