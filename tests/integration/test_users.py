"""Staff accounts on a running node: the operator's `kakehashi user ...` commands in a
subprocess over the admin socket, and logins through the node's own `Accounts`."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from gateway.accounts import AuthError
from gateway.node import Node

from .conftest import Cluster

pytestmark = pytest.mark.integration

KAKEHASHI = str(Path(sys.executable).parent / "kakehashi")
PASSWORD = "津市役所の桜はきれいです"


async def cli(*args: str | Path, stdin: bytes | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAKEHASHI_HOME"}
    env["NO_COLOR"] = "1"
    process = await asyncio.create_subprocess_exec(
        KAKEHASHI,
        *map(str, args),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def user(node: Node, *args: str | Path, stdin: bytes | None = None) -> tuple[int, str, str]:
    return await cli("user", args[0], "--home", node.home.root, *args[1:], stdin=stdin)


async def users_json(node: Node) -> list[dict[str, object]]:
    code, out, err = await user(node, "list", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list)
    return rows


async def refused(awaitable: object) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value


def password_file(tmp_path: Path, password: str = PASSWORD) -> Path:
    path = tmp_path / "password.txt"
    path.write_text(password + "\n", encoding="utf-8")
    return path


async def test_user_add_and_list_through_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    node = await cluster.authority()
    code, out, err = await user(
        node, "add", "tanaka", "--name", "田中太郎", "--department", "総務課", "--json"
    )
    assert code == 0, err
    added = json.loads(out)
    assert added["user_id"] == "tanaka@mie-pref" and added["role"] == "staff"
    generated = added["initial_password"]
    assert isinstance(generated, str) and len(generated) >= 12
    assert "password_hash" not in added
    # Human output: the generated password once, with what to do with it.
    code, out, err = await user(
        node, "add", "sato", "--name", "佐藤花子", "--role", "node_admin", "--password-file",
        password_file(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "added sato@mie-pref (佐藤花子, node_admin)" in out
    assert "initial password" not in out and PASSWORD not in out + err
    rows = await users_json(node)
    assert [(r["login"], r["display_name"], r["department"], r["role"]) for r in rows] == [
        ("sato", "佐藤花子", "", "node_admin"),
        ("tanaka", "田中太郎", "総務課", "staff"),
    ]
    assert all(r["disabled"] is False and r["last_login_at"] is None for r in rows)
    # Both passwords work, and the login shows in the list.
    assert (await node.accounts.login("tanaka", generated)).user_id == "tanaka@mie-pref"
    assert (await node.accounts.login("sato", PASSWORD)).role.value == "node_admin"
    code, out, _ = await user(node, "list")
    assert code == 0 and "田中太郎" in out and "総務課" in out and "never" not in out
    key = node.home.token_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


async def test_user_add_refusals_are_one_line_with_a_fix_and_usage_errors_exit_2(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = await cluster.authority()
    code, _, err = await user(node, "add", "Tanaka", "--name", "田中太郎")
    assert code == 1 and "invalid login 'Tanaka'" in err and "(bad_login)" in err
    code, _, err = await user(
        node, "add", "tanaka", "--name", "田中", "--password-file", password_file(tmp_path, "short")
    )
    assert code == 1 and "shorter than 12" in err and "fix:" in err
    code, _, err = await user(node, "add", "tanaka")
    assert code == 2 and "--name" in err
    code, _, err = await user(node, "add", "tanaka", "--name", "田中", "--role", "root")
    assert code == 2
    assert await users_json(node) == []


async def test_import_adds_a_staff_list_and_a_file_with_a_bad_row_adds_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = await cluster.authority()
    good = tmp_path / "staff.csv"
    good.write_bytes(
        "\ufeffログイン名,氏名,所属,権限\r\n"
        "tanaka,田中太郎,総務課,職員\r\n"
        'sato,"佐藤, 花子",情報政策課,room_admin\r\n'
        "ito,伊藤一郎,,\r\n".encode()
    )
    code, out, err = await user(node, "import", good, "--json")
    assert code == 0, err
    imported = json.loads(out)
    assert [(r["login"], r["display_name"], r["role"]) for r in imported] == [
        ("tanaka", "田中太郎", "staff"),
        ("sato", "佐藤, 花子", "room_admin"),
        ("ito", "伊藤一郎", "staff"),
    ]
    passwords = {r["login"]: r["initial_password"] for r in imported}
    assert all(passwords.values()) and len(set(passwords.values())) == 3
    assert (await node.accounts.login("sato", passwords["sato"])).user_id == "sato@mie-pref"
    before = await users_json(node)

    bad = tmp_path / "more.csv"
    bad.write_text(
        "login,display_name,department,role\n"
        "kato,加藤三郎,税務課,staff\n"
        "endo,遠藤四郎,税務課,staff\n"
        "suzuki,鈴木五郎,税務課,superuser\n"
        "mori,森六郎,税務課,staff\n",
        encoding="utf-8",
    )
    code, out, err = await user(node, "import", bad)
    assert code == 1
    assert "line 4:" in err and "superuser" in err and "nothing was imported" in err
    assert out == ""
    assert await users_json(node) == before

    # A login that already exists on the node also stops the whole file.
    clash = tmp_path / "clash.csv"
    clash.write_text("login,display_name\nkato,加藤三郎\nito,伊藤一郎\n", encoding="utf-8")
    code, _, err = await user(node, "import", clash)
    assert code == 1 and "line 3:" in err and "already exists" in err
    assert await users_json(node) == before

    # Human output: a table of logins and their passwords.
    fine = tmp_path / "fine.csv"
    fine.write_text("login,display_name\nkato,加藤三郎\n", encoding="utf-8")
    code, out, err = await user(node, "import", fine)
    assert code == 0, err
    assert "kato" in out and "加藤三郎" in out and "imported 1 user" in err
    assert len(await users_json(node)) == 4


async def test_disabled_user_cannot_log_in_until_enabled(cluster: Cluster, tmp_path: Path) -> None:
    node = await cluster.authority()
    code, _, err = await user(
        node, "add", "tanaka", "--name", "田中太郎", "--password-file", password_file(tmp_path)
    )
    assert code == 0, err
    tokens = await node.accounts.login("tanaka", PASSWORD)
    code, out, err = await user(node, "disable", "tanaka")
    assert code == 0, err
    assert "disabled tanaka@mie-pref; 1 session revoked" in out
    assert (await refused(node.accounts.login("tanaka", PASSWORD))).code == "user_disabled"
    assert (await refused(node.accounts.verify_access(tokens.access_token))).code == (
        "user_disabled"
    )
    rows = await users_json(node)
    assert rows[0]["disabled"] is True
    code, out, _ = await user(node, "list")
    assert "disabled" in out
    code, out, err = await user(node, "enable", "tanaka@mie-pref", "--json")
    assert code == 0, err
    assert json.loads(out)["disabled"] is False
    assert (await node.accounts.login("tanaka", PASSWORD)).user_id == "tanaka@mie-pref"


async def test_reset_password_refuses_the_old_refresh_token_and_the_old_password(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = await cluster.authority()
    code, _, err = await user(
        node, "add", "tanaka", "--name", "田中太郎", "--password-file", password_file(tmp_path)
    )
    assert code == 0, err
    tokens = await node.accounts.login("tanaka", PASSWORD)
    code, out, err = await user(node, "reset-password", "tanaka", "--json")
    assert code == 0, err
    reset = json.loads(out)
    assert reset["sessions_revoked"] == 1
    new_password = reset["initial_password"]
    assert (await refused(node.accounts.refresh(tokens.refresh_token))).code == "session_revoked"
    assert (await refused(node.accounts.login("tanaka", PASSWORD))).code == "bad_credentials"
    assert (await node.accounts.login("tanaka", new_password)).user_id == "tanaka@mie-pref"
    # From standard input, as a script would.
    code, out, err = await user(
        node, "reset-password", "tanaka", "--password-file", "-", stdin=b"another fine passphrase\n"
    )
    assert code == 0, err
    assert "password of tanaka@mie-pref replaced; 1 session revoked" in out
    assert (await node.accounts.login("tanaka", "another fine passphrase")).user_id


async def test_five_wrong_passwords_lock_even_the_right_one_also_after_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    node = await cluster.authority()
    code, _, err = await user(
        node, "add", "tanaka", "--name", "田中太郎", "--password-file", password_file(tmp_path)
    )
    assert code == 0, err
    for _ in range(5):
        wrong = await refused(node.accounts.login("tanaka", "not the password", source="10.1.2.3"))
        assert wrong.code == "bad_credentials"
    locked = await refused(node.accounts.login("tanaka", PASSWORD, source="10.1.2.4"))
    assert (locked.code, locked.status) == ("too_many_attempts", 429)
    assert locked.retry_after is not None and 0 < locked.retry_after <= 900

    await cluster.stop("mie-pref")
    node = await cluster.start("mie-pref")
    again = await refused(node.accounts.login("tanaka", PASSWORD))
    assert again.code == "too_many_attempts"

    cluster.clocks["mie-pref"].offset += 901  # the 15-minute window has passed
    assert (await node.accounts.login("tanaka", PASSWORD)).user_id == "tanaka@mie-pref"


async def test_users_are_local_to_their_node(cluster: Cluster) -> None:
    authority = await cluster.authority()
    tsu = await cluster.member("tsu", "津市", "242012")
    code, out, err = await user(tsu, "add", "tanaka", "--name", "田中太郎", "--json")
    assert code == 0, err
    assert json.loads(out)["user_id"] == "tanaka@tsu"
    assert await users_json(authority) == []
    code, _, err = await user(tsu, "disable", "tanaka@mie-pref")
    assert code == 1 and "not a user of this node (tsu)" in err and "mie-pref" in err
    code, _, err = await user(authority, "disable", "tanaka")
    assert code == 1 and "no user tanaka@mie-pref" in err and "(unknown_user)" in err
