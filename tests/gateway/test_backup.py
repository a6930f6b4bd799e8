"""Backup and restore of a node's home, without a network: what goes in, what comes back.

The online-copy test writes to the database from another connection during the whole
backup, in transactions that keep an invariant, so a copy mixing two states would show.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from federation.errors import ConfigError, KakehashiError
from gateway import backup as backup_module
from gateway.backup import RESTORED_AT, backup_home, restore_home
from gateway.config import Home, load_config, write_config
from gateway.membership import create_federation, init_home
from gateway.sealed import KdfParams

FAST = KdfParams(log2_n=4, r=8, p=1)
PASSPHRASE = "a long enough passphrase"


@pytest.fixture
async def authority_home(tmp_path: Path) -> Home:
    """An authority's home: every kind of key and certificate file there is."""
    home = Home(tmp_path / "mie-pref")
    await init_home(
        home,
        node_id="mie-pref",
        name="三重県",
        code="240001",
        listen_host="127.0.0.1",
        listen_port=18443,
        segments={},
    )
    await create_federation(home, name="三重県 市町連携")
    return home


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    """relative path -> (content, mode) of the key, certificate and config files."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "node.db" and not path.name.startswith("node.db-"):
            mode = stat.S_IMODE(path.stat().st_mode)
            found[str(path.relative_to(root))] = (path.read_bytes(), mode)
    return found


def _meta(database: Path) -> dict[str, bytes]:
    db = sqlite3.connect(database)
    try:
        return {key: bytes(value) for key, value in db.execute("SELECT key, value FROM meta")}
    finally:
        db.close()


def test_restore_brings_back_config_every_key_and_certificate_and_the_database(
    authority_home: Home, tmp_path: Path
) -> None:
    file = tmp_path / "backups" / "mie.kkb"
    file.parent.mkdir()
    summary = backup_home(authority_home, file, PASSPHRASE, kdf=FAST)
    assert summary.node_id == "mie-pref" and summary.database_pages > 0
    assert summary.bytes == file.stat().st_size
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert [p.name for p in file.parent.iterdir()] == ["mie.kkb"]  # no temporary left
    assert not [p for p in authority_home.root.iterdir() if p.name.startswith(".backup-")]

    target = Home(tmp_path / "restored" / "mie-pref")
    restored = restore_home(file, target, PASSPHRASE)
    assert restored.node_id == "mie-pref" and restored.moved_aside is None
    assert restored.database_pages == summary.database_pages
    original, copy = _files(authority_home.root), _files(target.root)
    assert set(original) == {
        "config.toml",
        "keys/signing.key",
        "keys/tls.key",
        "keys/federation.key",
        "keys/ca.key",
        "certs/node.crt",
        "certs/ca.crt",
    }
    assert {name: content for name, (content, _) in copy.items()} == {
        name: content for name, (content, _) in original.items()
    }
    for name, (_, mode) in copy.items():
        assert mode == (0o644 if name.startswith("certs/") else 0o600), name
    assert stat.S_IMODE(target.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.keys.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.database.stat().st_mode) == 0o600
    # The roster is in the database; the restore marked it for a catch-up on start.
    meta = _meta(target.database)
    assert meta["role"] == b"authority"
    assert RESTORED_AT in meta
    assert RESTORED_AT not in _meta(authority_home.database)
    assert not [p for p in target.root.parent.iterdir() if p.name.startswith(".")]


def test_backup_while_the_database_is_written_copies_one_state_without_restarting(
    authority_home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between every two steps of the copy another connection commits a pair of rows, as
    a running node would. The copy must neither restart (it would never finish under a
    busy node) nor mix states: it holds exactly the pairs there were when it began."""
    monkeypatch.setattr(backup_module, "SNAPSHOT_STEP_PAGES", 1)  # 16 KiB a step
    db = sqlite3.connect(authority_home.database, isolation_level=None)
    db.execute("CREATE TABLE pairs (n INTEGER, side TEXT, pad BLOB)")
    db.execute("BEGIN")
    for n in range(2000):
        db.executemany(
            "INSERT INTO pairs VALUES (?, ?, ?)", [(n, "a", os.urandom(300)), (n, "b", b"")]
        )
    db.execute("COMMIT")
    steps: list[int] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase != "database":
            return
        steps.append(done)
        if len(steps) <= 30:  # bounded: a copy that restarts on writes must still end
            n = 2000 + len(steps)
            db.execute("BEGIN IMMEDIATE")  # the node's writer is never blocked by the copy
            db.executemany(
                "INSERT INTO pairs VALUES (?, ?, ?)", [(n, "a", os.urandom(300)), (n, "b", b"")]
            )
            db.execute("COMMIT")

    try:
        backup_home(authority_home, tmp_path / "b.kkb", PASSPHRASE, kdf=FAST, progress=progress)
    finally:
        db.close()
    assert len(steps) > 30  # copied in many steps, each followed by a write
    assert steps == sorted(steps)  # never restarted by those writes
    target = Home(tmp_path / "restored")
    restore_home(tmp_path / "b.kkb", target, PASSPHRASE)
    copy = sqlite3.connect(target.database)
    try:
        sides = dict(copy.execute("SELECT side, COUNT(*) FROM pairs GROUP BY side").fetchall())
        assert sides == {"a": 2000, "b": 2000}  # the state when the copy began, whole
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        copy.close()


