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
from services.errors import (
    JobFailed,
    JobTimeout,
    MeshError,
    NotFound,
    PermanentError,
    RateLimited,
    RetryableError,
    StateConflict,
    StoreUnavailable,
)

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
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
        return ApiError(429, "rate_limit_error", exc.message, exc.code, headers)
    if isinstance(exc, RetryableError):
        return ApiError(
            503, "service_unavailable", exc.message, exc.code, {"Retry-After": RETRY_AFTER_S}
        )
    if isinstance(exc, NotFound):
        return ApiError(404, "invalid_request_error", exc.message, exc.code)
    if isinstance(exc, StateConflict):
        return ApiError(409, "invalid_request_error", exc.message, exc.code)
    if isinstance(exc, PermanentError) or (isinstance(exc, JobFailed) and not exc.retryable):
        return ApiError(400, "invalid_request_error", exc.message, exc.code)
    # A worker failed in a way that may not happen again.
    return ApiError(502, "worker_error", exc.message, exc.code, {"Retry-After": RETRY_AFTER_S})


def to_api_error(exc: BaseException) -> ApiError:
    """The one map from anything raised while serving a request to its HTTP error.
    Routes raise domain errors (services.errors) or ApiError; the rest is ours to log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, MeshError):
        return from_mesh_error(exc)
    if isinstance(exc, RedisError):
        log.error("redis error: %s", exc)
        return from_mesh_error(StoreUnavailable("Redis is unavailable"))
    if isinstance(exc, ClientDisconnected):
        # Nobody reads this; 499 (nginx's "client closed request") marks it in metrics.
        return ApiError(499, "client_closed", "client closed the request", "client_closed")
    if isinstance(exc, ValidationError):
        # Input that passed the request schema but not an internal model built from it.
        details = exc.errors()
        where = ".".join(str(part) for part in details[0]["loc"]) if details else ""
        what = details[0]["msg"] if details else "invalid"
        message = f"{where}: {what}" if where else what
        return ApiError(400, "invalid_request_error", message, "invalid_request")
    log.error("unhandled error", exc_info=exc)
    return ApiError(500, "server_error", "internal error", "internal_error")


def stream_error(exc: BaseException) -> ErrorBody:
    """The body of the `error` event that ends a stream already under way: the same
    map as a plain response (a stream cannot change its status any more)."""
    return to_api_error(exc).body()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    async def _error(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    for raised in (
        ApiError,
        MeshError,
        RedisError,
        ClientDisconnected,
        ValidationError,
        Exception,
    ):
        app.add_exception_handler(raised, _error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return ApiError(
            422, "invalid_request_error", _validation_message(exc), "invalid_body"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        return ApiError(
            exc.status_code, "invalid_request_error", str(exc.detail), code, dict(exc.headers or {})
        ).response()
