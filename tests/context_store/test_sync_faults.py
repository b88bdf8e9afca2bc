"""The sync process survives its world: its Redis paused (a suspended desktop) and
restarted, and the broker restarted. Two sites with their own redis-server and sync
process, on a RabbitMQ node of this test's own (services.private_servers)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from context_store.store import ContextStore
from services.launcher import MeshProcesses
from services.private_servers import PrivateRabbit, PrivateRedis
from services.redis_client import Keys, connect
from tests.conftest import free_port, mesh_env

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]
SITES = ("desktop", "vps")


class World:
    def __init__(self, namespace: str, root: Path) -> None:
        self.namespace = namespace
        self.rabbit = PrivateRabbit(root / "rabbit")
        self.redis = {site: PrivateRedis(root / site) for site in SITES}
        env = mesh_env(namespace, free_port(), "unused-key-123", MESH_CATCH_UP_S="1")
        env["MESH_AMQP_URL"] = self.rabbit.url
        self.processes = MeshProcesses(env, "127.0.0.1", 0, output=root / "logs")
        self.stores: dict[str, ContextStore] = {}

    def start(self) -> None:
        self.rabbit.start()
        for site in SITES:
            self.redis[site].start()
            self.stores[site] = ContextStore(
                connect(self.redis[site].url, timeout_s=1), self.namespace, site
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


@pytest.fixture
async def world(namespace: str, tmp_path: Path) -> AsyncIterator[World]:
    if not (PrivateRabbit.available() and PrivateRedis.available()):
        pytest.skip("needs rabbitmq-server and redis-server (Debian's packages)")
    world = World(f"{namespace}-syncf", tmp_path)
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


async def test_the_sync_process_waits_out_its_redis_and_the_broker(world: World) -> None:
    desktop, vps = world.stores["desktop"], world.stores["vps"]
    await desktop.write("briefing", "v1", 0)
    await world.arrives("vps", "briefing", "v1")

    # The VPS's Redis hangs for 7 s (longer than a command's timeout) while the
    # desktop keeps writing: the VPS's sync process waits, then applies.
    world.redis["vps"].pause()
    await desktop.write("briefing", "v2", 1)
    await asyncio.sleep(7)
    world.redis["vps"].resume()
    await world.arrives("vps", "briefing", "v2")

    # The VPS's Redis restarts (its data kept, AOF): a write made on the VPS after it
    # still reaches the desktop.
    await asyncio.to_thread(world.redis["vps"].restart, 1.0)
    await world.arrives("vps", "briefing", "v2")  # reachable again
    await vps.write("portfolio", "from the vps", 0)
    await world.arrives("desktop", "portfolio", "from the vps")

    # The broker restarts: both ways still work afterwards, by themselves.
    await asyncio.to_thread(world.rabbit.restart, 1.0)
    await desktop.write("briefing", "v3", 2)
    await vps.write("portfolio", "again from the vps", 1)
    await world.arrives("vps", "briefing", "v3", timeout_s=60)
    await world.arrives("desktop", "portfolio", "again from the vps", timeout_s=60)

    assert world.alive() == list(SITES)  # nothing exited on the way
    # Each process reports its state where `make doctor` reads it.
    for site, store in world.stores.items():
        for _ in range(150):  # its own changes published, not only caught up by the other
            raw = await store.client.get(Keys(world.namespace).context_sync(site))
            if raw and json.loads(raw)["state"] == "running" and not json.loads(raw)["unpublished"]:
                break
            await asyncio.sleep(0.2)
        status = json.loads(raw or "{}")
        assert status["state"] == "running" and status["unpublished"] == 0, status
    doctor = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services", "doctor", "--check", "sync"],
        env={
            **os.environ,
            "MESH_NAMESPACE": world.namespace,
            "MESH_REDIS_URL": world.redis["vps"].url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert doctor.stdout.startswith("ok  sync") and "vps: running" in doctor.stdout, doctor.stdout
