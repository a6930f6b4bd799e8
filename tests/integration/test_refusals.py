"""Bad input gets a clear refusal, and nothing breaks.

Every refusal here happens between real nodes on 127.0.0.1 over real mutual TLS. Each test
checks the typed error (or the HTTP status and msgpack error code), that the refusing node
logged the refusal with its reason, and that the node goes on serving legitimate peers.
"""

from __future__ import annotations

import base64
import dataclasses
import ssl
from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from federation import codec
from federation.errors import TrustError
from federation.invites import JoinRequest, issue_invitation, read_invitation
from federation.roster import Endpoint, MemberStatus, SignedRoster, check_update, sign_roster
from federation.signing import SigningKey
from gateway import tls
from gateway.config import Home, load_config
from gateway.membership import init_home, join_federation, load_signing_key
from gateway.node import Node
from gateway.transport import FEDERATION_PREFIX, HEADER_NODE, HEADER_ROSTER, MSGPACK

from .conftest import Cluster, eventually, free_port

pytestmark = pytest.mark.integration

Answer = tuple[int, dict[str, Any]]


# --------------------------------------------------------------------------- helpers


def url(node: Node, path: str) -> str:
    return f"https://127.0.0.1:{node.federation_port}{FEDERATION_PREFIX}{path}"


def member_context(home: Home) -> ssl.SSLContext:
    """The mutual-TLS client context of a node home (its real certificate and key)."""
    return tls.client_context(home.tls_cert, home.tls_key, home.ca_cert)


def context_with(
    directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, ca: Path
) -> ssl.SSLContext:
    """A client context presenting `cert`, trusting `ca`."""
    directory.mkdir()
    tls.write_public_file(directory / "node.crt", tls.cert_to_pem(cert))
    tls.write_private_key(directory / "tls.key", key)
    return tls.client_context(directory / "node.crt", directory / "tls.key", ca)


