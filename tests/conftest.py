"""Checks that hold for every test."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

_DATABASE_ENDINGS = (".db", ".db-wal", ".db-shm", ".db-journal")


def _open_databases() -> set[str]:
    """Paths of SQLite files this process holds open (Linux: /proc/self/fd)."""
    found = set()
    with os.scandir("/proc/self/fd") as entries:
        for entry in entries:
            try:
                target = os.readlink(entry.path)
            except OSError:  # closed meanwhile, or the directory's own descriptor
                continue
            if target.removesuffix(" (deleted)").endswith(_DATABASE_ENDINGS):
                found.add(target)
    return found


@pytest.fixture(autouse=True)
def _databases_closed() -> Iterator[None]:
    """A test leaves no database connection open (it runs after the test's own fixtures
    are torn down, so a node a fixture started has stopped by then).

    A connection left open keeps its file's locks and shared-memory index in this
    process for the rest of the run, where a later test's database can meet them.
    `with sqlite3.connect(...)` commits but does not close: use `contextlib.closing`."""
    before = _open_databases()
    yield
    left = _open_databases() - before
    if left:
        gc.collect()  # a connection only waiting to be collected is not a leak
        left = _open_databases() - before
    if left:
        pytest.fail(f"the test left database files open: {sorted(left)}", pytrace=False)
