"""`kakehashi user ...`: the node operator manages this node's staff accounts.

Every command goes to the running node over its admin socket. Passwords the
node generates are printed once and kept nowhere in clear; a password chosen by
the operator is read from a file (`--password-file`, `-` for standard input),
never from the command line, where other accounts could read it in the process
list and it would stay in the shell history.
"""

from __future__ import annotations

import base64
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from federation.errors import ConfigError

from .admin_client import AdminClient
from .cli import _print_json, err, home_option, json_option, out
from .config import resolve_home
from .staff import StaffRole

__all__ = ["user"]

IMPORT_TIMEOUT = 900.0
"""Seconds an import may take (hashing thousands of generated passwords)."""

_ROLES = click.Choice([role.value for role in StaffRole])


def _admin(home: str, timeout: float = 30.0) -> AdminClient:
    return AdminClient(resolve_home(home).admin_socket, timeout=timeout)


def _read_password(path: str | None) -> str | None:
    """The password in `path` (`-`: standard input), without its line ending."""
    if path is None:
        return None
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the password file {path}: {exc}",
            code="bad_password_file",
            hint="give a UTF-8 text file holding only the password",
        ) from exc
    return text.removesuffix("\n").removesuffix("\r")


def _when(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="minutes")


def _who(row: dict[str, Any]) -> str:
    parts = [row["display_name"], row["department"], row["role"]]
    return f"{row['user_id']} ({escape(', '.join(p for p in parts if p))})"


def _print_password(row: dict[str, Any], label: str = "initial password") -> None:
    out.print(f"{label}: {row['initial_password']}")
    err.print(
        f"  shown only now: give it to {escape(row['display_name'])} in person or over a "
        "trusted channel"
    )


@click.group()
def user() -> None:
    """Staff accounts of this node: add, import, list, disable, enable, reset passwords."""


@user.command("add")
@home_option
@click.argument("login")
@click.option("--name", "display_name", required=True, help="Display name, e.g. 田中太郎.")
@click.option("--department", default="", help="Department, e.g. 総務課.")
@click.option("--role", type=_ROLES, default=StaffRole.STAFF.value, show_default=True)
@click.option(
    "--password-file",
    metavar="FILE",
    help="Read the password from FILE ('-': standard input). Without it, the node "
    "generates one and it is printed once.",
)
@json_option
def user_add(
    home: str,
    login: str,
    display_name: str,
    department: str,
    role: str,
    password_file: str | None,
    as_json: bool,
) -> None:
    """Add the user LOGIN (lowercase a-z, 0-9, '.', '_', '-'; known as LOGIN@this-node)."""
    payload: dict[str, Any] = {
        "login": login,
        "display_name": display_name,
        "department": department,
        "role": role,
    }
    password = _read_password(password_file)
    if password is not None:
        payload["password"] = password
    data = _admin(home).request("POST", "/v1/users", payload)
    if as_json:
        _print_json(data)
        return
    out.print(f"added {_who(data)}")
    if data["initial_password"]:
        _print_password(data)


@user.command("import")
@home_option
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(dir_okay=False))
@json_option
def user_import(home: str, csv_file: str, as_json: bool) -> None:
    """Add every user of a staff list: CSV in UTF-8 (Excel's 「CSV UTF-8」 is fine), a header
    row naming the columns login, display_name, department, role (or ログイン名, 氏名,
    所属, 権限), one user per row. Either every user is added or, if any row is wrong,
    none: the error names the line. Prints each new user's generated password once."""
    try:
        data = Path(csv_file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {csv_file}: {exc}", code="bad_csv") from exc
    if not as_json and sys.stderr.isatty():
        err.print("adding the users and hashing their passwords ...")
    rows = _admin(home, IMPORT_TIMEOUT).request(
        "POST", "/v1/users/import", {"csv": base64.b64encode(data).decode("ascii")}
    )
    if as_json:
        _print_json(
            [
                {
                    key: row[key]
                    for key in (
                        "login",
                        "user_id",
                        "display_name",
                        "department",
                        "role",
                        "initial_password",
                    )
                }
                for row in rows
            ]
        )
        return
    table = Table("login", "name", "department", "role", "initial password")
    for row in rows:
        table.add_row(
            row["login"],
            escape(row["display_name"]),
            escape(row["department"]),
            row["role"],
            row["initial_password"],
        )
    out.print(table)
    err.print(
        f"imported {len(rows)} user{'' if len(rows) == 1 else 's'}; the passwords are shown "
        "only now: hand each to its user in person or over a trusted channel"
    )


@user.command("list")
@home_option
@json_option
def user_list(home: str, as_json: bool) -> None:
    """Every user of this node: login, name, department, role, disabled, last login (UTC)."""
    rows = _admin(home).request("GET", "/v1/users")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no users yet; add one with: kakehashi user add LOGIN --name NAME")
        return
    table = Table("login", "name", "department", "role", "status", "last login")
    for row in rows:
        table.add_row(
            row["login"],
            escape(row["display_name"]),
            escape(row["department"]),
            row["role"],
            "[red]disabled[/]" if row["disabled"] else "enabled",
            _when(row["last_login_at"]),
        )
    out.print(table)


def _sessions(count: int) -> str:
    return f"{count} session{'' if count == 1 else 's'} revoked"


@user.command("disable")
@home_option
@click.argument("login")
@json_option
def user_disable(home: str, login: str, as_json: bool) -> None:
    """Refuse LOGIN's logins and end their sessions (until `user enable`)."""
    data = _admin(home).request("POST", "/v1/users/disable", {"login": login})
    if as_json:
        _print_json(data)
    else:
        out.print(f"disabled {data['user_id']}; {_sessions(data['sessions_revoked'])}")


@user.command("enable")
@home_option
@click.argument("login")
@json_option
def user_enable(home: str, login: str, as_json: bool) -> None:
    """Let a disabled LOGIN log in again."""
    data = _admin(home).request("POST", "/v1/users/enable", {"login": login})
    if as_json:
        _print_json(data)
    else:
        out.print(f"enabled {data['user_id']}")


@user.command("reset-password")
@home_option
@click.argument("login")
@click.option(
    "--password-file",
    metavar="FILE",
    help="Read the new password from FILE ('-': standard input). Without it, the node "
    "generates one and it is printed once.",
)
@json_option
def user_reset_password(home: str, login: str, password_file: str | None, as_json: bool) -> None:
    """Give LOGIN a new password and end all their sessions (their devices log in again)."""
    payload: dict[str, Any] = {"login": login}
    password = _read_password(password_file)
    if password is not None:
        payload["password"] = password
    data = _admin(home).request("POST", "/v1/users/reset-password", payload)
    if as_json:
        _print_json(data)
        return
    out.print(f"password of {data['user_id']} replaced; {_sessions(data['sessions_revoked'])}")
    if data["initial_password"]:
        _print_password(data, "new password")
