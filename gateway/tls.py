"""Certificates, keys and TLS contexts for the federation's mutual-TLS transport.

What this module owns:

* The federation CA: an ECDSA P-256 key and a self-signed certificate that may sign node
  certificates only (``path_length=0``).
* Node identity material: P-256 keys, CSRs carrying the node id as CN, and the node
  certificates the CA issues from them.
* PEM encoding/decoding, SHA-256 fingerprints, and the stdlib ``ssl`` contexts used by the
  gateway's server and client sides.
* The two atomic file writers (private key 0600, public material 0644).

Invariants:

* Every key is ECDSA on P-256 and everything is signed with SHA-256; keys and CSRs using
  anything else are refused rather than carried along.
* A node certificate's subject CN, its SAN ``DNSName`` and its SAN URI
  ``kakehashi://node/<node_id>`` all name the same node id, and the CA only ever copies the
  public key and CN from a CSR: requested extensions are ignored, so a node cannot ask for
  CA powers or extra names.
* TLS is 1.3 only, in both directions. Peers are identified by certificate fingerprint
  (published in the signed roster), never by host name.
* No function reads the clock: every time-dependent operation takes an explicit,
  timezone-aware ``now``. Naive datetimes are a caller bug and raise ``ValueError``.

Strategy: certificates are built directly with ``cryptography``'s x509 builders (no
OpenSSL config files, no external tools); the single federation CA is the only trust anchor
loaded into the ``ssl`` contexts, so OpenSSL does chain and validity checks during the
handshake, and callers bind the resulting peer to a node by comparing
``fingerprint_der(peer_certificate_der(...))`` with the roster. ``verify_issued_by`` repeats
the chain/validity check in Python for certificates received outside a handshake.

Errors: failures caused by data or configuration surface as ``ConfigError`` (our own
material is unusable) or ``TrustError`` (a peer's material must not be trusted), each with a
stable ``code``. Exceptions from ``cryptography``, ``ssl`` and the OS are translated with
``raise ... from exc`` so callers only need to handle the ``federation.errors`` hierarchy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import ssl
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError, TrustError

__all__ = [
    "CLOCK_SKEW",
    "build_csr",
    "cert_to_pem",
    "client_context",
    "create_ca",
    "csr_to_pem",
    "days_left",
    "fingerprint",
    "fingerprint_der",
    "generate_tls_key",
    "issue_node_certificate",
    "key_to_pem",
    "load_certificate_pem",
    "load_csr_pem",
    "load_private_key_pem",
    "node_id_of",
    "peer_certificate_der",
    "server_context",
    "verify_issued_by",
    "write_private_key",
    "write_public_file",
    "write_secret_file",
]

# Backdating not_before lets a peer whose clock runs a few minutes behind the issuer accept a
# certificate that was issued "just now".
CLOCK_SKEW = timedelta(minutes=5)

_CURVE_NAME = ec.SECP256R1.name
_NODE_URI_PREFIX = "kakehashi://node/"


def _aware(now: datetime) -> datetime:
    # cryptography silently treats naive datetimes as UTC while comparisons against its
    # *_utc properties raise TypeError; refusing them early avoids both surprises.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return now


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and (
        key.curve.name == _CURVE_NAME
    )


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- keys


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """Generate a fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM (file permissions protect it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM private key; only P-256 keys are accepted.

    Raises ``ConfigError`` (code ``bad_key``) for garbage, encrypted keys or other key types.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot parse private key: {exc}", code="bad_key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _is_p256(key):
        raise ConfigError("private key is not an ECDSA P-256 key", code="bad_key")
    return key


# --------------------------------------------------------------------------- CA and CSRs


def create_ca(
    federation_id: str, name: str, now: datetime, days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create the federation CA key and its self-signed certificate.

    The CA may sign end-entity certificates only (``path_length=0``). Its validity starts
    ``CLOCK_SKEW`` before ``now`` so that certificates issued immediately (which are
    backdated the same way) never predate their issuer.

    Raises ``ConfigError`` (code ``bad_ca_name``) if the id or name cannot be encoded in a
    certificate name (e.g. empty or longer than 64 characters).
    """
    now = _aware(now)
    key = generate_tls_key()
    try:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, f"Kakehashi federation CA {federation_id}"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            ]
        )
    except ValueError as exc:
        raise ConfigError(f"invalid CA name: {exc}", code="bad_ca_name") from exc
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def build_csr(key: ec.EllipticCurvePrivateKey, node_id: str) -> x509.CertificateSigningRequest:
    """Build a CSR with subject CN=node_id, signed by ``key``.

    Raises ``ConfigError`` (code ``bad_node_id``) if the node id cannot be a CN.
    """
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    except ValueError as exc:
        raise ConfigError(f"invalid node id {node_id!r}: {exc}", code="bad_node_id") from exc
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def _single_cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    # Several CNs would make "the" node id ambiguous, so they count as no CN at all.
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value or None


def issue_node_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    node_id: str,
    now: datetime,
    days: int = 365,
) -> x509.Certificate:
    """Issue a node certificate for ``node_id`` from a CSR the node signed itself.

    Only the CSR's public key is used; the subject, SANs and extensions are set here. The
    certificate is usable for both TLS server and client authentication, valid from
    ``now - CLOCK_SKEW`` to ``now + days``.

    Raises ``TrustError`` (code ``bad_csr``) if the CSR signature is invalid, its CN is not
    ``node_id``, its key is not P-256 or the node id cannot be encoded; ``ConfigError``
    (code ``ca_key_mismatch``) if ``ca_key`` does not belong to ``ca_cert``.
    """
    now = _aware(now)
    ca_public = ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey) or _spki_der(ca_public) != _spki_der(
        ca_key.public_key()
    ):
        raise ConfigError(
            "CA private key does not match the CA certificate", code="ca_key_mismatch"
        )
    try:
        node_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TrustError(f"CSR is unusable: {exc}", code="bad_csr") from exc
    if not signature_ok:
        raise TrustError("CSR signature is invalid", code="bad_csr")
    if not isinstance(node_key, ec.EllipticCurvePublicKey) or not _is_p256(node_key):
        raise TrustError("CSR key is not an ECDSA P-256 key", code="bad_csr")
    cn = _single_cn(csr.subject)
    if cn != node_id:
        raise TrustError(f"CSR is for {cn!r}, not for node {node_id!r}", code="bad_csr")

    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public)

    try:
        san = x509.SubjectAlternativeName(
            [
                x509.DNSName(node_id),
                x509.UniformResourceIdentifier(f"{_NODE_URI_PREFIX}{node_id}"),
            ]
        )
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    except ValueError as exc:
        # e.g. non-ASCII node ids, which DNSName/URI refuse.
        raise TrustError(f"node id {node_id!r} cannot be certified: {exc}", code="bad_csr") from exc

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(node_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(node_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------- PEM


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """Encode a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificate_pem(data: bytes) -> x509.Certificate:
    """Parse the first PEM certificate in ``data``.

    Raises ``ConfigError`` (code ``bad_certificate``) on garbage.
    """
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"cannot parse certificate: {exc}", code="bad_certificate") from exc


def csr_to_pem(csr: x509.CertificateSigningRequest) -> bytes:
    """Encode a CSR as PEM."""
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr_pem(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR received from a joining node.

    Raises ``TrustError`` (code ``bad_csr``) on garbage: CSRs come from peers, not from our
    own configuration.
    """
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise TrustError(f"cannot parse CSR: {exc}", code="bad_csr") from exc


# --------------------------------------------------------------------------- inspection


def fingerprint_der(der: bytes) -> bytes:
    """SHA-256 of DER-encoded certificate bytes (32 bytes)."""
    return hashlib.sha256(der).digest()


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding (32 bytes), as published in the roster."""
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def node_id_of(cert: x509.Certificate) -> str:
    """Return the node id (the single subject CN) of a certificate.

    Raises ``TrustError`` (code ``bad_certificate``) if there is no single, non-empty CN.
    """
    cn = _single_cn(cert.subject)
    if cn is None:
        raise TrustError("certificate has no single common name", code="bad_certificate")
    return cn


def _check_window(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now > cert.not_valid_after_utc:
        raise TrustError(
            f"{what} expired at {cert.not_valid_after_utc.isoformat()}",
            code="certificate_expired",
        )
    if now < cert.not_valid_before_utc:
        # Not "expired": renewing would not help, the certificate (or our clock) is wrong.
        raise TrustError(
            f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}",
            code="untrusted_certificate",
        )


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, now: datetime) -> None:
    """Check that ``cert`` was signed by ``ca_cert`` and that both are valid at ``now``.

    Raises ``TrustError`` with code ``untrusted_certificate`` (wrong issuer, bad signature,
    not yet valid) or ``certificate_expired``.
    """
    now = _aware(now)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise TrustError(
            f"certificate is not issued by the federation CA: {exc!r}",
            code="untrusted_certificate",
        ) from exc
    _check_window(ca_cert, now, "federation CA certificate")
    _check_window(cert, now, "certificate")


def days_left(cert: x509.Certificate, now: datetime) -> int:
    """Whole days until ``cert`` expires, rounded down; negative once it has expired."""
    return (cert.not_valid_after_utc - _aware(now)) // timedelta(days=1)


# --------------------------------------------------------------------------- ssl contexts


def _tls13_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3


def server_context(
    cert_path: Path, key_path: Path, ca_path: Path, require_client_cert: bool
) -> ssl.SSLContext:
    """TLS 1.3-only server context presenting our node certificate.

    With ``require_client_cert`` the handshake fails without a CA-issued client certificate.
    Without it the mode is ``CERT_OPTIONAL``: a presented certificate is still verified
    against the CA, but clients without one get through; this serves the join endpoint, and
    every other route must refuse certificate-less clients at the HTTP layer.

    Raises ``ConfigError`` (code ``bad_tls_material``) if the files are missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    try:
        ctx.load_cert_chain(certfile=cert_path, keyfile=key_path)
        ctx.load_verify_locations(cafile=ca_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load server TLS material: {exc}", code="bad_tls_material"
        ) from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    cert_path: Path | None, key_path: Path | None, ca_path: Path | None
) -> ssl.SSLContext:
    """TLS 1.3-only client context; host names are never checked.

    Peers are identified by the certificate fingerprint published in the signed roster,
    not by host names, because endpoints change and may be bare IPs on LGWAN. Callers must
    therefore compare ``fingerprint_der(peer_certificate_der(...))`` with the roster.

    With ``ca_path`` the server certificate must chain to that CA (``CERT_REQUIRED``).

    With ``ca_path=None`` the server certificate is NOT verified at all (``CERT_NONE``).
    This exists solely for the first step of joining, before the node has the CA: the
    caller MUST pin the CA fingerprint carried in the invitation and check the server's
    chain against it itself. Never use it for anything else.

    ``cert_path`` and ``key_path`` (given together or not at all) make the client present
    its node certificate.

    Raises ``ConfigError`` (code ``bad_tls_material``) if files are missing or unusable, or
    only one of ``cert_path``/``key_path`` is given.
    """
    if (cert_path is None) != (key_path is None):
        raise ConfigError(
            "client certificate and key must be given together", code="bad_tls_material"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    # check_hostname must be cleared before verify_mode may drop to CERT_NONE.
    ctx.check_hostname = False
    try:
        if ca_path is not None:
            ctx.load_verify_locations(cafile=ca_path)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
        if cert_path is not None and key_path is not None:
            ctx.load_cert_chain(certfile=cert_path, keyfile=key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load client TLS material: {exc}", code="bad_tls_material"
        ) from exc
    return ctx


def peer_certificate_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    """DER bytes of the certificate the peer presented, or None (no TLS, or no cert)."""
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


# --------------------------------------------------------------------------- files


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        # The mode is applied at creation, so the bytes are never readable more widely than
        # intended, not even for the instant between create and chmod. O_EXCL also refuses
        # to follow a symlink planted at the temporary name.
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as exc:
        # Nothing of ours to clean up: the name may belong to someone else.
        raise ConfigError(f"cannot write {path}: {exc}", code="write_failed") from exc
    try:
        try:
            # umask may have narrowed the creation mode; pin it to exactly what we promise.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc}", code="write_failed") from exc
    # Persist the rename itself so a crash cannot resurrect the old file. Some filesystems
    # cannot fsync a directory; the new file is already in place, so that is not fatal.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Atomically write ``key`` as PEM with mode 0600 from the moment the file exists.

    Raises ``ConfigError`` (code ``write_failed``) on OS errors.
    """
    _write_atomically(path, key_to_pem(key), 0o600)


def write_secret_file(path: Path, data: bytes) -> None:
    """Atomically write secret bytes (e.g. a signing key's PEM) with mode 0600 from creation."""
    _write_atomically(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically write non-secret material (certificates, CSRs) with mode 0644.

    Raises ``ConfigError`` (code ``write_failed``) on OS errors.
    """
    _write_atomically(path, data, 0o644)
