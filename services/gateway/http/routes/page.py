"""The web chat page: `/` and its static files, shipped inside the package.

The files are read once from `services/gateway/http/static/` and served from memory, only by
exact name (no path walking), with headers that keep the page safe even if a reply or a
title ever slipped into the DOM as markup: a Content-Security-Policy without inline script,
no framing, no MIME sniffing, no referrer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

# Scripts, styles and fetches only from this origin; nothing inline, nothing framed.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


@cache
def static_files() -> dict[str, StaticFile]:
    """Every servable file of the static folder, by file name."""
    files: dict[str, StaticFile] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = MEDIA_TYPES.get(path.suffix)
        if not path.is_file() or media_type is None:
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[path.name] = StaticFile(body, media_type, etag)
    return files


def _serve(name: str, if_none_match: str | None) -> Response:
    file = static_files().get(name)
    if file is None:
        raise HTTPException(status_code=404, detail=f"No static file named {name!r}.")
    # Revalidate every time (files change with each deploy; they are small), 304 when unchanged.
    headers = {**SECURITY_HEADERS, "ETag": file.etag, "Cache-Control": "no-cache"}
    if if_none_match and file.etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(content=file.body, media_type=file.media_type, headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
async def index(if_none_match: Annotated[str | None, Header()] = None) -> Response:
    return _serve("index.html", if_none_match)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    return _serve(name, if_none_match)
