"""The audit log of real nodes: what the authority and members record, and `kakehashi audit
verify` (the real CLI, in a subprocess) catching each kind of tampering with the database.

Tampering is done as an intruder with access to the database file would: with a separate
sqlite3 connection, dropping the append-only triggers first.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from federation import codec
from federation.audit import AuditRecord, seal_record
from federation.errors import KakehashiError
from federation.roster import MemberStatus
from gateway import tls
from gateway.audit import read_records
from gateway.config import Home
from gateway.membership import join_federation
from gateway.transport import FEDERATION_PREFIX

from .conftest import Cluster, eventually

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


async def cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAKEHASHI_HOME", "COLUMNS")}
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def show(home: Home, *args: str) -> list[dict[str, Any]]:
    code, out, err = await cli("audit", "show", "--home", str(home.root), "--json", *args)
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


async def verify(home: Home, *args: str) -> tuple[int, str, str]:
    return await cli("audit", "verify", "--home", str(home.root), *args)


def _tamper(home: Home, *statements: tuple[str, tuple[Any, ...]]) -> None:
    # BEGIN IMMEDIATE: a deferred transaction that read before the running node committed
    # could not upgrade to a write (SQLITE_BUSY_SNAPSHOT, no retry).
    db = sqlite3.connect(home.database, isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN IMMEDIATE")
        for trigger in ("audit_no_update", "audit_no_delete"):
            db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for sql, params in statements:
            db.execute(sql, params)
        db.execute("COMMIT")
    finally:
        db.close()


async def tamper(home: Home, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change the database behind the node's back, as an intruder with the file would.

    In a thread: while it waits for the write lock, a running node must be able to finish
    the transaction that holds it.
    """
    await asyncio.to_thread(_tamper, home, *statements)


def seq_of(home: Home, event: str, **fields: Any) -> int:
    """Seq of the first record of `event` whose fields include `fields`."""
    for record in read_records(home.database, event=event, limit=1000):
        assert isinstance(record, AuditRecord)
        if all(record.field_map.get(k) == v for k, v in fields.items()):
            return record.seq
    raise AssertionError(f"no {event} record with {fields}")


async def suspended_and_resumed(cluster: Cluster) -> Home:
    """An authority that admitted two towns and suspended and resumed one of them; stopped."""
    authority = await cluster.authority()
    assert authority.authority is not None
    await cluster.member("tsu", "津市", "242012")
    await cluster.member("ise", "伊勢市", "242039")
    await authority.authority.set_status("tsu", MemberStatus.SUSPENDED, "maintenance")
    await authority.authority.set_status("tsu", MemberStatus.ACTIVE, "maintenance done")
    await cluster.stop_all()
    return cluster.home("mie-pref")


# --- what is recorded ---------------------------------------------------------------------


