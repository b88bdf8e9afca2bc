"""Redis connection and the key names every service agrees on."""

from __future__ import annotations

import redis.asyncio as redis

# How long one command may wait for Redis: a hung Redis (a paused VM, a stuck disk)
# becomes a prompt 503 with Retry-After, not a request that hangs with it. Every
# command the services send answers in well under a millisecond when Redis is well
# (the sync process blocks on XREAD for 0.5 s at most).
TIMEOUT_S = 3.0


def connect(url: str, max_connections: int = 64, timeout_s: float = TIMEOUT_S) -> redis.Redis:
    """A client for `url`; strings in and out (we store JSON).

    The pool blocks (up to `timeout_s`) for a free connection instead of failing: a
    burst of requests queues for Redis rather than erroring. A refused connection
    fails at once (no retries here: the caller answers 503 and the client retries).
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        decode_responses=True,
        health_check_interval=10,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
    )
    return redis.Redis(connection_pool=pool)


def worth_waiting_out(exc: BaseException) -> bool:
    """Refused, hung, loading its data, a replica or out of memory for now, a script
    busy: the same command may succeed later. Any other Redis error (a key of the
    wrong type, a script's own error) would fail the same way again."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ReadOnlyError | OSError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("OOM", "BUSY", "LOADING"))


class Keys:
    """Redis key names under one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def worker(self, worker_id: str) -> str:
        return f"{self.namespace}:workers:{worker_id}"

    def workers_index(self) -> str:
        return f"{self.namespace}:workers"

    def latest_conversation(self, owner: str) -> str:
        return f"{self.namespace}:conv-latest:{owner}"

    def conversation(self, owner: str, conversation_id: str) -> str:
        return f"{self.namespace}:conv:{owner}:{conversation_id}"

    def conversation_index(self, owner: str) -> str:
        """Sorted set: conversation id -> time of its last turn (ms)."""
        return f"{self.namespace}:conv-index:{owner}"

    def adapters(self) -> str:
        """Hash: adapter name -> the version every worker must serve (JSON)."""
        return f"{self.namespace}:adapters"

    def training_conversations(self) -> str:
        """Hash: "owner:conversation_id" -> when it was marked for training."""
        return f"{self.namespace}:training-conversations"

    def turn_recorded(self, turn_id: str) -> str:
        """Set once a turn is in its conversation: a retry after a timeout (the write
        may have happened) does not add it twice."""
        return f"{self.namespace}:turn:{turn_id}"

    def context_sync(self, site: str) -> str:
        """A site's sync process's state (JSON, short-lived: absent means not running)."""
        return f"{self.namespace}:context-sync:{site}"

    def deliveries(self, job_id: str) -> str:
        return f"{self.namespace}:deliveries:{job_id}"

    def api_keys(self) -> str:
        return f"{self.namespace}:api-keys"

    def rate_window(self, key_id: str, window: int) -> str:
        return f"{self.namespace}:rate:{key_id}:{window}"

    def all_pattern(self) -> str:
        return f"{self.namespace}:*"
