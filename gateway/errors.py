"""The gateway's one error edge: every failure becomes {"error": {type, message, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.disconnect import ClientDisconnected
from proto.api import ErrorBody, ErrorDetail
from services.errors import JobFailed, JobTimeout, MeshError, PermanentError, RetryableError

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


class ApiError(Exception):
    """An HTTP error with the standard body."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        code: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(type=type_, message=message, code=code)
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(error=self.detail)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), self.status, headers=self.headers)


def from_mesh_error(exc: MeshError) -> ApiError:
    """How each mesh error reaches a client."""
    if isinstance(exc, JobTimeout):
        return ApiError(504, "timeout_error", exc.message, exc.code)
    if isinstance(exc, RetryableError):
        return ApiError(
            503, "service_unavailable", exc.message, exc.code, {"Retry-After": RETRY_AFTER_S}
        )
    if isinstance(exc, PermanentError) or (isinstance(exc, JobFailed) and not exc.retryable):
        return ApiError(400, "invalid_request_error", exc.message, exc.code)
    # A worker failed in a way that may not happen again.
    return ApiError(502, "worker_error", exc.message, exc.code, {"Retry-After": RETRY_AFTER_S})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(MeshError)
    async def _mesh_error(_: Request, exc: MeshError) -> JSONResponse:
        return from_mesh_error(exc).response()

    @app.exception_handler(RedisError)
    async def _redis_error(_: Request, exc: RedisError) -> JSONResponse:
        log.error("redis error: %s", exc)
        return ApiError(
            503,
            "service_unavailable",
            "Redis is unavailable",
            "redis_unavailable",
            {"Retry-After": RETRY_AFTER_S},
        ).response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") marks it in metrics.
        return ApiError(
            499, "client_closed", "client closed the request", "client_closed"
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return ApiError(
            422, "invalid_request_error", _validation_message(exc), "invalid_body"
        ).response()

    @app.exception_handler(ValidationError)
    async def _inconsistent(_: Request, exc: ValidationError) -> JSONResponse:
        # Input that passed the request schema but not an internal model built from it.
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))
        return ApiError(400, "invalid_request_error", message, "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        return ApiError(
            exc.status_code, "invalid_request_error", str(exc.detail), code, dict(exc.headers or {})
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, "server_error", "internal error", "internal_error").response()