async def test_audit_show_lists_a_join_suspend_and_resume_at_the_authority(
    cluster: Cluster,
) -> None:
    authority = await cluster.authority()
    home = authority.home
    token = await cluster.invite("tsu")
    await cluster.init("tsu", "津市", "242012")
    await join_federation(cluster.home("tsu"), token)
    await cluster.start("tsu")
    code, _, err = await cli("peer", "suspend", "--home", str(home.root), "tsu", "--reason", "保守")
    assert code == 0, err
    code, _, err = await cli("peer", "resume", "--home", str(home.root), "tsu")
    assert code == 0, err

    everything = await show(home)  # the node is running: read beside it, read-only
    assert [row["seq"] for row in everything] == list(range(1, len(everything) + 1))
    # Suspended tsu may have knocked (and been refused) before it was resumed.
    refused = [row["fields"] for row in everything if row["event"] == "peer_refused"]
    assert all((r["reason"], r["source"]) == ("peer_suspended", "tsu") for r in refused)
    rows = [row for row in everything if row["event"] != "peer_refused"]
    assert [row["event"] for row in rows] == [
        "node_initialised",
        "federation_created",
        "node_started",
        "invitation_issued",
        "join_admitted",
        "roster_adopted",
        "member_status_changed",
        "roster_adopted",
        "member_status_changed",
        "roster_adopted",
    ]
    by_event = {row["event"]: row["fields"] for row in rows}
    assert by_event["invitation_issued"] == {
        "node": "tsu",
        "approval": "auto",
        "relay": False,
        "expires_at": by_event["invitation_issued"]["expires_at"],
    }
    assert by_event["join_admitted"]["node"] == "tsu"
    assert by_event["join_admitted"]["roster_version"] == 2
    changes = [row["fields"] for row in rows if row["event"] == "member_status_changed"]
    assert [(c["node"], c["previous"], c["status"], c["reason"]) for c in changes] == [
        ("tsu", "active", "suspended", "保守"),
        ("tsu", "suspended", "active", ""),
    ]
    adopted = [row["fields"] for row in rows if row["event"] == "roster_adopted"]
    assert [(a["version"], a.get("joined"), a.get("status_changed")) for a in adopted] == [
        (2, ["tsu"], None),
        (3, None, ["tsu=suspended"]),
        (4, None, ["tsu=active"]),
    ]
    # Filters, and the one thing that must never be there: the invitation token.
    filtered = await show(home, "--event", "member_status_changed", "--since", "1h", "--limit", "1")
    assert filtered == [row for row in rows if row["event"] == "member_status_changed"][-1:]
    assert await show(home, "--since", "2999-01-01") == []
    text = json.dumps(everything, ensure_ascii=False)
    signature = token.rsplit(".", 1)[1]
    assert signature not in text and token.split(".")[1] not in text
    with closing(sqlite3.connect(home.database)) as db:
        blobs = b"".join(bytes(row[0]) for row in db.execute("SELECT fields FROM audit"))
    assert signature.encode() not in blobs
    code, out, _ = await cli("audit", "show", "--home", str(home.root))
    assert code == 0 and "member_status_changed" in out and "reason=保守" in out


async def test_manual_joins_record_pending_approved_and_denied(cluster: Cluster) -> None:
    authority = await cluster.authority()
    assert authority.authority is not None
    for town, name in (("tsu", "津市"), ("ise", "伊勢市")):
        await cluster.init(town, name)
        token = await cluster.invite(town, approval="manual")
        with pytest.raises(Exception) as held:
            await join_federation(cluster.home(town), token, wait_seconds=0.5, poll_seconds=0.2)
        assert getattr(held.value, "code", None) == "join_pending"
    await authority.authority.approve("tsu")
    await authority.authority.deny("ise")
    records = [r for r in read_records(authority.home.database) if isinstance(r, AuditRecord)]
    joins = [(r.event, r.field_map.get("node")) for r in records if r.event.startswith("join_")]
    assert joins == [
        ("join_pending", "tsu"),  # once, however often the joiner polled
        ("join_pending", "ise"),
        ("join_approved", "tsu"),
        ("join_denied", "ise"),
    ]


async def test_every_node_records_the_roster_versions_it_adopts_and_member_updates(
    cluster: Cluster,
) -> None:
    authority = await cluster.authority()
    assert authority.authority is not None
    tsu = await cluster.member("tsu", "津市", "242012")
    await cluster.member("ise", "伊勢市", "242039")
    await authority.authority.set_status("ise", MemberStatus.SUSPENDED, "audit")
    await authority.authority.update_member("tsu", relay=True)
    await eventually(lambda: tsu.roster.version == 5, timeout=10)
    await eventually(
        lambda: any(
            isinstance(r, AuditRecord) and r.field_map.get("version") == 5
            for r in read_records(tsu.home.database, event="roster_adopted")
        ),
        timeout=10,
    )
    adopted = [
        r.field_map
        for r in read_records(tsu.home.database, event="roster_adopted")
        if isinstance(r, AuditRecord)
    ]
    assert adopted[-2:] == [
        {"version": 4, "previous": 3, "status_changed": ["ise=suspended"]},
        {"version": 5, "previous": 4, "relay_changed": ["tsu=on"]},
    ]
    (updated,) = [
        r.field_map
        for r in read_records(authority.home.database, event="member_updated")
        if isinstance(r, AuditRecord)
    ]
    assert updated["node"] == "tsu" and updated["relay"] is True
    assert updated["previous_relay"] is False and updated["roster_version"] == 5
    events = [r.event for r in read_records(tsu.home.database) if isinstance(r, AuditRecord)]
    assert events[:3] == ["node_initialised", "federation_joined", "node_started"]


