"""The one exception hierarchy of Kakehashi.

Everything the project raises on purpose derives from `KakehashiError`, so the CLI
can catch the base, print one line and the fix, and exit 1. Each error carries a
stable snake_case `code` (for logs, metrics and the wire) and, where it helps, a
`hint` telling the operator what to do about it.

Third-party exceptions never cross this boundary untranslated: the module doing
the I/O re-raises them as one of these, `from` the original.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "KakehashiError",
    "ProtocolError",
    "StorageError",
    "TransportError",
    "TrustError",
]


class KakehashiError(Exception):
    """Base of every error Kakehashi raises on purpose."""

    default_code = "error"

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ProtocolError(KakehashiError):
    """A peer (or a file claiming to come from one) sent something malformed.

    `status` is the HTTP status a server should answer with.
    """

    default_code = "protocol_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        hint: str | None = None,
        status: int = 400,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.status = status


class TrustError(KakehashiError):
    """Unknown, suspended or revoked peer; bad signature; untrusted certificate or token."""

    default_code = "untrusted"
    status = 403


class ConfigError(KakehashiError):
    """A configuration file, a node home or a command-line value is wrong or missing."""

    default_code = "config_error"


class StorageError(KakehashiError):
    """The node's database or file store failed (disk full, corrupt, locked)."""

    default_code = "storage_error"

    @property
    def status(self) -> int:
        """The request was fine, this node could not keep it: 507 Insufficient Storage for
        a full disk, else 503. Either way the sender may try again later."""
        return 507 if self.code == "disk_full" else 503


class TransportError(KakehashiError):
    """A peer could not be reached, or the connection failed during an exchange."""

    default_code = "transport_error"
