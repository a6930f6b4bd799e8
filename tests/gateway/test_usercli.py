"""`kakehashi user ...` without a running node: refusals before anything is sent."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.lstrip().startswith(prefix)]


def kakehashi(*args: str | Path) -> Result:
    env = {k: v for k, v in os.environ.items() if k not in ("KAKEHASHI_HOME", "COLUMNS")}
    env["NO_COLOR"] = "1"
    done = subprocess.run(
        [KAKEHASHI, *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def test_user_commands_say_the_node_is_not_running_and_how_to_start_it(tmp_path: Path) -> None:
    result = kakehashi("user", "list", "--home", tmp_path, "--json")
    assert result.code == 1
    assert "(node_not_running)" in result.stderr
    assert result.lines("fix:") == [f"  fix: start it with: kakehashi run --home {tmp_path}"]


def test_unreadable_password_file_is_refused_before_contacting_the_node(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = kakehashi(
        "user", "add", "--home", tmp_path, "tanaka", "--name", "田中太郎",
        "--password-file", missing,
    )  # fmt: skip
    assert result.code == 1
    assert f"cannot read the password file {missing}" in result.stderr
    assert "(bad_password_file)" in result.stderr


def test_user_add_without_name_is_a_usage_error(tmp_path: Path) -> None:
    result = kakehashi("user", "add", "--home", tmp_path, "tanaka")
    assert result.code == 2 and "--name" in result.stderr
