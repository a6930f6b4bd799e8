"""An HTTPS + WebSocket client for the staff API that checks every answer against the spec.

Every JSON response a test receives is validated against the response schema that
`schemas/openapi.json` gives for its path, method and status (a status the spec
does not list fails the test), and every WebSocket frame against
`components/schemas/Event`. So the tests prove the spec as well as the node.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from gateway.node import Node

SPEC_PATH = Path(__file__).resolve().parents[2] / "schemas" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
PREFIX = "/api/v1"


def _template(path: str) -> re.Pattern[str]:
    parts = ["[^/]+" if part.startswith("{") else re.escape(part) for part in path.split("/")]
    return re.compile("^" + "/".join(parts) + "$")


_TEMPLATES = [(template, _template(template)) for template in SPEC["paths"]]


def spec_path(path: str) -> str:
    """The spec's path template that `path` (under /api/v1, no query) matches."""
    assert path.startswith(PREFIX), path
    local = path[len(PREFIX) :]
    matches = [template for template, pattern in _TEMPLATES if pattern.match(local)]
    assert matches, f"{path} matches no path of the OpenAPI spec"
    # A literal segment beats a parameter: /rooms/{room}/read over /rooms/{room}/{x}.
    return min(matches, key=lambda t: t.count("{"))


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """Validate against a schema of the spec (its $refs resolve in the spec)."""
    root = {**schema, "components": SPEC["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


def response_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The JSON schema the spec gives for this answer; fails if the status is not listed."""
    operation = SPEC["paths"][spec_path(path)][method.lower()]
    answer = operation["responses"].get(str(status))
    assert answer is not None, f"{method} {path} answered {status}, which the spec does not list"
    if "$ref" in answer:
        answer = SPEC["components"]["responses"][answer["$ref"].rpartition("/")[2]]
    content = answer.get("content", {}).get("application/json")
    return None if content is None else content["schema"]


def event_schema() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/Event"}


def client_ssl(node: Node) -> ssl.SSLContext:
    """Trust the federation CA that issued the node's certificate (the API's default).
    That certificate names the node id, so requests give it as the server name."""
    return ssl.create_default_context(cafile=str(node.home.ca_cert))


class Answer:
    """A checked response."""

    def __init__(self, status: int, body: Any, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def __getitem__(self, key: str) -> Any:
        return self.body[key]


class Api:
    """One node's client API, as one logged-in user (or none)."""

    def __init__(self, session: aiohttp.ClientSession, node: Node) -> None:
        assert node.api_port is not None, "the node was started without [api]"
        self.session = session
        self.node = node
        self.base = f"https://127.0.0.1:{node.api_port}"
        self.token: str | None = None
        self.refresh_token: str | None = None
        self.user: dict[str, Any] | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        expect: int | None = 200,
        token: str | None = None,
        params: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        headers = {}
        bearer = token if token is not None else self.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        full = PREFIX + path
        async with self.session.request(
            method,
            self.base + full,
            json=body if raw is None else None,
            data=raw,
            headers=headers,
            params=params,
            server_hostname=self.node.node_id,
        ) as response:
            text = await response.text()
            status = response.status
            answer_headers = dict(response.headers)
        schema = response_schema(method, full, status)
        data = None
        if text:
            data = json.loads(text)
            assert schema is not None, f"{method} {full} {status}: JSON the spec does not describe"
            validate(data, schema)
        else:
            assert schema is None, f"{method} {full} {status}: the spec promises a JSON body"
        if expect is not None:
            assert status == expect, f"{method} {full}: {status} {text}"
        return Answer(status, data, answer_headers)

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Answer:
        return await self.request("POST", path, body if body is not None else {}, **kwargs)

    async def login(self, login: str, password: str) -> Answer:
        answer = await self.post("/auth/login", {"login": login, "password": password})
        self.token = answer["access_token"]
        self.refresh_token = answer["refresh_token"]
        self.user = answer["user"]
        return answer

    @asynccontextmanager
    async def events(self, *, first_message: bool = False) -> AsyncIterator[Events]:
        """A WebSocket of live events, past its `ready` event."""
        assert self.token is not None
        url = self.base + PREFIX + "/events"
        if not first_message:
            url += f"?access_token={self.token}"
        async with self.session.ws_connect(
            url, heartbeat=None, server_hostname=self.node.node_id
        ) as ws:
            if first_message:
                await ws.send_json({"type": "auth", "access_token": self.token})
            events = Events(ws)
            ready = await events.next()
            assert ready["type"] == "ready", ready
            yield events


class Events:
    """Frames of an events WebSocket, each checked against the spec."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def next(self, timeout: float = 15.0) -> dict[str, Any]:  # noqa: ASYNC109
        message = await self.ws.receive(timeout=timeout)
        assert message.type is aiohttp.WSMsgType.TEXT, f"not an event: {message}"
        event = json.loads(message.data)
        validate(event, event_schema())
        self.seen.append(event)
        return event

    async def wait_for(self, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:  # noqa: ASYNC109
        """The next event whose fields have these values (others are kept in `seen`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                pytest.fail(f"no event with {fields} within {timeout} s; saw {self.seen}")
            event = await self.next(left)
            if all(event.get(key) == value for key, value in fields.items()):
                return event


@asynccontextmanager
async def session_for(node: Node) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTPS client session trusting the federation CA, closed at the end."""
    connector = aiohttp.TCPConnector(ssl=client_ssl(node))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session
