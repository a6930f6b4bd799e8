"""Tests for gateway.tls: certificate issuance, trust checks, files and real TLS 1.3 handshakes.

Pure certificate tests use a fixed clock. The handshake tests need certificates valid at the
real current time because OpenSSL checks validity against the system clock.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError, TrustError
from gateway import tls

NOW = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)
FED = "fed-tokyo"

# A federation CA: its private key and self-signed certificate.
Ca = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


@pytest.fixture(scope="module")
def ca() -> Ca:
    return tls.create_ca(FED, "Tokyo municipalities", NOW)


def _issue(
    ca: Ca,
    node_id: str,
    now: datetime = NOW,
    days: int = 365,
) -> Ca:
    key = tls.generate_tls_key()
    cert = tls.issue_node_certificate(ca[0], ca[1], tls.build_csr(key, node_id), node_id, now, days)
    return key, cert


# --------------------------------------------------------------------------- CA and issuance


def test_ca_is_self_signed_and_limited_to_signing_leaf_certificates(
    ca: Ca,
) -> None:
    _, cert = ca
    cert.verify_directly_issued_by(cert)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert (cn, org) == (f"Kakehashi federation CA {FED}", "Tokyo municipalities")
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)


def test_issued_certificate_chains_to_ca(
    ca: Ca,
) -> None:
    _, cert = _issue(ca, "node-a")
    tls.verify_issued_by(cert, ca[1], NOW)
    ski = ca[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_node_certificate_names_the_node_and_is_a_tls_leaf(
    ca: Ca,
) -> None:
    _, cert = _issue(ca, "node-a")
    assert tls.node_id_of(cert) == "node-a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["kakehashi://node/node-a"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)


def test_serial_numbers_are_random(
    ca: Ca,
) -> None:
    assert _issue(ca, "node-a")[1].serial_number != _issue(ca, "node-a")[1].serial_number


def test_csr_requested_extensions_are_ignored(
    ca: Ca,
) -> None:
    key = tls.generate_tls_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert = tls.issue_node_certificate(ca[0], ca[1], greedy, "node-a", NOW)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a"]


def test_certificate_from_other_ca_is_untrusted(
    ca: Ca,
) -> None:
    # Same federation id and name, hence an identical subject: only the signature differs.
    impostor = tls.create_ca(FED, "Tokyo municipalities", NOW)
    assert impostor[1].subject == ca[1].subject
    _, cert = _issue(impostor, "node-a")
    with pytest.raises(TrustError) as info:
        tls.verify_issued_by(cert, ca[1], NOW)
    assert info.value.code == "untrusted_certificate"


def test_csr_for_another_node_id_is_refused(
    ca: Ca,
) -> None:
    csr = tls.build_csr(tls.generate_tls_key(), "node-b")
    with pytest.raises(TrustError) as info:
        tls.issue_node_certificate(ca[0], ca[1], csr, "node-a", NOW)
    assert info.value.code == "bad_csr"


def test_csr_with_forged_subject_is_refused(
    ca: Ca,
) -> None:
    der = tls.build_csr(tls.generate_tls_key(), "node-a").public_bytes(serialization.Encoding.DER)
    forged = x509.load_der_x509_csr(der.replace(b"node-a", b"node-b"))
    assert forged.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-b"
    with pytest.raises(TrustError) as info:
        tls.issue_node_certificate(ca[0], ca[1], forged, "node-b", NOW)
    assert info.value.code == "bad_csr"


def test_csr_with_non_p256_key_is_refused(
    ca: Ca,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(TrustError) as info:
        tls.issue_node_certificate(ca[0], ca[1], tls.build_csr(key, "node-a"), "node-a", NOW)
    assert info.value.code == "bad_csr"


def test_issuing_with_a_key_that_is_not_the_cas_is_refused(
    ca: Ca,
) -> None:
    csr = tls.build_csr(tls.generate_tls_key(), "node-a")
    with pytest.raises(ConfigError) as info:
        tls.issue_node_certificate(tls.generate_tls_key(), ca[1], csr, "node-a", NOW)
    assert info.value.code == "ca_key_mismatch"


# --------------------------------------------------------------------------- validity


def test_expired_certificate_is_reported(
    ca: Ca,
) -> None:
    _, cert = _issue(ca, "node-a", days=30)
    tls.verify_issued_by(cert, ca[1], NOW + timedelta(days=30))
    with pytest.raises(TrustError) as info:
        tls.verify_issued_by(cert, ca[1], NOW + timedelta(days=30, seconds=1))
    assert info.value.code == "certificate_expired"


def test_expired_ca_makes_its_certificates_expired(
    ca: Ca,
) -> None:
    short_ca = tls.create_ca(FED, "Tokyo municipalities", NOW, days=10)
    _, cert = _issue(short_ca, "node-a", days=365)
    with pytest.raises(TrustError) as info:
        tls.verify_issued_by(cert, short_ca[1], NOW + timedelta(days=11))
    assert info.value.code == "certificate_expired"


def test_certificate_tolerates_clock_skew_but_not_the_future(
    ca: Ca,
) -> None:
    _, cert = _issue(ca, "node-a")
    tls.verify_issued_by(cert, ca[1], NOW - timedelta(minutes=4))
    with pytest.raises(TrustError) as info:
        tls.verify_issued_by(cert, ca[1], NOW - timedelta(minutes=6))
    assert info.value.code == "untrusted_certificate"


def test_days_left_counts_whole_days_and_goes_negative(
    ca: Ca,
) -> None:
    _, cert = _issue(ca, "node-a", days=30)
    assert tls.days_left(cert, NOW) == 30
    assert tls.days_left(cert, NOW + timedelta(hours=1)) == 29
    assert tls.days_left(cert, NOW + timedelta(days=31)) == -1


def test_naive_now_is_rejected(ca: Ca) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        tls.verify_issued_by(ca[1], ca[1], NOW.replace(tzinfo=None))


# --------------------------------------------------------------------------- encodings


def test_fingerprint_is_sha256_of_der(
    ca: Ca,
) -> None:
    der = ca[1].public_bytes(serialization.Encoding.DER)
    assert tls.fingerprint(ca[1]) == hashlib.sha256(der).digest()
    assert len(tls.fingerprint(ca[1])) == 32
    assert tls.fingerprint_der(der) == tls.fingerprint(ca[1])
    assert tls.fingerprint(_issue(ca, "node-a")[1]) != tls.fingerprint(ca[1])


def test_pem_round_trips(ca: Ca) -> None:
    key, cert = _issue(ca, "node-a")
    assert tls.load_certificate_pem(tls.cert_to_pem(cert)) == cert
    loaded = tls.load_private_key_pem(tls.key_to_pem(key))
    assert loaded.private_numbers() == key.private_numbers()
    assert b"BEGIN PRIVATE KEY" in tls.key_to_pem(key)  # PKCS#8, unencrypted
    csr = tls.build_csr(key, "node-a")
    assert tls.load_csr_pem(tls.csr_to_pem(csr)) == csr


@pytest.mark.parametrize(
    ("loader", "code"),
    [
        (tls.load_private_key_pem, "bad_key"),
        (tls.load_certificate_pem, "bad_certificate"),
    ],
)
@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_garbage_pem_raises_config_error(
    loader: Callable[[bytes], object], code: str, data: bytes
) -> None:
    with pytest.raises(ConfigError) as info:
        loader(data)
    assert info.value.code == code


def test_garbage_csr_raises_trust_error() -> None:
    with pytest.raises(TrustError) as info:
        tls.load_csr_pem(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    assert info.value.code == "bad_csr"


def test_non_p256_private_key_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError) as info:
        tls.load_private_key_pem(pem)
    assert info.value.code == "bad_key"


def test_certificate_without_cn_has_no_node_id(
    ca: Ca,
) -> None:
    key = tls.generate_tls_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(TrustError) as info:
        tls.node_id_of(cert)
    assert info.value.code == "bad_certificate"


# --------------------------------------------------------------------------- files


def test_private_key_file_is_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[int, int]] = []
    real_open = os.open

    def spy_open(
        path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        if flags & os.O_CREAT:
            created.append((flags, mode))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spy_open)
    old_umask = os.umask(0)  # a permissive umask must not widen the key file
    try:
        key = tls.generate_tls_key()
        target = tmp_path / "node.key"
        target.write_bytes(b"old")
        target.chmod(0o644)
        tls.write_private_key(target, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    # The restrictive mode must be in place from creation, not applied afterwards.
    assert created
    assert all(mode == 0o600 and flags & os.O_EXCL for flags, mode in created)
    assert tls.load_private_key_pem(target.read_bytes()).private_numbers() == key.private_numbers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_public_file_is_mode_0644_and_replaced_whole(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # a strict umask must not hide certificates from readers
    try:
        target = tmp_path / "ca.pem"
        target.write_bytes(b"previous contents that are longer than the new ones")
        tls.write_public_file(target, b"new")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem"]


def test_write_failure_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tls.write_public_file(tmp_path / "missing-dir" / "ca.pem", b"x")
    assert info.value.code == "write_failed"


# --------------------------------------------------------------------------- real handshakes


@dataclass(frozen=True)
class Identity:
    """A node certificate and key on disk, plus the certificate's DER."""

    cert: Path
    key: Path
    der: bytes


