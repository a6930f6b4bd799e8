"""Staff accounts of this node: users, passwords, login sessions and access tokens.

Users are local to their node (`tanaka@tsu` exists only at `tsu`); the node's
operator manages them with `kakehashi user ...` over the admin socket, and
staff authenticate with `login` (the future web client and client API call the
methods of `Accounts`; the admin routes are in `gateway.admin`).

Strategy and invariants:

- **Passwords** are hashed with Argon2id (argon2-cffi, RFC 9106 low-memory
  profile: 64 MiB, 3 passes). Hashing runs in worker threads, at most one per
  CPU at a time, so a burst of logins neither stalls the event loop nor takes
  64 MiB per waiting request. Initial passwords the node generates carry 80 random
  bits, which no amount of guessing reaches, so they are hashed with a light
  Argon2id profile (4 MiB, 1 pass) to keep importing 2,500 staff quick; the
  first login re-hashes them with the full profile (`check_needs_rehash`), as it
  does any hash made with older parameters. (So until their first login, such
  users answer a wrong password faster than an unknown login does: that tells
  only that the login exists, which staff directories tell anyway.) Passwords and
  hashes are never logged nor returned; a generated password is returned once,
  to the operator.
- **Sessions**: a login opens a session and returns an access token (JWT, 15
  minutes, see `gateway.tokens`) and a refresh token (30 days). Refreshing
  rotates: the presented refresh token is marked used and a new one issued in the
  same session. Presenting a used refresh token again means two parties hold
  it (it was copied), so the whole session is revoked: every refresh token of it
  and every access token naming it (`sid`). Disabling a user or resetting their
  password revokes all their sessions. `verify_access` checks the signature and
  expiry against the node's clock, then that the user exists, is enabled and the
  session is not revoked, and reports the user's current role.
- **Throttling**: failed logins are stored (`login_failure`) per login and per
  source address, so a restart does not forget them; `gateway.throttle.decide`
  judges each attempt before any password is checked. Refused attempts check
  no password and record nothing. The per-source limit is higher than the
  per-login one because a town's staff often reach the node through one proxy
  address.
- Every change is one transaction: a staff list is imported wholly or not at all.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from federation.errors import ProtocolError
from federation.identity import check_node_id
from federation.rooms import check_sender_name

from .accountstore import AccountStore, NewSession, RotationOutcome
from .staff import (
    StaffRole,
    StaffRow,
    check_login,
    check_password,
    clean_department,
    clean_display_name,
    generate_password,
    parse_role,
    parse_staff_csv,
)
from .throttle import Decision, ThrottlePolicy, decide
from .tokens import AccessClaims, AuthError, TokenKey, new_session_id

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .store import Store

__all__ = [
    "AccountSettings",
    "Accounts",
    "AuthError",
    "IssuedPassword",
    "Principal",
    "Tokens",
    "UserView",
]

log = structlog.get_logger("kakehashi.accounts")

MAX_SOURCE_LENGTH = 64
PRUNE_INTERVAL = 3600.0
"""Seconds between deletions of expired sessions and refresh tokens."""


def _full_hasher() -> PasswordHasher:
    return PasswordHasher()  # RFC 9106 low-memory profile: t=3, m=64 MiB, p=4


def _light_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=4096, parallelism=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountSettings:
    """Lifetimes, throttles and hashing of staff accounts."""

    access_ttl: int = 15 * 60
    """Seconds an access token is valid."""
    refresh_ttl: int = 30 * 24 * 3600
    """Seconds a refresh token is valid (each refresh issues a new one)."""
    per_login: ThrottlePolicy = field(
        default_factory=lambda: ThrottlePolicy(limit=5, window=15 * 60.0)
    )
    """Failed logins of one login name that lock it."""
    per_source: ThrottlePolicy = field(
        default_factory=lambda: ThrottlePolicy(limit=100, window=15 * 60.0)
    )
    """Failed logins from one source address that lock it (higher: shared proxies)."""
    hasher: PasswordHasher = field(default_factory=_full_hasher)
    """Argon2id for passwords people choose (and for every hash after a login)."""
    initial_hasher: PasswordHasher = field(default_factory=_light_hasher)
    """Argon2id for the node's generated 80-bit initial passwords."""
    hash_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Password hashes computed at the same time, at most."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tokens:
    """What a successful login or refresh gives the client."""

    user_id: str
    """`login@node`."""
    role: StaffRole
    """The user's role."""
    access_token: str
    """JWT for API requests."""
    access_expires_at: int
    """Unix seconds."""
    refresh_token: str
    """Opaque; exchanged once for new tokens."""
    refresh_expires_at: int
    """Unix seconds."""

    def __repr__(self) -> str:  # tokens are secrets: keep them out of logs and tracebacks
        return f"Tokens(user_id={self.user_id!r}, role={self.role.value!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The user an access token authenticates, as the node knows them now."""

    user_id: str
    """`login@node`."""
    login: str
    """Login name."""
    role: StaffRole
    """Current role (a change applies at once, not at the next token)."""
    display_name: str
    """Display name."""
    department: str
    """Department (may be empty)."""
    session_id: str
    """The login session the token belongs to."""
    token_id: str
    """The token's `jti`."""
    expires_at: int
    """Unix seconds at which the token expires."""

    @property
    def sender_name(self) -> str | None:
        """The display name as the envelopes the user sends carry it (other nodes show
        them by it). Names are cleaned when stored, so the protocol takes them; one
        stored under older rules that it would refuse is left out (None)."""
        try:
            return check_sender_name(self.display_name)
        except ProtocolError:
            return None


