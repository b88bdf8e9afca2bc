"""Chat turns the gateway could not record yet, kept in order and retried until Redis
takes them.

An answer already generated (and maybe streamed) is not thrown away because Redis
was unreachable at its end: the turn waits here, later turns of the same
conversation queue behind it (the history stays in order), and a background loop
retries with backoff. A chat that reads the conversation's history first tries
to record what is held for it. What is still held when the gateway stops is
logged turn by turn, so a person can see what was not saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.conversations import ConversationStore
from services.errors import StoreUnavailable

log = logging.getLogger(__name__)

# Worth waiting out (refused, hung, still loading its data); any other Redis error
# (a key of the wrong type, say) would fail the same way again: it is raised.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str
    at: datetime


Conversation = tuple[str, str]  # (owner, conversation id)


class TurnOutbox:
    def __init__(
        self, conversations: ConversationStore, first_retry_s: float = 0.5, max_retry_s: float = 5
    ) -> None:
        self.conversations = conversations
        self.first_retry_s = first_retry_s
        self.max_retry_s = max_retry_s
        self._held: dict[Conversation, list[Turn]] = {}
        self._lock = asyncio.Lock()  # one writer at a time keeps each history in order
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        """Turns waiting for Redis."""
        return sum(len(turns) for turns in self._held.values())

    async def record(self, owner: str, conversation_id: str, user: str, assistant: str) -> bool:
        """Record a turn now if Redis takes it (True), else hold it for a retry (False)."""
        turn = Turn(user, assistant, datetime.now(UTC))
        key = (owner, conversation_id)
        async with self._lock:
            self._held.setdefault(key, []).append(turn)  # behind any held before it
            saved = await self._flush(key)
        if not saved:
            log.warning(
                "conversation %s: turn not recorded yet (Redis unreachable); "
                "%d turn(s) held for a retry",
                conversation_id,
                self.pending,
            )
            self._wake.set()
        return saved

    async def flush(self, owner: str, conversation_id: str) -> None:
        """Record what is held for this conversation (before its history is read);
        raises StoreUnavailable when Redis still cannot take it."""
        key = (owner, conversation_id)
        if key not in self._held:
            return
        async with self._lock:
            if not await self._flush(key):
                raise StoreUnavailable(
                    "this conversation's last turns are not recorded yet; try again shortly"
                )

    async def _flush(self, key: Conversation) -> bool:
        """Record `key`'s held turns, oldest first; False at the first one Redis refuses."""
        turns = self._held.get(key, [])
        while turns:
            turn = turns[0]
            try:
                await self.conversations.append_turn(*key, turn.user, turn.assistant, at=turn.at)
            except UNREACHABLE:
                return False
            turns.pop(0)
        self._held.pop(key, None)
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
            async with self._lock:
                for key in list(self._held):
                    try:
                        if not await self._flush(key):
                            break
                    except RedisError:
                        continue  # dropped and logged
            if self._held:
                delay = min(delay * 2, self.max_retry_s)
            else:
                log.info("every held conversation turn is recorded")

    async def close(self) -> None:
        """One last try; then say what was not saved."""
        with contextlib.suppress(RedisError):
            async with self._lock:
                for key in list(self._held):
                    if not await self._flush(key):
                        break
        for (owner, conversation_id), turns in self._held.items():
            for turn in turns:
                log.error(
                    "conversation %s of %s: turn of %s NOT SAVED (Redis unreachable): %r",
                    conversation_id,
                    owner,
                    turn.at.isoformat(),
                    turn.user[:200],
                )
