"""Two real nodes (tsu, ise) with client API listeners, for the web client in Chromium.

The nodes run in their own thread and event loop (`LocalFederation`, real mutual TLS
on 127.0.0.1) so the tests can drive Playwright's synchronous API. The tests skip
when Playwright or /usr/bin/chromium is missing, except on CI (`CI` set), where
`make test` installs them and a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.local import LocalFederation
from tests.integration.apiclient import Api, session_for
from tests.integration.conftest import eventually

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
STAFF = {
    # login: (node, display name, role, password)
    "tanaka": ("tsu", "田中太郎", "room_admin", "津市役所の桜はきれいです"),
    "suzuki": ("ise", "鈴木次郎", "staff", "伊勢神宮の森はしずかです"),
}
T = TypeVar("T")


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright)"
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        return f"{CHROMIUM} is missing (apt-get install chromium fonts-noto-cjk)"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _missing()
    if reason is None:
        return
    for item in items:
        if "browser" in item.keywords and not os.environ.get("CI"):
            item.add_marker(pytest.mark.skip(reason=reason))


class Loop:
    """An event loop in a thread of its own, for the nodes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@dataclass
class Towns:
    urls: dict[str, str]
    """node id -> the web client's URL."""
    room: str
    loop: Loop


@pytest.fixture
def towns(tmp_path: Path) -> Iterator[Towns]:
    loop = Loop()
    federation = LocalFederation(tmp_path, api=True)

    async def setup() -> str:
        tsu = await federation.authority("tsu", "津市", "242012")
        ise = await federation.member("ise", "伊勢市", "242039")
        await eventually(lambda: tsu.roster.version == ise.roster.version == 2)
        for login, (node_id, name, role, password) in STAFF.items():
            await federation.nodes[node_id].accounts.add_user(
                login, display_name=name, role=role, password=password
            )
        async with session_for(tsu) as session:
            tanaka = Api(session, tsu)
            await tanaka.login("tanaka", STAFF["tanaka"][3])
            answer = await tanaka.post(
                "/rooms", {"name": "防災連絡", "members": ["suzuki@ise"]}, expect=201
            )
        room: str = answer["id"]
        await eventually(lambda: all(n.rooms.state(room) is not None for n in (tsu, ise)))
        return room

    try:
        room = loop.run(setup())
        urls = {
            node_id: f"https://127.0.0.1:{federation.nodes[node_id].api_port}/"
            for node_id in ("tsu", "ise")
        }
        yield Towns(urls=urls, room=room, loop=loop)
    finally:
        loop.run(federation.stop_all())
        loop.close()