@dataclass(frozen=True, slots=True, kw_only=True)
class UserView:
    """A user as the operator sees them (never the password hash)."""

    login: str
    user_id: str
    display_name: str
    department: str
    role: StaffRole
    disabled: bool
    created_at: int
    updated_at: int
    last_login_at: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "login": self.login,
            "user_id": self.user_id,
            "display_name": self.display_name,
            "department": self.department,
            "role": self.role.value,
            "disabled": self.disabled,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_login_at": self.last_login_at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedPassword:
    """A user and the password the node generated for them (shown to the operator once)."""

    user: UserView
    initial_password: str | None
    """None when the operator supplied the password."""

    def __repr__(self) -> str:
        return f"IssuedPassword(user={self.user.user_id!r})"

    def to_json(self) -> dict[str, Any]:
        return {**self.user.to_json(), "initial_password": self.initial_password}


class Accounts:
    """The node's staff accounts (owned by `Node` as `node.accounts`)."""

    def __init__(
        self,
        *,
        store: Store,
        node_id: str,
        token_key_path: Path,
        clock: Callable[[], float],
        settings: AccountSettings | None = None,
    ) -> None:
        self._rows = AccountStore(store)
        self._node_id = check_node_id(node_id)
        self._token_key_path = token_key_path
        self._token_key: TokenKey | None = None
        self._clock = clock
        self.settings = settings or AccountSettings()
        self._hashing = asyncio.Semaphore(max(1, self.settings.hash_workers))
        self._dummy_hash: str | None = None
        self._last_prune = float("-inf")
        self.audit: Callable[..., None] | None = None
        """Where account events are recorded (the node's audit log, once it runs)."""

    # helpers -----------------------------------------------------------------

    @property
    def token_key(self) -> TokenKey:
        """The access-token key, made on first use (mode 0600)."""
        if self._token_key is None:
            self._token_key = TokenKey.load_or_create(self._token_key_path)
        return self._token_key

    def user_id(self, login: str) -> str:
        return f"{login}@{self._node_id}"

    def local_login(self, value: object) -> str:
        """`tanaka` from `tanaka` or `tanaka@<this node>`; `ProtocolError` otherwise."""
        if isinstance(value, str) and "@" in value:
            login, _, node = value.rpartition("@")
            if node != self._node_id:
                raise ProtocolError(
                    f"{value!r} is not a user of this node ({self._node_id})",
                    code="not_local_user",
                    hint=f"users are managed at their own node; run this at {node}",
                )
            value = login
        return check_login(value)

    def _view(self, row: Sequence[Any]) -> UserView:
        return UserView(
            login=row[0],
            user_id=self.user_id(row[0]),
            display_name=row[1],
            department=row[2],
            role=StaffRole(row[3]),
            disabled=bool(row[4]),
            created_at=row[5],
            updated_at=row[6],
            last_login_at=row[7],
        )

    async def _hash(self, password: str, hasher: PasswordHasher) -> str:
        async with self._hashing:
            return await asyncio.to_thread(hasher.hash, password)

    async def _verify(self, stored: str, password: str) -> bool:
        async with self._hashing:
            return await asyncio.to_thread(_verify_password, self.settings.hasher, stored, password)

    # administration ------------------------------------------------------------

    async def users(self) -> list[UserView]:
        """Every user of this node, by login."""
        return [self._view(row) for row in await self._rows.users()]

    async def user(self, login: str) -> UserView:
        """One user; `ProtocolError` unknown_user (404) if there is none."""
        login = self.local_login(login)
        row = await self._rows.user(login)
        if row is None:
            raise _unknown_user(self.user_id(login))
        return self._view(row)

    async def add_user(
        self,
        login: str,
        *,
        display_name: str,
        department: str = "",
        role: StaffRole | str = StaffRole.STAFF,
        password: str | None = None,
    ) -> IssuedPassword:
        """Create a user. Without `password`, one is generated and returned once."""
        login = self.local_login(login)
        name = clean_display_name(display_name)
        row = StaffRow(
            line=0,
            login=login,
            display_name=name,
            department=clean_department(department),
            role=parse_role(role),
        )
        if password is not None:
            check_password(password, login=login, display_name=name)
        issued = await self._insert([row], password)
        log.info("user_added", user=self.user_id(login), role=row.role.value)
        self._audit("user_added", user=self.user_id(login), role=row.role.value)
        return issued[0]

    async def import_users(self, data: bytes) -> list[IssuedPassword]:
        """Create every user of a staff list (CSV; see `gateway.staff.parse_staff_csv`),
        each with a generated password, in one transaction: all of them or none."""
        rows = parse_staff_csv(data, existing=await self._rows.logins())
        if not rows:
            raise ProtocolError(
                "line 2: the file names no users", code="bad_csv", hint="add one line per user"
            )
        issued = await self._insert(rows, None)
        log.info("users_imported", count=len(issued))
        self._audit("users_imported", count=len(issued))
        return issued

    async def _insert(self, rows: Sequence[StaffRow], password: str | None) -> list[IssuedPassword]:
        """Store `rows`: with `password` (one row), else each with a generated one."""
        generated = {row.login: generate_password() for row in rows} if password is None else {}
        if password is not None:
            hashes = [await self._hash(password, self.settings.hasher)]
        else:
            hasher = self.settings.initial_hasher
            hashes = await asyncio.gather(*(self._hash(generated[r.login], hasher) for r in rows))
        now = int(self._clock())
        await self._rows.insert_users(list(zip(rows, hashes, strict=True)), now, self._node_id)
        return [
            IssuedPassword(
                user=UserView(
                    login=row.login,
                    user_id=self.user_id(row.login),
                    display_name=row.display_name,
                    department=row.department,
                    role=row.role,
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                    last_login_at=None,
                ),
                initial_password=generated.get(row.login),
            )
            for row in rows
        ]

    async def set_disabled(self, login: str, disabled: bool) -> tuple[UserView, int]:
        """Disable (revoking every session) or enable a user; returns the user and the
        number of sessions revoked."""
        login = self.local_login(login)
        revoked = await self._rows.set_disabled(login, disabled, int(self._clock()))
        if revoked is None:
            raise _unknown_user(self.user_id(login))
        log.info(
            "user_disabled" if disabled else "user_enabled",
            user=self.user_id(login),
            sessions_revoked=revoked,
        )
        self._audit("user_disabled" if disabled else "user_enabled", user=self.user_id(login))
        return await self.user(login), revoked

    async def reset_password(
        self, login: str, password: str | None = None
    ) -> tuple[IssuedPassword, int]:
        """Set a new password (generated and returned once unless given), revoke every
        session of the user and clear its failed logins; returns the user with the
        generated password and the number of sessions revoked."""
        user = await self.user(login)
        generated = None
        if password is not None:
            check_password(password, login=user.login, display_name=user.display_name)
            password_hash = await self._hash(password, self.settings.hasher)
        else:
            generated = generate_password()
            password_hash = await self._hash(generated, self.settings.initial_hasher)
        revoked = await self._rows.set_password(user.login, password_hash, int(self._clock()))
        if revoked is None:
            raise _unknown_user(user.user_id)
        log.info("password_reset", user=user.user_id, sessions_revoked=revoked)
        self._audit("password_reset", user=user.user_id)
        return IssuedPassword(user=await self.user(user.login), initial_password=generated), revoked

    # authentication --------------------------------------------------------------

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit(
                event, **{name: value for name, value in fields.items() if value is not None}
            )

    async def login(self, login: str, password: str, *, source: str | None = None) -> Tokens:
        """Check a password and open a session.

        `AuthError` too_many_attempts (429, with `retry_after`) while the login or the
        source is throttled, whatever the password; bad_credentials (401) for an
        unknown login or a wrong password (the same answer for both); user_disabled
        (403) for the right password of a disabled user.
        """
        now = self._clock()
        name = _login_name(login)
        scopes = [] if name is None else [f"login:{name}"]
        if source:
            scopes.append(f"source:{source[:MAX_SOURCE_LENGTH]}")
        found = None if name is None else await self._rows.credentials(name)
        # An unknown "login" may be a password typed into the wrong field: never logged.
        user = self.user_id(name) if found is not None and name is not None else None
        refusal = await self._throttled(scopes, now)
        if refusal is not None:
            log.warning(
                "login_throttled", user=user, source=source, retry_after=refusal.retry_after
            )
            self._audit("login_throttled", user=user, source=source)
            raise AuthError(
                f"too many failed logins; try again in {refusal.retry_after} s",
                code="too_many_attempts",
                status=429,
                retry_after=refusal.retry_after,
                hint="wait, or ask the node's administrator to reset the password",
            )
        stored = found.password_hash if found is not None else await self._unknown_user_hash()
        right = isinstance(password, str) and await self._verify(stored, password)
        if found is None or not right:
            await self._record_failure(scopes, now)
            log.info(
                "login_failed",
                user=user,
                source=source,
                reason="bad_password" if found is not None else "unknown_user",
            )
            self._audit("login_failed", user=user, source=source)
            raise AuthError("wrong login or password", code="bad_credentials")
        assert name is not None and user is not None
        if found.disabled:
            log.info("login_refused", user=user, source=source, reason="user_disabled")
            raise _disabled(user)
        rehash = None
        if self.settings.hasher.check_needs_rehash(stored):
            rehash = await self._hash(password, self.settings.hasher)
        session = await self._rows.open_session(
            name, found.role, int(now), self.settings.refresh_ttl, rehash
        )
        await self._prune(now)
        log.info("login_succeeded", user=user, source=source, session=session.session_id)
        self._audit("login_succeeded", user=user, role=found.role.value, source=source)
        return self._tokens(session, now)

    async def refresh(self, refresh_token: str) -> Tokens:
        """New tokens for a refresh token, which is used up.

        `AuthError` bad_token for an unknown or already used token (a used one revokes
        its whole session: see the module docstring), token_expired, session_revoked,
        user_disabled.
        """
        _check_refresh_token(refresh_token)
        now = self._clock()
        rotation = await self._rows.rotate(refresh_token, int(now), self.settings.refresh_ttl)
        outcome, login = rotation.outcome, rotation.login
        if outcome is RotationOutcome.ROTATED:
            assert rotation.new is not None
            return self._tokens(rotation.new, now)
        if outcome is RotationOutcome.REUSED:
            assert login is not None
            log.warning(
                "refresh_token_reused", user=self.user_id(login), session=rotation.session_id
            )
            raise AuthError(
                "refresh token refused: it was already used, so its session is revoked",
                code="bad_token",
                hint="log in again",
            )
        if outcome is RotationOutcome.USER_DISABLED:
            assert login is not None
            raise _disabled(self.user_id(login))
        if outcome is RotationOutcome.EXPIRED:
            raise AuthError("refresh token expired", code="token_expired", hint="log in again")
        if outcome is RotationOutcome.SESSION_REVOKED:
            raise _revoked()
        raise AuthError("refresh token refused: unknown", code="bad_token", hint="log in again")

    async def logout(self, refresh_token: str) -> None:
        """Revoke the session of `refresh_token` (a revoked session stays so, so logging
        out twice is fine); `AuthError` bad_token if the node never issued it."""
        _check_refresh_token(refresh_token)
        ended = await self._rows.revoke_by_token(refresh_token, int(self._clock()))
        if ended is None:
            raise AuthError("refresh token refused: unknown", code="bad_token")
        log.info("logout", user=self.user_id(ended[1]), session=ended[0])

    async def verify_access(self, token: str) -> Principal:
        """The user an access token authenticates; `AuthError` bad_token, token_expired,
        session_revoked or user_disabled."""
        claims = self.token_key.verify(token, issuer=self._node_id, now=self._clock())
        login, _, node = claims.user_id.rpartition("@")
        if node != self._node_id or _login_name(login) != login:
            raise AuthError("access token refused: not a user of this node", code="bad_token")
        row = await self._rows.holder(login, claims.session_id)
        if row is None:
            raise AuthError("access token refused: the user no longer exists", code="bad_token")
        if row[1]:
            raise _disabled(claims.user_id)
        if row[4] is not None:
            raise _revoked()
        return Principal(
            user_id=claims.user_id,
            login=login,
            role=StaffRole(row[0]),
            display_name=row[2],
            department=row[3],
            session_id=claims.session_id,
            token_id=claims.token_id,
            expires_at=claims.expires_at,
        )

    # sessions and failures ----------------------------------------------------------

    def _tokens(self, session: NewSession, now: float) -> Tokens:
        claims = AccessClaims(
            issuer=self._node_id,
            user_id=self.user_id(session.login),
            role=session.role,
            issued_at=int(now),
            expires_at=int(now) + self.settings.access_ttl,
            token_id=new_session_id(),
            session_id=session.session_id,
        )
        return Tokens(
            user_id=claims.user_id,
            role=session.role,
            access_token=self.token_key.issue(claims),
            access_expires_at=claims.expires_at,
            refresh_token=session.refresh_token,
            refresh_expires_at=session.refresh_expires_at,
        )

    async def _prune(self, now: float) -> None:
        if now - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = now
            await self._rows.prune(int(now))

    def _policy(self, scope: str) -> ThrottlePolicy:
        return self.settings.per_login if scope.startswith("login:") else self.settings.per_source

    async def _throttled(self, scopes: Iterable[str], now: float) -> Decision | None:
        """The longest refusal among `scopes`, or None if the attempt may go ahead."""
        refusal: Decision | None = None
        for scope in scopes:
            policy = self._policy(scope)
            failures = await self._rows.failures(scope, int((now - policy.window) * 1000))
            decision = decide(failures, now, policy)
            if not decision.allowed and (
                refusal is None or decision.retry_after > refusal.retry_after
            ):
                refusal = decision
        return refusal

    async def _record_failure(self, scopes: Sequence[str], now: float) -> None:
        longest = max(self.settings.per_login.window, self.settings.per_source.window)
        await self._rows.record_failure(scopes, int(now * 1000), int((now - longest) * 1000))

    async def _unknown_user_hash(self) -> str:
        """A hash to check passwords of unknown logins against, so that they take as long
        as known ones and the timing does not tell which logins exist."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._hash(generate_password(), self.settings.hasher)
        return self._dummy_hash


def _verify_password(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _login_name(value: object) -> str | None:
    """The login a person typed (surrounding spaces and capitals forgiven), if valid."""
    if not isinstance(value, str):
        return None
    name = value.strip().lower()
    try:
        return check_login(name)
    except ProtocolError:
        return None


def _check_refresh_token(refresh_token: object) -> None:
    if not isinstance(refresh_token, str) or not 0 < len(refresh_token) <= 256:
        raise AuthError("refresh token refused: malformed", code="bad_token")


def _unknown_user(user_id: str) -> ProtocolError:
    return ProtocolError(
        f"no user {user_id}",
        code="unknown_user",
        status=404,
        hint="see the node's users with: kakehashi user list",
    )


def _disabled(user_id: str) -> AuthError:
    return AuthError(
        f"{user_id} is disabled",
        code="user_disabled",
        status=403,
        hint="ask the node's administrator (kakehashi user enable)",
    )


def _revoked() -> AuthError:
    return AuthError("the session was revoked", code="session_revoked", hint="log in again")