async def raw_request(
    context: ssl.SSLContext,
    target: str,
    *,
    method: str = "GET",
    node: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request with a plain aiohttp client; the status and the decoded msgpack answer."""
    sent = dict(headers or {})
    if node is not None:
        sent[HEADER_NODE] = node
    if body is not None:
        sent["Content-Type"] = MSGPACK
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(total=10)
        ) as session,
        session.request(method, target, headers=sent, data=body) as response,
    ):
        return response.status, codec.decode_map(await response.read())


async def post_join(cluster: Cluster, target: Node, body: Any) -> Answer:
    """POST to /join as a joiner does: no client certificate, server checked against the CA."""
    anonymous = tls.client_context(None, None, cluster.home("mie-pref").ca_cert)
    return await raw_request(anonymous, url(target, "/join"), method="POST", body=body)


def join_request(home: Home, token: str) -> bytes:
    """The join request the node of `home` would send with `token`."""
    config = load_config(home)
    key = tls.load_private_key_pem(home.tls_key.read_bytes())
    return JoinRequest(
        token=token,
        name=config.name,
        code=config.code,
        endpoints=config.endpoints,
        signing_key=load_signing_key(home).public_raw,
        csr_pem=tls.csr_to_pem(tls.build_csr(key, config.node_id)),
    ).to_bytes()


def refused(logs: list[MutableMapping[str, Any]], reason: str) -> list[MutableMapping[str, Any]]:
    """The `peer_refused` events with `reason` among captured log events."""
    return [e for e in logs if e["event"] == "peer_refused" and e["reason"] == reason]


async def health_check(cluster: Cluster, source: str, target: str) -> None:
    """A legitimate health check of `target` by `source`, through source's own PeerClient."""
    node = cluster.nodes[source]
    entry = node.roster.member(target)
    assert entry is not None
    body = codec.encode({"node": source, "sent_ms": 0})
    response = await node.client.request(entry, "POST", "/health", body)
    assert response.status == 200
    assert codec.decode_map(response.body)["node"] == target


async def raw_health(cluster: Cluster, source: str, target: Node) -> None:
    """The same raw client as the refused request, with `source`'s real certificate: served."""
    status, answer = await raw_request(
        member_context(cluster.home(source)),
        url(target, "/health"),
        method="POST",
        node=source,
        body=codec.encode({"node": source}),
    )
    assert (status, answer["node"]) == (200, target.node_id)


def forged_next(held: SignedRoster, key: SigningKey, *, key_id: str | None = None) -> SignedRoster:
    """The next roster version (ise suspended) signed by `key`, optionally claiming `key_id`."""
    ise = held.roster.member("ise")
    assert ise is not None
    changed = dataclasses.replace(ise, status=MemberStatus.SUSPENDED, status_reason="forged")
    signed = sign_roster(held.roster.with_member(changed, issued_at=held.roster.issued_at), key)
    return signed if key_id is None else dataclasses.replace(signed, key_id=key_id)


@pytest.fixture
async def towns(cluster: Cluster) -> AsyncIterator[Cluster]:
    """The prefecture (authority) and two towns, every node holding roster v3."""
    await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    await cluster.member("ise", "伊勢市", "242039")
    await eventually(lambda: {node.roster.version for node in cluster.nodes.values()} == {3})
    yield cluster


# --------------------------------------------------------------------------- who is calling


async def test_connection_without_client_certificate_is_refused(towns: Cluster) -> None:
    authority = towns.nodes["mie-pref"]
    anonymous = tls.client_context(None, None, towns.home("mie-pref").ca_cert)
    with capture_logs() as logs:
        status, answer = await raw_request(anonymous, url(authority, "/roster"), node="tsu")
    assert status == 401
    assert answer["error"] == "client_certificate_required"
    assert refused(logs, "client_certificate_required")
    assert authority.refusals["client_certificate_required"] == 1
    await raw_health(towns, "tsu", authority)
    await health_check(towns, "ise", "mie-pref")


async def test_certificate_from_another_ca_is_refused_at_tls(
    towns: Cluster, tmp_path: Path
) -> None:
    authority = towns.nodes["mie-pref"]
    now = datetime.now(UTC)
    rogue_key, rogue_ca = tls.create_ca("rogue-1", "偽の県", now)
    key = tls.generate_tls_key()
    cert = tls.issue_node_certificate(rogue_key, rogue_ca, tls.build_csr(key, "tsu"), "tsu", now)
    context = context_with(tmp_path / "rogue", cert, key, towns.home("mie-pref").ca_cert)
    with (
        capture_logs() as logs,
        pytest.raises((aiohttp.ClientError, ssl.SSLError, OSError)),
    ):
        await raw_request(context, url(authority, "/roster"), node="tsu")
    # The handshake failed: the request never reached the federation API to be answered.
    assert not [e for e in logs if e["event"] == "peer_refused"]
    assert sum(authority.refusals.values()) == 0
    await raw_health(towns, "tsu", authority)
    await health_check(towns, "tsu", "mie-pref")


async def test_valid_certificate_whose_fingerprint_is_not_in_the_roster_is_refused(
    towns: Cluster, tmp_path: Path
) -> None:
    ise = towns.nodes["ise"]
    authority_home = towns.home("mie-pref")
    ca_key = tls.load_private_key_pem(authority_home.ca_key.read_bytes())
    ca_cert = tls.load_certificate_pem(authority_home.ca_cert.read_bytes())
    now = datetime.now(UTC)
    key = tls.generate_tls_key()
    cert = tls.issue_node_certificate(ca_key, ca_cert, tls.build_csr(key, "tsu"), "tsu", now)
    tls.verify_issued_by(cert, ca_cert, now)  # a genuine federation certificate for 'tsu' ...
    tsu_entry = ise.roster.member("tsu")
    assert tsu_entry is not None and tsu_entry.tls_fingerprint != tls.fingerprint(cert)  # ... not
    context = context_with(tmp_path / "second", cert, key, authority_home.ca_cert)
    for claimed_version in ("0", "99"):  # 99: the server first catches up, then still refuses
        with capture_logs() as logs:
            status, answer = await raw_request(
                context, url(ise, "/roster"), node="tsu", headers={HEADER_ROSTER: claimed_version}
            )
        assert (status, answer["error"]) == (403, "unknown_certificate")
        assert "'tsu'" in answer["message"]
        events = refused(logs, "unknown_certificate")
        assert [(e["claimed"], e["fingerprint"]) for e in events] == [
            ("tsu", tls.fingerprint(cert).hex()[:16])
        ]
    assert ise.refusals["unknown_certificate"] == 2
    assert ise.roster.version == 3
    await raw_health(towns, "tsu", ise)
    await health_check(towns, "tsu", "ise")


async def test_certificate_claiming_another_node_id_is_refused(towns: Cluster) -> None:
    authority = towns.nodes["mie-pref"]
    tsu_context = member_context(towns.home("tsu"))
    with capture_logs() as logs:
        status, answer = await raw_request(tsu_context, url(authority, "/roster"), node="ise")
    assert (status, answer["error"]) == (403, "unknown_certificate")
    assert "'ise'" in answer["message"]
    assert [e["claimed"] for e in refused(logs, "unknown_certificate")] == ["ise"]
    assert authority.refusals["unknown_certificate"] == 1
    # The very same certificate, telling the truth, is served.
    await raw_health(towns, "tsu", authority)
    await health_check(towns, "ise", "mie-pref")


async def _node_is_refused_after(towns: Cluster, status: MemberStatus, code: str) -> None:
    authority, tsu, ise = towns.nodes["mie-pref"], towns.nodes["tsu"], towns.nodes["ise"]
    assert authority.authority is not None
    tsu_entry, authority_entry = ise.roster.member("tsu"), ise.roster.member("mie-pref")
    assert tsu_entry is not None and authority_entry is not None
    await health_check(towns, "ise", "tsu")  # served before the change
    await authority.authority.set_status("ise", status, "audit")

    def tsu_holds_the_change() -> bool:
        entry = tsu.roster.member("ise")
        return entry is not None and entry.status is status

    await eventually(tsu_holds_the_change, timeout=5)
    health = codec.encode({"node": "ise"})
    with capture_logs() as logs, pytest.raises(TrustError) as at_tsu:
        await ise.client.request(tsu_entry, "POST", "/health", health)
    assert at_tsu.value.code == code
    assert "'ise'" in str(at_tsu.value)
    assert [e["peer"] for e in refused(logs, code)] == ["ise"]
    assert tsu.refusals[code] >= 1
    with pytest.raises(TrustError) as at_authority:
        await ise.client.request(authority_entry, "POST", "/health", health)
    assert at_authority.value.code == code
    assert authority.refusals[code] >= 1
    # A suspended node may still read the roster (to learn it is suspended); a revoked
    # one may not.
    if status is MemberStatus.SUSPENDED:
        response = await ise.client.request(authority_entry, "GET", "/roster")
        assert response.status == 200
    else:
        with pytest.raises(TrustError):
            await ise.client.request(authority_entry, "GET", "/roster")
    await health_check(towns, "mie-pref", "tsu")
    await health_check(towns, "tsu", "mie-pref")


async def test_suspended_node_is_refused(towns: Cluster) -> None:
    await _node_is_refused_after(towns, MemberStatus.SUSPENDED, "peer_suspended")


async def test_revoked_node_is_refused(towns: Cluster) -> None:
    await _node_is_refused_after(towns, MemberStatus.REVOKED, "peer_revoked")


# --------------------------------------------------------------------------- who answers


async def test_client_refuses_a_server_whose_certificate_is_not_the_roster_one(
    towns: Cluster,
) -> None:
    ise = towns.nodes["ise"]
    tsu_entry = ise.roster.member("tsu")
    assert tsu_entry is not None
    altered = dataclasses.replace(
        tsu_entry, tls_fingerprint=bytes(b ^ 0x01 for b in tsu_entry.tls_fingerprint)
    )
    with pytest.raises(TrustError) as refused_server:
        await ise.client.request(altered, "GET", "/roster")
    assert refused_server.value.code == "server_certificate_mismatch"
    assert "tsu" in str(refused_server.value)
    # A roster fetch meeting such a server logs why and takes the roster from the authority.
    held = ise.signed_roster
    with capture_logs() as logs:
        await ise.roster_hint(held.version + 1, altered)
    failures = [e for e in logs if e["event"] == "roster_sync_failed" and e["source"] == "tsu"]
    assert [e["code"] for e in failures] == ["server_certificate_mismatch"]
    assert ise.signed_roster == held
    await health_check(towns, "ise", "tsu")


async def test_client_refuses_another_member_answering_at_a_peers_address(
    towns: Cluster,
) -> None:
    ise = towns.nodes["ise"]
    tsu_entry, authority_entry = ise.roster.member("tsu"), ise.roster.member("mie-pref")
    assert tsu_entry is not None and authority_entry is not None
    # tsu's address now leads to the authority: a genuine federation certificate, not tsu's.
    redirected = dataclasses.replace(tsu_entry, endpoints=authority_entry.endpoints)
    with pytest.raises(TrustError) as refused_server:
        await ise.client.request(redirected, "GET", "/roster")
    assert refused_server.value.code == "server_certificate_mismatch"
    assert "tsu" in str(refused_server.value)
    await health_check(towns, "ise", "tsu")
    await health_check(towns, "ise", "mie-pref")


# --------------------------------------------------------------------------- invitations


async def test_expired_invitation_is_refused_by_the_joiner_and_by_the_authority(
    cluster: Cluster,
) -> None:
    authority = await cluster.authority()
    home = await cluster.init("tsu", "津市", "242012")
    token = await cluster.invite("tsu", expires_in=60)

    def an_hour_later() -> datetime:
        return datetime.now(UTC) + timedelta(hours=1)

    with pytest.raises(TrustError) as local:
        await join_federation(home, token, now=an_hour_later)
    assert local.value.code == "token_expired"
    assert "'tsu'" in str(local.value)
    assert authority.refusals["token_expired"] == 0  # refused before asking the authority

    cluster.clocks["mie-pref"].offset = 3600  # the joiner's clock still says "valid"
    with capture_logs() as logs, pytest.raises(TrustError) as remote:
        await join_federation(home, token)
    assert remote.value.code == "token_expired"
    assert "'tsu'" in str(remote.value)
    status, answer = await post_join(cluster, authority, join_request(home, token))
    assert (status, answer["error"]) == (403, "token_expired")
    assert len(refused(logs, "token_expired")) == 1
    assert authority.refusals["token_expired"] == 2
    assert authority.roster.member("tsu") is None

    # Nothing was spent or broken: back on time, the same first-use invitation admits tsu.
    cluster.clocks["mie-pref"].offset = 0
    await join_federation(home, token)
    await cluster.start("tsu")
    await health_check(cluster, "tsu", "mie-pref")


async def test_forged_invitation_is_refused_by_the_authority(cluster: Cluster) -> None:
    authority = await cluster.authority()
    home = await cluster.init("tsu", "津市", "242012")
    genuine_token = await cluster.invite("tsu")
    genuine = read_invitation(genuine_token)
    forger = SigningKey.generate()
    naming_its_own_key = issue_invitation(
        dataclasses.replace(genuine, federation_key_id=forger.key_id), forger
    )
    # The genuine header and claims (naming the federation key), signed by the forger.
    signing_input = genuine_token.rsplit(".", 1)[0]
    signature = base64.urlsafe_b64encode(forger.sign(signing_input.encode())).rstrip(b"=")
    naming_the_federation_key = f"{signing_input}.{signature.decode()}"
    assert read_invitation(naming_the_federation_key) == genuine
    for forged in (naming_its_own_key, naming_the_federation_key):
        with capture_logs() as logs, pytest.raises(TrustError) as refused_token:
            await join_federation(home, forged)
        assert refused_token.value.code == "token_forged"
        assert "forged" in str(refused_token.value)
        assert len(refused(logs, "token_forged")) == 1
    assert authority.refusals["token_forged"] == 2
    assert authority.roster.member("tsu") is None
    # The forgeries, carrying the genuine nonce, did not spend the genuine invitation.
    await join_federation(home, genuine_token)
    await cluster.start("tsu")
    await health_check(cluster, "tsu", "mie-pref")


async def test_reused_invitation_is_refused(cluster: Cluster) -> None:
    authority = await cluster.authority()
    first = await cluster.init("tsu", "津市", "242012")
    token = await cluster.invite("tsu")
    await join_federation(first, token)
    second = Home(cluster.root / "tsu-copy")
    await init_home(
        second,
        node_id="tsu",
        name="津市",
        code="242012",
        listen_host="127.0.0.1",
        listen_port=free_port(),
        segments={},
    )
    with capture_logs() as logs, pytest.raises(TrustError) as reused:
        await join_federation(second, token)
    assert reused.value.code == "token_reused"
    assert "'tsu'" in str(reused.value)
    assert len(refused(logs, "token_reused")) == 1
    assert authority.refusals["token_reused"] == 1
    assert not second.tls_cert.exists()
    entry = authority.roster.member("tsu")
    first_cert = tls.load_certificate_pem(first.tls_cert.read_bytes())
    assert entry is not None and entry.tls_fingerprint == tls.fingerprint(first_cert)
    await cluster.start("tsu")
    await health_check(cluster, "tsu", "mie-pref")


async def test_invitation_for_another_node_is_refused_by_the_joiner_and_by_the_authority(
    cluster: Cluster,
) -> None:
    authority = await cluster.authority()
    ise_home = await cluster.init("ise", "伊勢市", "242039")
    token = await cluster.invite("tsu")
    with pytest.raises(TrustError) as local:
        await join_federation(ise_home, token)
    assert local.value.code == "token_wrong_node"
    assert "'tsu'" in str(local.value) and "'ise'" in str(local.value)
    assert authority.refusals["token_wrong_node"] == 0

    with capture_logs() as logs:
        status, answer = await post_join(cluster, authority, join_request(ise_home, token))
    assert (status, answer["error"]) == (403, "token_wrong_node")
    assert "'tsu'" in answer["message"] and "'ise'" in answer["message"]
    assert len(refused(logs, "token_wrong_node")) == 1
    assert authority.refusals["token_wrong_node"] == 1
    assert authority.roster.member("ise") is None and authority.roster.member("tsu") is None
    # The invitation is still good for the node it names.
    tsu_home = await cluster.init("tsu", "津市", "242012")
    await join_federation(tsu_home, token)
    await cluster.start("tsu")
    await health_check(cluster, "tsu", "mie-pref")


async def test_request_for_another_node_cannot_take_a_manual_invitation(cluster: Cluster) -> None:
    authority = await cluster.authority()
    assert authority.authority is not None
    ise_home = await cluster.init("ise", "伊勢市", "242039")
    token = await cluster.invite("tsu", approval="manual")
    with capture_logs() as logs:
        status, answer = await post_join(cluster, authority, join_request(ise_home, token))
    assert (status, answer["error"]) == (403, "token_wrong_node")
    assert len(refused(logs, "token_wrong_node")) == 1
    assert await authority.authority.pending() == []  # nothing held for the operator
    tsu_home = await cluster.init("tsu", "津市", "242012")
    with pytest.raises(TrustError) as waiting:
        await join_federation(tsu_home, token, wait_seconds=0.2, poll_seconds=0.1)
    assert waiting.value.code == "join_pending"
    await authority.authority.approve("tsu")
    await join_federation(tsu_home, token, wait_seconds=5, poll_seconds=0.1)
    await cluster.start("tsu")
    await health_check(cluster, "tsu", "mie-pref")


# --------------------------------------------------------------------------- rosters


async def test_roster_signed_by_another_key_is_refused_and_the_held_roster_is_kept(
    towns: Cluster,
) -> None:
    tsu = towns.nodes["tsu"]
    held = tsu.signed_roster
    forger = SigningKey.generate()
    for forged in (forged_next(held, forger), forged_next(held, forger, key_id=held.key_id)):
        with pytest.raises(TrustError) as refused_roster:
            await tsu.adopt(forged)
        assert refused_roster.value.code == "bad_roster_signature"
        assert tsu.signed_roster == held
    assert await tsu.store.latest_roster() == held.to_bytes()
    await health_check(towns, "ise", "tsu")


async def test_member_serving_a_forged_newer_roster_cannot_make_a_peer_adopt_it(
    towns: Cluster,
) -> None:
    ise = towns.nodes["ise"]
    held = ise.signed_roster
    forged = forged_next(held, SigningKey.generate(), key_id=held.key_id)

    async def serve_forged(request: web.Request) -> web.Response:
        headers = {HEADER_ROSTER: str(forged.version), HEADER_NODE: "tsu"}
        return web.Response(body=forged.to_bytes(), content_type=MSGPACK, headers=headers)

    # A compromised tsu: its real certificate and key, serving a forged roster.
    tsu_home = towns.home("tsu")
    app = web.Application()
    app.router.add_get(f"{FEDERATION_PREFIX}/roster", serve_forged)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    context = tls.server_context(
        tsu_home.tls_cert, tsu_home.tls_key, tsu_home.ca_cert, require_client_cert=True
    )
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    tsu_entry = ise.roster.member("tsu")
    assert tsu_entry is not None
    compromised = dataclasses.replace(
        tsu_entry, endpoints=(Endpoint(segment="default", url=f"https://127.0.0.1:{port}"),)
    )
    try:
        with capture_logs() as logs:
            await ise.roster_hint(forged.version, compromised)
    finally:
        await runner.cleanup()
    failures = [e for e in logs if e["event"] == "roster_sync_failed" and e["source"] == "tsu"]
    assert [e["code"] for e in failures] == ["bad_roster_signature"]
    assert ise.signed_roster == held
    assert await ise.store.latest_roster() == held.to_bytes()
    await health_check(towns, "mie-pref", "ise")
    await health_check(towns, "ise", "tsu")


async def test_older_roster_version_is_never_adopted(cluster: Cluster) -> None:
    authority = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    version_2 = authority.signed_roster
    assert version_2.version == 2
    await cluster.member("ise", "伊勢市", "242039")
    await eventually(lambda: tsu.roster.version == 3)
    held = tsu.signed_roster
    assert await tsu.adopt(version_2) is None
    assert tsu.signed_roster == held and tsu.roster.member("ise") is not None
    with pytest.raises(TrustError) as rollback:
        check_update(tsu.roster, version_2)
    assert rollback.value.code == "roster_rollback"
    # A peer claiming a newer version while serving its genuine roster changes nothing.
    ise_entry = tsu.roster.member("ise")
    assert ise_entry is not None
    with capture_logs() as logs:
        await tsu.roster_hint(held.version + 5, ise_entry)
    assert not [e for e in logs if e["event"] in ("roster_updated", "roster_sync_failed")]
    assert tsu.signed_roster == held
    assert await tsu.store.latest_roster() == held.to_bytes()
    await health_check(cluster, "ise", "tsu")


# --------------------------------------------------------------------------- bodies


async def test_malformed_msgpack_body_is_refused_with_400(towns: Cluster) -> None:
    authority = towns.nodes["mie-pref"]
    with capture_logs() as logs:
        status, answer = await raw_request(
            member_context(towns.home("tsu")),
            url(authority, "/health"),
            method="POST",
            node="tsu",
            body=b"\xc1garbage",
        )
    assert (status, answer["error"]) == (400, "malformed_msgpack")
    assert [e["path"] for e in refused(logs, "malformed_msgpack")] == ["/federation/v1/health"]
    assert authority.refusals["malformed_msgpack"] == 1
    await raw_health(towns, "tsu", authority)
    await health_check(towns, "ise", "mie-pref")


async def test_body_over_one_mebibyte_is_refused_with_413(towns: Cluster) -> None:
    authority = towns.nodes["mie-pref"]
    member = member_context(towns.home("tsu"))
    anonymous = tls.client_context(None, None, towns.home("mie-pref").ca_cert)
    oversized = b"\x00" * (1024 * 1024 + 1)

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for _ in range(17):
            yield b"\x00" * 65536

    cases = (
        (member, "/health", "tsu", oversized),
        (member, "/health", "tsu", streamed()),
        (anonymous, "/join", None, streamed()),  # the open route: no certificate needed
    )
    sizes: list[int] = []
    for context, path, node, body in cases:
        with capture_logs() as logs:
            status, answer = await raw_request(
                context, url(authority, path), method="POST", node=node, body=body
            )
        assert (status, answer["error"]) == (413, "too_large")
        assert str(1024 * 1024) in answer["message"]  # the transport's cap, not the decoder's
        assert len(refused(logs, "too_large")) == 1
        sizes += [e["size"] for e in refused(logs, "too_large") if "size" in e]
        await raw_health(towns, "tsu", authority)
    assert authority.refusals["too_large"] == 3
    assert sizes == [len(oversized)]  # refused on its declared length, before reading it
    await health_check(towns, "ise", "mie-pref")


async def test_garbage_join_request_is_refused_with_400(towns: Cluster) -> None:
    authority = towns.nodes["mie-pref"]
    cases = (
        (b"\xc1garbage", "malformed_msgpack"),
        (codec.encode({"token": "x"}), "bad_join_request"),
    )
    for body, code in cases:
        with capture_logs() as logs:
            status, answer = await post_join(towns, authority, body)
        assert (status, answer["error"]) == (400, code)
        assert [e["path"] for e in refused(logs, code)] == ["/federation/v1/join"]
        assert authority.refusals[code] == 1
    assert authority.roster.version == 3
    await raw_health(towns, "tsu", authority)
    await health_check(towns, "ise", "mie-pref")


async def test_non_authority_node_refuses_join_requests(towns: Cluster) -> None:
    tsu = towns.nodes["tsu"]
    home = await towns.init("matsusaka", "松阪市", "242047")
    token = await towns.invite("matsusaka")
    with capture_logs() as logs:
        status, answer = await post_join(towns, tsu, join_request(home, token))
    assert (status, answer["error"]) == (403, "not_authority")
    assert len(refused(logs, "not_authority")) == 1
    assert tsu.refusals["not_authority"] == 1
    assert all(node.roster.member("matsusaka") is None for node in towns.nodes.values())
    await health_check(towns, "ise", "tsu")
    # The invitation is untouched: at the authority it admits the town.
    await join_federation(home, token)
    await eventually(lambda: tsu.roster.member("matsusaka") is not None)