def test_restore_refuses_a_non_empty_home_without_force_and_moves_it_aside_with_force(
    authority_home: Home, tmp_path: Path
) -> None:
    file = tmp_path / "b.kkb"
    backup_home(authority_home, file, PASSPHRASE, kdf=FAST)
    target = Home(tmp_path / "occupied")
    target.root.mkdir()
    (target.root / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError) as refused:
        restore_home(file, target, PASSPHRASE)
    assert refused.value.code == "home_not_empty" and "--force" in (refused.value.hint or "")
    assert [p.name for p in target.root.iterdir()] == ["notes.txt"]

    summary = restore_home(file, target, PASSPHRASE, force=True, now=1_700_000_000)
    assert summary.moved_aside == str(tmp_path / "occupied.before-restore-20231114T221320Z")
    assert (Path(summary.moved_aside) / "notes.txt").read_text() == "keep me"
    assert target.signing_key.read_bytes() == authority_home.signing_key.read_bytes()


def test_restore_into_an_existing_empty_directory(authority_home: Home, tmp_path: Path) -> None:
    file = tmp_path / "b.kkb"
    backup_home(authority_home, file, PASSPHRASE, kdf=FAST)
    target = Home(tmp_path / "empty")
    target.root.mkdir(mode=0o755)
    restore_home(file, target, PASSPHRASE)
    assert target.config.read_bytes() == authority_home.config.read_bytes()
    assert stat.S_IMODE(target.root.stat().st_mode) == 0o700


@pytest.mark.parametrize("damage", ["passphrase", "flipped", "truncated"])
def test_a_refused_restore_leaves_nothing_behind(
    authority_home: Home, tmp_path: Path, damage: str
) -> None:
    file = tmp_path / "b.kkb"
    backup_home(authority_home, file, PASSPHRASE, kdf=FAST)
    data = bytearray(file.read_bytes())
    passphrase = PASSPHRASE
    if damage == "passphrase":
        passphrase = "not the passphrase"
    elif damage == "flipped":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-100:]
    file.write_bytes(bytes(data))
    parent = tmp_path / "restore-here"
    parent.mkdir()
    with pytest.raises(KakehashiError) as refused:
        restore_home(file, Home(parent / "tsu"), passphrase)
    assert refused.value.code == ("bad_passphrase" if damage == "passphrase" else "backup_corrupt")
    assert list(parent.iterdir()) == []


def test_backup_refuses_a_short_passphrase_and_a_home_that_is_not_one(
    authority_home: Home, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as short:
        backup_home(authority_home, tmp_path / "b.kkb", "1234567", kdf=FAST)
    assert short.value.code == "weak_passphrase"
    with pytest.raises(ConfigError) as missing:
        backup_home(Home(tmp_path / "nothing"), tmp_path / "b.kkb", PASSPHRASE, kdf=FAST)
    assert missing.value.code == "not_initialised"
    assert not (tmp_path / "b.kkb").exists()


async def test_restore_catch_up_timeout_defaults_to_a_minute_and_is_read_from_delivery(
    tmp_path: Path,
) -> None:
    home = Home(tmp_path / "tsu")
    config = await init_home(
        home,
        node_id="tsu",
        name="津市",
        code=None,
        listen_host="127.0.0.1",
        listen_port=18443,
        segments={},
    )
    assert config.restore_timeout == 60.0
    assert "restore_catch_up_timeout_seconds" not in home.config.read_text()
    write_config(home, dataclasses.replace(config, restore_timeout=5.0))
    assert load_config(home).restore_timeout == 5.0
    text = home.config.read_text().replace(
        "restore_catch_up_timeout_seconds = 5.0", "restore_catch_up_timeout_seconds = -1"
    )
    home.config.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(home)
    assert "restore_catch_up_timeout_seconds" in str(refused.value)
