"""Staff accounts, login sessions, refresh tokens and failed logins in the node's SQLite database.

Tables (migration 4 in `gateway.store`):

- `user_account`: one row per user (login, display name, department, role,
  Argon2id hash, disabled, times).
- `session`: one row per login: the family of refresh tokens that login began.
  `expires_at` follows its newest refresh token; `revoked_at` ends it for good.
- `refresh_token`: the SHA-256 of every refresh token issued, with its session;
  `rotated_at` is set when it is exchanged. Rotated tokens are kept until they
  expire, so that presenting one again is recognised as reuse.
- `login_failure`: one row per failed login per scope (`login:NAME`,
  `source:ADDRESS`), kept for the longest throttle window.

Each method that writes is one transaction; the rules (what a rotation means,
when to throttle) are in `gateway.accounts` and `gateway.throttle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiosqlite

from federation.errors import ProtocolError

from .staff import StaffRole, StaffRow
from .store import Store
from .tokens import new_refresh_token, new_session_id, refresh_token_hash

__all__ = ["AccountStore", "Credentials", "NewSession", "Rotation", "RotationOutcome"]

USER_COLUMNS = (
    "login, display_name, department, role, disabled, created_at, updated_at, last_login_at"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What a login checks."""

    password_hash: str
    disabled: bool
    role: StaffRole


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSession:
    """A session opened or continued, with its new refresh token."""

    session_id: str
    """The session."""
    login: str
    """Its user."""
    role: StaffRole
    """The user's current role."""
    refresh_token: str
    """The new refresh token (only its hash is stored)."""
    refresh_expires_at: int
    """Unix seconds."""

    def __repr__(self) -> str:
        return f"NewSession(session_id={self.session_id!r}, login={self.login!r})"


class RotationOutcome(StrEnum):
    """What presenting a refresh token led to."""

    ROTATED = "rotated"
    """Exchanged for a new one in the same session."""
    UNKNOWN = "unknown"
    """Never issued here (or expired long ago and forgotten)."""
    SESSION_REVOKED = "session_revoked"
    """Its session was ended (logout, disable, password reset, reuse)."""
    REUSED = "reused"
    """Exchanged before: the session has now been revoked."""
    EXPIRED = "expired"
    """Past its expiry."""
    USER_DISABLED = "user_disabled"
    """Its user is disabled."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotation:
    """The outcome of presenting a refresh token."""

    outcome: RotationOutcome
    login: str | None = None
    """The session's user (None when the token is unknown)."""
    session_id: str | None = None
    """The session (None when the token is unknown)."""
    new: NewSession | None = None
    """The continued session with its new token (ROTATED only)."""


