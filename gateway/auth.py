"""Bearer-key authentication with scopes, and the per-key rate limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.deps import Mesh
from gateway.errors import ApiError
from gateway.keys import ApiKey, Scope, key_id
from gateway.ratelimit import WINDOW_TTL_MS

_bearer = HTTPBearer(auto_error=False, description="An API key from `python -m gateway keys`.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def require(scope: Scope, rate_limited: bool = False) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency: a valid key (401) with `scope` (403), within its rate limit (429).
    Looking the key up and counting the request are one Redis round trip."""

    async def dependency(mesh: Mesh, credentials: Credentials) -> ApiKey:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(
                401,
                "authentication_error",
                "missing bearer API key",
                "missing_api_key",
                UNAUTHORIZED,
            )
        token = credentials.credentials
        window = None
        if rate_limited and mesh.limiter.enabled:
            window = mesh.limiter.window(key_id(token))
        record, count = await mesh.keys.lookup_counting(
            token, window.key if window else "", WINDOW_TTL_MS
        )
        if record is None:
            raise ApiError(
                401, "authentication_error", "invalid API key", "invalid_api_key", UNAUTHORIZED
            )
        if not record.allows(scope):
            raise ApiError(
                403, "permission_error", f"this key lacks the '{scope}' scope", "missing_scope"
            )
        if window is not None:
            mesh.limiter.check(window, count)
        return record

    return dependency


ChatKey = Annotated[ApiKey, Depends(require("chat", rate_limited=True))]
ReadKey = Annotated[ApiKey, Depends(require("chat"))]
AdminKey = Annotated[ApiKey, Depends(require("admin"))]
ContextKey = Annotated[ApiKey, Depends(require("context"))]
WorkerKey = Annotated[ApiKey, Depends(require("worker"))]
MetricsKey = Annotated[ApiKey, Depends(require("metrics"))]
