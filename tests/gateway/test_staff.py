"""Tests for gateway.staff: login names, display names, the password policy, staff-list CSV."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.errors import ProtocolError
from federation.rooms import check_user_id
from gateway.staff import (
    StaffRole,
    check_login,
    check_password,
    clean_department,
    clean_display_name,
    generate_password,
    parse_role,
    parse_staff_csv,
)

# --------------------------------------------------------------------------- login names


@pytest.mark.parametrize("login", ["tanaka", "t", "taro.tanaka", "sato_2", "k-ito", "a" * 32])
def test_valid_logins_are_accepted(login: str) -> None:
    assert check_login(login) == login


@pytest.mark.parametrize(
    "login",
    ["", "Tanaka", "2tanaka", ".tanaka", "_x", "a" * 33, "tanaka@tsu", "田中", "tana ka", "é", 7],
)
def test_invalid_logins_are_refused_with_bad_login(login: object) -> None:
    with pytest.raises(ProtocolError) as refused:
        check_login(login)
    assert refused.value.code == "bad_login"


@given(st.from_regex(r"[a-z][a-z0-9._-]{0,31}", fullmatch=True))
def test_every_valid_login_makes_a_valid_protocol_user_id(login: str) -> None:
    assert check_user_id(f"{check_login(login)}@tsu") == f"{login}@tsu"


# --------------------------------------------------------------------------- names


def test_display_name_keeps_japanese_and_strips_controls_and_invisible_characters() -> None:
    assert clean_display_name("田中\u3000太郎") == "田中\u3000太郎"
    assert clean_display_name("  田中 \x00太郎\u202e\u200b ") == "田中 太郎"
    assert clean_display_name("田中\t\n太郎") == "田中 太郎"
    assert clean_display_name("田中\u3000\u3000太郎") == "田中\u3000太郎"
    # Decomposed kana (か + combining dakuten) is stored composed (が), so names compare equal.
    assert clean_display_name("\u304b\u3099") == "\u304c"


@pytest.mark.parametrize("name", ["", "   ", "\u3000", "\x00\x07", "あ" * 65, 3])
def test_display_name_empty_too_long_or_not_text_is_refused(name: object) -> None:
    with pytest.raises(ProtocolError) as refused:
        clean_display_name(name)
    assert refused.value.code == "bad_name"


def test_department_may_be_empty_but_not_too_long() -> None:
    assert clean_department("") == ""
    assert clean_department(" 総務課 ") == "総務課"
    with pytest.raises(ProtocolError) as refused:
        clean_department("課" * 65)
    assert refused.value.code == "bad_department"


def test_roles_by_name_and_by_japanese_name() -> None:
    assert parse_role("staff") is StaffRole.STAFF
    assert parse_role("Room_Admin") is StaffRole.ROOM_ADMIN
    assert parse_role("ノード管理者") is StaffRole.NODE_ADMIN
    with pytest.raises(ProtocolError) as refused:
        parse_role("root")
    assert refused.value.code == "bad_role"


# --------------------------------------------------------------------------- passwords


def test_password_of_twelve_characters_is_accepted_eleven_refused() -> None:
    assert check_password("a1b2c3d4e5f6") == "a1b2c3d4e5f6"
    with pytest.raises(ProtocolError) as refused:
        check_password("a1b2c3d4e5f")
    assert refused.value.code == "weak_password"
    assert "12" in str(refused.value)


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("x" * 257, "longer than 256"),
        ("aaaaaaaaaaaaaaaa", "repeats one character"),
        ("correct\x00horse-battery", "control characters"),
        ("Taro.Tanaka.Soumu", "login or the display name"),
    ],
)
def test_password_policy_says_which_rule_failed_and_never_repeats_the_password(
    password: str, why: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        check_password(password, login="taro.tanaka.soumu", display_name="田中太郎")
    assert why in str(refused.value)
    assert password not in str(refused.value) and password not in (refused.value.hint or "")


def test_japanese_passphrase_is_accepted() -> None:
    assert check_password("津市役所の桜はきれいです")


def test_generated_passwords_are_long_unambiguous_and_different() -> None:
    passwords = {generate_password() for _ in range(200)}
    assert len(passwords) == 200
    for password in passwords:
        assert re.fullmatch(r"[a-km-np-z2-9]{4}(-[a-km-np-z2-9]{4}){3}", password)
        assert check_password(password) == password


# --------------------------------------------------------------------------- staff lists (CSV)


def _bad_csv(data: bytes, **kwargs: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        parse_staff_csv(data, **kwargs)  # type: ignore[arg-type]
    assert refused.value.code == "bad_csv"
    return refused.value


def test_csv_with_excel_bom_and_crlf_is_read() -> None:
    data = (
        "\ufefflogin,display_name,department,role\r\n"
        "tanaka,田中太郎,総務課,staff\r\n"
        "sato,佐藤花子,情報政策課,room_admin\r\n"
    ).encode()
    rows = parse_staff_csv(data)
    assert [(r.line, r.login, r.display_name, r.department, r.role) for r in rows] == [
        (2, "tanaka", "田中太郎", "総務課", StaffRole.STAFF),
        (3, "sato", "佐藤花子", "情報政策課", StaffRole.ROOM_ADMIN),
    ]


def test_csv_without_bom_reads_the_same() -> None:
    with_bom = "\ufefflogin,display_name\ntanaka,田中太郎\n".encode()
    without = b"login,display_name\ntanaka," + "田中太郎".encode() + b"\n"
    assert parse_staff_csv(with_bom) == parse_staff_csv(without)


def test_csv_quoted_fields_keep_commas_and_quotes() -> None:
    data = (
        'login,display_name,department,role\nito,"伊藤, 一郎","企画課 ""DX"" 推進室",\n'
    ).encode()
    (row,) = parse_staff_csv(data)
    assert row.display_name == "伊藤, 一郎"
    assert row.department == '企画課 "DX" 推進室'
    assert row.role is StaffRole.STAFF  # an empty role cell means staff


def test_csv_japanese_headers_in_any_order_and_optional_columns() -> None:
    data = "氏名,ログイン名,権限\n田中太郎,tanaka,ノード管理者\n".encode()
    (row,) = parse_staff_csv(data)
    assert (row.login, row.display_name, row.department, row.role) == (
        "tanaka",
        "田中太郎",
        "",
        StaffRole.NODE_ADMIN,
    )


def test_csv_blank_rows_are_skipped_but_count_as_lines() -> None:
    data = b"login,display_name\n\ntanaka,Tanaka\n,,\nsato,Sato\n"
    assert [(r.line, r.login) for r in parse_staff_csv(data)] == [(3, "tanaka"), (5, "sato")]


def test_csv_broken_row_names_its_line_and_nothing_is_returned() -> None:
    data = (
        "login,display_name,department,role\n"
        "tanaka,田中太郎,総務課,staff\n"
        "sato,佐藤花子,情報政策課,staff\n"
        "Suzuki,鈴木次郎,税務課,staff\n"
        "ito,伊藤一郎,企画課,staff\n"
    ).encode()
    refused = _bad_csv(data)
    assert str(refused).startswith("line 4: ")
    assert "Suzuki" in str(refused)
    assert "nothing was imported" in (refused.hint or "")


def test_csv_line_numbers_count_line_breaks_inside_quoted_cells() -> None:
    data = b'login,display_name,department\ntanaka,Tanaka,"line one\nline two"\nsato,,x\n'
    assert str(_bad_csv(data)).startswith("line 4: ")


@pytest.mark.parametrize(
    ("data", "line", "words"),
    [
        (b"tanaka,Tanaka\n", 1, "unknown column 'tanaka'"),
        (b"login,department\nx,y\n", 1, "missing: display_name"),
        (b"login,display_name,email\n", 1, "unknown column 'email'"),
        (b"login,display_name,login\n", 1, "appears twice"),
        (b"", 1, "empty"),
        (b"login,display_name\ntanaka,A\nsato,B\ntanaka,C\n", 4, "already appears on line 2"),
        (b"login,display_name\nsato,B,extra\n", 2, "3 cells"),
        (b"login,display_name,role\nsato,B,admin\n", 2, "unknown role"),
        (b"login,display_name\nsato,\n", 2, "display name is empty"),
        (b'login,display_name\nsato,"B\n', 2, "not valid CSV"),
    ],
)
def test_csv_problems_name_the_line_and_the_reason(data: bytes, line: int, words: str) -> None:
    message = str(_bad_csv(data))
    assert message.startswith(f"line {line}: ")
    assert words in message


def test_csv_login_existing_on_the_node_is_refused_with_its_line() -> None:
    data = b"login,display_name\ntanaka,A\nsato,B\n"
    message = str(_bad_csv(data, existing={"sato"}))
    assert message.startswith("line 3: ") and "already exists" in message


def test_csv_in_shift_jis_is_refused_with_how_to_save_as_utf8() -> None:
    data = "login,display_name\ntanaka,田中太郎\n".encode("cp932")
    refused = _bad_csv(data)
    assert str(refused).startswith("line 2: ")
    assert "CSV UTF-8" in (refused.hint or "")
