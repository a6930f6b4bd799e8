"""Ed25519 signing keys: signatures, key ids and PEM files."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.errors import ConfigError, TrustError
from federation.signing import SigningKey, public_key_id, verify_signature

MESSAGE = "津市から三重県へ: 住民異動届 #42".encode()


def key_from_seed(seed: int) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


def refused_signature(public: bytes, signature: bytes, message: bytes) -> TrustError:
    with pytest.raises(TrustError) as info:
        verify_signature(public, signature, message)
    return info.value


def test_signature_by_a_key_verifies_with_its_public_key() -> None:
    key = key_from_seed(1)
    signature = key.sign(MESSAGE)
    assert len(signature) == 64
    verify_signature(key.public_raw, signature, MESSAGE)  # does not raise


def test_generated_keys_are_distinct_and_sign() -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    assert first.public_raw != second.public_raw
    verify_signature(first.public_raw, first.sign(MESSAGE), MESSAGE)


def test_tampered_message_is_refused_as_bad_signature() -> None:
    key = key_from_seed(1)
    signature = key.sign(MESSAGE)
    tampered = MESSAGE[:-1] + bytes([MESSAGE[-1] ^ 1])
    assert refused_signature(key.public_raw, signature, tampered).code == "bad_signature"


def test_tampered_signature_is_refused_as_bad_signature() -> None:
    key = key_from_seed(1)
    signature = bytearray(key.sign(MESSAGE))
    signature[10] ^= 0x40
    assert refused_signature(key.public_raw, bytes(signature), MESSAGE).code == "bad_signature"


def test_signature_checked_with_another_key_is_refused_as_bad_signature() -> None:
    signature = key_from_seed(1).sign(MESSAGE)
    other = key_from_seed(2).public_raw
    assert refused_signature(other, signature, MESSAGE).code == "bad_signature"


@pytest.mark.parametrize("length", [0, 32, 63])
def test_truncated_signature_is_refused_as_bad_signature(length: int) -> None:
    key = key_from_seed(1)
    signature = key.sign(MESSAGE)[:length]
    assert refused_signature(key.public_raw, signature, MESSAGE).code == "bad_signature"


def test_overlong_signature_is_refused_as_bad_signature() -> None:
    key = key_from_seed(1)
    signature = key.sign(MESSAGE) + b"\x00"
    assert refused_signature(key.public_raw, signature, MESSAGE).code == "bad_signature"


@pytest.mark.parametrize("public", [b"", b"\x01" * 31, b"\x01" * 33], ids=len)
def test_public_key_of_wrong_length_is_refused_as_bad_signature(public: bytes) -> None:
    signature = key_from_seed(1).sign(MESSAGE)
    assert refused_signature(public, signature, MESSAGE).code == "bad_signature"


def test_pem_round_trip_keeps_the_same_key() -> None:
    key = key_from_seed(3)
    pem = key.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = SigningKey.from_pem(pem)
    assert loaded.public_raw == key.public_raw
    assert loaded.key_id == key.key_id
    # Ed25519 is deterministic: the same key signs the same message identically.
    assert loaded.sign(MESSAGE) == key.sign(MESSAGE)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "text", "broken-pem"],
)
def test_from_pem_on_garbage_raises_config_error(data: bytes) -> None:
    with pytest.raises(ConfigError) as info:
        SigningKey.from_pem(data)
    assert info.value.code == "bad_key"


def test_from_pem_on_an_ec_key_raises_config_error() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError) as info:
        SigningKey.from_pem(pem)
    assert info.value.code == "bad_key"


def test_from_pem_on_an_rsa_key_raises_config_error() -> None:
    pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError):
        SigningKey.from_pem(pem)


def test_from_pem_on_an_encrypted_key_raises_config_error() -> None:
    pem = key_from_seed(4).private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError):
        SigningKey.from_pem(pem)


def test_public_raw_is_the_32_byte_raw_public_key() -> None:
    key = key_from_seed(5)
    expected = key.private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert key.public_raw == expected
    assert len(key.public_raw) == 32


def test_key_id_of_a_signing_key_is_sha256_prefix_of_its_public_key() -> None:
    key = key_from_seed(6)
    expected = hashlib.sha256(key.public_raw).hexdigest()[:16]
    assert key.key_id == expected
    assert public_key_id(key.public_raw) == expected


def test_public_key_id_refuses_a_key_of_the_wrong_length() -> None:
    with pytest.raises(TrustError) as info:
        public_key_id(b"\x00" * 31)
    assert info.value.code == "bad_key"
