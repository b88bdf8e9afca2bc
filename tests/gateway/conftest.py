"""The gateway app in-process (lifespan and all) against the real broker and Redis,
or, for the HTTP layer's own tests, against an in-process engine (still real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from gateway.app import create_app
from gateway.engine import Engine
from gateway.settings import GatewaySettings


@asynccontextmanager
async def gateway_client(
    settings: GatewaySettings, engine: Engine | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for a gateway app built from `settings` (and `engine`, instead of
    the broker's); `client.app` is the app."""
    app = create_app(settings, engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http
