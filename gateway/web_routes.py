"""The phone's web client: a static, installable page served by the gateway itself
(no build step). `/` is the app shell, `/sw.js` its service worker (served from the
root so it controls the whole origin), `/app/*` the rest."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gateway.errors import ApiError

WEB = Path(__file__).parent / "web"
ASSETS = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}
router = APIRouter(include_in_schema=False)
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a new gateway brings a new client


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/sw.js")
async def service_worker() -> FileResponse:
    return FileResponse(
        WEB / "sw.js",
        media_type="text/javascript",
        headers={**NO_CACHE, "Service-Worker-Allowed": "/"},
    )


@router.get("/manifest.webmanifest")
async def manifest() -> FileResponse:
    return FileResponse(WEB / "manifest.webmanifest", media_type="application/manifest+json")


@router.get("/app/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, "invalid_request_error", f"no such file: {name}", "not_found")
    return FileResponse(WEB / name, media_type=ASSETS[name], headers=NO_CACHE)
