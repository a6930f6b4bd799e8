"""`kakehashi backup` and `kakehashi restore` as a real subprocess, standard error a pipe.

Where the passphrase comes from (file, environment, never a pipe prompt), what is printed
for people and for scripts, and that every refusal is one error line and a fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
PASSPHRASE = "correct horse battery staple"


def run(*args: str | Path, passphrase: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAKEHASHI_HOME", "KAKEHASHI_BACKUP_PASSPHRASE", "FORCE_COLOR")
    }
    env["NO_COLOR"] = "1"
    if passphrase is not None:
        env["KAKEHASHI_BACKUP_PASSPHRASE"] = passphrase
    return subprocess.run(
        [KAKEHASHI, *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


def error_lines(result: subprocess.CompletedProcess[str], prefix: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.lstrip().startswith(prefix)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("backup-cli") / "tsu"
    done = run(
        "init", "--home", root, "--node-id", "tsu", "--name", "津市", "--listen", "127.0.0.1:8443"
    )
    assert done.returncode == 0, done.stderr
    return root


def test_backup_with_a_passphrase_file_prints_progress_lines_and_a_summary(
    home: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\nthe second line is not part of it\n")
    result = run("backup", tmp_path / "tsu.kkb", "--home", home, "--passphrase-file", secret)
    assert result.returncode == 0, result.stderr
    assert "backup of node tsu written to" in result.stdout
    # Not a terminal: plain progress lines on standard error, no bar.
    assert any(line.startswith("database snapshot: ") for line in result.stderr.splitlines())
    assert any(line.startswith("encrypting: ") for line in result.stderr.splitlines())
    # The first line alone is the passphrase: the environment's copy of it opens the file.
    restored = run("restore", tmp_path / "tsu.kkb", "--home", tmp_path / "r", passphrase=PASSPHRASE)
    assert restored.returncode == 0, restored.stderr
    assert "restored node tsu" in restored.stdout and "kakehashi run" in restored.stdout


def test_json_prints_only_the_summary_on_standard_output(home: Path, tmp_path: Path) -> None:
    result = run("backup", tmp_path / "tsu.kkb", "--home", home, "--json", passphrase=PASSPHRASE)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"file", "bytes", "database_pages", "node_id", "created"}
    assert summary["node_id"] == "tsu" and summary["file"] == str(tmp_path / "tsu.kkb")
    assert result.stderr == ""
    restored = run(
        "restore", tmp_path / "tsu.kkb", "--home", tmp_path / "r", "--json", passphrase=PASSPHRASE
    )
    assert restored.returncode == 0, restored.stderr
    data = json.loads(restored.stdout)
    assert data["home"] == str(tmp_path / "r") and data["moved_aside"] is None
    assert data["database_pages"] == summary["database_pages"]


def test_without_a_passphrase_and_no_terminal_the_backup_fails_with_the_fix(
    home: Path, tmp_path: Path
) -> None:
    result = run("backup", tmp_path / "tsu.kkb", "--home", home)
    assert result.returncode == 1
    [error] = error_lines(result, "error:")
    assert error.endswith("(no_passphrase)")
    [fix] = error_lines(result, "fix:")
    assert "--passphrase-file" in fix and "KAKEHASHI_BACKUP_PASSPHRASE" in fix
    assert not (tmp_path / "tsu.kkb").exists()


@pytest.mark.parametrize(
    ("damage", "code"),
    [("passphrase", "bad_passphrase"), ("flip", "backup_corrupt"), ("cut", "backup_corrupt")],
)
def test_a_refused_restore_is_one_error_line_and_a_fix_never_a_traceback(
    home: Path, tmp_path: Path, damage: str, code: str
) -> None:
    file = tmp_path / "tsu.kkb"
    assert run("backup", file, "--home", home, passphrase=PASSPHRASE).returncode == 0
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[-50] ^= 0x40
    elif damage == "cut":
        del data[len(data) // 2 :]
    file.write_bytes(bytes(data))
    passphrase = "a wrong passphrase" if damage == "passphrase" else PASSPHRASE
    result = run("restore", file, "--home", tmp_path / "r", passphrase=passphrase)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [error] = error_lines(result, "error:")
    assert error.endswith(f"({code})")
    assert len(error_lines(result, "fix:")) == 1
    assert not (tmp_path / "r").exists()
