"""Fixtures of the context-store tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from services.settings import MeshSettings


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    """A connection to the real Redis; each namespace a test appends to
    `client.test_prefixes` is deleted after it."""
    connection = redis.Redis.from_url(MeshSettings().redis_url, decode_responses=True)
    prefixes: list[str] = []
    connection.test_prefixes = prefixes  # type: ignore[attr-defined]
    yield connection
    for prefix in prefixes:
        names = [name async for name in connection.scan_iter(match=f"{prefix}:*")]
        if names:
            await connection.delete(*names)
    await connection.aclose()
