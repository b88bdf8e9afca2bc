"""Conversation history for the model, against the real Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

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


async def test_a_turn_recorded_twice_is_kept_once_and_a_late_one_keeps_the_latest(
    redis_client: redis.Redis, namespace: str
) -> None:
    """A retry after a timeout (the first write may have happened) adds nothing; a turn
    recorded late (held while Redis was away) does not make its conversation the
    owner's latest over one answered after it."""
    from datetime import UTC, datetime, timedelta

    store = ConversationStore(redis_client, Keys(namespace))
    owner, early, later = "owner-" + uuid.uuid4().hex[:8], uuid.uuid4().hex, uuid.uuid4().hex
    answered = datetime.now(UTC) - timedelta(minutes=1)
    await store.append_turn(owner, later, "new", "answer")
    for _ in range(2):
        await store.append_turn(owner, early, "held", "answer", at=answered, turn_id="t-1")
    assert [m.content for m in await store.messages(owner, early)] == ["held", "answer"]
    assert await store.latest(owner) == later
    listed = [c.conversation_id for c in await store.list(owner, 10)]
    assert listed == [later, early]


async def test_held_turns_are_recorded_in_order_once_redis_takes_them(
    namespace: str, tmp_path: Path
) -> None:
    """The gateway's outbox against a redis-server that is down, then back."""
    from gateway.turns import TurnOutbox
    from services.private_servers import PrivateRedis
    from services.redis_client import connect

    server = PrivateRedis(Path(tmp_path))
    server.start()
    client = connect(server.url, timeout_s=1)
    outbox = TurnOutbox(ConversationStore(client, Keys(namespace)), first_retry_s=0.05)
    try:
        assert await outbox.record("o", "c", "one", "1") is True
        server.stop()
        assert await outbox.record("o", "c", "two", "2") is False
        assert await outbox.record("o", "c", "three", "3") is False  # queued, no wait
        assert outbox.pending == 2
        server.start()
        await outbox.flush("o", "c")
        contents = [m.content for m in await outbox.conversations.messages("o", "c")]
        assert contents == ["one", "1", "two", "2", "three", "3"]
        assert outbox.pending == 0
    finally:
        await client.aclose()
        server.stop()
