"""Per-key rate limit in Redis, shared by every gateway replica.

At most `per_minute` generation requests per key in each fixed minute window. The
count is kept in Redis, and taken in the same round trip as the key's lookup
(`KeyStore.lookup`), so a rate-limited request costs one Redis call before its job.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from services.errors import RateLimited
from services.redis_client import Keys

WINDOW_TTL_MS = 61_000  # a little over a window: the count outlives no window by much


@dataclass(frozen=True)
class Window:
    key: str  # the Redis counter of this key's current window
    index: int  # minutes since the epoch
    now: float


class RateLimiter:
    def __init__(self, keys: Keys, per_minute: int) -> None:
        self.keys = keys
        self.per_minute = per_minute

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def window(self, key_id: str) -> Window:
        now = time.time()
        index = int(now // 60)
        return Window(self.keys.rate_window(key_id, index), index, now)

    def check(self, window: Window, count: int) -> None:
        """RateLimited when `count` requests in `window` are more than allowed."""
        if count > self.per_minute:
            retry_after = max(1, math.ceil((window.index + 1) * 60 - window.now))
            raise RateLimited(
                f"rate limit of {self.per_minute} requests per minute reached", retry_after
            )
