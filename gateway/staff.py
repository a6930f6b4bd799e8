"""Staff records: login names, display names, roles, the password policy and CSV staff lists.

Users are local to their node and known to the federation as `login@node`
(`tanaka@tsu`). These are the node's own rules for what an operator may type,
pure functions of their arguments (no I/O, no clock), so the CLI, the admin API
and a future web client refuse the same things with the same words.

- A login is lowercase ASCII `[a-z][a-z0-9._-]{0,31}`: short, typeable on any
  keyboard, and always a valid protocol user id once `@node` is appended (the
  protocol allows more, `federation.rooms.check_user_id`).
- Display names and departments are Japanese text: NFC-normalised, control,
  format-override and zero-width characters removed (they hide or reorder text
  in a room's member list), runs of spaces (ASCII or 全角) collapsed, ends trimmed,
  then length-checked.
- Passwords: at least 12 and at most 256 characters, no control characters, not
  one character repeated, not the login or display name. Length is what makes a
  password strong; composition rules (a digit, a symbol ...) make people write
  `Password1!` and are not imposed (NIST SP 800-63B, section 5.1.1.2).
- Generated passwords are 4 groups of 4 characters from 32 unambiguous lowercase
  letters and digits (`k7wq-3mzt-…`, 80 bits): read aloud or copied from paper
  without confusing 0/o or 1/l.
- A staff list (CSV from Excel) has a header row and one user per row; the first
  bad row stops the whole import with its line number, so a file is imported
  wholly or not at all.
"""

from __future__ import annotations

import csv
import io
import re
import secrets
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from federation.errors import ProtocolError

__all__ = [
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "StaffRole",
    "StaffRow",
    "check_login",
    "check_password",
    "clean_department",
    "clean_display_name",
    "generate_password",
    "parse_role",
    "parse_staff_csv",
]

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256
MAX_DISPLAY_NAME = 64
MAX_DEPARTMENT = 64
MAX_CSV_ROWS = 20_000
"""More rows than the largest municipality has staff (about 2,500) by a wide margin."""

_LOGIN = re.compile(r"[a-z][a-z0-9._-]{0,31}")
_PASSWORD_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # noqa: S105 - no l, o, 0, 1
_SPACES = re.compile(r"[ \u3000]+")
# Bidirectional overrides and isolates, zero-width characters and the BOM: invisible,
# and able to make one name look like another.
_INVISIBLE = frozenset(
    "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2066\u2067\u2068\u2069\ufeff"
)


class StaffRole(StrEnum):
    """What a user may do at their node."""

    STAFF = "staff"
    """Takes part in the rooms they are a member of."""
    ROOM_ADMIN = "room_admin"
    """May also create rooms and manage their members."""
    NODE_ADMIN = "node_admin"
    """May also manage the node's users."""


# Japanese names an office may put in the role column of a staff list.
_ROLE_ALIASES = {
    "職員": StaffRole.STAFF,
    "ルーム管理者": StaffRole.ROOM_ADMIN,
    "ノード管理者": StaffRole.NODE_ADMIN,
}


