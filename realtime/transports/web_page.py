"""The browser page at `/`: static files from `clients/web/` (package data), served by the server's own app.

Only the files that ship in that folder are served (a fixed table made at startup, so no request path ever
reaches the file system), with a Content-Security-Policy that lets the page load nothing from elsewhere and
connect only back to this server (WebSocket, WebRTC calls, client secrets).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

import clients

WEB_DIR = Path(clients.__file__).resolve().parent / "web"
ASSET_PREFIX = "/web/"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
          ".png": "image/png", ".ico": "image/x-icon"}
HEADERS = {
    # 'self' covers same-origin ws:/wss: in CSP level 3 browsers; media from the peer connection needs no source.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a page from an older server must not talk to a newer one
}


def page_files(folder: Path = WEB_DIR) -> dict[str, Path]:
    """Served name -> file, for the folder's files of known types."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in _TYPES}


def add_page_routes(app: web.Application, folder: Path = WEB_DIR) -> None:
    """`GET /` (index.html) and `GET /web/<file>`; add before the server's catch-all 404 route."""
    files = page_files(folder)
    if "index.html" not in files:
        return  # an install without the page still serves the protocol

    def serve(path: Path) -> web.FileResponse:
        return web.FileResponse(path, headers={**HEADERS, "Content-Type": _TYPES[path.suffix]})

    async def index(request: web.Request) -> web.StreamResponse:
        return serve(files["index.html"])

    async def asset(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(text="no such file\n")
        return serve(path)

    app.router.add_get("/", index)
    app.router.add_get(ASSET_PREFIX + "{name}", asset)
