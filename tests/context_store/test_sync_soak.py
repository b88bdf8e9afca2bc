"""A soak of the sync between two sites, for real: each site its own redis-server and
sync process, a RabbitMQ node of the test's own. Eight tasks make ~1,000 random
edits through `ContextStore` (65 % compare-and-set document writes over five
documents, 35 % log appends) on either site, while the VPS's sync process is cut for
20 s twice (SIGKILL then a restart; SIGSTOP then SIGCONT) and the desktop's Redis
restarts. Then both sites must hold the same documents, log, history and conflict
records, byte for byte, and every acknowledged edit must be accounted for on both:
held (current, history or a conflict record), or superseded and dropped by the
history retention (kept small here, 40, so that it drops) behind 40 newer superseded
versions. Seeded: the same operations every run."""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from context_store.store import VersionConflict
from tests.context_store.sites import SITES, World, private_world

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]
DOCS = ["portfolio", "briefing", "project/a", "project/b", "project/c"]
TASKS = 8
OPS_PER_TASK = 125
PARTITION_S = 20
HISTORY_KEEP = 40


@dataclass
class Tally:
    writes: list[tuple[str, str]] = field(default_factory=list)  # (doc, version id) acked
    entries: list[str] = field(default_factory=list)  # log texts acked
    cas_rejected: int = 0
    refused: int = 0  # Redis away (the restart): not acknowledged, the caller knows
    lags: list[float] = field(default_factory=list)


@pytest.fixture
async def world(namespace: str, tmp_path: Path) -> AsyncIterator[World]:
    async for started in private_world(f"{namespace}-soak", tmp_path, HISTORY_KEEP):
        yield started


async def edits(world: World, task: int, tally: Tally, stop_at: float) -> None:
    rng = random.Random(1000 + task)
    pace = stop_at - time.monotonic()
    for n in range(OPS_PER_TASK):
        site = rng.choice(SITES)
        store = world.stores[site]
        try:
            if rng.random() < 0.65:
                doc = rng.choice(DOCS)
                current = await store.get(doc)
                content = f"{doc} by task {task}, edit {n}, at {site}"
                try:
                    done = await store.write(doc, content, current.version if current else 0)
                    tally.writes.append((doc, f"{done.hlc}|{done.site}"))
                except VersionConflict:
                    tally.cas_rejected += 1
            else:
                text = f"log by task {task}, entry {n}, at {site}"
                await store.append_log(text)
                tally.entries.append(text)
        except (redis.RedisError, OSError):
            tally.refused += 1
        await asyncio.sleep(pace / OPS_PER_TASK * rng.uniform(0.5, 1.5))


async def snapshot(world: World, site: str) -> dict[str, Any]:
    store = world.stores[site]
    docs = {}
    for doc in await store.docs():
        d = await store.get(doc)
        assert d is not None
        docs[doc] = (d.content, d.hlc, d.site, d.sha256)
    log = [(e.hlc, e.site, e.entry_id, e.text) for e in await store.log(100_000)]
    conflicts = sorted(c.model_dump_json() for c in await store.conflicts())
    history = {doc: [v.model_dump_json() for v in await store.history(doc)] for doc in docs}
    return {"docs": docs, "log": log, "conflicts": conflicts, "history": history}


async def accounted_for(store: Any, doc: str, version_id: str) -> str:
    """'held'; 'dropped': held once, superseded, and behind HISTORY_KEEP newer superseded
    versions the site still holds (what the retention drops); or 'lost'."""
    history = await store.history(doc)
    ids = [v.id.replace("-", "|", 1) for v in history]
    if version_id in ids:
        return "held"
    hlc, site = version_id.split("|", 1)
    newer = [
        v for v in history if v.state == "superseded" and (int(v.hlc), v.site) > (int(hlc), site)
    ]
    if version_id in await store.known_ids(doc) and len(newer) >= HISTORY_KEEP:
        return "dropped"
    return "lost"


