"""Conversation history in Redis, keyed by API key and conversation id: recorded by
the gateway, read back by it and (those marked for training) by the trainer. The
one place that knows how conversations are laid out in Redis."""

from __future__ import annotations

import builtins
import json
import uuid
from datetime import UTC, datetime
from typing import cast

import redis.asyncio as redis

from proto.api import ConversationMessage, ConversationSummary
from proto.conversations import TrainingConversation
from proto.messages import ChatMessage
from services.redis_client import Keys

# KEYS: the conversation's list, the owner's latest, the owner's index, the turn's
# marker. ARGV: the user entry, the assistant entry, the conversation id, the turn's
# time (ms), how long the marker is kept (s): it outlives any retry (a day for the
# gateway's own; a phone may come back online weeks later).
APPEND_TURN = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[5]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1], ARGV[2])
local newest = redis.call('ZREVRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if not newest[2] or tonumber(ARGV[4]) >= tonumber(newest[2]) then
  redis.call('SET', KEYS[2], ARGV[3])
end
redis.call('ZADD', KEYS[3], 'GT', ARGV[4], ARGV[3])  -- GT still adds a new member
return 1
"""


class ConversationStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._append = client.register_script(APPEND_TURN)

    async def history(self, owner: str, conversation_id: str, limit: int) -> list[ChatMessage]:
        """The conversation's recent messages for the model, oldest first: at most `limit`.

        Once a conversation is longer than `limit`, its window's start moves in steps of
        half the limit rather than one turn at a time, so that consecutive prompts keep
        sharing their start (which the workers' prefix caches read only once); the
        window then holds between half the limit and the limit.
        """
        if limit <= 0:
            return []
        key = self.keys.conversation(owner, conversation_id)
        async with self.client.pipeline(transaction=True) as pipe:  # one consistent view
            pipe.llen(key)
            pipe.lrange(key, -limit, -1)
            length, raw = cast("tuple[int, list[str]]", await pipe.execute())
        excess = length - limit
        if excess > 0:
            step = max(2, (limit // 2 + 1) // 2 * 2)  # half, even: starts on a user turn
            raw = raw[-(-excess // step) * step - excess :]
        messages = [json.loads(item) for item in raw]
        # Never start the model's view with an assistant turn.
        while messages and messages[0]["role"] != "user":
            messages.pop(0)
        return [ChatMessage(role=m["role"], content=m["content"]) for m in messages]

    async def messages(self, owner: str, conversation_id: str) -> list[ConversationMessage]:
        """Every recorded message, oldest first (empty when there is no such conversation)."""
        key = self.keys.conversation(owner, conversation_id)
        raw = cast("list[str]", await self.client.lrange(key, 0, -1))
        return [ConversationMessage.model_validate_json(item) for item in raw]

    async def latest(self, owner: str) -> str | None:
        return cast("str | None", await self.client.get(self.keys.latest_conversation(owner)))

    async def append_turn(
        self,
        owner: str,
        conversation_id: str,
        user: str,
        assistant: str,
        at: datetime | None = None,
        turn_id: str | None = None,
        answered_on: str | None = None,
        remember_s: int = 86_400,
    ) -> bool:
        """Both halves of a turn at once (one script: atomic), and mark the conversation
        the owner's latest unless a later turn of another one is. `at`: when the turn
        was answered (now, unless it is recorded late). `turn_id`: recording the same
        turn again within `remember_s` (a retry after a timeout) changes nothing; False
        then. `answered_on`: the phone's model, for a turn answered on the device."""
        when = at or datetime.now(UTC)
        stamp = when.astimezone(UTC).isoformat()
        user_entry = ConversationMessage(role="user", content=user, at=stamp)
        answer = ConversationMessage(
            role="assistant", content=assistant, at=stamp, answered_on=answered_on
        )
        entries = [
            user_entry.model_dump_json(exclude_none=True),
            answer.model_dump_json(exclude_none=True),
        ]
        keys = [
            self.keys.conversation(owner, conversation_id),
            self.keys.latest_conversation(owner),
            self.keys.conversation_index(owner),
            self.keys.turn_recorded(turn_id or uuid.uuid4().hex),
        ]
        args: list[str | float] = [
            *entries,
            conversation_id,
            when.timestamp() * 1000,
            remember_s,
        ]
        return bool(await self._append(keys=keys, args=args))

    async def list(self, owner: str, limit: int) -> list[ConversationSummary]:
        """This owner's conversations, the most recently active first."""
        index = self.keys.conversation_index(owner)
        recent = cast(
            "list[tuple[str, float]]",
            await self.client.zrevrange(index, 0, limit - 1, withscores=True),
        )
        async with self.client.pipeline(transaction=False) as pipe:
            for conversation_id, _ in recent:
                pipe.lindex(self.keys.conversation(owner, conversation_id), 0)
                pipe.llen(self.keys.conversation(owner, conversation_id))
            found = await pipe.execute()
        summaries = []
        for (conversation_id, score), first, length in zip(
            recent, found[::2], found[1::2], strict=True
        ):
            if not length:
                continue  # expired or deleted meanwhile
            summaries.append(
                ConversationSummary(
                    conversation_id=conversation_id,
                    title=json.loads(first)["content"][:80],
                    messages=length,
                    updated_at=datetime.fromtimestamp(score / 1000, UTC).isoformat(),
                )
            )
        return summaries

    async def mark_for_training(self, owner: str, conversation_id: str, marked: bool) -> None:
        """The trainer's dataset reads every marked conversation."""
        member = f"{owner}:{conversation_id}"
        if marked:
            at = datetime.now(UTC).isoformat()
            await self.client.hset(self.keys.training_conversations(), member, at)
        else:
            await self.client.hdel(self.keys.training_conversations(), member)

    async def marked_for_training(self) -> builtins.list[TrainingConversation]:
        """Every conversation marked for training, in a stable order (owner, id)."""
        marked = cast(
            "dict[str, str]", await self.client.hgetall(self.keys.training_conversations())
        )
        found = []
        for member in sorted(marked):
            owner, conversation_id = member.split(":", 1)
            messages = await self.messages(owner, conversation_id)
            if messages:  # deleted or expired since it was marked
                found.append(
                    TrainingConversation(
                        owner=owner,
                        conversation_id=conversation_id,
                        marked_at=marked[member],
                        messages=messages,
                    )
                )
        return found

    async def delete(self, owner: str, conversation_id: str) -> bool:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.training_conversations(), f"{owner}:{conversation_id}")
            pipe.zrem(self.keys.conversation_index(owner), conversation_id)
            pipe.delete(self.keys.conversation(owner, conversation_id))
            pipe.get(self.keys.latest_conversation(owner))
            _, _, deleted, latest = await pipe.execute()
        if latest == conversation_id:
            await self.client.delete(self.keys.latest_conversation(owner))
        return bool(deleted)
