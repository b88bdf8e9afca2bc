"""Bearer-key authentication."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="The mesh's API key.")


def key_owner(api_key: str) -> str:
    """A stable, non-secret id for a key: conversations are stored under it."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's owner id, or a 401 with the standard error body."""
    expected: str = request.app.state.settings.api_key
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "authentication_error",
            "missing bearer API key",
            "missing_api_key",
            {"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise ApiError(
            401,
            "authentication_error",
            "invalid API key",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )
    return key_owner(credentials.credentials)


Owner = Annotated[str, Depends(require_key)]
