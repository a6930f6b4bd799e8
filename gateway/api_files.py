"""The staff API's file routes: upload to a room, list a room's files, download.

`file_routes(node)` returns route definitions for the client API application to mount
(it runs on its own HTTPS listener); they authenticate on their own (`authenticate`,
a Bearer access token checked by `node.accounts.verify_access`) and answer refusals
as JSON `{error, message, hint}` with the matching HTTP status, whatever app they are
mounted in.

    POST /api/v1/rooms/{room}/files[?text=…]   upload and share (201: the shared file)
    GET  /api/v1/rooms/{room}/files            the room's files, newest first
    GET  /api/v1/files/{sha256}[?room=…]       download (fetched from peers first if only
                                               referenced here; Range honoured)

Uploads: the request body is the file's bytes, not multipart (a browser sends a `File`
as the body of `fetch`, curl with `--data-binary @file`; the node streams it to disk
without parsing anything). The name comes from `Content-Disposition: attachment;
filename*=UTF-8''<percent-encoded UTF-8>` (RFC 6266 / RFC 5987, so Japanese names
travel intact; a plain `filename="…"` is taken when there is no `filename*`). Path
components a browser may add are dropped and the name is NFC-normalised (macOS
sends decomposed kana). The message's text is `text`, else the name. Every check
that needs no body (token, room membership, name, declared length) runs before a
byte is read and, for a client sending `Expect: 100-continue` (curl does for large
files), before the client sends one.

Only member users of a room may upload to it, list it, or download a file shared in
it (403 `not_a_room_member`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11

from federation.envelope import check_room_id
from federation.errors import (
    KakehashiError,
    ProtocolError,
    StorageError,
    TransportError,
    TrustError,
)
from federation.files import MAX_FILE_NAME

from .files import FileStore, file_too_large, parse_sha256
from .tokens import AuthError

if TYPE_CHECKING:
    from .accounts import Accounts, Principal
    from .node import Node

__all__ = ["authenticate", "content_disposition", "file_name_from", "file_routes"]

log = structlog.get_logger("kakehashi.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PARAM = re.compile(r';\s*([A-Za-z0-9!#$&+.^_`|~*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def authenticate(request: web.Request, accounts: Accounts) -> Principal:
    """The staff user of `Authorization: Bearer TOKEN`; `AuthError` (401) without a valid
    token, 403 for a disabled user (see `Accounts.verify_access`)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            "no access token: send Authorization: Bearer TOKEN",
            code="bad_token",
            hint="log in to get an access token",
        )
    return await accounts.verify_access(token.strip())


def file_name_from(header: str | None) -> str:
    """The file name of an upload's Content-Disposition, cleaned for display and downloads.

    `filename*` (RFC 5987: charset'language'percent-encoded) wins over `filename`; path
    components are dropped, control characters removed, the name NFC-normalised and
    shortened to 255 characters keeping its extension. `ProtocolError` missing_file_name.
    """
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(";" + (header or "").partition(";")[2]):
        value = raw.strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.setdefault(key.lower(), value)
    name = None
    if "filename*" in params:
        charset, _, rest = params["filename*"].partition("'")
        _, _, encoded = rest.partition("'")
        try:
            name = unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            name = None
    if name is None:
        name = params.get("filename")
    name = unicodedata.normalize("NFC", _CONTROL.sub("", name or ""))
    name = re.split(r"[/\\]", name)[-1].strip()
    if not name or name in (".", ".."):
        raise ProtocolError(
            "the upload does not name the file",
            code="missing_file_name",
            hint="send Content-Disposition: attachment; filename*=UTF-8''<percent-encoded name>",
        )
    if len(name) > MAX_FILE_NAME:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and len(extension) <= 16:
            name = stem[: MAX_FILE_NAME - len(extension) - 1] + "." + extension
        else:
            name = name[:MAX_FILE_NAME]
    return name


