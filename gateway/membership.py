"""Becoming a node and a member: `init`, `federation create`, `federation join`.

These run before the node serves (the node must not be running), from the CLI and
from tests through the same functions.

Joining trusts nothing it has not pinned. The invitation names the federation
CA's fingerprint and the federation key id. The joiner first fetches the CA
certificate over unauthenticated TLS and compares its fingerprint with the pin;
then it sends its join request over TLS verified against that CA; it accepts
the roster only if signed by the pinned federation key, listing itself with
its own keys; and finally it reconnects pinned to the authority's roster
fingerprint, so a member that merely holds a CA-signed certificate cannot pose
as the authority.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import structlog

from federation.errors import ConfigError, KakehashiError, TransportError, TrustError
from federation.identity import check_municipality_code, check_node_id
from federation.invites import (
    JoinReply,
    JoinRequest,
    JoinStatus,
    check_not_expired,
    read_invitation,
)
from federation.roster import (
    MemberStatus,
    PublishedKey,
    Roster,
    RosterEntry,
    SignedRoster,
    sign_roster,
    verify_roster,
)
from federation.signing import SigningKey

from . import tls
from .audit import write_record
from .config import Home, NodeConfig, load_config, parse_endpoints, write_config
from .store import Store
from .transport import FEDERATION_PREFIX, MSGPACK, PinnedConnector, raise_for_error

__all__ = ["JoinOutcome", "create_federation", "init_home", "join_federation", "load_signing_key"]

log = structlog.get_logger("kakehashi.membership")


def load_signing_key(path: Home | None, file: str | None = None) -> SigningKey:
    """Load the node's signing key (or another key file of the home)."""
    assert path is not None
    target = path.signing_key if file is None else path.keys / file
    try:
        return SigningKey.from_pem(target.read_bytes())
    except OSError as exc:
        raise ConfigError(
            f"cannot read key {target}: {exc.strerror}", code="key_unreadable"
        ) from exc


async def init_home(
    home: Home,
    *,
    node_id: str,
    name: str,
    code: str | None,
    listen_host: str,
    listen_port: int,
    segments: dict[str, str],
) -> NodeConfig:
    """Create a node home: config, signing key, TLS key (both 0600), empty database."""
    if home.config.exists():
        raise ConfigError(
            f"{home.root} is already a node home",
            code="already_initialised",
            hint="choose another --home, or remove this one if it is really unused",
        )
    try:
        check_node_id(node_id)
        if code is not None:
            check_municipality_code(code)
    except KakehashiError as exc:
        raise ConfigError(str(exc), code=exc.code) from exc
    if not segments:
        if listen_host in ("0.0.0.0", "::", ""):  # noqa: S104 - deciding, not binding
            raise ConfigError(
                f"listening on {listen_host!r} does not say how peers reach this node",
                code="no_endpoint",
                hint="add --segment NAME=https://HOST:PORT for each network this node sits on",
            )
        host = f"[{listen_host}]" if ":" in listen_host else listen_host
        segments = {"default": f"https://{host}:{listen_port}"}
    config = NodeConfig(
        node_id=node_id,
        name=name,
        code=code,
        listen_host=listen_host,
        listen_port=listen_port,
        endpoints=parse_endpoints(segments, "--segment"),
    )
    home.create_dirs()
    signing = SigningKey.generate()
    tls.write_secret_file(home.signing_key, signing.to_pem())
    tls.write_private_key(home.tls_key, tls.generate_tls_key())
    write_config(home, config)
    async with Store(home.database) as store, store.transaction() as db:  # creates the schema
        await write_record(
            db,
            at_ms=int(datetime.now(UTC).timestamp() * 1000),
            event="node_initialised",
            fields={"node": node_id, "name": name, "signing_key_id": signing.key_id},
        )
    return config


def _self_entry(
    config: NodeConfig, signing: SigningKey, fingerprint: bytes, now: int
) -> RosterEntry:
    return RosterEntry(
        node_id=config.node_id,
        name=config.name,
        code=config.code,
        endpoints=config.endpoints,
        signing_keys=(PublishedKey(public_key=signing.public_raw, not_before=now),),
        tls_fingerprint=fingerprint,
        status=MemberStatus.ACTIVE,
        status_since=now,
        joined_at=now,
    )


async def _require_no_federation(store: Store, home: Home) -> None:
    if await store.get_meta("federation_id") is not None:
        raise ConfigError(
            f"{home.root} already belongs to a federation",
            code="already_member",
            hint="a node belongs to one federation; initialise a new home for another",
        )


