"""Two sites for the sync tests: each with its own redis-server (AOF) and sync
process, on a RabbitMQ node of the test's own (services.private_servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from context_store.store import ContextStore
from services.launcher import MeshProcesses
from services.private_servers import PrivateRabbit, PrivateRedis
from services.redis_client import connect
from tests.conftest import free_port, mesh_env

SITES = ("desktop", "vps")


class World:
    def __init__(self, namespace: str, root: Path, history_keep: int = 100) -> None:
        self.namespace = namespace
        self.history_keep = history_keep
        self.rabbit = PrivateRabbit(root / "rabbit")
        self.redis = {site: PrivateRedis(root / site) for site in SITES}
        env = mesh_env(
            namespace,
            free_port(),
            "unused-key-123",
            MESH_CATCH_UP_S="1",
            MESH_CONTEXT_HISTORY_KEEP=str(history_keep),
        )
        env["MESH_AMQP_URL"] = self.rabbit.url
        self.processes = MeshProcesses(env, "127.0.0.1", 0, output=root / "logs")
        self.stores: dict[str, ContextStore] = {}

    def start(self) -> None:
        self.rabbit.start()
        for site in SITES:
            self.redis[site].start()
            self.stores[site] = ContextStore(
                connect(self.redis[site].url, timeout_s=1),
                self.namespace,
                site,
                history_keep=self.history_keep,
            )
            self.processes.start_process(
                site,
                "context_store",
                args=["sync"],
                extra_env={"MESH_SITE": site, "MESH_REDIS_URL": self.redis[site].url},
            )

    def alive(self) -> list[str]:
        return [site for site in SITES if self.processes.children[site].poll() is None]

    async def content(self, site: str, doc: str) -> str | None:
        try:
            found = await self.stores[site].get(doc)
        except (redis.RedisError, OSError):
            return None
        return None if found is None else found.content

    async def arrives(self, site: str, doc: str, content: str, timeout_s: float = 30) -> float:
        started = time.monotonic()
        while await self.content(site, doc) != content:
            assert time.monotonic() - started < timeout_s, f"{doc!r} never reached {site}"
            await asyncio.sleep(0.1)
        return time.monotonic() - started


async def private_world(
    namespace: str, tmp_path: Path, history_keep: int = 100
) -> AsyncIterator[World]:
    """A World, started, and everything stopped after (use as a fixture's body)."""
    if not (PrivateRabbit.available() and PrivateRedis.available()):
        pytest.skip("needs rabbitmq-server and redis-server (Debian's packages)")
    world = World(namespace, tmp_path, history_keep)
    try:
        await asyncio.to_thread(world.start)
        yield world
    finally:
        world.processes.stop()
        for store in world.stores.values():
            await store.client.aclose()
        for server in world.redis.values():
            server.stop()
        await asyncio.to_thread(world.rabbit.shutdown)
