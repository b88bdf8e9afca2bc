"""Typed errors: one class per kind of failure, each carrying the gateway's error body."""

from __future__ import annotations


class MeshClientError(Exception):
    """Base class. `status` is the HTTP status (0 when there was no answer)."""

    def __init__(
        self, message: str, status: int = 0, code: str = "", type_: str = "", url: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type_
        self.url = url


class GatewayUnreachable(MeshClientError):
    """No gateway in the list answered (every URL refused, timed out connecting, or
    had no worker)."""


class BadRequestError(MeshClientError):
    """400, 413, 422: the request itself is wrong."""


class AuthenticationError(MeshClientError):
    """401: missing or invalid API key."""


class PermissionDeniedError(MeshClientError):
    """403: the key lacks the scope."""


class NotFoundError(MeshClientError):
    """404: unknown model, conversation, document or adapter."""


class ConflictError(MeshClientError):
    """409/412: a context save based on a stale version. `current_version` is the
    gateway's number of the version now stored and `current_etag` its ETag (send it
    as `version` to save over it on purpose), when the gateway said."""

    current_version: int | None = None
    current_etag: str | None = None


class RateLimitError(MeshClientError):
    """429. `retry_after` seconds, when the gateway said."""

    retry_after: float | None = None


class ServiceUnavailableError(MeshClientError):
    """503 from the last gateway tried: no worker, full queue or no broker."""


class ServerError(MeshClientError):
    """Any other 5xx (502: a worker failed; 504: no answer in time)."""


class StreamError(MeshClientError):
    """The stream ended with an `error` event (e.g. the worker was lost mid-answer)."""


BY_STATUS: dict[int, type[MeshClientError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    412: ConflictError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