async def create_federation(home: Home, *, name: str, now: datetime | None = None) -> Roster:
    """Make this node the federation authority: federation key, CA, own certificate, roster v1."""
    config = load_config(home)
    when = now or datetime.now(UTC)
    seconds = int(when.timestamp())
    async with Store(home.database) as store:
        await _require_no_federation(store, home)
        federation_id = f"{config.node_id}-{secrets.token_hex(4)}"
        federation_key = SigningKey.generate()
        ca_key, ca_cert = tls.create_ca(federation_id, name, when)
        tls_key = tls.load_private_key_pem(home.tls_key.read_bytes())
        csr = tls.build_csr(tls_key, config.node_id)
        cert = tls.issue_node_certificate(
            ca_key, ca_cert, csr, config.node_id, when, days=config.certificate_days
        )
        signing = load_signing_key(home)
        roster = Roster(
            federation_id=federation_id,
            federation_name=name,
            version=1,
            issued_at=seconds,
            authority=config.node_id,
            federation_key=federation_key.public_raw,
            ca_fingerprint=tls.fingerprint(ca_cert),
            members=(_self_entry(config, signing, tls.fingerprint(cert), seconds),),
        )
        signed = sign_roster(roster, federation_key)
        tls.write_secret_file(home.federation_key, federation_key.to_pem())
        tls.write_private_key(home.ca_key, ca_key)
        tls.write_public_file(home.ca_cert, tls.cert_to_pem(ca_cert))
        tls.write_public_file(home.tls_cert, tls.cert_to_pem(cert))
        async with store.transaction() as db:
            await store.insert_roster(db, 1, signed.to_bytes(), seconds * 1000)
            await write_record(
                db,
                at_ms=int(when.timestamp() * 1000),
                event="federation_created",
                fields={
                    "federation": federation_id,
                    "name": name,
                    "federation_key_id": federation_key.key_id,
                    "ca_fingerprint": roster.ca_fingerprint,
                    "roster_version": 1,
                },
            )
        await store.set_meta("role", b"authority")
        await store.set_meta("federation_id", federation_id.encode())
    log.info("federation_created", federation=federation_id, authority=config.node_id)
    return roster


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinOutcome:
    """Result of a successful join."""

    federation_id: str
    federation_name: str
    authority: str
    roster_version: int
    members: tuple[str, ...]


async def join_federation(
    home: Home,
    token: str,
    *,
    wait_seconds: float = 600.0,
    poll_seconds: float = 2.0,
    on_pending: Callable[[], None] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> JoinOutcome:
    """Join the federation that `token` invites this node to."""
    config = load_config(home)
    invitation = read_invitation(token)
    if invitation.node_id != config.node_id:
        raise TrustError(
            f"this invitation is for node {invitation.node_id!r}, "
            f"but this home is node {config.node_id!r}",
            code="token_wrong_node",
            hint=f"use the home initialised as {invitation.node_id}, or ask for a token for "
            f"{config.node_id}",
        )
    check_not_expired(invitation, int(now().timestamp()))
    async with Store(home.database) as store:
        await _require_no_federation(store, home)
    signing = load_signing_key(home)
    tls_key = tls.load_private_key_pem(home.tls_key.read_bytes())
    request = JoinRequest(
        token=token,
        name=config.name,
        code=config.code,
        endpoints=config.endpoints,
        signing_key=signing.public_raw,
        csr_pem=tls.csr_to_pem(tls.build_csr(tls_key, config.node_id)),
    )
    errors: list[str] = []
    for endpoint in invitation.authority_endpoints:
        try:
            ca_pem = await _fetch_pinned_ca(endpoint, invitation.ca_fingerprint, config)
            reply = await _request_join(
                endpoint, ca_pem, request, config, wait_seconds, poll_seconds, on_pending
            )
            break
        except TransportError as exc:
            errors.append(f"{endpoint}: {exc}")
            log.warning("authority_unreachable", endpoint=endpoint, error=str(exc))
    else:
        raise TransportError(
            "could not reach the authority at any endpoint: " + "; ".join(errors),
            code="authority_unreachable",
            hint="check the network path to the authority and that its node is running",
        )
    signed = SignedRoster.from_bytes(reply.roster)
    roster = signed.roster
    if signed.key_id != invitation.federation_key_id:
        raise TrustError(
            "roster is not signed by the federation key the invitation names",
            code="bad_roster_signature",
        )
    verify_roster(signed, roster.federation_key)
    ca_cert = tls.load_certificate_pem(reply.ca_pem)
    cert = tls.load_certificate_pem(reply.certificate_pem)
    if (
        roster.federation_id != invitation.federation_id
        or roster.ca_fingerprint != invitation.ca_fingerprint
    ):
        raise TrustError("roster does not match the invitation", code="wrong_federation")
    tls.verify_issued_by(cert, ca_cert, now())
    me = roster.member(config.node_id)
    if (
        me is None
        or me.tls_fingerprint != tls.fingerprint(cert)
        or me.signing_key(signing.key_id) is None
    ):
        raise TrustError("the roster does not list this node with its keys", code="bad_join_reply")
    authority = roster.active_member(roster.authority)
    tls.write_public_file(home.ca_cert, reply.ca_pem)
    tls.write_public_file(home.tls_cert, reply.certificate_pem)
    await _confirm_authority(home, authority, config)
    async with Store(home.database) as store:
        at_ms = int(now().timestamp() * 1000)
        async with store.transaction() as db:
            await store.insert_roster(db, roster.version, signed.to_bytes(), at_ms)
            await write_record(
                db,
                at_ms=at_ms,
                event="federation_joined",
                fields={
                    "federation": roster.federation_id,
                    "authority": roster.authority,
                    "federation_key_id": signed.key_id,
                    "ca_fingerprint": roster.ca_fingerprint,
                    "roster_version": roster.version,
                    "tls_fingerprint": me.tls_fingerprint,
                },
            )
        await store.set_meta("role", b"member")
        await store.set_meta("federation_id", roster.federation_id.encode())
    log.info(
        "federation_joined",
        federation=roster.federation_id,
        node=config.node_id,
        roster_version=roster.version,
    )
    return JoinOutcome(
        federation_id=roster.federation_id,
        federation_name=roster.federation_name,
        authority=roster.authority,
        roster_version=roster.version,
        members=tuple(m.node_id for m in roster.members),
    )


def _timeout(config: NodeConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=config.request_timeout)


async def _fetch_pinned_ca(endpoint: str, pin: bytes, config: NodeConfig) -> bytes:
    """The CA certificate from the authority, accepted only if its fingerprint is the pinned one."""
    context = tls.client_context(None, None, None)
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context), timeout=_timeout(config)
            ) as session,
            session.get(f"{endpoint}{FEDERATION_PREFIX}/ca") as response,
        ):
            body = await response.read()
            if response.status != 200:
                raise_for_error(response.status, body)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise TransportError(f"cannot fetch the CA: {exc or type(exc).__name__}") from exc
    cert = tls.load_certificate_pem(body)
    if tls.fingerprint(cert) != pin:
        raise TrustError(
            "the authority's CA certificate does not match the fingerprint in the invitation",
            code="ca_mismatch",
            hint="the connection may be intercepted; check the endpoint with the prefecture",
        )
    return body