# --- verify -------------------------------------------------------------------------------


async def test_intact_log_verifies_with_exit_0_running_or_stopped(cluster: Cluster) -> None:
    authority = await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    code, out, err = await verify(authority.home)
    assert code == 0, err
    assert out.startswith("audit log intact: 6 records, ")  # the tail is not signed yet
    await cluster.stop_all()
    code, out, err = await verify(authority.home)
    assert code == 0, err
    assert out.strip() == "audit log intact: 7 records, last signed head at seq 7"
    code, out, _ = await verify(authority.home, "--json")
    assert code == 0
    assert json.loads(out) == {
        "intact": True,
        "records": 7,
        "last_seq": 7,
        "last_signed_seq": 7,
        "unsigned_records": 0,
        "problems": [],
    }


async def test_verify_uses_the_roster_key_when_the_key_file_cannot_be_read(
    cluster: Cluster,
) -> None:
    home = await suspended_and_resumed(cluster)
    home.signing_key.rename(home.keys / "elsewhere.key")
    code, out, err = await verify(home)
    assert code == 0, err
    assert "audit log intact" in out


async def test_edited_record_is_caught_and_named(cluster: Cluster) -> None:
    home = await suspended_and_resumed(cluster)
    seq = seq_of(home, "member_status_changed", status="suspended")
    forged = {
        "node": "tsu",
        "previous": "active",
        "reason": "requested by tsu",
        "roster_version": 5,
        "status": "suspended",
    }
    await tamper(home, ("UPDATE audit SET fields = ? WHERE seq = ?", (codec.encode(forged), seq)))
    code, out, err = await verify(home)
    assert code == 1
    assert f"record {seq}: edited: its content does not match its hash" in out
    assert "audit_log_tampered" in err
    code, out, _ = await verify(home, "--json")
    assert code == 1
    assert json.loads(out)["problems"] == [
        {"kind": "edited", "seq": seq, "detail": "its content does not match its hash"}
    ]


async def test_edited_record_with_its_hash_recomputed_is_caught_by_the_next_records_link(
    cluster: Cluster,
) -> None:
    home = await suspended_and_resumed(cluster)
    seq = seq_of(home, "join_admitted", node="ise")
    (record,) = [r for r in read_records(home.database) if r.seq == seq]
    assert isinstance(record, AuditRecord)
    forged = dict(record.field_map, relay=True)
    resealed = seal_record(
        seq=seq, at_ms=record.at_ms, event=record.event, fields=forged, prev=record.prev
    )
    digest = resealed.hash
    await tamper(
        home,
        (
            "UPDATE audit SET fields = ?, hash = ? WHERE seq = ?",
            (codec.encode(forged), digest, seq),
        ),
    )
    code, out, _ = await verify(home)
    assert code == 1
    assert f"record {seq}: edited: record {seq + 1} links to another version of it" in out


async def test_deleted_record_is_caught_and_named(cluster: Cluster) -> None:
    home = await suspended_and_resumed(cluster)
    seq = seq_of(home, "member_status_changed", status="suspended")
    await tamper(home, ("DELETE FROM audit WHERE seq = ?", (seq,)))
    code, out, _ = await verify(home)
    assert code == 1
    assert f"record {seq}: removed: record {seq} is missing" in out
    assert "audit log NOT intact: 1 problem\n" in out


async def test_records_with_swapped_seqs_are_caught_and_both_named(cluster: Cluster) -> None:
    home = await suspended_and_resumed(cluster)
    first = seq_of(home, "member_status_changed", status="suspended")
    second = seq_of(home, "member_status_changed", status="active")
    await tamper(
        home,
        ("UPDATE audit SET seq = -1 WHERE seq = ?", (first,)),
        ("UPDATE audit SET seq = ? WHERE seq = ?", (first, second)),
        ("UPDATE audit SET seq = ? WHERE seq = -1", (second,)),
    )
    code, out, _ = await verify(home)
    assert code == 1
    assert f"record {first}: reordered: holds record {second}" in out
    assert f"record {second}: reordered: holds record {first}" in out
    assert "2 problems" in out