@dataclass(frozen=True)
class Pki:
    """Files for the handshake tests, all valid at the real current time."""

    ca: Path
    server: Identity
    client: Identity
    foreign: Identity  # issued by a different CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # OpenSSL checks validity against the system clock, so issue "now" for real.
    now = datetime.now(UTC)
    root = tmp_path_factory.mktemp("pki")
    ca = tls.create_ca(FED, "Tokyo municipalities", now)
    other_ca = tls.create_ca("fed-other", "Elsewhere", now)
    tls.write_public_file(root / "ca.pem", tls.cert_to_pem(ca[1]))

    def identity(issuer: Ca, name: str) -> Identity:
        key, cert = _issue(issuer, name, now=now)
        tls.write_private_key(root / f"{name}.key", key)
        tls.write_public_file(root / f"{name}.pem", tls.cert_to_pem(cert))
        der = cert.public_bytes(serialization.Encoding.DER)
        return Identity(root / f"{name}.pem", root / f"{name}.key", der)

    return Pki(
        ca=root / "ca.pem",
        server=identity(ca, "node-server"),
        client=identity(ca, "node-client"),
        foreign=identity(other_ca, "node-foreign"),
    )


@dataclass
class Side:
    """What one end of a handshake observed."""

    error: BaseException | None = None
    peer_der: bytes | None = None
    version: str | None = None
    received: bytes = b""


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Side, Side]:
    """Run a real TLS handshake over a loopback socket pair, one thread per side.

    The server sends b"ok" after its handshake; the client reads it, which is where TLS 1.3
    clients learn that the server rejected their certificate.
    """
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)
    server, client = Side(), Side()

    def run_server() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as s:
                server.peer_der = tls.peer_certificate_der(s)
                server.version = s.version()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            server.error = exc
            server_sock.close()

    thread = threading.Thread(target=run_server)
    thread.start()
    try:
        # A bare IP that matches nothing in the certificate: host names are never checked.
        with client_ctx.wrap_socket(client_sock, server_hostname="203.0.113.7") as c:
            client.peer_der = tls.peer_certificate_der(c)
            client.version = c.version()
            client.received = c.recv(2)
    except (ssl.SSLError, OSError) as exc:
        client.error = exc
        client_sock.close()
    finally:
        thread.join(timeout=10)
    assert not thread.is_alive()
    return server, client


