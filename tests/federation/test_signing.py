"""Ed25519 signing keys: signatures, key ids and PEM files."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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


def test_signature_is_rfc_8032_ed25519() -> None:
    # RFC 8032, section 7.1, TEST 2: a one-byte message.
    key = SigningKey(
        Ed25519PrivateKey.from_private_bytes(
            bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
        )
    )
    assert key.public_raw.hex() == (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
    )
    signature = bytes.fromhex(
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
    )
    assert key.sign(b"\x72") == signature
    verify_signature(key.public_raw, signature, b"\x72")


@pytest.mark.parametrize("seed", range(1, 9))
def test_signatures_agree_with_cryptography_both_ways(seed: int) -> None:
    # Signing and verifying go through libsodium, keys through `cryptography`: a node
    # whose peers sign or verify with either must agree with them on every signature.
    key = key_from_seed(seed)
    message = MESSAGE * seed
    ours = key.sign(message)
    assert ours == key.private.sign(message)
    Ed25519PublicKey.from_public_bytes(key.public_raw).verify(ours, message)
    verify_signature(key.public_raw, key.private.sign(message), message)


def test_a_small_order_public_key_verifies_nothing() -> None:
    # The identity point as a public key, and a signature whose R is the identity and S
    # is zero: the verification equation holds for every message. OpenSSL (through
    # `cryptography`) accepts it; a node must not.
    identity = bytes([1]) + bytes(31)
    forged = identity + bytes(32)
    for message in (MESSAGE, b"", b"any other message"):
        assert refused_signature(identity, forged, message).code == "bad_signature"


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