def content_disposition(name: str) -> str:
    """`attachment` with the original name: RFC 5987 `filename*` (UTF-8) for every client
    that reads it, an ASCII `filename` for the rest."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{fallback or 'file'}\"; filename*=UTF-8''{quote(name, safe='')}"


def _status(exc: KakehashiError) -> int:
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, TransportError):
        return 503
    if isinstance(exc, StorageError):
        return 507 if exc.code == "disk_full" else 500
    return 400


def refusal(exc: KakehashiError) -> web.Response:
    """A refusal as JSON {error, message, hint}, with the status its error carries."""
    status = _status(exc)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if isinstance(exc, AuthError) and exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if status == 413:
        headers["Connection"] = "close"  # the rest of the body is not wanted
    return web.json_response(
        {"error": exc.code, "message": str(exc), "hint": exc.hint}, status=status, headers=headers
    )


def _answering_errors(handler: Handler) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except KakehashiError as exc:
            log.info("api_refused", path=request.path, code=exc.code, status=_status(exc))
            return refusal(exc)

    return run


def file_routes(node: Node) -> list[web.RouteDef]:
    """The file routes of the client API, over `node.files`."""

    def files() -> FileStore:
        return node.files

    def member_of(room: str, principal: Principal) -> None:
        check_room_id(room)
        state = node.rooms.state(room)
        if state is None:
            raise ProtocolError(f"this node knows no room {room}", code="unknown_room", status=404)
        if principal.user_id not in state.users:
            raise TrustError(
                f"{principal.user_id} is not a member of {room}", code="not_a_room_member"
            )

    async def before_body(request: web.Request) -> tuple[Principal, str]:
        """Every upload check that needs no body."""
        principal = await authenticate(request, node.accounts)
        room = request.match_info["room"]
        files().check_can_post(room, principal.user_id)
        name = file_name_from(request.headers.get("Content-Disposition"))
        limit = files().settings.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise file_too_large(limit)
        return principal, name

    async def expect_continue(request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse before the client sends the body, else invite it."""
        try:
            await before_body(request)
        except KakehashiError as exc:
            return refusal(exc)
        if request.version == HttpVersion11 and (
            request.headers.get("Expect", "").lower() == "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own handler: the body starts after
            return None
        raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")

    async def upload(request: web.Request) -> web.StreamResponse:
        principal, name = await before_body(request)
        shared = await files().upload(
            room=request.match_info["room"],
            user=principal.user_id,
            name=name,
            body=request.content.iter_any(),
            declared_size=request.content_length,
            text=request.query.get("text") or None,
            sender_name=principal.sender_name,
        )
        return web.json_response(shared.to_json(), status=201)

    async def room_files(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request, node.accounts)
        room = request.match_info["room"]
        member_of(room, principal)
        listed = await files().in_room(room)
        return web.json_response({"room": room, "files": [f.to_json() for f in listed]})

    async def download(request: web.Request) -> web.StreamResponse:
        principal = await authenticate(request, node.accounts)
        sha256 = parse_sha256(request.match_info["sha256"])
        wanted = request.query.get("room")
        references = await files().references(sha256)
        if not references:
            raise ProtocolError("no message here shares that file", code="unknown_file", status=404)
        visible = [
            ref
            for ref in references
            if (wanted is None or ref.room == wanted)
            and (state := node.rooms.state(ref.room)) is not None
            and principal.user_id in state.users
        ]
        if not visible:
            raise TrustError(
                f"{principal.user_id} is not a member of a room that shares this file",
                code="not_a_room_member",
            )
        fetcher = files().fetcher
        assert fetcher is not None
        stored = await fetcher.ensure(sha256)
        return web.FileResponse(
            files().path(sha256),
            headers={
                "Content-Type": stored.mime,
                "Content-Disposition": content_disposition(visible[-1].name),
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "private, max-age=86400",
            },
        )

    return [
        web.post(
            "/api/v1/rooms/{room}/files",
            _answering_errors(upload),
            expect_handler=expect_continue,
        ),
        web.get("/api/v1/rooms/{room}/files", _answering_errors(room_files)),
        web.get("/api/v1/files/{sha256}", _answering_errors(download)),
    ]
