"""The federation authority's duties on a running node: invite, admit, approve, change status.

Only the node that created the federation holds the federation key and the CA
key, so only it runs this. Every change to the roster goes through one lock,
and is persisted in the same transaction as the invitation state that caused
it, so a crash between "certificate issued" and "roster saved" cannot happen.
The join lifecycle itself is the pure table in `federation.invites`; this module
feeds it the stored state and the request, and carries out the effect.

Each decision is written to the audit log in the transaction that carries it out
(invitation issued, join admitted / pending / approved / denied, member status
and member changes), so the log holds a decision exactly when it took effect.
Invitation tokens are never audited: the record names the node, the approval
mode, the relay flag and the expiry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from federation.errors import ConfigError, ProtocolError, TrustError
from federation.identity import check_node_id
from federation.invites import (
    Approval,
    Invitation,
    JoinEffect,
    JoinInput,
    JoinReply,
    JoinRequest,
    JoinState,
    JoinStatus,
    check_not_expired,
    issue_invitation,
    join_transition,
    new_nonce,
    verify_invitation,
)
from federation.roster import (
    Endpoint,
    MemberStatus,
    PublishedKey,
    Roster,
    RosterEntry,
    SignedRoster,
    key_proof_message,
    sign_roster,
    with_certificate,
    with_signing_key,
)
from federation.signing import SigningKey, public_key_id, verify_signature

from . import tls
from .audit import AuditLog
from .config import Home, NodeConfig
from .store import InvitationRow, Store

__all__ = ["Authority", "IssuedInvitation"]

log = structlog.get_logger("kakehashi.authority")


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedInvitation:
    """A token just issued, with its claims."""

    token: str
    invitation: Invitation


class Authority:
    """Issues invitations and roster versions for the federation this node created."""

    def __init__(
        self,
        *,
        home: Home,
        config: NodeConfig,
        store: Store,
        current: Callable[[], SignedRoster],
        publish: Callable[[SignedRoster], Awaitable[None]],
        clock: Callable[[], float],
        audit: AuditLog,
    ) -> None:
        self._config = config
        self._audit = audit
        self._store = store
        self._current = current
        self._publish = publish
        self._clock = clock
        self._lock = asyncio.Lock()
        try:
            self._federation_key = SigningKey.from_pem(home.federation_key.read_bytes())
            ca_key = tls.load_private_key_pem(home.ca_key.read_bytes())
            self._ca_pem = home.ca_cert.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"authority key material missing in {home.root}: {exc}", code="authority_keys"
            ) from exc
        if not isinstance(ca_key, EllipticCurvePrivateKey):
            raise ConfigError("CA key is not an EC key", code="bad_key")
        self._ca_key = ca_key
        self._ca_cert = tls.load_certificate_pem(self._ca_pem)

    @property
    def roster(self) -> Roster:
        return self._current().roster

    def _now(self) -> int:
        return int(self._clock())

    async def invite(
        self,
        node_id: str,
        *,
        expires_in: int,
        approval: Approval = Approval.AUTO,
        relay: bool = False,
    ) -> IssuedInvitation:
        """Issue a single-use invitation token for `node_id`."""
        approval = Approval(approval)
        check_node_id(node_id)
        existing = self.roster.member(node_id)
        if existing is not None:
            if existing.status is MemberStatus.REVOKED:
                raise TrustError(
                    f"node id {node_id!r} was revoked and cannot join again",
                    code="node_revoked",
                    hint="invite the town under a new node id",
                )
            raise TrustError(
                f"{node_id!r} is already a member",
                code="already_member",
                hint="a node that lost its home is restored from backup; otherwise revoke it "
                "and invite a new node id",
            )
        now = self._now()
        endpoints = tuple(endpoint.url for endpoint in self._config.endpoints)
        invitation = Invitation(
            federation_id=self.roster.federation_id,
            node_id=node_id,
            authority_endpoints=endpoints,
            ca_fingerprint=self.roster.ca_fingerprint,
            federation_key_id=self._federation_key.key_id,
            nonce=new_nonce(),
            issued_at=now,
            expires_at=now + expires_in,
            approval=approval,
            relay=relay,
        )
        token = issue_invitation(invitation, self._federation_key)
        async with self._store.transaction() as db:
            await self._store.insert_invitation(
                db,
                nonce=invitation.nonce,
                node_id=node_id,
                expires_at=invitation.expires_at,
                approval=approval,
                relay=relay,
                now=now,
            )
            await self._audit.append_in(
                db,
                "invitation_issued",
                node=node_id,
                approval=approval,
                relay=relay,
                expires_at=invitation.expires_at,
            )
        log.info(
            "invitation_issued",
            node=node_id,
            approval=approval.value,
            expires_at=invitation.expires_at,
            relay=relay,
        )
        return IssuedInvitation(token=token, invitation=invitation)

    async def join(self, body: bytes) -> JoinReply:
        """Handle a join request: admit, hold for approval, repeat an answer, or refuse."""
        request = JoinRequest.from_bytes(body)
        now = self._now()
        csr = tls.load_csr_pem(request.csr_pem)
        invitation = verify_invitation(
            request.token,
            self.roster.federation_key,
            now=now,
            federation_id=self.roster.federation_id,
            # The CSR's CN is the node id the requester asks to become; refuse before the
            # request can bind (or, under manual approval, be held against) the invitation.
            node_id=tls._single_cn(csr.subject) or "",
        )
        keys = request.signing_key + csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        async with self._lock:
            row = await self._store.invitation(invitation.nonce)
            if row is None:
                raise TrustError(
                    "this invitation is not known to the authority", code="unknown_invitation"
                )
            if row.state is JoinState.ISSUED:
                check_not_expired(invitation, now)
                event = (
                    JoinInput.REQUEST_AUTO
                    if row.approval is Approval.AUTO
                    else JoinInput.REQUEST_MANUAL
                )
            else:
                same = row.request_keys == keys
                event = JoinInput.REQUEST_SAME_KEYS if same else JoinInput.REQUEST_OTHER_KEYS
            effect, state = join_transition(row.state, event)
            log.info("join_request", node=invitation.node_id, input=event.name, effect=effect.name)
            if effect is JoinEffect.REFUSE_REUSED:
                raise TrustError(
                    f"the invitation for {invitation.node_id!r} has already been used",
                    code="token_reused",
                    hint="invitation tokens are single-use; ask for a new one",
                )
            if effect is JoinEffect.REFUSE_DENIED:
                raise TrustError(
                    f"the authority denied the join of {invitation.node_id!r}", code="join_denied"
                )
            if effect is JoinEffect.HOLD:
                async with self._store.transaction() as db:
                    await self._store.update_invitation(
                        db, row.nonce, state=state, now=now, request=body, request_keys=keys
                    )
                    if row.state is JoinState.ISSUED:  # not again for each poll of the joiner
                        await self._audit.append_in(
                            db, "join_pending", node=row.node_id, name=request.name
                        )
                return JoinReply(status=JoinStatus.PENDING)
            if effect is JoinEffect.DELIVER:
                assert row.certificate is not None
                return self._reply(row.certificate)
            assert effect is JoinEffect.ADMIT
            return await self._admit(row, request, keys, body, now, event="join_admitted")

    async def _admit(
        self,
        row: InvitationRow,
        request: JoinRequest,
        keys: bytes,
        body: bytes,
        now: int,
        *,
        event: str,
    ) -> JoinReply:
        """Issue the certificate, add the member, persist both at once, publish. Lock held."""
        csr = tls.load_csr_pem(request.csr_pem)
        when = datetime.fromtimestamp(now, UTC)
        cert = tls.issue_node_certificate(
            self._ca_key, self._ca_cert, csr, row.node_id, when, days=self._config.certificate_days
        )
        entry = RosterEntry(
            node_id=row.node_id,
            name=request.name,
            code=request.code,
            endpoints=tuple(sorted(request.endpoints, key=lambda e: e.segment)),
            signing_keys=(PublishedKey(public_key=request.signing_key, not_before=now),),
            tls_fingerprint=tls.fingerprint(cert),
            status=MemberStatus.ACTIVE,
            status_since=now,
            relay=row.relay,
            joined_at=now,
        )
        signed = sign_roster(self.roster.with_member(entry, issued_at=now), self._federation_key)
        cert_pem = tls.cert_to_pem(cert)
        async with self._store.transaction() as db:
            await self._store.update_invitation(
                db,
                row.nonce,
                state=JoinState.APPROVED,
                now=now,
                request=body,
                request_keys=keys,
                certificate=cert_pem,
            )
            await self._store.insert_roster(db, signed.version, signed.to_bytes(), now * 1000)
            await self._audit.append_in(
                db,
                event,
                node=row.node_id,
                name=request.name,
                code=request.code,
                approval=row.approval,
                relay=row.relay,
                segments=[e.segment for e in entry.endpoints],
                signing_key_id=entry.signing_keys[0].key_id,
                tls_fingerprint=entry.tls_fingerprint,
                roster_version=signed.version,
            )
        await self._publish(signed)
        log.info("member_admitted", node=row.node_id, roster_version=signed.version)
        return self._reply(cert_pem)

    def _reply(self, certificate_pem: bytes) -> JoinReply:
        return JoinReply(
            status=JoinStatus.ADMITTED,
            certificate_pem=certificate_pem,
            ca_pem=self._ca_pem,
            roster=self._current().to_bytes(),
        )

    async def _pending_for(self, node_id: str) -> InvitationRow:
        rows = [r for r in await self._store.invitations(JoinState.PENDING) if r.node_id == node_id]
        if not rows:
            raise TrustError(
                f"no join request from {node_id!r} is waiting for approval",
                code="nothing_pending",
                hint="see waiting requests with: kakehashi peer pending",
            )
        return rows[-1]

    async def approve(self, node_id: str) -> Roster:
        """Admit the waiting join of `node_id`."""
        async with self._lock:
            row = await self._pending_for(node_id)
            effect, _ = join_transition(row.state, JoinInput.APPROVE)
            assert effect is JoinEffect.ADMIT and row.request is not None
            request = JoinRequest.from_bytes(row.request)
            assert row.request_keys is not None
            await self._admit(
                row, request, row.request_keys, row.request, self._now(), event="join_approved"
            )
            return self.roster

    async def deny(self, node_id: str) -> None:
        """Refuse the waiting join of `node_id`."""
        async with self._lock:
            row = await self._pending_for(node_id)
            _, state = join_transition(row.state, JoinInput.DENY)
            async with self._store.transaction() as db:
                await self._store.update_invitation(db, row.nonce, state=state, now=self._now())
                await self._audit.append_in(db, "join_denied", node=node_id)
            log.info("join_denied", node=node_id)

    async def pending(self) -> list[InvitationRow]:
        """Join requests waiting for an operator."""
        return await self._store.invitations(JoinState.PENDING)

    async def set_status(self, node_id: str, status: MemberStatus, reason: str) -> Roster:
        """Suspend, resume or revoke a member: a new roster version, signed and published."""
        async with self._lock:
            entry = self.roster.member(node_id)
            if entry is None:
                raise TrustError(f"{node_id!r} is not a member", code="unknown_peer")
            if node_id == self.roster.authority:
                raise TrustError("the authority cannot change its own status", code="self_status")
            if entry.status is MemberStatus.REVOKED:
                raise TrustError(f"{node_id!r} is revoked; that is final", code="peer_revoked")
            if entry.status is status:
                return self.roster
            now = self._now()
            version = await self._issue(
                replace(entry, status=status, status_reason=reason, status_since=now),
                now,
                "member_status_changed",
                {"node": node_id, "status": status, "previous": entry.status, "reason": reason},
            )
            log.info(
                "member_status_changed",
                node=node_id,
                status=status.value,
                reason=reason,
                roster_version=version,
            )
            return self.roster

    async def update_member(
        self,
        node_id: str,
        *,
        relay: bool | None = None,
        endpoints: tuple[Endpoint, ...] | None = None,
    ) -> Roster:
        """Change what the roster publishes for a member: its relay flag, its endpoints."""
        async with self._lock:
            entry = self.roster.member(node_id)
            if entry is None:
                raise TrustError(f"{node_id!r} is not a member", code="unknown_peer")
            if entry.status is MemberStatus.REVOKED:
                raise TrustError(f"{node_id!r} is revoked; that is final", code="peer_revoked")
            changed = replace(
                entry,
                relay=entry.relay if relay is None else relay,
                endpoints=entry.endpoints if endpoints is None else endpoints,
            )
            if changed == entry:
                return self.roster
            version = await self._issue(
                changed,
                self._now(),
                "member_updated",
                {
                    "node": node_id,
                    "relay": changed.relay,
                    "previous_relay": entry.relay,
                    "endpoints": [f"{e.segment}={e.url}" for e in changed.endpoints],
                    "previous_endpoints": [f"{e.segment}={e.url}" for e in entry.endpoints],
                },
            )
            log.info(
                "member_updated",
                node=node_id,
                relay=changed.relay,
                segments=list(changed.segments),
                roster_version=version,
            )
            return self.roster

    # key lifecycle ------------------------------------------------------------

    async def renew_certificate(self, node_id: str, csr_pem: bytes, *, overlap: int) -> bytes:
        """Issue a new certificate for an active member's new TLS key; the roster names it
        current and keeps the replaced one accepted for `overlap` seconds. Returns PEM."""
        async with self._lock:
            entry = self.roster.active_member(node_id)
            csr = tls.load_csr_pem(csr_pem)
            now = self._now()
            cert = tls.issue_node_certificate(
                self._ca_key,
                self._ca_cert,
                csr,
                node_id,
                datetime.fromtimestamp(now, UTC),
                days=self._config.certificate_days,
            )
            changed = with_certificate(entry, tls.fingerprint(cert), now=now, overlap=overlap)
            version = await self._issue(
                changed,
                now,
                "certificate_renewed",
                {
                    "node": node_id,
                    "fingerprint": changed.tls_fingerprint.hex()[:16],
                    "previous_fingerprint": entry.tls_fingerprint.hex()[:16],
                    "expires": cert.not_valid_after_utc.isoformat(),
                },
            )
            log.info(
                "certificate_renewed",
                node=node_id,
                fingerprint=changed.tls_fingerprint.hex()[:16],
                expires=cert.not_valid_after_utc.isoformat(),
                roster_version=version,
            )
            return tls.cert_to_pem(cert)

    async def add_signing_key(
        self, node_id: str, public_key: bytes, proof: bytes, *, overlap: int
    ) -> int:
        """Publish an active member's new signing key (it proved it holds it); the keys
        before it stay valid for `overlap` seconds. Returns the roster version."""
        async with self._lock:
            entry = self.roster.active_member(node_id)
            if len(public_key) != 32:
                raise ProtocolError("a signing key is 32 bytes", code="bad_key")
            try:
                verify_signature(
                    public_key,
                    proof,
                    key_proof_message(self.roster.federation_id, node_id, public_key),
                )
            except TrustError as exc:
                raise TrustError(
                    "the proof does not show the node holds the new key", code="bad_key_proof"
                ) from exc
            now = self._now()
            changed = with_signing_key(entry, public_key, now=now, overlap=overlap)
            previous = [key.key_id for key in entry.signing_keys if key.not_after is None]
            version = await self._issue(
                changed,
                now,
                "signing_key_published",
                {
                    "node": node_id,
                    "key_id": public_key_id(public_key),
                    "closed": previous,
                    "overlap_s": overlap,
                },
            )
            log.info(
                "signing_key_rotated",
                node=node_id,
                key_id=public_key_id(public_key),
                overlap_s=overlap,
                roster_version=version,
            )
            return version

    async def rotate_federation_key(self, key_path: Path) -> int:
        """Replace the federation key: the next roster version, signed by the old key,
        names the new one; every later version is signed by the new key. The new key is
        written to `key_path` (the old one kept beside it) before anything is published.
        Returns the roster version that announced it."""
        async with self._lock:
            new_key = SigningKey.generate()
            now = self._now()
            announced = replace(
                self.roster.next_version(issued_at=now, members=self.roster.members),
                federation_key=new_key.public_raw,
            )
            signed = sign_roster(announced, self._federation_key)
            old = key_path.with_name(f"{key_path.name}.{self._federation_key.key_id}")
            tls.write_secret_file(old, self._federation_key.to_pem())
            tls.write_secret_file(key_path, new_key.to_pem())
            async with self._store.transaction() as db:
                await self._store.insert_roster(db, signed.version, signed.to_bytes(), now * 1000)
                await self._audit.append_in(
                    db,
                    "federation_key_rotated",
                    roster_version=signed.version,
                    key_id=new_key.key_id,
                    previous_key_id=self._federation_key.key_id,
                )
            self._federation_key = new_key
            await self._publish(signed)
            log.info(
                "federation_key_rotated",
                key_id=new_key.key_id,
                previous=old.name,
                roster_version=signed.version,
            )
            return signed.version

    async def _issue(
        self, changed: RosterEntry, now: int, event: str, fields: dict[str, Any]
    ) -> int:
        """Sign, store (with its audit record) and publish the roster with `changed` in place
        of its member."""
        signed = sign_roster(self.roster.with_member(changed, issued_at=now), self._federation_key)
        async with self._store.transaction() as db:
            await self._store.insert_roster(db, signed.version, signed.to_bytes(), now * 1000)
            await self._audit.append_in(db, event, roster_version=signed.version, **fields)
        await self._publish(signed)
        return signed.version
