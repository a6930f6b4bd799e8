"""Kakehashi's federation protocol: pure values and decisions, no I/O.

This package never imports asyncio, sockets, TLS, databases or loggers and never
reads the clock; time is always an argument. `gateway` feeds it bytes and time
and carries out what it decides.
"""

from .errors import (
    ConfigError,
    KakehashiError,
    ProtocolError,
    StorageError,
    TransportError,
    TrustError,
)

__all__ = [
    "ConfigError",
    "KakehashiError",
    "ProtocolError",
    "StorageError",
    "TransportError",
    "TrustError",
]
