"""The web page's files (viper_web/static), served as they are: no build step, nothing from a CDN."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from .exchange import HttpHeaders, Send

STATIC_DIR = Path(__file__).parent / "static"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    "": "text/plain; charset=utf-8",  # LICENSE files
}
# The page loads only its own scripts and styles; images may also be data: and blob: URLs (previews, uploads).
_PAGE_POLICY = (
    b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _resolve(root: Path, url_path: str) -> Path | None:
    relative = url_path.lstrip("/") or "index.html"
    if "\\" in relative or "\0" in relative:
        return None
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file() or path.suffix not in _TYPES:
        return None
    return path


async def serve_static(scope: dict, send: Send, root: Path = STATIC_DIR) -> None:
    if scope["method"] not in ("GET", "HEAD"):
        await plain_response(send, 405, "method not allowed\n", [(b"allow", b"GET, HEAD")])
        return
    path = _resolve(root, scope["path"])
    if path is None:
        await plain_response(send, 404, "not found\n")
        return
    body = await asyncio.to_thread(path.read_bytes)
    etag = b'"' + hashlib.blake2b(body, digest_size=12).hexdigest().encode() + b'"'
    headers = [
        (b"content-type", _TYPES[path.suffix].encode()),
        (b"etag", etag),
        # Revalidated on every load, so a new version of the page is never mixed with a cached script.
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
    ]
    if path.suffix == ".html":
        headers.append((b"content-security-policy", _PAGE_POLICY))
    if etag in dict(scope["headers"]).get(b"if-none-match", b"").split(b", "):
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


async def plain_response(send: Send, status: int, text: str, headers: HttpHeaders = ()) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()), *headers,
    ]})
    await send({"type": "http.response.body", "body": body})
