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


class WorkerLost(RetryableError):
    """A worker died after part of a streamed answer was sent; it is not resent."""

    code = "worker_lost"