async def lag_probe(world: World, tally: Tally, stop_at: float) -> None:
    """Sync lag while both sites are up: a write on one, until it is on the other."""
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        content = f"probe {n}"
        try:
            doc = await world.stores["desktop"].get("project/probe")
            done = await world.stores["desktop"].write(
                "project/probe", content, doc.version if doc else 0
            )
            tally.writes.append(("project/probe", f"{done.hlc}|{done.site}"))
            started = time.monotonic()
            while await world.content("vps", "project/probe") != content:
                if time.monotonic() - started > 2:
                    break  # partitioned now: not a lag sample
                await asyncio.sleep(0.005)
            else:
                tally.lags.append(time.monotonic() - started)
        except (redis.RedisError, OSError, VersionConflict):
            pass
        await asyncio.sleep(0.5)


async def test_two_sites_converge_after_partitions_and_a_redis_restart(world: World) -> None:
    tally = Tally()
    started = time.monotonic()
    stop_at = started + 3 * PARTITION_S + 15
    load = [asyncio.create_task(edits(world, task, tally, stop_at)) for task in range(TASKS)]
    probe = asyncio.create_task(lag_probe(world, tally, stop_at))

    await asyncio.sleep(5)
    vps = world.processes.children.pop("vps")  # partition one: the sync process dies
    vps.kill()
    vps.wait()
    await asyncio.sleep(PARTITION_S)
    world.processes.start_process(
        "vps",
        "context_store",
        args=["sync"],
        extra_env={"MESH_SITE": "vps", "MESH_REDIS_URL": world.redis["vps"].url},
    )
    await asyncio.sleep(5)
    world.processes.children["vps"].send_signal(signal.SIGSTOP)  # partition two: frozen
    await asyncio.sleep(PARTITION_S)
    world.processes.children["vps"].send_signal(signal.SIGCONT)
    await asyncio.sleep(5)
    await asyncio.to_thread(world.redis["desktop"].restart, 1.0)
    await asyncio.gather(*load)
    last_write = time.monotonic()
    probe.cancel()

    deadline = last_write + 60
    while True:
        desktop, vps_state = await snapshot(world, "desktop"), await snapshot(world, "vps")
        if desktop == vps_state:
            break
        assert time.monotonic() < deadline, "the sites did not converge within 60 s"
        await asyncio.sleep(0.2)
    converged_s = time.monotonic() - last_write

    assert world.alive() == list(SITES)
    lost_edits, lost_entries, dropped = 0, 0, dict.fromkeys(SITES, 0)
    for site in SITES:
        store = world.stores[site]
        for doc, version_id in tally.writes:
            state = await accounted_for(store, doc, version_id)
            lost_edits += state == "lost"
            dropped[site] += state == "dropped"
        texts = {e.text for e in await store.log(100_000)}
        lost_entries += sum(text not in texts for text in tally.entries)
    conflicts = len(desktop["conflicts"])
    lags = sorted(tally.lags)
    p99 = lags[int(len(lags) * 0.99)] if lags else float("nan")
    print(
        f"\nsoak: {TASKS * OPS_PER_TASK} operations in {last_write - started:.0f} s: "
        f"{len(tally.writes)} edits and {len(tally.entries)} log entries acknowledged, "
        f"{tally.cas_rejected} CAS rejections, {tally.refused} refused while Redis restarted; "
        f"lost: {lost_edits} edits, {lost_entries} log entries; superseded versions "
        f"dropped by the retention {dropped}; {conflicts} conflict records "
        f"(the same on both sites); converged {converged_s:.2f} s after the last write; "
        f"sync lag p50 {statistics.median(lags) * 1000 if lags else float('nan'):.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms ({len(lags)} samples)"
    )
    assert lost_edits == 0 and lost_entries == 0
    assert desktop["docs"] and desktop["log"]
    assert min(dropped.values()) > 0  # the retention ran, and converged (history above)
