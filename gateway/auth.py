"""Bearer-key authentication with scopes, and the per-key rate limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import ApiError
from gateway.keys import ApiKey, Scope

_bearer = HTTPBearer(auto_error=False, description="An API key from `python -m gateway keys`.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def authenticate(request: Request, credentials: Credentials) -> ApiKey:
    """The caller's key record, or a 401 with the standard error body."""
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401, "authentication_error", "missing bearer API key", "missing_api_key", unauthorized
        )
    record = await request.app.state.key_store.lookup(credentials.credentials)
    if record is None:
        raise ApiError(
            401, "authentication_error", "invalid API key", "invalid_api_key", unauthorized
        )
    return record


def require(scope: Scope, rate_limited: bool = False) -> Callable[..., Awaitable[ApiKey]]:
    """A dependency: a valid key with `scope` (403 otherwise), within its rate limit."""

    async def dependency(
        request: Request, record: Annotated[ApiKey, Depends(authenticate)]
    ) -> ApiKey:
        if not record.allows(scope):
            raise ApiError(
                403, "permission_error", f"this key lacks the '{scope}' scope", "missing_scope"
            )
        if rate_limited:
            await request.app.state.rate_limiter.check(record.key_id)
        return record

    return dependency


ChatKey = Annotated[ApiKey, Depends(require("chat", rate_limited=True))]
ReadKey = Annotated[ApiKey, Depends(require("chat"))]
AdminKey = Annotated[ApiKey, Depends(require("admin"))]
ContextKey = Annotated[ApiKey, Depends(require("context"))]
WorkerKey = Annotated[ApiKey, Depends(require("worker"))]
MetricsKey = Annotated[ApiKey, Depends(require("metrics"))]
