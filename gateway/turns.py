"""Chat turns the gateway could not record yet, kept in order and retried until Redis
takes them.

An answer already generated (and maybe streamed) is not thrown away because Redis
was unreachable at its end: the turn waits here, later turns of the same
conversation queue behind it (the history stays in order), and a background loop
retries with backoff. While Redis is known to be away, a finishing answer does not
wait for it again (its turn is queued at once). A chat that reads the
conversation's history first tries to record what is held for it. Every turn has
an id, so a retry after a timeout (the write may have happened) adds it once. What
is still held when the gateway stops is logged turn by turn, so a person can see
what was not saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from redis.exceptions import RedisError

from services.conversations import ConversationStore
from services.errors import StoreUnavailable
from services.redis_client import worth_waiting_out

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str
    at: datetime
    turn_id: str = field(default_factory=lambda: uuid.uuid4().hex)


Conversation = tuple[str, str]  # (owner, conversation id)


class TurnOutbox:
    def __init__(
        self,
        conversations: ConversationStore,
        first_retry_s: float = 0.5,
        max_retry_s: float = 5,
    ) -> None:
        self.conversations = conversations
        self.first_retry_s = first_retry_s
        self.max_retry_s = max_retry_s
        self._held: dict[Conversation, list[Turn]] = {}
        # One writer per conversation keeps its history in order; others go on.
        self._locks: dict[Conversation, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._unreachable_until = 0.0  # after a failure, do not wait for Redis inline

    @property
    def pending(self) -> int:
        """Turns waiting for Redis."""
        return sum(len(turns) for turns in self._held.values())

    def _lock(self, key: Conversation) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _tidy(self, key: Conversation) -> None:
        lock = self._locks.get(key)
        if key not in self._held and lock is not None and not lock.locked():
            del self._locks[key]

    async def record(self, owner: str, conversation_id: str, user: str, assistant: str) -> bool:
        """Record a turn now if Redis takes it (True), else hold it for a retry (False)."""
        key = (owner, conversation_id)
        self._held.setdefault(key, []).append(Turn(user, assistant, datetime.now(UTC)))
        saved = False
        try:
            if time.monotonic() >= self._unreachable_until:
                async with self._lock(key):
                    saved = await self._flush(key)
        finally:
            if key in self._held:  # also when the request was cancelled meanwhile
                self._wake.set()
            self._tidy(key)
        if not saved:
            log.warning(
                "conversation %s: turn not recorded yet (Redis unreachable); "
                "%d turn(s) held for a retry",
                conversation_id,
                self.pending,
            )
        return saved

    async def flush(self, owner: str, conversation_id: str) -> None:
        """Record what is held for this conversation (before its history is read);
        raises StoreUnavailable when Redis still cannot take it."""
        key = (owner, conversation_id)
        if key not in self._held:
            return
        async with self._lock(key):
            saved = await self._flush(key)
        self._tidy(key)
        if not saved:
            raise StoreUnavailable(
                "this conversation's last turns are not recorded yet; try again shortly"
            )

    async def _flush(self, key: Conversation) -> bool:
        """Record `key`'s held turns, oldest first; False at the first one Redis cannot
        take yet. A turn Redis refuses for good is dropped, logged, and its error raised
        (the client whose request is recording is told: an `error` event or a 503)."""
        turns = self._held.get(key, [])
        try:
            while turns:
                turn = turns[0]
                try:
                    await self.conversations.append_turn(
                        *key, turn.user, turn.assistant, at=turn.at, turn_id=turn.turn_id
                    )
                except RedisError as exc:
                    if worth_waiting_out(exc):
                        self._unreachable_until = time.monotonic() + self.first_retry_s
                        return False
                    turns.pop(0)
                    log.error("conversation %s: a turn could not be recorded: %s", key[1], exc)
                    raise
                except OSError:
                    self._unreachable_until = time.monotonic() + self.first_retry_s
                    return False
                turns.pop(0)
        finally:
            if not turns:
                self._held.pop(key, None)
        self._unreachable_until = 0.0
        return True

    async def _flush_all(self) -> bool:
        """One pass over every held conversation; False when Redis is still away."""
        for key in list(self._held):
            try:
                async with self._lock(key):
                    saved = await self._flush(key)
            except RedisError:
                continue  # that turn was dropped and logged
            self._tidy(key)
            if not saved:
                return False
        return True

    async def run(self) -> None:
        """Retry the held turns with backoff, for as long as the gateway runs."""
        delay = self.first_retry_s
        while True:
            if not self._held:
                self._wake.clear()
                await self._wake.wait()
                delay = self.first_retry_s
            await asyncio.sleep(delay)
            if await self._flush_all() and not self._held:
                log.info("every held conversation turn is recorded")
            else:
                delay = min(delay * 2, self.max_retry_s)

    async def close(self) -> None:
        """One last try; then say what was not saved."""
        with contextlib.suppress(RedisError, OSError):
            await self._flush_all()
        for (owner, conversation_id), turns in self._held.items():
            for turn in turns:
                log.error(
                    "conversation %s of %s: turn of %s NOT SAVED (Redis unreachable): %r",
                    conversation_id,
                    owner,
                    turn.at.isoformat(),
                    turn.user[:200],
                )
