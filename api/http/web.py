"""The chat page (`CHAT_WEB_UI`): `GET /` and the script and style sheet it loads, from `api/web/`.

Three small files, read once when the app is built and served from memory; nothing is built or fetched
from elsewhere. The page may load only its own script and style and talk only to this origin.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Response

from api.errors import NotFound

# No inline script or style, no other origin, no plugin, no framing: model text that slipped into the
# page's markup could still not run.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The files change only with a new release: a browser asks again each time, and gets them again.
_COMMON = {"cache-control": "no-cache", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def web_router() -> APIRouter:
    folder = files("api") / "web"
    page = (folder / "index.html").read_bytes()
    assets = {name: (folder / name).read_bytes() for name in _TYPES}
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def chat_page() -> Response:
        headers = {**_COMMON, "content-security-policy": PAGE_POLICY, "x-frame-options": "DENY"}
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @router.get("/web/{name}")
    async def chat_page_asset(name: str) -> Response:
        if name not in assets:
            raise NotFound(f"no file {name!r}")
        return Response(assets[name], media_type=_TYPES[name], headers=_COMMON)

    return router
