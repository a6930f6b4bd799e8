"""Tests for gateway.accounts: users, login, tokens, rotation, throttling, over a real database.

The clock is a fixed value the tests move; password hashing uses cheap Argon2id
parameters (the rules do not depend on the cost).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from argon2 import PasswordHasher
from structlog.testing import capture_logs

from federation.errors import ProtocolError
from gateway.accounts import Accounts, AccountSettings, AuthError, Tokens
from gateway.staff import StaffRole
from gateway.store import Store
from gateway.throttle import ThrottlePolicy

T0 = 1_750_000_000.0
PASSWORD = "correct horse battery"


class FixedClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _settings(**changes: object) -> AccountSettings:
    values: dict[str, object] = {
        "hasher": PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1),
        "initial_hasher": PasswordHasher(time_cost=1, memory_cost=256, parallelism=1),
        "per_source": ThrottlePolicy(limit=8, window=900.0),
    }
    values.update(changes)
    return AccountSettings(**values)  # type: ignore[arg-type]


class Env:
    def __init__(self, root: Path, clock: FixedClock) -> None:
        self.root = root
        self.clock = clock
        self.store = Store(root / "node.db")
        self.accounts = self._accounts(_settings())

    def _accounts(self, settings: AccountSettings) -> Accounts:
        return Accounts(
            store=self.store,
            node_id="tsu",
            token_key_path=self.root / "token.key",
            clock=self.clock,
            settings=settings,
        )

    async def restart(self, settings: AccountSettings | None = None) -> None:
        """A new process on the same home: new store connection, new service."""
        await self.store.close()
        self.store = Store(self.root / "node.db")
        await self.store.open()
        self.accounts = self._accounts(settings or _settings())


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    environment = Env(tmp_path, FixedClock())
    await environment.store.open()
    try:
        yield environment
    finally:
        await environment.store.close()


async def _with_user(env: Env, login: str = "tanaka", **kwargs: object) -> None:
    await env.accounts.add_user(
        login,
        display_name=str(kwargs.pop("display_name", "田中太郎")),
        password=PASSWORD,
        **kwargs,  # type: ignore[arg-type]
    )


async def _refused(awaitable: object) -> AuthError:
    with pytest.raises(AuthError) as refused:
        await awaitable  # type: ignore[misc]
    return refused.value


async def _fail_login(env: Env, login: str = "tanaka", source: str | None = None) -> None:
    refused = await _refused(env.accounts.login(login, "wrong password!", source=source))
    assert refused.code == "bad_credentials"


# --------------------------------------------------------------------------- users


async def test_add_user_with_generated_password_returns_it_once_and_it_logs_in(env: Env) -> None:
    issued = await env.accounts.add_user(
        "tanaka", display_name="田中太郎", department="総務課", role="room_admin"
    )
    assert issued.initial_password is not None
    assert issued.user.user_id == "tanaka@tsu" and issued.user.role is StaffRole.ROOM_ADMIN
    tokens = await env.accounts.login("tanaka", issued.initial_password)
    assert tokens.user_id == "tanaka@tsu" and tokens.role is StaffRole.ROOM_ADMIN
    (listed,) = await env.accounts.users()
    assert listed.to_json() == {
        "login": "tanaka",
        "user_id": "tanaka@tsu",
        "display_name": "田中太郎",
        "department": "総務課",
        "role": "room_admin",
        "disabled": False,
        "created_at": int(T0),
        "updated_at": int(T0),
        "last_login_at": int(T0),
    }


async def test_add_user_refuses_bad_login_weak_password_duplicates_and_other_nodes(
    env: Env,
) -> None:
    cases = [
        ({"login": "Tanaka"}, "bad_login"),
        ({"login": "tanaka", "password": "short"}, "weak_password"),
        ({"login": "tanaka", "display_name": "  "}, "bad_name"),
        ({"login": "tanaka", "role": "root"}, "bad_role"),
        ({"login": "tanaka@ise"}, "not_local_user"),
    ]
    for change, code in cases:
        values: dict[str, object] = {"login": "tanaka", "display_name": "田中太郎"}
        values.update(change)
        login = values.pop("login")
        with pytest.raises(ProtocolError) as refused:
            await env.accounts.add_user(login, **values)  # type: ignore[arg-type]
        assert refused.value.code == code, change
    assert await env.accounts.users() == []
    await env.accounts.add_user("tanaka@tsu", display_name="田中太郎")
    with pytest.raises(ProtocolError) as refused:
        await env.accounts.add_user("tanaka", display_name="田中次郎")
    assert refused.value.code == "user_exists" and refused.value.status == 409


async def test_import_adds_every_row_or_none(env: Env) -> None:
    good = "\ufefflogin,display_name,department,role\ntanaka,田中太郎,総務課,staff\n".encode()
    good += "sato,佐藤花子,情報政策課,node_admin\n".encode()
    issued = await env.accounts.import_users(good)
    assert [(i.user.login, i.user.role) for i in issued] == [
        ("tanaka", StaffRole.STAFF),
        ("sato", StaffRole.NODE_ADMIN),
    ]
    passwords = [i.initial_password for i in issued]
    assert all(passwords) and len(set(passwords)) == 2
    before = await env.accounts.users()
    bad = b"login,display_name\nito,Ito\nkato,Kato\nBAD!,Nope\nendo,Endo\n"
    with pytest.raises(ProtocolError) as refused:
        await env.accounts.import_users(bad)
    assert str(refused.value).startswith("line 4: ")
    clash = b"login,display_name\nito,Ito\nsato,Sato again\n"
    with pytest.raises(ProtocolError) as refused:
        await env.accounts.import_users(clash)
    assert str(refused.value).startswith("line 3: ") and "already exists" in str(refused.value)
    assert await env.accounts.users() == before
    assert passwords[0] is not None
    assert (await env.accounts.login("tanaka", passwords[0])).user_id == "tanaka@tsu"


async def test_generated_password_is_rehashed_with_the_full_profile_at_first_login(
    env: Env,
) -> None:
    issued = await env.accounts.add_user("tanaka", display_name="田中太郎")
    assert issued.initial_password is not None

    async def stored_hash() -> str:
        row = await env.store.read_one(
            "SELECT password_hash FROM user_account WHERE login = 'tanaka'"
        )
        return str(row[0])

    light = await stored_hash()
    assert env.accounts.settings.hasher.check_needs_rehash(light)
    await env.accounts.login("tanaka", issued.initial_password)
    full = await stored_hash()
    assert full != light and not env.accounts.settings.hasher.check_needs_rehash(full)
    assert full.startswith("$argon2id$")
    await env.accounts.login("tanaka", issued.initial_password)  # still the same password


async def test_passwords_and_hashes_never_reach_logs_or_views(env: Env) -> None:
    with capture_logs() as logs:
        issued = await env.accounts.add_user("tanaka", display_name="田中太郎")
        assert issued.initial_password is not None
        tokens = await env.accounts.login("tanaka", issued.initial_password, source="10.0.0.5")
        await _fail_login(env)
        # A password typed into the login field: not logged either, failed or throttled.
        for _ in range(6):
            await _refused(env.accounts.login("s3cret.passw0rd", PASSWORD))
        await env.accounts.reset_password("tanaka", "another good password")
    row = await env.store.read_one("SELECT password_hash FROM user_account")
    secrets = [issued.initial_password, PASSWORD, "another good password", str(row[0])]
    secrets += [tokens.access_token, tokens.refresh_token, "wrong password!", "s3cret.passw0rd"]
    text = repr(logs) + repr(tokens) + repr(issued) + repr(await env.accounts.users())
    assert {event["event"] for event in logs} >= {
        "user_added",
        "login_succeeded",
        "login_failed",
        "login_throttled",
        "password_reset",
    }
    for secret in secrets:
        assert secret not in text


# --------------------------------------------------------------------------- tokens


async def test_login_gives_a_15_minute_access_token_naming_user_role_and_session(
    env: Env,
) -> None:
    await _with_user(env, role="node_admin")
    env.clock.now = T0 + 0.7
    tokens = await env.accounts.login("tanaka", PASSWORD)
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert claims["sub"] == "tanaka@tsu" and claims["iss"] == "tsu"
    assert claims["role"] == "node_admin"
    assert claims["iat"] == int(T0) and claims["exp"] == int(T0) + 900
    assert tokens.access_expires_at == int(T0) + 900
    assert tokens.refresh_expires_at == int(T0) + 30 * 24 * 3600
    principal = await env.accounts.verify_access(tokens.access_token)
    assert (principal.user_id, principal.login, principal.role) == (
        "tanaka@tsu",
        "tanaka",
        StaffRole.NODE_ADMIN,
    )
    assert principal.display_name == "田中太郎" and principal.session_id == claims["sid"]
    env.clock.now = T0 + 899
    assert (await env.accounts.verify_access(tokens.access_token)).login == "tanaka"
    env.clock.now = T0 + 900
    assert (await _refused(env.accounts.verify_access(tokens.access_token))).code == (
        "token_expired"
    )


async def test_wrong_password_and_unknown_login_get_the_same_answer(env: Env) -> None:
    await _with_user(env)
    wrong = await _refused(env.accounts.login("tanaka", "not the password"))
    unknown = await _refused(env.accounts.login("nobody", PASSWORD))
    invalid = await _refused(env.accounts.login("Not A Login!", PASSWORD))
    assert (wrong.code, str(wrong), wrong.status) == (unknown.code, str(unknown), unknown.status)
    assert (invalid.code, invalid.status) == ("bad_credentials", 401)


async def test_login_forgives_capitals_and_spaces_around_the_login(env: Env) -> None:
    await _with_user(env)
    assert (await env.accounts.login("  Tanaka ", PASSWORD)).user_id == "tanaka@tsu"


async def test_refresh_rotates_and_reusing_a_used_token_revokes_the_whole_session(
    env: Env,
) -> None:
    await _with_user(env)
    first = await env.accounts.login("tanaka", PASSWORD)
    env.clock.now += 600
    second = await env.accounts.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.access_expires_at == int(env.clock.now) + 900
    assert (await env.accounts.verify_access(second.access_token)).login == "tanaka"
    # The first token again: someone holds a copy. Both copies' session ends.
    with capture_logs() as logs:
        reused = await _refused(env.accounts.refresh(first.refresh_token))
    assert reused.code == "bad_token" and "revoked" in str(reused)
    assert [e["event"] for e in logs] == ["refresh_token_reused"]
    assert (await _refused(env.accounts.refresh(second.refresh_token))).code == "session_revoked"
    assert (await _refused(env.accounts.verify_access(second.access_token))).code == (
        "session_revoked"
    )
    assert (await _refused(env.accounts.verify_access(first.access_token))).code == (
        "session_revoked"
    )
    # Other sessions of the same user are not touched.
    other = await env.accounts.login("tanaka", PASSWORD)
    assert (await env.accounts.refresh(other.refresh_token)).user_id == "tanaka@tsu"


async def test_refresh_token_expires_after_30_days_and_unknown_ones_are_refused(
    env: Env,
) -> None:
    await _with_user(env)
    tokens = await env.accounts.login("tanaka", PASSWORD)
    assert (await _refused(env.accounts.refresh("x" * 43))).code == "bad_token"
    assert (await _refused(env.accounts.refresh(""))).code == "bad_token"
    env.clock.now = T0 + 30 * 24 * 3600
    assert (await _refused(env.accounts.refresh(tokens.refresh_token))).code == "token_expired"


async def test_each_refresh_extends_the_session_by_30_days(env: Env) -> None:
    await _with_user(env)
    tokens: Tokens = await env.accounts.login("tanaka", PASSWORD)
    for _ in range(3):
        env.clock.now += 20 * 24 * 3600
        tokens = await env.accounts.refresh(tokens.refresh_token)
    assert tokens.refresh_expires_at == int(env.clock.now) + 30 * 24 * 3600


async def test_logout_revokes_the_session_and_is_idempotent(env: Env) -> None:
    await _with_user(env)
    tokens = await env.accounts.login("tanaka", PASSWORD)
    await env.accounts.logout(tokens.refresh_token)
    await env.accounts.logout(tokens.refresh_token)
    assert (await _refused(env.accounts.refresh(tokens.refresh_token))).code == "session_revoked"
    assert (await _refused(env.accounts.verify_access(tokens.access_token))).code == (
        "session_revoked"
    )
    assert (await _refused(env.accounts.logout("never-issued"))).code == "bad_token"


async def test_disabled_user_is_refused_everywhere_and_enabling_needs_a_new_login(
    env: Env,
) -> None:
    await _with_user(env)
    tokens = await env.accounts.login("tanaka", PASSWORD)
    user, revoked = await env.accounts.set_disabled("tanaka", True)
    assert user.disabled and revoked == 1
    refused = await _refused(env.accounts.login("tanaka", PASSWORD))
    assert (refused.code, refused.status) == ("user_disabled", 403)
    assert (await _refused(env.accounts.verify_access(tokens.access_token))).code == (
        "user_disabled"
    )
    assert (await _refused(env.accounts.refresh(tokens.refresh_token))).code in (
        "session_revoked",
        "user_disabled",
    )
    # The wrong password of a disabled user says only "wrong": disabled is not revealed.
    assert (await _refused(env.accounts.login("tanaka", "nope nope nope"))).code == (
        "bad_credentials"
    )
    await env.accounts.set_disabled("tanaka", False)
    assert (await _refused(env.accounts.refresh(tokens.refresh_token))).code == "session_revoked"
    fresh = await env.accounts.login("tanaka", PASSWORD)
    assert (await env.accounts.verify_access(fresh.access_token)).login == "tanaka"


async def test_reset_password_revokes_sessions_and_replaces_the_password(env: Env) -> None:
    await _with_user(env)
    one = await env.accounts.login("tanaka", PASSWORD)
    two = await env.accounts.login("tanaka", PASSWORD)
    issued, revoked = await env.accounts.reset_password("tanaka")
    assert revoked == 2 and issued.initial_password is not None
    for tokens in (one, two):
        assert (await _refused(env.accounts.refresh(tokens.refresh_token))).code == (
            "session_revoked"
        )
    assert (await _refused(env.accounts.login("tanaka", PASSWORD))).code == "bad_credentials"
    assert (await env.accounts.login("tanaka", issued.initial_password)).user_id == "tanaka@tsu"
    with pytest.raises(ProtocolError) as refused:
        await env.accounts.reset_password("nobody")
    assert refused.value.code == "unknown_user" and refused.value.status == 404


# --------------------------------------------------------------------------- throttling


async def test_after_five_failures_even_the_right_password_is_refused_until_the_window_passes(
    env: Env,
) -> None:
    await _with_user(env)
    for step in range(5):
        env.clock.now = T0 + step * 10
        await _fail_login(env)
    env.clock.now = T0 + 60
    refused = await _refused(env.accounts.login("tanaka", PASSWORD))
    assert (refused.code, refused.status, refused.retry_after) == (
        "too_many_attempts",
        429,
        840,  # the first failure (T0) leaves the 15-minute window at T0 + 900
    )
    env.clock.now = T0 + 899
    assert (await _refused(env.accounts.login("tanaka", PASSWORD))).code == "too_many_attempts"
    env.clock.now = T0 + 900
    assert (await env.accounts.login("tanaka", PASSWORD)).user_id == "tanaka@tsu"


async def test_failed_logins_survive_a_restart(env: Env) -> None:
    await _with_user(env)
    for _ in range(5):
        await _fail_login(env)
    await env.restart()
    assert (await _refused(env.accounts.login("tanaka", PASSWORD))).code == "too_many_attempts"


async def test_a_locked_login_does_not_lock_other_logins(env: Env) -> None:
    await _with_user(env)
    await _with_user(env, "sato", display_name="佐藤花子")
    for _ in range(5):
        await _fail_login(env, "tanaka")
    assert (await env.accounts.login("sato", PASSWORD)).user_id == "sato@tsu"


async def test_one_source_failing_across_logins_is_locked_for_every_login(env: Env) -> None:
    await env.restart(_settings(per_source=ThrottlePolicy(limit=3, window=900.0)))
    await _with_user(env)
    for login in ("sato", "ito", "kato"):
        await _fail_login(env, login, source="192.0.2.7")
    refused = await _refused(env.accounts.login("tanaka", PASSWORD, source="192.0.2.7"))
    assert refused.code == "too_many_attempts"
    assert (await env.accounts.login("tanaka", PASSWORD, source="192.0.2.8")).user_id


async def test_success_clears_the_logins_failures_but_not_the_sources(env: Env) -> None:
    await env.restart(_settings(per_source=ThrottlePolicy(limit=5, window=900.0)))
    await _with_user(env)
    for _ in range(4):
        await _fail_login(env, source="192.0.2.7")
    await env.accounts.login("tanaka", PASSWORD, source="192.0.2.7")
    await _fail_login(env, source="192.0.2.9")
    # The login's count restarted (1 failure); the source's did not (4 + this one = 5).
    await _fail_login(env, source="192.0.2.7")
    assert (await _refused(env.accounts.login("tanaka", PASSWORD, source="192.0.2.7"))).code == (
        "too_many_attempts"
    )
    assert (await env.accounts.login("tanaka", PASSWORD, source="192.0.2.9")).user_id


async def test_reset_password_clears_the_lock(env: Env) -> None:
    await _with_user(env)
    for _ in range(5):
        await _fail_login(env)
    await env.accounts.reset_password("tanaka", "a brand new password")
    assert (await env.accounts.login("tanaka", "a brand new password")).user_id == "tanaka@tsu"


async def test_refused_attempts_record_no_failures(env: Env) -> None:
    await _with_user(env)
    for step in range(5):
        env.clock.now = T0 + step
        await _fail_login(env)
    for step in range(20):
        env.clock.now = T0 + 100 + step
        await _refused(env.accounts.login("tanaka", "wrong again!!"))
    env.clock.now = T0 + 904  # every recorded failure has left the window
    assert (await env.accounts.login("tanaka", PASSWORD)).user_id == "tanaka@tsu"
