"""Two sites, each with its own real Redis server and its own sync process, over
the real broker: edits propagate, a partition heals without losing an edit, and a
site that lost its events catches up from the other's history."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from context_store.store import ContextStore
from services.launcher import MeshProcesses
from services.local_infra import start_redis_server
from services.redis_client import connect
from services.settings import MeshSettings
from tests.conftest import free_port, mesh_env, remove_namespace

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_redis_server(folder, free_port())


class Sites:
    def __init__(self, namespace: str, urls: dict[str, str], logs: Path) -> None:
        self.namespace = namespace
        self.urls = urls
        self.stores = {
            site: ContextStore(connect(url), namespace, site) for site, url in urls.items()
        }
        env = mesh_env(namespace, free_port(), "unused-key-123", MESH_CATCH_UP_S="1")
        self.processes = MeshProcesses(env, "127.0.0.1", 0, output=logs)

    def start(self, site: str) -> None:
        self.processes.start_process(
            site,
            "context_store",
            args=["sync"],
            extra_env={"MESH_SITE": site, "MESH_REDIS_URL": self.urls[site]},
        )

    def stop(self, site: str) -> None:
        self.processes.stop_process(site)


@pytest.fixture
async def sites(namespace: str, tmp_path: Path) -> AsyncIterator[Sites]:
    servers = []
    urls = {}
    for site in ("desktop", "vps"):
        folder = tmp_path / site
        folder.mkdir()
        server, urls[site] = start_redis(folder)
        servers.append(server)
    ns = f"{namespace}-sync{int(time.time() * 1000) % 100000}"
    pair = Sites(ns, urls, tmp_path / "logs")
    for site in urls:
        pair.start(site)
    try:
        yield pair
    finally:
        pair.processes.stop()
        for store in pair.stores.values():
            await store.client.aclose()
        for server in servers:
            server.terminate()
            server.wait()
        await remove_namespace(MeshSettings(namespace=ns))


async def state(store: ContextStore) -> dict[str, Any]:
    docs = {}
    for doc in await store.docs():
        d = await store.get(doc)
        docs[doc] = (d.content, d.hlc, d.site)  # type: ignore[union-attr]
    log = [(e.hlc, e.site, e.entry_id, e.text) for e in await store.log(10_000)]
    conflicts = {c.conflict_id: c.content for c in await store.conflicts()}
    return {"docs": docs, "log": log, "conflicts": conflicts}


async def converged(sites: Sites, timeout_s: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        a, b = [await state(store) for store in sites.stores.values()]
        if a == b:
            return a
        assert time.monotonic() < deadline, f"no convergence:\n{a}\n{b}"
        await asyncio.sleep(0.2)


async def test_edits_propagate_both_ways(sites: Sites) -> None:
    desktop, vps = sites.stores["desktop"], sites.stores["vps"]
    await desktop.write("briefing", "from the desktop", 0)
    await vps.append_log("written on the VPS")
    result = await converged(sites)
    assert result["docs"]["briefing"][0] == "from the desktop"
    assert [entry[3] for entry in result["log"]] == ["written on the VPS"]
    assert result["conflicts"] == {}


async def test_a_partition_heals_without_losing_an_edit(sites: Sites) -> None:
    desktop, vps = sites.stores["desktop"], sites.stores["vps"]
    await desktop.write("briefing", "base", 0)
    await converged(sites)

    sites.stop("vps")  # the VPS is cut off: its sync process is gone
    written: list[str] = []
    d = await desktop.write("briefing", "desktop edit", 1)
    written.append(d.content)
    await desktop.write("portfolio", "desktop portfolio", 0)
    v = await vps.write("briefing", "vps edit", 1)
    written.append(v.content)
    await vps.write("project/mesh", "vps project", 0)
    for n in range(3):
        await desktop.append_log(f"desktop entry {n}")
        await vps.append_log(f"vps entry {n}")
    assert (await vps.get("portfolio")) is None  # not yet

    sites.start("vps")  # heal
    result = await converged(sites)
    assert result["docs"]["portfolio"][0] == "desktop portfolio"
    assert result["docs"]["project/mesh"][0] == "vps project"
    # both briefing edits survive: one current, the other a conflict record
    kept = [result["docs"]["briefing"][0], *result["conflicts"].values()]
    assert sorted(kept) == sorted(written)
    texts = [entry[3] for entry in result["log"]]
    assert sorted(texts) == sorted([f"{s} entry {n}" for s in ("desktop", "vps") for n in range(3)])
    ordered = [(int(hlc), site, entry_id) for hlc, site, entry_id, _ in result["log"]]
    assert ordered == sorted(ordered, reverse=True)  # newest first by (hlc, site, id)


async def test_a_site_that_lost_its_events_catches_up_from_history(sites: Sites) -> None:
    import aio_pika

    desktop, vps = sites.stores["desktop"], sites.stores["vps"]
    sites.stop("vps")
    connection = await aio_pika.connect(MeshSettings().amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{sites.namespace}.context.vps")  # its events are gone
    await desktop.write("briefing", "written while the VPS had no queue", 0)
    await desktop.append_log("logged while the VPS had no queue")
    await asyncio.sleep(0.5)  # published and routed nowhere
    sites.start("vps")
    result = await converged(sites)
    assert result["docs"]["briefing"][0] == "written while the VPS had no queue"
    assert [entry[3] for entry in result["log"]] == ["logged while the VPS had no queue"]
    del vps