def parse_role(value: object) -> StaffRole:
    """A role from its name (`staff`, `room_admin`, `node_admin`, or 職員 / ルーム管理者 /
    ノード管理者); `ProtocolError` (bad_role) otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if text in _ROLE_ALIASES:
            return _ROLE_ALIASES[text]
        try:
            return StaffRole(text.lower())
        except ValueError:
            pass
    raise ProtocolError(
        f"unknown role {value!r}: use staff, room_admin or node_admin", code="bad_role"
    )


def check_login(login: object) -> str:
    """Return `login` if it is a valid login name, else `ProtocolError` (bad_login)."""
    if not isinstance(login, str) or not _LOGIN.fullmatch(login):
        raise ProtocolError(
            f"invalid login {login!r}: use 1-32 characters a-z, 0-9, '.', '_' and '-', "
            "starting with a lowercase letter (for example 'tanaka' or 'taro.tanaka')",
            code="bad_login",
        )
    return login


def _clean_text(value: object, what: str, code: str, *, maximum: int, required: bool) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be text", code=code)
    text = unicodedata.normalize("NFC", value)
    text = "".join(
        " " if ch in "\t\n\r" else ch
        for ch in text
        if ch not in _INVISIBLE and (ch in "\t\n\r" or unicodedata.category(ch) not in ("Cc", "Cs"))
    )
    text = _SPACES.sub(lambda m: m.group(0)[0], text).strip(" \u3000")
    if required and not text:
        raise ProtocolError(f"{what} is empty", code=code)
    if len(text) > maximum:
        raise ProtocolError(f"{what} is longer than {maximum} characters: {text!r}", code=code)
    return text


def clean_display_name(value: object) -> str:
    """The display name as stored (see the module docstring); `ProtocolError` (bad_name)."""
    return _clean_text(
        value, "the display name", "bad_name", maximum=MAX_DISPLAY_NAME, required=True
    )


def clean_department(value: object) -> str:
    """The department as stored (may be empty); `ProtocolError` (bad_department)."""
    return _clean_text(
        value, "the department", "bad_department", maximum=MAX_DEPARTMENT, required=False
    )


def check_password(password: object, *, login: str = "", display_name: str = "") -> str:
    """Return `password` if the policy accepts it, else `ProtocolError` (weak_password).

    The message says which rule failed and never repeats the password.
    """

    def refuse(why: str) -> ProtocolError:
        return ProtocolError(
            f"password refused: {why}",
            code="weak_password",
            hint=f"use at least {MIN_PASSWORD_LENGTH} characters, for example several words",
        )

    if not isinstance(password, str):
        raise refuse("it must be text")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise refuse(f"it is shorter than {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise refuse(f"it is longer than {MAX_PASSWORD_LENGTH} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        raise refuse("it contains control characters")
    if len(set(password)) == 1:
        raise refuse("it repeats one character")
    folded = password.casefold()
    if (login and folded == login.casefold()) or (
        display_name and folded == display_name.casefold()
    ):
        raise refuse("it is the login or the display name")
    return password


def generate_password() -> str:
    """A random initial password, `xxxx-xxxx-xxxx-xxxx` (80 bits)."""
    groups = ("".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(4)) for _ in range(4))
    return "-".join(groups)


@dataclass(frozen=True, slots=True, kw_only=True)
class StaffRow:
    """One user of a staff list, validated."""

    line: int
    """Line of the file the row starts on (1 is the header)."""
    login: str
    """Login name."""
    display_name: str
    """Display name, cleaned."""
    department: str
    """Department, cleaned (may be empty)."""
    role: StaffRole
    """Role (staff when the cell or the column is absent)."""


# Accepted header names (compared after trimming and lowercasing).
_COLUMNS: dict[str, tuple[str, ...]] = {
    "login": ("login", "ログイン名", "ログインid", "ユーザーid", "ユーザid"),
    "display_name": ("display_name", "display name", "name", "氏名", "表示名", "名前"),
    "department": ("department", "所属", "部署", "課"),
    "role": ("role", "権限", "役割"),
}
_HEADER_NAMES = {alias: column for column, aliases in _COLUMNS.items() for alias in aliases}


def _bad(line: int, why: str) -> ProtocolError:
    return ProtocolError(
        f"line {line}: {why}",
        code="bad_csv",
        hint="nothing was imported; correct that line and import the whole file again",
    )


def _header(line: int, cells: list[str]) -> dict[str, int]:
    columns: dict[str, int] = {}
    for index, cell in enumerate(cells):
        name = cell.strip().lower()
        if not name:
            continue
        column = _HEADER_NAMES.get(name)
        if column is None:
            raise _bad(
                line,
                f"unknown column {cell.strip()!r}; the header names the columns "
                "login, display_name, department, role (or ログイン名, 氏名, 所属, 権限)",
            )
        if column in columns:
            raise _bad(line, f"column {column} appears twice")
        columns[column] = index
    missing = [c for c in ("login", "display_name") if c not in columns]
    if missing:
        raise _bad(
            line,
            "the first line must be a header naming the columns login, display_name, "
            f"department, role; missing: {', '.join(missing)}",
        )
    return columns


def parse_staff_csv(data: bytes, *, existing: Collection[str] = ()) -> list[StaffRow]:
    """Every user of a staff list, or `ProtocolError` (bad_csv) naming the first bad line.

    `data` is UTF-8, with or without the BOM Excel writes ("CSV UTF-8"). Quoted cells
    may hold commas and line breaks. Blank rows are skipped. A login that appears
    twice in the file or is in `existing` is refused.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ProtocolError(
            f"line {line}: the file is not UTF-8 text",
            code="bad_csv",
            hint="nothing was imported; in Excel save it as 「CSV UTF-8 (コンマ区切り)」",
        ) from exc
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[StaffRow] = []
    seen: dict[str, int] = {}
    columns: dict[str, int] | None = None
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise _bad(line, f"not valid CSV ({exc})") from exc
        if not any(cell.strip() for cell in cells):
            continue
        if columns is None:
            columns = _header(line, cells)
            continue
        rows.append(_row(line, cells, columns, seen, existing))
        if len(rows) > MAX_CSV_ROWS:
            raise _bad(line, f"more than {MAX_CSV_ROWS} users in one file; split it")
    if columns is None:
        raise _bad(1, "the file is empty; it needs a header line and one line per user")
    return rows


def _row(
    line: int,
    cells: list[str],
    columns: dict[str, int],
    seen: dict[str, int],
    existing: Collection[str],
) -> StaffRow:
    width = max(columns.values()) + 1
    extra = [cell for cell in cells[width:] if cell.strip()]
    if extra:
        raise _bad(line, f"{len(cells)} cells, but the header names {width} columns")

    def cell(column: str) -> str:
        index = columns.get(column)
        return cells[index].strip() if index is not None and index < len(cells) else ""

    try:
        login = check_login(cell("login"))
        name = clean_display_name(cell("display_name"))
        department = clean_department(cell("department"))
        role = parse_role(cell("role")) if cell("role") else StaffRole.STAFF
    except ProtocolError as exc:
        raise _bad(line, str(exc)) from exc
    if login in seen:
        raise _bad(line, f"login {login!r} already appears on line {seen[login]}")
    if login in existing:
        raise _bad(line, f"login {login!r} already exists on this node")
    seen[login] = line
    return StaffRow(line=line, login=login, display_name=name, department=department, role=role)