async def test_records_removed_from_the_end_are_caught_by_the_signed_head(
    cluster: Cluster,
) -> None:
    home = await suspended_and_resumed(cluster)
    (last,) = [r.seq for r in read_records(home.database, limit=1)]
    await tamper(home, ("DELETE FROM audit WHERE seq > ?", (last - 3,)))
    code, out, _ = await verify(home)
    assert code == 1
    assert (
        f"record {last - 2}: truncated: records {last - 2}-{last} are missing from the end" in out
    )


async def test_tampering_while_the_node_runs_is_caught_while_it_runs(cluster: Cluster) -> None:
    authority = await cluster.authority()
    await cluster.member("tsu", "津市", "242012")
    home = authority.home
    seq = seq_of(home, "invitation_issued", node="tsu")
    await tamper(home, ("UPDATE audit SET event = 'join_denied' WHERE seq = ?", (seq,)))
    code, out, _ = await verify(home)
    assert code == 1
    assert f"record {seq}: edited" in out
    await cluster.stop_all()  # the node goes on appending after it, and stops cleanly
    code, out, _ = await verify(home)
    assert code == 1 and f"record {seq}: edited" in out


# --- refused peers ------------------------------------------------------------------------


async def test_a_flood_of_refused_requests_leaves_a_handful_of_records(cluster: Cluster) -> None:
    authority = await cluster.authority()
    home = authority.home
    anonymous = tls.client_context(None, None, home.ca_cert)
    url = f"https://127.0.0.1:{authority.federation_port}{FEDERATION_PREFIX}/roster"

    async def refused_requests(count: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=anonymous)) as s:
            for _ in range(count):
                async with s.get(url) as response:
                    assert response.status == 401

    def refusal_records() -> list[dict[str, Any]]:
        return [
            r.field_map
            for r in read_records(home.database)
            if isinstance(r, AuditRecord) and r.event in ("peer_refused", "refusals_suppressed")
        ]

    await refused_requests(100)
    await eventually(lambda: len(refusal_records()) == 1, timeout=10)
    cluster.clocks["mie-pref"].offset += 61  # a minute later, the same source tries again
    await refused_requests(1 + 5)
    await eventually(lambda: len(refusal_records()) == 2, timeout=10)
    assert authority.refusals["client_certificate_required"] == 106
    await cluster.stop_all()
    records = refusal_records()
    assert [(r["reason"], r["source"], r["suppressed"]) for r in records] == [
        ("client_certificate_required", "127.0.0.1", 0),
        ("client_certificate_required", "127.0.0.1", 99),
        ("client_certificate_required", "127.0.0.1", 5),  # summary written at stop
    ]
    assert records[0]["path"] == f"{FEDERATION_PREFIX}/roster"
    code, _, err = await verify(home)
    assert code == 0, err


async def test_staff_logins_and_account_changes_are_audited(cluster: Cluster) -> None:
    node = await cluster.authority()
    issued = await node.accounts.add_user("tanaka", display_name="田中太郎")
    password = issued.initial_password
    assert password is not None
    with pytest.raises(KakehashiError):
        await node.accounts.login("tanaka", "wrong password here", source="10.20.0.9")
    await node.accounts.login("tanaka", password, source="10.20.0.9")
    await node.accounts.set_disabled("tanaka", True)
    await cluster.stop("mie-pref")  # queued records are written at stop
    events = [(r["event"], r["fields"]) for r in await show(node.home)]
    names = [event for event, _ in events]
    assert (
        names.index("user_added")
        < names.index("login_failed")
        < names.index("login_succeeded")
        < names.index("user_disabled")
    )
    succeeded = next(fields for event, fields in events if event == "login_succeeded")
    assert succeeded == {"user": "tanaka@mie-pref", "role": "staff", "source": "10.20.0.9"}
    assert password not in json.dumps(events, ensure_ascii=False)
