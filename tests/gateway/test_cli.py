"""Tests for the `kakehashi` console script, run as a real subprocess.

Exit codes are part of the interface: 0 ok, 1 failure (one `error:` line and, where there is
one, a `fix:` line), 2 usage error. Standard error is a pipe here, as in scripts and logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def lines(self, prefix: str) -> list[str]:
        """Standard-error lines starting (after indentation) with `prefix`."""
        return [line for line in self.stderr.splitlines() if line.lstrip().startswith(prefix)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("KAKEHASHI_HOME", "COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(name, None)
    env["NO_COLOR"] = "1"
    # Some tests run in another directory: keep a relative PYTHONPATH (e.g. ".") pointing here.
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(entry).absolute()) for entry in env["PYTHONPATH"].split(os.pathsep) if entry
        )
    return env


def kakehashi(*args: str | Path, cwd: Path | None = None) -> Result:
    done = subprocess.run(
        [KAKEHASHI, *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_env(),
        cwd=cwd,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def _init_args(home: Path, *extra: str) -> list[str | Path]:
    return ["init", "--home", home, "--name", "津市", "--listen", "127.0.0.1:8443", *extra]


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One home made by a successful `kakehashi init`, shared by the tests that need one."""
    home = tmp_path_factory.mktemp("cli") / "home-of-a-node-with-a-rather-long-path"
    return home, kakehashi(*_init_args(home, "--node-id", "tsu", "--code", "242012"))


def test_console_script_is_installed_next_to_the_interpreter() -> None:
    assert Path(KAKEHASHI).is_file(), f"install the package: pip install -e . ({KAKEHASHI})"


def test_help_exits_0_and_lists_every_top_level_command() -> None:
    result = kakehashi("--help")
    assert result.code == 0, result.stderr
    commands = result.stdout.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"init", "run", "federation", "peer", "status"} <= listed


def test_init_with_malformed_listen_is_a_usage_error_exit_2(tmp_path: Path) -> None:
    result = kakehashi(
        "init", "--home", tmp_path / "h", "--node-id", "tsu", "--name", "津市", "--listen", "8443"
    )
    assert result.code == 2
    assert "--listen" in result.stderr
    assert "HOST:PORT" in result.stderr
    assert not (tmp_path / "h").exists()


def test_init_with_invalid_node_id_exits_1_with_one_error_line_naming_the_rule(
    tmp_path: Path,
) -> None:
    result = kakehashi(*_init_args(tmp_path / "h", "--node-id", "Tsu_City"))
    assert result.code == 1
    assert "Traceback" not in result.stderr
    [error] = result.lines("error:")
    # The whole message stays on one line even though standard error is a pipe (no wrapping).
    assert "'Tsu_City'" in error
    assert "2-32 characters a-z, 0-9 and '-'" in error
    assert error.endswith("(bad_node_id)")
    assert not (tmp_path / "h").exists()


def test_init_with_valid_options_exits_0_and_creates_the_home(
    initialised: tuple[Path, Result],
) -> None:
    home, result = initialised
    assert result.code == 0, result.stderr
    assert "initialised node tsu" in result.stdout
    for name in ("config.toml", "node.db", "keys/signing.key", "keys/tls.key"):
        assert (home / name).is_file(), name
    assert 'id = "tsu"' in (home / "config.toml").read_text(encoding="utf-8")


def test_init_twice_on_the_same_home_exits_1_already_initialised(
    initialised: tuple[Path, Result],
) -> None:
    home, _ = initialised
    result = kakehashi(*_init_args(home, "--node-id", "tsu"))
    assert result.code == 1
    [error] = result.lines("error:")
    assert "(already_initialised)" in error
    assert len(result.lines("fix:")) == 1


def test_status_of_a_stopped_node_exits_1_not_running_with_a_fix_naming_kakehashi_run(
    initialised: tuple[Path, Result],
) -> None:
    home, _ = initialised
    result = kakehashi("status", "--home", home)
    assert result.code == 1
    [error] = result.lines("error:")
    assert "not running" in error
    assert error.endswith("(node_not_running)")
    [fix] = result.lines("fix:")
    assert f"kakehashi run --home {home}" in fix


def test_peer_list_without_home_or_environment_is_click_missing_option_exit_2(
    tmp_path: Path,
) -> None:
    result = kakehashi("peer", "list", "--json", cwd=tmp_path)
    assert result.code == 2
    assert "Missing option '--home'" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("limit", ["0", "-3", "100001"])
def test_room_history_limit_outside_1_to_100000_is_a_usage_error_before_any_request(
    tmp_path: Path, limit: str
) -> None:
    # No node runs at this home: the range is checked before the CLI asks one.
    result = kakehashi("room", "history", "--home", tmp_path, "!r:tsu", "--limit", limit)
    assert result.code == 2
    assert f"Invalid value for '--limit': {limit} is not in the range 1<=x<=100000" in (
        result.stderr
    )
    assert result.stdout == ""


def test_init_with_wrong_check_digit_exits_1_and_names_the_expected_code(
    tmp_path: Path,
) -> None:
    result = kakehashi(*_init_args(tmp_path / "h", "--node-id", "tsu", "--code", "242013"))
    assert result.code == 1
    [error] = result.lines("error:")
    assert "check digit" in error
    assert "expected 242012" in error
    assert not (tmp_path / "h").exists()


def test_federation_join_with_garbage_token_exits_1_not_an_invitation_token(
    initialised: tuple[Path, Result],
) -> None:
    home, _ = initialised
    result = kakehashi("federation", "join", "--home", home, "not.a-real.token")
    assert result.code == 1
    assert "Traceback" not in result.stderr
    [error] = result.lines("error:")
    assert "not a Kakehashi invitation token" in error
    assert "(bad_token)" in error
