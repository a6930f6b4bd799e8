"""Ed25519 signing keys: the identity of a node and of the federation authority.

Keys are handled as raw 32-byte public keys on the wire and in the roster, and
as PKCS#8 PEM private keys on disk (the gateway writes those with mode 0600).
Verification never raises anything but `TrustError`: a bad signature, a key of
the wrong length and a malformed key are all the same refusal to a caller.

Signing and verifying use libsodium (PyNaCl, from the same maintainers as
`cryptography`), which keys are still loaded and stored with. Measured on the
two-core development machine: a verification took 80-90 µs against 155-200 µs
through `cryptography`'s OpenSSL, a signature 26-37 µs against 47-57. A node
verifies one signature per batch it receives, and when messages arrive one at a
time that was a quarter of the receiving node's event loop. Ed25519 signatures
are deterministic, so both give the same bytes. libsodium is the stricter
verifier: it also refuses public keys and signature points of small order, which
no key made by `generate` has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import CryptoError

from .errors import ConfigError, TrustError
from .identity import key_id

__all__ = ["SigningKey", "public_key_id", "verify_signature"]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private Ed25519 key with its derived public key and key id."""

    private: Ed25519PrivateKey
    _public: bytes = field(init=False, repr=False, compare=False)
    _key_id: str = field(init=False, repr=False, compare=False)
    _secret: bytes = field(init=False, repr=False, compare=False)
    """libsodium's form of the private key (seed and public key, 64 bytes)."""

    def __post_init__(self) -> None:
        # Derived once: every envelope names its key id, so this is on the hot path.
        seed = self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public, secret = crypto_sign_seed_keypair(seed)
        object.__setattr__(self, "_public", public)
        object.__setattr__(self, "_key_id", key_id(public))
        object.__setattr__(self, "_secret", secret)

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load a PKCS#8 PEM private key; `ConfigError` if it is not an Ed25519 key."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                "signing key file is not a valid PEM private key", code="bad_key"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("signing key file does not hold an Ed25519 key", code="bad_key")
        return cls(key)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted (the file's mode protects it)."""
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_raw(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 of the raw public key."""
        return self._key_id

    def sign(self, message: bytes) -> bytes:
        """A 64-byte Ed25519 signature over `message`."""
        return crypto_sign(message, self._secret)[:SIGNATURE_SIZE]


def public_key_id(raw_public_key: bytes) -> str:
    """Key id of a raw public key (checked for length)."""
    if len(raw_public_key) != PUBLIC_KEY_SIZE:
        raise TrustError("public key must be 32 bytes", code="bad_key")
    return key_id(raw_public_key)


def verify_signature(raw_public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise `TrustError` unless `signature` is a valid signature of `message`."""
    if len(raw_public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise TrustError("malformed key or signature", code="bad_signature")
    try:
        crypto_sign_open(signature + message, raw_public_key)
    except CryptoError as exc:
        raise TrustError("signature does not verify", code="bad_signature") from exc
