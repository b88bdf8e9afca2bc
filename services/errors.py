"""The error hierarchy: raised deep, translated once at each edge.

The gateway turns these into HTTP errors; the worker turns them into JobError
replies and ack/requeue decisions.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of the mesh's own errors. `code` is machine-readable."""

    code = "mesh_error"
    retryable = False

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class RetryableError(MeshError):
    """The same request may succeed later (broker gone, no worker, timeout)."""

    code = "unavailable"
    retryable = True


class PermanentError(MeshError):
    """Sending the same request again will fail the same way."""

    code = "invalid_request"


class InvalidRequest(PermanentError):
    """The request itself is wrong (too long, an option out of range, bad messages)."""


class NotFound(PermanentError):
    """The request names something that does not exist (a model, a conversation)."""

    code = "not_found"


class StateConflict(PermanentError):
    """The request cannot apply to the current state (e.g. no earlier version)."""

    code = "conflict"


class RateLimited(RetryableError):
    """Too many requests from one key; `retry_after_s` says when it may try again."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailable(RetryableError):
    """Redis (conversations, context, keys) did not answer."""

    code = "redis_unavailable"


class BusUnavailable(RetryableError):
    code = "broker_unavailable"


class NoWorkers(RetryableError):
    code = "no_live_workers"


class JobTimeout(RetryableError):
    code = "timeout"


class JobFailed(MeshError):
    """A worker reported that the job failed; retryable as the worker said."""

    def __init__(self, message: str, code: str, retryable: bool) -> None:
        super().__init__(message, code)
        self.retryable = retryable


class RequesterGone(MeshError):
    """A job's replies cannot be delivered: the reply queue is gone with the gateway
    (or its connection) that asked. Nobody waits for the answer any more."""

    code = "requester_gone"


class WorkerLost(RetryableError):
    """A worker died after part of a streamed answer was sent; it is not resent."""

    code = "worker_lost"
