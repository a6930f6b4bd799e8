"""AuditLog over a real Store: serialised appends, heads by count, by time and at stop, the
refusal throttle, append-only tables, and the read-only reader the CLI uses."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest

from federation.audit import AuditRecord
from federation.errors import ProtocolError, StorageError
from federation.signing import SigningKey
from gateway.audit import AuditLog, AuditSettings, read_log, read_records
from gateway.store import Store

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
T0 = 1_790_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Poll `check()` until it holds; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "node.db") as opened:
        yield opened


KEY = SigningKey.generate()


def records_of(path: Path) -> list[AuditRecord]:
    rows = read_log(path).records
    assert all(isinstance(r, AuditRecord) for r in rows)
    return rows  # type: ignore[return-value]


async def test_concurrent_appends_form_one_gap_free_chain(store: Store, tmp_path: Path) -> None:
    audit = AuditLog(store, signing_key=KEY, clock=FakeClock())
    await audit.start()
    try:
        written = await asyncio.gather(
            *(audit.append("member_updated", node=f"town-{i}", index=i) for i in range(40))
        )
        for i in range(10):
            audit.note("peer_refused", reason="too_large", index=i)
        await until(lambda: len(read_log(tmp_path / "node.db").records) == 50)
    finally:
        await audit.stop()
    records = records_of(tmp_path / "node.db")
    assert [r.seq for r in records] == list(range(1, 51))
    assert sorted(r.seq for r in written) == list(range(1, 41))
    assert records[0].prev == bytes(32)
    for before, after in itertools.pairwise(records):
        assert after.prev == before.hash and after.computed_hash() == after.hash


async def test_a_record_written_in_a_rolled_back_transaction_is_gone_with_it(
    store: Store, tmp_path: Path
) -> None:
    audit = AuditLog(store, signing_key=KEY, clock=FakeClock())
    await audit.append("node_started", node="tsu")
    with pytest.raises(RuntimeError):
        async with store.transaction() as db:
            await audit.append_in(db, "member_status_changed", node="ise", status="suspended")
            raise RuntimeError("the change failed after its record was written")
    await audit.append("node_stopped", node="tsu")
    assert [(r.seq, r.event) for r in records_of(tmp_path / "node.db")] == [
        (1, "node_started"),
        (2, "node_stopped"),
    ]


async def test_a_head_is_signed_every_n_records(store: Store, tmp_path: Path) -> None:
    audit = AuditLog(
        store,
        signing_key=KEY,
        clock=FakeClock(),
        settings=AuditSettings(head_every_records=5, head_every_seconds=3600),
    )
    await audit.start()
    try:
        for i in range(12):
            await audit.append("roster_adopted", version=i + 2)
            if i in (4, 9):  # the writer signs once woken; wait for it before going on
                want = (i + 1) // 5
                await until(lambda want=want: len(read_log(tmp_path / "node.db").heads) == want)
    finally:
        await audit.stop()
    heads = read_log(tmp_path / "node.db").heads
    assert [h.seq for h in heads] == [5, 10, 12]  # 12: the head signed at stop
    for head in heads:
        assert head.key_id == KEY.key_id


async def test_a_head_is_signed_after_some_seconds_while_records_arrive(
    store: Store, tmp_path: Path
) -> None:
    audit = AuditLog(
        store,
        signing_key=KEY,
        clock=FakeClock(),
        settings=AuditSettings(head_every_records=1000, head_every_seconds=0.2),
    )
    await audit.start()
    try:
        await audit.append("node_started", node="tsu")
        await until(lambda: [h.seq for h in read_log(tmp_path / "node.db").heads] == [1])
        assert await audit.sign_head() is None  # nothing new to cover
    finally:
        await audit.stop()


async def test_refusals_are_throttled_per_source_and_reason_and_nothing_held_is_lost(
    store: Store, tmp_path: Path
) -> None:
    clock = FakeClock()
    audit = AuditLog(store, signing_key=KEY, clock=clock)
    await audit.start()
    try:
        for _ in range(100):
            audit.refused("client_certificate_required", remote="10.0.0.9", path="/roster")
        audit.refused("peer_suspended", remote="10.0.0.7", peer="ise")
        await until(lambda: len(read_log(tmp_path / "node.db").records) == 2)
        clock.now += 61
        audit.refused("client_certificate_required", remote="10.0.0.9", path="/roster")
        for _ in range(7):
            audit.refused("client_certificate_required", remote="10.0.0.9", path="/roster")
        await until(lambda: len(read_log(tmp_path / "node.db").records) == 3)
    finally:
        await audit.stop()
    records = records_of(tmp_path / "node.db")
    seen = [(r.event, r.field_map.get("source"), r.field_map["suppressed"]) for r in records]
    assert seen == [
        ("peer_refused", "10.0.0.9", 0),
        ("peer_refused", "ise", 0),  # an authenticated peer is counted by its node id
        ("peer_refused", "10.0.0.9", 99),  # the next record carries what was held back
        ("refusals_suppressed", "10.0.0.9", 7),  # written at stop rather than lost
    ]
    assert records[0].field_map == {
        "path": "/roster",
        "reason": "client_certificate_required",
        "remote": "10.0.0.9",
        "source": "10.0.0.9",
        "suppressed": 0,
    }


async def test_refusal_records_keep_only_known_fields_and_redact_tokens(
    store: Store, tmp_path: Path
) -> None:
    audit = AuditLog(store, signing_key=KEY, clock=FakeClock())
    token = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9.eyJub2RlIjoidHN1In0.c2lnbmF0dXJlLWJ5dGVz"
    audit.refused(
        "token_reused",
        remote="10.0.0.9",
        message=f"token {token} was used",
        token=token,
        authorization=f"Bearer {token}",
    )
    await audit.stop()
    (record,) = records_of(tmp_path / "node.db")
    assert record.field_map["message"] == "token [redacted] was used"
    assert "token" not in record.field_map and "authorization" not in record.field_map
    with closing(sqlite3.connect(tmp_path / "node.db")) as db:
        raw = db.execute("SELECT fields FROM audit").fetchall()
    assert not any(token.encode()[:40] in bytes(row[0]) for row in raw)


async def test_an_event_field_named_like_a_secret_is_refused(store: Store) -> None:
    audit = AuditLog(store, signing_key=KEY, clock=FakeClock())
    with pytest.raises(ProtocolError):
        await audit.append("invitation_issued", node="tsu", token="eyJ...")


async def test_a_signing_key_rotation_is_recorded_by_key_ids_only(
    store: Store, tmp_path: Path
) -> None:
    audit = AuditLog(store, signing_key=KEY, clock=FakeClock())
    new_key = SigningKey.generate()
    await audit.signing_key_rotated(
        old_key_id=KEY.key_id, new_key_id=new_key.key_id, reason="yearly rotation"
    )
    (record,) = records_of(tmp_path / "node.db")
    assert (record.event, record.field_map) == (
        "signing_key_rotated",
        {"old_key_id": KEY.key_id, "new_key_id": new_key.key_id, "reason": "yearly rotation"},
    )


async def test_the_audit_tables_refuse_updates_and_deletes_through_sql(
    store: Store, tmp_path: Path
) -> None:
    audit = AuditLog(store, signing_key=KEY, clock=FakeClock())
    await audit.append("node_started", node="tsu")
    await audit.sign_head()
    for statement in (
        "UPDATE audit SET event = 'node_stopped'",
        "DELETE FROM audit",
        "UPDATE audit_head SET seq = 2",
        "DELETE FROM audit_head",
    ):
        with pytest.raises(StorageError) as refused:
            async with store.transaction() as db:
                await db.execute(statement)
        assert "append-only" in str(refused.value)
    assert len(read_log(tmp_path / "node.db").records) == 1


async def test_reader_filters_by_time_and_event_and_returns_the_newest_oldest_first(
    store: Store, tmp_path: Path
) -> None:
    clock = FakeClock()
    audit = AuditLog(store, signing_key=KEY, clock=clock)
    for i in range(10):
        clock.now = T0 + i * 3600
        await audit.append("roster_adopted" if i % 2 else "peer_refused", version=i)
    path = tmp_path / "node.db"
    assert [r.seq for r in read_records(path, limit=3)] == [8, 9, 10]
    since = int((T0 + 6 * 3600) * 1000)
    assert [r.seq for r in read_records(path, since_ms=since)] == [7, 8, 9, 10]
    assert [r.seq for r in read_records(path, event="roster_adopted", limit=2)] == [8, 10]


def test_reading_a_home_without_a_database_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [KAKEHASHI, "audit", "verify", "--home", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no node database" in done.stderr


def test_show_refuses_a_since_it_cannot_read_as_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [KAKEHASHI, "audit", "show", "--home", str(tmp_path), "--since", "last tuesday"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--since" in done.stderr