def test_mutual_tls_handshake_exposes_both_peer_certificates(pki: Pki) -> None:
    server, client = _handshake(
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, require_client_cert=True),
        tls.client_context(pki.client.cert, pki.client.key, pki.ca),
    )
    assert server.error is None
    assert client.error is None
    assert client.received == b"ok"
    assert server.version == client.version == "TLSv1.3"
    assert server.peer_der is not None
    assert client.peer_der is not None
    assert tls.fingerprint_der(server.peer_der) == tls.fingerprint_der(pki.client.der)
    assert tls.fingerprint_der(client.peer_der) == tls.fingerprint_der(pki.server.der)


def test_server_context_refuses_tls12_client(pki: Pki) -> None:
    tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.check_hostname = False
    tls12.load_verify_locations(cafile=pki.ca)
    tls12.load_cert_chain(pki.client.cert, pki.client.key)
    server, client = _handshake(
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, require_client_cert=True),
        tls12,
    )
    assert isinstance(server.error, ssl.SSLError)
    assert isinstance(client.error, ssl.SSLError)


def test_server_requiring_client_cert_refuses_client_without_one(pki: Pki) -> None:
    server, client = _handshake(
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, require_client_cert=True),
        tls.client_context(None, None, pki.ca),
    )
    assert isinstance(server.error, ssl.SSLError)
    assert client.received != b"ok"