async def _request_join(
    endpoint: str,
    ca_pem: bytes,
    request: JoinRequest,
    config: NodeConfig,
    wait_seconds: float,
    poll_seconds: float,
    on_pending: Callable[[], None] | None,
) -> JoinReply:
    """POST the join request; poll while an operator has not yet approved it."""
    ca_path = _temporary_ca(ca_pem)
    try:
        context = tls.client_context(None, None, ca_path)
        deadline = asyncio.get_running_loop().time() + wait_seconds
        told = False
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), timeout=_timeout(config)
        ) as session:
            while True:
                try:
                    async with session.post(
                        f"{endpoint}{FEDERATION_PREFIX}/join",
                        data=request.to_bytes(),
                        headers={"Content-Type": MSGPACK},
                    ) as response:
                        body = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    raise TransportError(
                        f"join request failed: {exc or type(exc).__name__}"
                    ) from exc
                if status not in (200, 202):
                    raise_for_error(status, body)
                reply = JoinReply.from_bytes(body)
                if reply.status is JoinStatus.ADMITTED:
                    return reply
                if not told and on_pending is not None:
                    on_pending()
                    told = True
                if asyncio.get_running_loop().time() + poll_seconds > deadline:
                    raise TrustError(
                        "the join is still waiting for approval",
                        code="join_pending",
                        hint=f"ask the authority to run: kakehashi peer approve {config.node_id}; "
                        "then run this join command again",
                    )
                await asyncio.sleep(poll_seconds)
    finally:
        ca_path.unlink(missing_ok=True)


def _temporary_ca(ca_pem: bytes) -> Path:
    # ssl loads trust anchors from files only; the pinned CA lives here until the join ends.
    handle = tempfile.NamedTemporaryFile(prefix="kakehashi-ca-", suffix=".pem", delete=False)  # noqa: SIM115
    with handle:
        handle.write(ca_pem)
    return Path(handle.name)


async def _confirm_authority(home: Home, authority: RosterEntry, config: NodeConfig) -> None:
    """Reconnect pinned to the authority's roster fingerprint, presenting our new certificate."""
    context = tls.client_context(home.tls_cert, home.tls_key, home.ca_cert)
    fingerprint = aiohttp.Fingerprint(authority.tls_fingerprint)
    errors = []
    for endpoint in authority.endpoints:
        try:
            async with (
                aiohttp.ClientSession(
                    connector=PinnedConnector(context), timeout=_timeout(config)
                ) as session,
                session.get(f"{endpoint.url}{FEDERATION_PREFIX}/ca", ssl=fingerprint) as response,
            ):
                await response.read()
                return
        except aiohttp.ServerFingerprintMismatch as exc:
            raise TrustError(
                "the server that answered the join is not the federation authority",
                code="authority_mismatch",
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            errors.append(str(exc))
    raise TransportError("could not confirm the authority's identity: " + "; ".join(errors))
