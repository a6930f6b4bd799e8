"""Key lifecycle of a running node: rotate the signing key and the TLS certificate
through the authority, renew the certificate before it expires, and (at the
authority) rotate the federation key. All online, with no downtime.

- Signing key: the node makes a new Ed25519 key and proves it holds it; the
  authority publishes it in the roster and closes the old key's window `overlap`
  seconds later. The node signs with the new key from the moment it holds that
  roster. Envelopes signed before keep verifying: their key stays in the roster
  with its window.
- TLS certificate: the node makes a new key and CSR; the authority issues the
  certificate and publishes its fingerprint as current, the replaced one still
  accepted for `overlap` seconds, so connections opened with either work while the
  roster spreads. The node then loads the new certificate into its server and
  client contexts (new handshakes use it; open ones go on), and opens new streams
  to its peers, the old ones closing once their batches are answered.
- Federation key (authority only): see `Authority.rotate_federation_key`; nodes
  that were offline fetch the chain of versions that announced each new key.

Files are replaced so that a crash never leaves a key without its certificate:
both are written beside the current ones (`*.new`), the key is moved in, then the
certificate; `recover_interrupted` finishes or discards an interrupted switch at
start-up.

`KeyManager` owns one background task, the renewal check.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.hazmat.primitives import serialization

from federation import codec
from federation.errors import ConfigError, KakehashiError, ProtocolError, TrustError
from federation.roster import key_proof_message
from federation.signing import SigningKey, public_key_id

from . import tls
from .config import Home
from .tasks import cancel_all

if TYPE_CHECKING:
    from .node import Node

__all__ = ["KeyManager", "KeySettings", "recover_interrupted"]

log = structlog.get_logger("kakehashi.keys")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySettings:
    """When certificates are renewed and how long replaced keys stay valid."""

    renew_before_days: int = 30
    """Renew the TLS certificate when it has this many days left or fewer."""
    check_interval: float = 6 * 3600.0
    """Seconds between renewal checks (the first runs at start)."""
    tls_overlap: int = 24 * 3600
    """Seconds a replaced certificate stays accepted (authority setting)."""
    signing_overlap: int = 7 * 24 * 3600
    """Seconds a replaced signing key may still sign (authority setting)."""


def _new(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def recover_interrupted(home: Home) -> None:
    """Finish or discard a certificate switch a crash interrupted (before start)."""
    key_new, cert_new = _new(home.tls_key), _new(home.tls_cert)
    if not key_new.exists() and not cert_new.exists():
        return
    if key_new.exists():
        # The key was not moved in yet: the old pair is intact; drop the new one.
        key_new.unlink()
        cert_new.unlink(missing_ok=True)
        log.warning("certificate_switch_discarded", home=str(home.root))
        return
    key = tls.load_private_key_pem(home.tls_key.read_bytes())
    cert = tls.load_certificate_pem(cert_new.read_bytes())
    if _public_der(cert.public_key()) == _public_der(key.public_key()):
        os.replace(cert_new, home.tls_cert)
        log.warning("certificate_switch_completed", home=str(home.root))
    else:
        cert_new.unlink()


class KeyManager:
    """Rotations for one node, and the renewal check."""

    def __init__(
        self,
        node: Node,
        *,
        contexts: tuple[ssl.SSLContext, ...],
        settings: KeySettings,
        clock: Callable[[], float],
    ) -> None:
        self._node = node
        self._contexts = contexts
        self.settings = settings
        self._clock = clock
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._renewals(), name="certificate-renewal")

    async def stop(self) -> None:
        await cancel_all([self._task])
        self._task = None

    @property
    def _home(self) -> Home:
        return self._node.home

    def days_left(self) -> int:
        certificate = tls.load_certificate_pem(self._home.tls_cert.read_bytes())
        return tls.days_left(certificate, datetime.fromtimestamp(self._clock(), UTC))

    async def _renewals(self) -> None:
        while True:
            try:
                left = self.days_left()
                if left <= self.settings.renew_before_days:
                    log.info("certificate_renewal_due", days_left=left)
                    await self.rotate_tls()
            except KakehashiError as exc:
                log.warning("certificate_renewal_failed", code=exc.code, error=str(exc))
            except Exception:
                log.exception("certificate_renewal_failed")
            await asyncio.sleep(self.settings.check_interval)

    # rotations -----------------------------------------------------------------

    async def _to_authority(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        roster = self._node.roster
        authority = roster.member(roster.authority)
        if authority is None:
            raise TrustError("the roster names no authority", code="no_authority")
        response = await self._node.client.request(authority, "POST", path, codec.encode(body))
        answer = codec.decode_map(response.body)
        await self._node.roster_hint(response.roster_version, authority)
        return answer

    async def _wait_for(self, check: Callable[[], bool], what: str) -> None:
        """Until our roster shows the change (fetched at once; checked for 30 s)."""
        for _ in range(300):
            if check():
                return
            await asyncio.sleep(0.1)
        raise TrustError(f"the roster did not show {what} within 30 s", code="rotation_pending")

    async def rotate_signing(self) -> dict[str, Any]:
        """A new signing key, published through the authority; returns a summary."""
        async with self._lock:
            node, roster = self._node, self._node.roster
            new = SigningKey.generate()
            proof = new.sign(key_proof_message(roster.federation_id, node.node_id, new.public_raw))
            if node.authority is not None:
                await node.authority.add_signing_key(
                    node.node_id, new.public_raw, proof, overlap=self.settings.signing_overlap
                )
            else:
                await self._to_authority("/keys/signing", {"key": new.public_raw, "proof": proof})

            def published() -> bool:
                me = node.roster.member(node.node_id)
                return me is not None and me.signing_key(new.key_id) is not None

            await self._wait_for(published, "the new signing key")
            tls.write_secret_file(self._home.signing_key, new.to_pem())
            previous = node.rooms.signing_key.key_id
            await node.rooms.set_signing_key(new)
            await node.audit.signing_key_rotated(
                old_key_id=previous, new_key_id=new.key_id, reason="keys rotate --signing"
            )
            node.audit.use_signing_key(new)
            log.info("signing_key_switched", key_id=new.key_id, previous=previous)
            return {
                "key_id": new.key_id,
                "previous": previous,
                "roster_version": node.roster.version,
            }

    async def rotate_tls(self) -> dict[str, Any]:
        """A new TLS key and certificate, issued by the authority; returns a summary."""
        async with self._lock:
            node = self._node
            key = tls.generate_tls_key()
            csr_pem = tls.csr_to_pem(tls.build_csr(key, node.node_id))
            if node.authority is not None:
                cert_pem = await node.authority.renew_certificate(
                    node.node_id, csr_pem, overlap=self.settings.tls_overlap
                )
            else:
                answer = await self._to_authority("/keys/certificate", {"csr": csr_pem})
                cert_pem = answer.get("certificate", b"")
                if not isinstance(cert_pem, bytes):
                    raise ProtocolError("the authority sent no certificate", code="bad_reply")
            cert = tls.load_certificate_pem(cert_pem)
            ca = tls.load_certificate_pem(self._home.ca_cert.read_bytes())
            tls.verify_issued_by(cert, ca, datetime.fromtimestamp(self._clock(), UTC))
            if tls.node_id_of(cert) != node.node_id or _public_der(cert.public_key()) != (
                _public_der(key.public_key())
            ):
                raise TrustError(
                    "the authority's certificate is not for this node's new key",
                    code="bad_certificate",
                )
            fingerprint = tls.fingerprint(cert)

            def published() -> bool:
                me = node.roster.member(node.node_id)
                return me is not None and me.tls_fingerprint == fingerprint

            await self._wait_for(published, "the new certificate")
            previous = tls.fingerprint(tls.load_certificate_pem(self._home.tls_cert.read_bytes()))
            self._install(key, cert_pem)
            node.certificate_changed()
            await node.audit.append(
                "certificate_switched",
                fingerprint=fingerprint.hex()[:16],
                previous_fingerprint=previous.hex()[:16],
                expires=cert.not_valid_after_utc.isoformat(),
            )
            log.info(
                "certificate_switched",
                fingerprint=fingerprint.hex()[:16],
                expires=cert.not_valid_after_utc.isoformat(),
            )
            return {
                "fingerprint": fingerprint.hex(),
                "expires": cert.not_valid_after_utc.isoformat(),
                "roster_version": node.roster.version,
            }

    def _install(self, key: Any, cert_pem: bytes) -> None:
        """Write key and certificate (crash-safe order) and load them for new handshakes."""
        home = self._home
        tls.write_private_key(_new(home.tls_key), key)
        tls.write_public_file(_new(home.tls_cert), cert_pem)
        os.replace(_new(home.tls_key), home.tls_key)
        os.replace(_new(home.tls_cert), home.tls_cert)
        for context in self._contexts:
            try:
                context.load_cert_chain(certfile=home.tls_cert, keyfile=home.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"cannot load the new certificate: {exc}", code="bad_tls_material"
                ) from exc

    async def rotate_federation(self) -> dict[str, Any]:
        """Authority only: a new federation key, announced in a roster signed by the old."""
        node = self._node
        if node.authority is None:
            raise TrustError("only the authority holds the federation key", code="not_authority")
        async with self._lock:
            version = await node.authority.rotate_federation_key(self._home.federation_key)
            return {"roster_version": version, "key_id": public_key_id(node.roster.federation_key)}
