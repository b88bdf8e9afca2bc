"""Per-key rate limit in Redis, shared by every gateway replica."""

from __future__ import annotations

import math
import time

import redis.asyncio as redis

from gateway.errors import ApiError
from services.redis_client import Keys

# One round trip: count this request in the current window, set the window's
# expiry on its first request, and return the count and the time left.
_COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {count, redis.call('PTTL', KEYS[1])}
"""


class RateLimiter:
    """At most `per_minute` generation requests per key in each fixed minute window."""

    def __init__(self, client: redis.Redis, keys: Keys, per_minute: int) -> None:
        self.keys = keys
        self.per_minute = per_minute
        self._count = client.register_script(_COUNT)

    async def check(self, key_id: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.time()
        window = int(now // 60)
        count, _ = await self._count(keys=[self.keys.rate_window(key_id, window)], args=[61000])
        if int(count) > self.per_minute:
            retry_after = max(1, math.ceil((window + 1) * 60 - now))
            raise ApiError(
                429,
                "rate_limit_error",
                f"rate limit of {self.per_minute} requests per minute reached",
                "rate_limit_exceeded",
                {"Retry-After": str(retry_after)},
            )
