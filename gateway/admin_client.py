"""The CLI's side of the admin socket: one JSON request to the running node.

It uses the standard library's HTTP client over the Unix socket, not aiohttp, so
that `kakehashi status` and friends start quickly when scripts call them in loops.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from federation.errors import ConfigError, TransportError

__all__ = ["HISTORY_LIMIT", "AdminClient"]

HISTORY_LIMIT = 100_000
"""Most timeline entries one `/v1/rooms/history` request returns."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the admin Unix socket (the standard library's client, so the CLI starts fast)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("node", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """The CLI's side: one JSON request to the node on its admin socket."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self._path = socket_path
        self._timeout = timeout

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        if not self._path.exists():
            raise _not_running(self._path)
        connection = _UnixHTTPConnection(self._path, self._timeout)
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            status, raw = response.status, response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _not_running(self._path) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"admin request failed: {exc}", code="admin_failed") from exc
        finally:
            connection.close()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise TransportError(
                f"node answered HTTP {status} without JSON", code="admin_failed"
            ) from exc
        if status >= 400:
            if isinstance(data, dict) and "message" in data and "error" in data:
                raise ConfigError(
                    str(data["message"]), code=str(data["error"]), hint=data.get("hint")
                )
            raise TransportError(f"node answered HTTP {status}", code="admin_failed")
        return data


def _not_running(path: Path) -> ConfigError:
    return ConfigError(
        f"the node is not running (no answer on {path})",
        code="node_not_running",
        hint=f"start it with: kakehashi run --home {path.parent}",
    )