def test_optional_client_cert_server_admits_client_without_one(pki: Pki) -> None:
    server, client = _handshake(
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, require_client_cert=False),
        tls.client_context(None, None, pki.ca),
    )
    assert server.error is None
    assert client.error is None
    assert client.received == b"ok"
    assert server.peer_der is None


def test_optional_client_cert_server_still_rejects_foreign_certificate(pki: Pki) -> None:
    server, client = _handshake(
        tls.server_context(pki.server.cert, pki.server.key, pki.ca, require_client_cert=False),
        tls.client_context(pki.foreign.cert, pki.foreign.key, pki.ca),
    )
    assert isinstance(server.error, ssl.SSLError)
    assert client.received != b"ok"


def test_client_with_ca_rejects_server_from_other_ca(pki: Pki) -> None:
    _, client = _handshake(
        tls.server_context(pki.foreign.cert, pki.foreign.key, pki.ca, require_client_cert=False),
        tls.client_context(None, None, pki.ca),
    )
    assert isinstance(client.error, ssl.SSLCertVerificationError)


def test_client_without_ca_accepts_any_server_so_caller_can_pin(pki: Pki) -> None:
    _, client = _handshake(
        tls.server_context(pki.foreign.cert, pki.foreign.key, pki.ca, require_client_cert=False),
        tls.client_context(None, None, None),
    )
    assert client.error is None
    assert client.received == b"ok"
    assert client.peer_der == pki.foreign.der


def test_client_context_is_tls13_only_without_hostname_checks(pki: Pki) -> None:
    for ctx in (tls.client_context(None, None, pki.ca), tls.client_context(None, None, None)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert not ctx.check_hostname
    assert tls.client_context(None, None, pki.ca).verify_mode == ssl.CERT_REQUIRED
    assert tls.client_context(None, None, None).verify_mode == ssl.CERT_NONE


def test_peer_certificate_der_without_tls_is_none() -> None:
    assert tls.peer_certificate_der(None) is None


def test_unusable_tls_files_raise_config_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        # Certificate and key from different identities do not match.
        tls.server_context(pki.server.cert, pki.client.key, pki.ca, require_client_cert=True)
    assert info.value.code == "bad_tls_material"
    with pytest.raises(ConfigError) as info:
        tls.client_context(None, None, tmp_path / "missing.pem")
    assert info.value.code == "bad_tls_material"
    with pytest.raises(ConfigError) as info:
        tls.client_context(pki.client.cert, None, pki.ca)
    assert info.value.code == "bad_tls_material"
