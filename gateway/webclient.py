"""The staff web client: static files (`gateway/web/`) served at `/` by the API listener.

No build step and no framework: `index.html`, `app.css` and the ES module `app.js`
talk to `/api/v1` on the same origin. The files ship as package data, so an installed
node serves them. Every answer carries a Content-Security-Policy that allows only this
origin's scripts, styles and connections (the WebSocket included).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["WEB_FILES", "web_client_routes"]

WEB_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/app.css": ("app.css", "text/css"),
}
"""Path served -> (file in gateway/web, media type)."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _read(name: str) -> bytes:
    return resources.files("gateway").joinpath("web", name).read_bytes()


def web_client_routes() -> list[web.RouteDef]:
    """GET routes for the client's files (read once, when the routes are made)."""
    routes = []
    for path, (name, mime) in WEB_FILES.items():
        body = _read(name)

        async def serve(_: web.Request, body: bytes = body, mime: str = mime) -> web.Response:
            return web.Response(
                body=body,
                content_type=mime,
                charset="utf-8",
                headers={
                    "Content-Security-Policy": CSP,
                    "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-cache",
                },
            )

        routes.append(web.get(path, serve))
    return routes
