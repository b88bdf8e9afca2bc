"""The phone's web client: a static, installable page served by the gateway itself
(no build step). `/` is the app shell, `/sw.js` its service worker (served from the
root so it controls the whole origin), `/app/*` the rest, `/app/wllama/*` the
on-device runtime (llama.cpp in WebAssembly, the npm package pinned in
web/vendor/package-lock.json; `make install` puts it there: nothing is fetched from
anywhere else at run time).

Every page file is sent with the cross-origin isolation headers (COOP/COEP): with
them the browser allows the runtime's threads (SharedArrayBuffer); without them (a
proxy that strips them) it runs on one thread.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gateway.errors import ApiError

WEB = Path(__file__).parent / "web"
WLLAMA = WEB / "vendor" / "node_modules" / "@wllama" / "wllama" / "esm"
ASSETS = {
    "app.js": "text/javascript",
    "device.js": "text/javascript",
    "download-worker.js": "text/javascript",
    "sha256.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}
RUNTIME = {  # served name -> (path in the package, media type)
    "index.js": ("index.js", "text/javascript"),
    "wllama.wasm": ("wasm/wllama.wasm", "application/wasm"),
}
router = APIRouter(include_in_schema=False)
ISOLATED = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
NO_CACHE = {
    "Cache-Control": "no-cache",
    **ISOLATED,
}  # revalidate: a new gateway brings a new client


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
    return FileResponse(
        WEB / "manifest.webmanifest", media_type="application/manifest+json", headers=ISOLATED
    )


@router.get("/app/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, "invalid_request_error", f"no such file: {name}", "not_found")
    return FileResponse(WEB / name, media_type=ASSETS[name], headers=NO_CACHE)


@router.get("/app/wllama/{name}")
async def runtime(name: str) -> FileResponse:
    if name not in RUNTIME:
        raise ApiError(404, "invalid_request_error", f"no such file: {name}", "not_found")
    path, media_type = RUNTIME[name]
    if not (WLLAMA / path).is_file():
        raise ApiError(
            404,
            "invalid_request_error",
            "the on-device runtime is not installed on this gateway "
            "(make install runs npm ci in gateway/web/vendor)",
            "not_installed",
        )
    return FileResponse(WLLAMA / path, media_type=media_type, headers=NO_CACHE)
