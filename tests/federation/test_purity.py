"""The federation package is pure: no I/O stack is imported and no clock is read.

`gateway` feeds `federation` bytes and time; if `federation` ever pulls in an
event loop, a socket, TLS, a database or a logger, or reads the clock itself,
its decisions stop being reproducible from their arguments.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "federation"

FORBIDDEN_MODULES = frozenset(
    {"asyncio", "aiohttp", "aiosqlite", "ssl", "socket", "structlog", "sqlite3", "selectors"}
)

LOADED_FOR_A_TYPE = frozenset({"_socket"})
"""C modules a dependency loads only to name a type, never to call: `typing_extensions`
(through msgspec) imports `_socket` for the type of its capsule. The core's own imports
are checked in its source (`test_the_protocol_core_imports_nothing_that_does_io`)."""

PURE_MODULES = (
    "federation",
    "federation.codec",
    "federation.errors",
    "federation.identity",
    "federation.signing",
    "federation.roster",
    "federation.invites",
    "federation.envelope",
    "federation.causal",
    "federation.rooms",
    "federation.backoff",
    "federation.routing",
    "federation.audit",
    "federation.files",
)

CLOCK_CALLS = (
    "time.time",
    "time.time_ns",
    "time.monotonic",
    "time.monotonic_ns",
    "time.perf_counter",
    "datetime.now",
    "datetime.utcnow",
    "datetime.today",
    "date.today",
)


def _forbidden_modules_loaded_by(modules: tuple[str, ...]) -> list[str]:
    """Import `modules` in a fresh interpreter; list forbidden modules the imports loaded."""
    script = (
        "import importlib, sys\n"
        "before = set(sys.modules)\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"forbidden = {sorted(FORBIDDEN_MODULES)!r}\n"
        f"probes = {sorted(LOADED_FOR_A_TYPE)!r}\n"
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0].lstrip('_') in forbidden and m not in probes))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = ast.literal_eval(result.stdout.strip())
    return loaded


def test_importing_the_protocol_core_loads_no_event_loop_socket_tls_database_or_logger() -> None:
    assert _forbidden_modules_loaded_by(PURE_MODULES) == []


def test_importing_invites_loads_no_event_loop_socket_tls_database_or_logger() -> None:
    assert _forbidden_modules_loaded_by(("federation.invites",)) == []


def imports_of_io(source: str, filename: str = "<source>") -> list[str]:
    """Every import in `source` of a module that does I/O (or the C module behind one)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            if name.split(".")[0].lstrip("_") in FORBIDDEN_MODULES:
                found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_import_scanner_finds_the_c_modules_too() -> None:
    source = (
        "import _socket\nfrom ssl import SSLContext\nimport asyncio.tasks\nfrom . import codec\n"
    )
    assert [line.split(": ")[1] for line in imports_of_io(source)] == [
        "_socket",
        "ssl",
        "asyncio.tasks",
    ]


def test_the_protocol_core_imports_nothing_that_does_io() -> None:
    found = [
        line
        for path in sorted(PACKAGE.glob("*.py"))
        for line in imports_of_io(path.read_text(encoding="utf-8"), path.name)
    ]
    assert found == []


def _dotted_name(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def clock_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every `import time` and every call that reads the clock in `source`, as 'file:line: what'."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "time" or alias.name.startswith("time."):
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            found.append(f"{filename}:{node.lineno}: from time import ...")
        elif isinstance(node, ast.Call):
            name = _dotted_name(node.func)
            if name is not None and any(
                name == call or name.endswith("." + call) for call in CLOCK_CALLS
            ):
                found.append(f"{filename}:{node.lineno}: {name}()")
    return found


def test_clock_scanner_reports_every_kind_of_clock_read() -> None:
    source = (
        "import time\n"
        "import datetime as dt\n"
        "from time import monotonic\n"
        "from datetime import date, datetime\n"
        "a = time.time()\n"
        "b = time.monotonic()\n"
        "c = datetime.now()\n"
        "d = dt.datetime.utcnow()\n"
        "e = date.today()\n"
    )
    found = clock_uses(source)
    assert [line.split(":")[1] for line in found] == ["1", "3", "5", "6", "7", "8", "9"]


def test_clock_scanner_accepts_code_that_takes_time_as_an_argument() -> None:
    source = (
        "from datetime import datetime, timezone\n"
        "def expired(now: int, expires_at: int) -> bool:\n"
        "    return now > expires_at\n"
        "stamp = datetime.fromtimestamp(0, timezone.utc)\n"
    )
    assert clock_uses(source) == []


def test_federation_sources_never_read_the_clock_or_import_time() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert {path.name for path in sources} >= {
        "codec.py",
        "identity.py",
        "invites.py",
        "roster.py",
        "signing.py",
    }
    found = [
        use
        for path in sources
        for use in clock_uses(path.read_text(encoding="utf-8"), filename=path.name)
    ]
    assert found == []