class AccountStore:
    """SQL for staff accounts over the node's `Store`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # users ------------------------------------------------------------------------

    async def users(self) -> list[Any]:
        return await self._store.read_all(
            f"SELECT {USER_COLUMNS} FROM user_account ORDER BY login"  # noqa: S608
        )

    async def user(self, login: str) -> Any:
        return await self._store.read_one(
            f"SELECT {USER_COLUMNS} FROM user_account WHERE login = ?",  # noqa: S608
            (login,),
        )

    async def logins(self) -> set[str]:
        return {row[0] for row in await self._store.read_all("SELECT login FROM user_account")}

    async def insert_users(
        self, rows: Sequence[tuple[StaffRow, str]], now: int, node_id: str
    ) -> None:
        """All of `rows` (each with its password hash) or, if one login exists, none:
        `ProtocolError` user_exists naming its line."""
        async with self._store.transaction() as db:
            for row, password_hash in rows:
                async with db.execute(
                    "SELECT 1 FROM user_account WHERE login = ?", (row.login,)
                ) as cursor:
                    if await cursor.fetchone() is not None:
                        where = f"line {row.line}: " if row.line else ""
                        raise ProtocolError(
                            f"{where}user {row.login}@{node_id} already exists",
                            code="user_exists",
                            status=409,
                            hint="choose another login"
                            + ("; nothing was imported" if row.line else ""),
                        )
                await db.execute(
                    "INSERT INTO user_account (login, display_name, department, role, "
                    "password_hash, disabled, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                    (
                        row.login,
                        row.display_name,
                        row.department,
                        row.role.value,
                        password_hash,
                        now,
                        now,
                    ),
                )

    async def set_disabled(self, login: str, disabled: bool, now: int) -> int | None:
        """Disable (revoking the user's sessions) or enable; sessions revoked, or None if
        there is no such user."""
        async with self._store.transaction() as db:
            cursor = await db.execute(
                "UPDATE user_account SET disabled = ?, updated_at = ? WHERE login = ?",
                (int(disabled), now, login),
            )
            if cursor.rowcount == 0:
                return None
            if not disabled:
                return 0
            return await _revoke_user_sessions(db, login, now, "user_disabled")

    async def set_password(self, login: str, password_hash: str, now: int) -> int | None:
        """Replace the hash, revoke the user's sessions and clear its failed logins;
        sessions revoked, or None if there is no such user."""
        async with self._store.transaction() as db:
            cursor = await db.execute(
                "UPDATE user_account SET password_hash = ?, updated_at = ? WHERE login = ?",
                (password_hash, now, login),
            )
            if cursor.rowcount == 0:
                return None
            await db.execute("DELETE FROM login_failure WHERE scope = ?", (f"login:{login}",))
            return await _revoke_user_sessions(db, login, now, "password_reset")

    async def credentials(self, login: str) -> Credentials | None:
        row = await self._store.read_one(
            "SELECT password_hash, disabled, role FROM user_account WHERE login = ?", (login,)
        )
        if row is None:
            return None
        return Credentials(password_hash=str(row[0]), disabled=bool(row[1]), role=StaffRole(row[2]))

    # sessions ----------------------------------------------------------------------

    async def open_session(
        self, login: str, role: StaffRole, now: int, ttl: int, rehash: str | None
    ) -> NewSession:
        """After a successful login: a new session and its first refresh token; records
        the login time, stores `rehash` if given, clears the login's failures."""
        session = new_session_id()
        async with self._store.transaction() as db:
            await db.execute(
                "INSERT INTO session (id, login, issued_at, expires_at) VALUES (?, ?, ?, ?)",
                (session, login, now, now + ttl),
            )
            new = await _add_refresh_token(db, session, login, role, now, ttl)
            await db.execute(
                "UPDATE user_account SET last_login_at = ?, "
                "password_hash = COALESCE(?, password_hash) WHERE login = ?",
                (now, rehash, login),
            )
            # A success clears the login's failures, never the source's: a source holding
            # one account's password must not reset its count for guessing the others.
            await db.execute("DELETE FROM login_failure WHERE scope = ?", (f"login:{login}",))
        return new

    async def rotate(self, token: str, now: int, ttl: int) -> Rotation:
        """Exchange a refresh token (see `RotationOutcome`); revokes the session on reuse."""
        async with self._store.transaction() as db:
            async with db.execute(
                "SELECT t.session_id, t.expires_at, t.rotated_at, s.login, s.revoked_at, "
                "u.disabled, u.role FROM refresh_token t "
                "JOIN session s ON s.id = t.session_id "
                "JOIN user_account u ON u.login = s.login WHERE t.hash = ?",
                (refresh_token_hash(token),),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return Rotation(outcome=RotationOutcome.UNKNOWN)
            session, expires_at, rotated_at, login, revoked_at, disabled, role = row

            def outcome(what: RotationOutcome) -> Rotation:
                return Rotation(outcome=what, login=login, session_id=session)

            if revoked_at is not None:
                return outcome(RotationOutcome.SESSION_REVOKED)
            if rotated_at is not None:
                await _revoke_session(db, session, now, "refresh_token_reused")
                return outcome(RotationOutcome.REUSED)
            if now >= expires_at:
                return outcome(RotationOutcome.EXPIRED)
            if disabled:
                return outcome(RotationOutcome.USER_DISABLED)
            await db.execute(
                "UPDATE refresh_token SET rotated_at = ? WHERE hash = ?",
                (now, refresh_token_hash(token)),
            )
            new = await _add_refresh_token(db, session, login, StaffRole(role), now, ttl)
        return Rotation(outcome=RotationOutcome.ROTATED, login=login, session_id=session, new=new)

    async def revoke_by_token(self, token: str, now: int) -> tuple[str, str] | None:
        """End the session of a refresh token: (session, login), or None if unknown."""
        async with self._store.transaction() as db:
            async with db.execute(
                "SELECT t.session_id, s.login FROM refresh_token t "
                "JOIN session s ON s.id = t.session_id WHERE t.hash = ?",
                (refresh_token_hash(token),),
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            await _revoke_session(db, row[0], now, "logout")
        return str(row[0]), str(row[1])

    async def holder(self, login: str, session: str) -> Any:
        """(role, disabled, display name, department, session revoked_at) of a user, with
        revoked_at also set when the session does not exist; None if the user does not."""
        return await self._store.read_one(
            "SELECT u.role, u.disabled, u.display_name, u.department, "
            "CASE WHEN s.id IS NULL THEN 0 ELSE s.revoked_at END "
            "FROM user_account u LEFT JOIN session s ON s.id = ? AND s.login = u.login "
            "WHERE u.login = ?",
            (session, login),
        )

    async def prune(self, now: int) -> None:
        """Forget expired refresh tokens and the sessions left without any (an expired
        token is refused whether or not it is remembered)."""
        async with self._store.transaction(durable=False) as db:
            await db.execute("DELETE FROM refresh_token WHERE expires_at <= ?", (now,))
            await db.execute(
                "DELETE FROM session WHERE expires_at <= ? AND id NOT IN "
                "(SELECT session_id FROM refresh_token)",
                (now,),
            )

    # failed logins -------------------------------------------------------------------

    async def failures(self, scope: str, since_ms: int) -> list[float]:
        """Unix seconds of the scope's failed logins after `since_ms`."""
        rows = await self._store.read_all(
            "SELECT at_ms FROM login_failure WHERE scope = ? AND at_ms > ?", (scope, since_ms)
        )
        return [row[0] / 1000 for row in rows]

    async def record_failure(self, scopes: Sequence[str], at_ms: int, forget_ms: int) -> None:
        """Durably (a restart must not reset the count); forgets failures before `forget_ms`."""
        async with self._store.transaction() as db:
            await db.executemany(
                "INSERT INTO login_failure (scope, at_ms) VALUES (?, ?)",
                [(scope, at_ms) for scope in scopes],
            )
            await db.execute("DELETE FROM login_failure WHERE at_ms < ?", (forget_ms,))


async def _add_refresh_token(
    db: aiosqlite.Connection, session: str, login: str, role: StaffRole, now: int, ttl: int
) -> NewSession:
    token = new_refresh_token()
    await db.execute(
        "INSERT INTO refresh_token (hash, session_id, issued_at, expires_at) VALUES (?, ?, ?, ?)",
        (refresh_token_hash(token), session, now, now + ttl),
    )
    await db.execute("UPDATE session SET expires_at = ? WHERE id = ?", (now + ttl, session))
    return NewSession(
        session_id=session,
        login=login,
        role=role,
        refresh_token=token,
        refresh_expires_at=now + ttl,
    )


async def _revoke_session(db: aiosqlite.Connection, session: str, now: int, reason: str) -> None:
    await db.execute(
        "UPDATE session SET revoked_at = ?, revoked_reason = ? WHERE id = ? AND revoked_at IS NULL",
        (now, reason, session),
    )


async def _revoke_user_sessions(db: aiosqlite.Connection, login: str, now: int, reason: str) -> int:
    cursor = await db.execute(
        "UPDATE session SET revoked_at = ?, revoked_reason = ? "
        "WHERE login = ? AND revoked_at IS NULL AND expires_at > ?",
        (now, reason, login, now),
    )
    return int(cursor.rowcount)
