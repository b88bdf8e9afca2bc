"""Which adapter version is current: typed records in Redis, an unreadable one skipped."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as redis

from services.adapters import CurrentVersions
from services.redis_client import Keys
from services.settings import MeshSettings

pytestmark = pytest.mark.integration


async def test_an_unreadable_record_is_skipped_not_fatal(redis_client: redis.Redis) -> None:
    settings = MeshSettings(namespace=f"cv{uuid.uuid4().hex[:8]}")
    key = Keys(settings.namespace).adapters()
    await redis_client.hset(key, "good", '{"version": 3, "base_model": "demo-model"}')
    await redis_client.hset(key, "old", '{"version": "three"}')
    try:
        current = CurrentVersions(settings, redis_client)
        records = await current.all()
        assert {name: (r.version, r.base_model) for name, r in records.items()} == {
            "good": (3, "demo-model")
        }
        assert await current.get("old") is None
        assert (await current.get("good")).version == 3  # type: ignore[union-attr]
    finally:
        await redis_client.delete(key)
