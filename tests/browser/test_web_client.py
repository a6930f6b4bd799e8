"""The web client in headless Chromium against two real nodes (tsu and ise).

One scenario, step by step with a screenshot each in test-artifacts/: both staff log
in on their own node's web client, tanaka@tsu sends, suzuki@ise sees it arrive live
and reads it, tanaka sees 「既読 1」 and 鈴木次郎 (伊勢市) among its readers, a file
uploaded at tsu downloads byte for byte at ise, and English replaces the Japanese.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ARTIFACTS, CHROMIUM, STAFF, Towns

pytestmark = pytest.mark.browser

WAIT = 60_000  # ms: generous, the machine is shared


@pytest.fixture
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        executable = str(CHROMIUM) if CHROMIUM.exists() else None
        launched = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"], headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


def log_in(browser: Any, url: str, login: str, *, phone: bool = False) -> Any:
    context = browser.new_context(
        ignore_https_errors=True,
        accept_downloads=True,
        locale="ja-JP",
        viewport={"width": 390, "height": 844} if phone else {"width": 1100, "height": 760},
    )
    context.set_default_timeout(WAIT)
    page = context.new_page()
    page.goto(url)
    assert page.locator("html").get_attribute("lang") == "ja"
    page.get_by_label("ログインID").fill(login)
    page.get_by_label("パスワード").fill(STAFF[login][3])
    page.get_by_role("button", name="ログイン").click()
    page.get_by_role("heading", name="ルーム", exact=True).wait_for()
    page.locator("body[data-live=true]").wait_for()  # the WebSocket is ready
    page.get_by_role("button", name="防災連絡").click()
    page.get_by_label("メッセージ").wait_for()
    return page


def test_two_towns_chat_read_receipts_files_and_english(
    towns: Towns, chromium: Any, tmp_path: Path
) -> None:
    tanaka = log_in(chromium, towns.urls["tsu"], "tanaka")
    suzuki = log_in(chromium, towns.urls["ise"], "suzuki", phone=True)
    shot(tanaka, "1-tanaka-logged-in")
    shot(suzuki, "1-suzuki-logged-in-phone")

    # Enter sends; Shift+Enter is a newline
    composer = tanaka.get_by_label("メッセージ")
    composer.fill("明日の訓練は9時からです")
    composer.press("Shift+Enter")
    composer.type("集合は市役所前")
    composer.press("Enter")
    sent = tanaka.locator("#timeline li.own").last
    # With a read counter: 0, or already 1 when ise's open page has read it and the
    # receipt came back before this page was looked at (the next step waits for 1).
    sent.get_by_text(re.compile(r"^既読 [01]$")).wait_for()
    assert composer.input_value() == ""
    shot(tanaka, "2-tanaka-sent")

    # ise's page is open on the room: the message arrives over the WebSocket and is
    # marked read by being viewed
    arrived = suzuki.locator("#timeline li", has_text="集合は市役所前")
    arrived.wait_for()
    assert "明日の訓練は9時からです\n集合は市役所前" in arrived.inner_text()
    # another town's staff: the name their own node gives, and the municipality
    assert "田中太郎 (津市)" in arrived.inner_text()
    shot(suzuki, "3-suzuki-received")

    # the receipt comes back to tsu live: 既読 1, and who read it
    sent.get_by_role("button", name="既読 1").click()
    readers = tanaka.get_by_role("dialog")
    readers.get_by_text("鈴木次郎 (伊勢市)").wait_for()
    shot(tanaka, "4-tanaka-read-by-suzuki")
    readers.get_by_role("button", name="閉じる").click()

    # a file uploaded at tsu downloads at ise, byte for byte
    content = os.urandom(50_000) + "避難所一覧".encode()
    source = tmp_path / "避難所一覧.bin"
    source.write_bytes(content)
    tanaka.get_by_label("添付").set_input_files(str(source))
    tanaka.get_by_role("button", name="アップロード").click()
    tanaka.get_by_text("アップロードしました").wait_for()
    listed = suzuki.locator("#file-list").get_by_role("button", name="ダウンロード: 避難所一覧.bin")
    listed.wait_for()
    shot(suzuki, "5-suzuki-sees-file")
    with suzuki.expect_download() as download_info:
        listed.click()
    download = download_info.value
    assert download.suggested_filename == "避難所一覧.bin"
    saved = tmp_path / "downloaded.bin"
    download.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(content).digest()

    # English, remembered across a reload (the session survives in this tab)
    suzuki.get_by_role("button", name="English").click()
    assert suzuki.locator("html").get_attribute("lang") == "en"
    suzuki.get_by_role("heading", name="Rooms", exact=True).wait_for()
    suzuki.get_by_role("button", name="Send").wait_for()
    suzuki.get_by_role("button", name="Upload").wait_for()
    shot(suzuki, "6-suzuki-english")
    suzuki.reload()
    suzuki.get_by_role("button", name="Log out").wait_for()
    assert suzuki.locator("html").get_attribute("lang") == "en"
    tanaka.get_by_role("button", name="English").click()
    tanaka.get_by_role("button", name="防災連絡").click()
    tanaka.locator("#timeline li.own").first.get_by_role("button", name="Read 1").wait_for()
    shot(tanaka, "7-tanaka-english")


def test_access_token_is_never_in_a_url_or_storage(towns: Towns, chromium: Any) -> None:
    page = log_in(chromium, towns.urls["tsu"], "tanaka")
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    page.reload()
    page.locator("body[data-live=true]").wait_for()
    page.get_by_role("button", name="防災連絡").click()
    page.get_by_label("メッセージ").wait_for()
    assert urls and not any("token" in url for url in urls)
    stored = page.evaluate("() => JSON.stringify({...localStorage, ...sessionStorage})")
    assert "kakehashi.refresh" in stored  # the refresh token, this tab only
    assert "eyJ" not in stored  # no JWT (the access token stays in memory)
