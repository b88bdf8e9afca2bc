"""Conversation history for the model, against the real Redis."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as redis

from services.conversations import ConversationStore
from services.redis_client import Keys

pytestmark = pytest.mark.integration


async def test_a_long_conversations_window_moves_in_steps_so_prompts_share_their_start(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = ConversationStore(redis_client, Keys(namespace))
    owner, conversation = "owner-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    starts, sizes = [], []
    for turn in range(20):
        await store.append_turn(owner, conversation, f"question {turn}", f"answer {turn}")
        window = await store.history(owner, conversation, 8)
        assert window[0].role == "user" and len(window) <= 8
        starts.append(window[0].content)
        sizes.append(len(window))
    # Up to the limit everything is sent; then the start moves every second turn
    # (half the limit of 8 messages), never by one turn at a time.
    assert sizes[:4] == [2, 4, 6, 8]
    assert min(sizes[4:]) >= 4
    assert starts == ["question 0"] * 4 + [f"question {2 * (n // 2)}" for n in range(2, 18)]
    assert await store.history(owner, conversation, 0) == []
