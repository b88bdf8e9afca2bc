"""The sync process survives its world: its Redis paused (a suspended desktop) and
restarted, and the broker restarted. Two sites with their own redis-server and sync
process, on a RabbitMQ node of this test's own (services.private_servers)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.redis_client import Keys
from tests.context_store.sites import SITES, World, private_world

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
async def world(namespace: str, tmp_path: Path) -> AsyncIterator[World]:
    async for started in private_world(f"{namespace}-syncf", tmp_path):
        yield started


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
