"""Context store: prompt assembly latency for realistic tiers, sync lag between
two sites (two real Redis servers, two sync processes) under a steady write load,
and what a catch-up costs for a site that lacks nothing, the last 10 changes, or
everything.

    python bench/context_store.py            # table + bench/results/context_store.json
    python bench/context_store.py --quick

Baselines measured in the same run: assembly against reading the same documents
and entries from Redis without assembling; sync lag against one local write;
catch-up against reading every change the site holds in full (what each catch-up
did before changes were numbered).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from context_store.assembly import assemble, cached
from context_store.store import ContextStore
from services.launcher import MeshProcesses
from services.local_infra import start_redis_server
from services.paths import demo_model_dir
from services.redis_client import connect

RESULTS = Path(__file__).parent / "results"
PARAGRAPH = (
    "The gateway validates each request, assembles the prompt from the four tiers and "
    "publishes a job; workers on the desktop take it first, the VPS takes the overflow. "
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_redis_server(folder, free_port(), appendonly=True)


async def bench_assembly(store: ContextStore, runs: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())

    def uncached(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    count = cached(uncached)  # as the gateway counts

    project = "\n\n".join(PARAGRAPH * 4 for _ in range(15 * 12))  # ~15 pages
    await store.write("project/mesh", project, 0)
    await store.write("portfolio", PARAGRAPH * 20, 0)
    await store.write("briefing", PARAGRAPH * 6, 0)
    for n in range(200):
        await store.append_log(f"Session {n}: {PARAGRAPH}")

    async def read_only() -> None:
        for doc in ("briefing", "project/mesh", "portfolio"):
            await store.get(doc)
        await store.log(50)

    async def timed(work, n: int) -> list[float]:  # type: ignore[no-untyped-def]
        await work()
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            await work()
            samples.append((time.perf_counter() - started) * 1000)
        return samples

    reads = await timed(read_only, runs)
    rows = {"read_only": reads}
    rows["assemble_uncached"] = await timed(lambda: assemble(store, uncached, 1024, "mesh"), 5)
    for budget in (1024, 8192):
        rows[f"assemble_{budget}"] = await timed(
            lambda b=budget: assemble(store, count, b, "mesh"), runs
        )
    base = statistics.median(reads)
    return {
        "project_chars": len(project),
        "log_entries": 200,
        "rows": {
            name: {
                "p50_ms": round(statistics.median(v), 3),
                "p99_ms": round(percentile(v, 0.99), 3),
                "vs_read_only": round(statistics.median(v) / base, 2),
            }
            for name, v in rows.items()
        },
    }


async def bench_sync(seconds: float, rate: float) -> dict:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ctx-bench-"))
    servers, urls = [], {}
    for site in ("desktop", "vps"):
        (folder / site).mkdir()
        server, urls[site] = start_redis(folder / site)
        servers.append(server)
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_NAMESPACE=namespace, MESH_LOG_LEVEL="WARNING")
    processes = MeshProcesses(env, "127.0.0.1", 0)
    for site, url in urls.items():
        processes.start_process(
            site,
            "context_store",
            args=["sync"],
            extra_env={"MESH_SITE": site, "MESH_REDIS_URL": url},
        )
    desktop = ContextStore(connect(urls["desktop"]), namespace, "desktop")
    vps = ContextStore(connect(urls["vps"]), namespace, "vps")
    try:
        await asyncio.sleep(2)  # both sync processes up
        written: dict[str, float] = {}
        write_ms: list[float] = []
        lags: list[float] = []

        async def writer() -> None:
            interval = 1 / rate
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                entry = await desktop.append_log("steady write")
                write_ms.append((time.perf_counter() - started) * 1000)
                written[entry.entry_id] = time.monotonic()
                await asyncio.sleep(interval)

        async def watcher() -> None:
            seen: set[str] = set()
            end = time.monotonic() + seconds + 10
            while time.monotonic() < end:
                for entry in await vps.log(50):
                    if entry.entry_id not in seen and entry.entry_id in written:
                        seen.add(entry.entry_id)
                        lags.append((time.monotonic() - written[entry.entry_id]) * 1000)
                if len(seen) == len(written) and time.monotonic() > end - 10:
                    return
                await asyncio.sleep(0.002)

        await asyncio.gather(writer(), watcher())
        base = statistics.median(write_ms)
        return {
            "writes": len(written),
            "arrived": len(lags),
            "rate_per_s": rate,
            "lag_p50_ms": round(statistics.median(lags), 2),
            "lag_p99_ms": round(percentile(lags, 0.99), 2),
            "local_write_p50_ms": round(base, 3),
            "lag_vs_local_write": round(statistics.median(lags) / base, 1),
        }
    finally:
        processes.stop()
        for server in servers:
            server.terminate()
        shutil.rmtree(folder, ignore_errors=True)


async def bench_catch_up(url: str, versions: int, entries: int) -> dict:
    """One site with `versions` document versions (over five documents, the default
    retention) and `entries` log entries; another asks to catch up."""
    namespace = f"catch{uuid.uuid4().hex[:6]}"
    desktop = ContextStore(connect(url), namespace, "desktop")
    vps = ContextStore(connect(url), f"{namespace}v", "vps")
    docs = ["portfolio", "briefing", "project/a", "project/b", "project/c"]
    for n in range(max(versions, entries)):
        if n < versions:
            doc = docs[n % len(docs)]
            current = await desktop.get(doc)
            await desktop.write(doc, PARAGRAPH * 8 + str(n), current.version if current else 0)
        if n < entries:
            await desktop.append_log(PARAGRAPH + str(n))

    async def full_read() -> int:  # the baseline: every change held, in full
        sizes = 0
        for doc in docs:
            sizes += len(await desktop.client.hgetall(desktop._key("vers", doc)))
        return sizes + len(await desktop.client.hgetall(desktop._key("log-entries")))

    answer_ms: list[float] = []

    async def catch_up() -> tuple[int, int, int]:
        pages = changes = size = 0
        answer_ms.clear()
        while True:
            request = await vps.catch_up_request()
            started = time.perf_counter()
            page = await desktop.answer(request)
            answer_ms.append((time.perf_counter() - started) * 1000)
            if page is None:
                return pages, changes, size
            pages, changes = pages + 1, changes + len(page.changes)
            size += len(page.model_dump_json())
            await vps.apply_page(page)
            if not page.more:
                return pages, changes, size

    async def timed(work):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = await work()
        return (time.perf_counter() - started) * 1000, result

    try:
        read_ms, held = await timed(full_read)
        everything_ms, (pages, sent, size) = await timed(catch_up)
        for n in range(10):
            await desktop.append_log(f"new {n}")
        last_ms, (_, last_sent, last_size) = await timed(catch_up)
        last_answer_ms = sum(answer_ms)
        nothing_ms, (_, none_sent, _) = await timed(catch_up)
        nothing_answer_ms = sum(answer_ms)
        return {
            "own_changes": versions + entries + 10,
            "held_in_full": held,
            "full_read_ms": round(read_ms, 2),
            "lacks_everything": {
                "ms": round(everything_ms, 1),
                "pages": pages,
                "changes": sent,
                "bytes": size,
            },
            "lacks_last_10": {
                "ms": round(last_ms, 2),
                "answer_ms": round(last_answer_ms, 2),
                "changes": last_sent,
                "bytes": last_size,
                "answer_vs_full_read": round(last_answer_ms / read_ms, 3),
            },
            "lacks_nothing": {
                "ms": round(nothing_ms, 2),
                "answer_ms": round(nothing_answer_ms, 2),
                "changes": none_sent,
                "answer_vs_full_read": round(nothing_answer_ms / read_ms, 3),
            },
        }
    finally:
        for store in (desktop, vps):
            names = [n async for n in store.client.scan_iter(match=f"{store.prefix}:*")]
            if names:
                await store.client.delete(*names)
            await store.client.aclose()


async def main(quick: bool) -> dict:
    folder = Path(__import__("tempfile").mkdtemp(prefix="ctx-asm-"))
    server, url = start_redis(folder)
    store = ContextStore(connect(url), "bench", "desktop")
    try:
        assembly = await bench_assembly(store, 20 if quick else 100)
        catch_up = await bench_catch_up(url, 500 if quick else 2000, 500 if quick else 2000)
    finally:
        await store.client.aclose()
        server.terminate()
        shutil.rmtree(folder, ignore_errors=True)
    sync = await bench_sync(3 if quick else 10, 50)
    return {"assembly": assembly, "sync": sync, "catch_up": catch_up}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "context_store.json")
    args = parser.parse_args()
    result = asyncio.run(main(args.quick))
    print(f"assembly (project {result['assembly']['project_chars']} chars, 200 log entries)")
    print(f"{'case':16} {'p50 ms':>8} {'p99 ms':>8} {'x read':>7}")
    for name, row in result["assembly"]["rows"].items():
        print(f"{name:16} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['vs_read_only']:>7}")
    s = result["sync"]
    print(
        f"\nsync lag desktop -> vps at {s['rate_per_s']}/s: p50 {s['lag_p50_ms']} ms, "
        f"p99 {s['lag_p99_ms']} ms ({s['arrived']}/{s['writes']} arrived; "
        f"{s['lag_vs_local_write']}x one local write of {s['local_write_p50_ms']} ms)"
    )
    c = result["catch_up"]
    e, last, none = c["lacks_everything"], c["lacks_last_10"], c["lacks_nothing"]
    print(
        f"\ncatch-up from a site with {c['own_changes']} own changes "
        f"({c['held_in_full']} held in full; reading them all: {c['full_read_ms']} ms):\n"
        f"  lacks everything: {e['changes']} changes in {e['pages']} pages, "
        f"{e['bytes']} bytes, {e['ms']} ms\n"
        f"  lacks the last 10: {last['changes']} changes, {last['bytes']} bytes, "
        f"{last['ms']} ms with applying them; the answer {last['answer_ms']} ms "
        f"({last['answer_vs_full_read']}x the full read)\n"
        f"  lacks nothing: {none['changes']} changes, {none['ms']} ms; the answer "
        f"{none['answer_ms']} ms ({none['answer_vs_full_read']}x the full read)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
