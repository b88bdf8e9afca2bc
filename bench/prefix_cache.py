"""Prefix cache: what keeping the KV of the shared prompt start buys, through the mesh.

    python bench/prefix_cache.py                 # demo model and a random ~100M Mistral
    python bench/prefix_cache.py --size demo --quick
    # table + bench/results/prefix_cache.json

Every chat's prompt carries the system prompt and the four tiers (~1,000 tokens
here), then the conversation. Three measurements, each a ratio within this run:

1. Time to first token of a chat with that context and a 5-turn history, cold (a
   prompt start no worker has seen) against warm (the same tiers and history, a new
   question), streamed through /v1/chat/completions. Goal: warm <= 0.2x cold on the
   ~100M model.
2. A realistic session through /chat: one conversation of 20 turns interleaved with
   two others (history from Redis); the share of prompt tokens the cache held.
   Goal: >= 80 %.
3. Generated tokens/s at 8 concurrent chats, cache on against off (two meshes, the
   rounds alternating between them because this VM drifts). Goal: within 5 %. Twice:
   chats that carry the tiers (what users send: the cache saves their reading), and
   chats that share nothing (each its own system prompt first: every lookup misses
   and every prompt is added, so only the cache's own cost shows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

# The repo first: `context_store` is the package, not bench/context_store.py (this
# script's folder, first on sys.path when it runs); then bench/ for its neighbours.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from context_store.store import ContextStore

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mesh_overhead import _remove_namespace, free_port
from worker_throughput import model_folder

from services.launcher import MeshProcesses
from services.redis_client import connect
from services.settings import MeshSettings
from trainer_job.demo_model import parameter_count

RESULTS = Path(__file__).parent / "results"
SYSTEM_PROMPT = "You are the owner's continuity assistant. Answer from the context below."
HISTORY = [
    ("What did we decide about the gateway?", "It stays the only public entry point."),
    ("And the workers?", "They dial out to the broker, GPU first, CPU for the overflow."),
    ("Where do the tiers live?", "In Redis on each site, synced over the bus."),
    ("How do adapters ship?", "The trainer publishes a version; every worker loads it."),
    ("What runs on the phone?", "The web client, and a small GGUF when offline."),
]


def tiers_text(words: int, topic: str) -> str:
    """Plausible prose of about `words` words (the demo tokenizer: ~1.3 tokens a word)."""
    sentences = [
        f"The {topic} keeps its decisions written down so the next session starts warm.",
        "Each site runs its own Redis and the edits travel over RabbitMQ.",
        "The gateway assembles the tiers into the system prompt within a token budget.",
        "Workers on the desktop GPU take jobs first and the VPS takes the overflow.",
        "Adapters are versioned folders with hashes and an evaluation in the manifest.",
        "The phone falls back from the LAN desktop to the VPS and then to its own model.",
    ]
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(sentences[len(out) % len(sentences)])
    return " ".join(out)


async def seed_context(namespace: str) -> None:
    store = ContextStore(connect("redis://127.0.0.1:6379/0"), namespace, "bench")
    await store.write("portfolio", tiers_text(200, "portfolio"), 0)
    await store.write("project/mesh", tiers_text(250, "project"), 0)
    await store.write("briefing", tiers_text(150, "briefing"), 0)
    for n in range(20):
        await store.append_log(f"Session {n}: finished step {n} of the plan and wrote it down.")
    await store.client.aclose()


class Mesh:
    """A gateway and a worker on their own namespace, with the tiers seeded."""

    def __init__(self, model: Path, cache_bytes: int | None, capacity: int = 8) -> None:
        self.port, self.key = free_port(), secrets.token_urlsafe(16)
        self.namespace = f"bench{uuid.uuid4().hex[:6]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update(
            MESH_NAMESPACE=self.namespace,
            MESH_HTTP_PORT=str(self.port),
            MESH_API_KEY=self.key,
            MESH_CAPACITY=str(capacity),
            MESH_LOG_LEVEL="WARNING",
            MESH_RATE_LIMIT_PER_MINUTE="0",
            MESH_SYSTEM_PROMPT=SYSTEM_PROMPT,
            MESH_CONTEXT_BUDGET="1100",
            MESH_DEFAULT_PROJECT="mesh",
            MESH_MODEL=str(model),
            MESH_MODEL_NAME="bench-model",
            MESH_REQUEST_TIMEOUT_S="600",
        )
        if cache_bytes is not None:
            env["MESH_PREFIX_CACHE_BYTES"] = str(cache_bytes)
        self.processes = MeshProcesses(env, "127.0.0.1", self.port)
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=600,
        )

    async def __aenter__(self) -> Mesh:
        await seed_context(self.namespace)
        self.processes.start()
        await asyncio.to_thread(self.processes.wait_ready, 180)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await asyncio.to_thread(self.processes.stop)
        await _remove_namespace(MeshSettings(namespace=self.namespace))

    async def ttft(self, system: str, question: str) -> tuple[float, dict]:
        """Seconds to the first streamed text, and the usage, of one chat."""
        messages = [{"role": "system", "content": system}]
        for user, assistant in HISTORY:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        messages.append({"role": "user", "content": question})
        body = {
            "model": "bench-model",
            "messages": messages,
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started, first, usage = time.perf_counter(), None, {}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if (
                    first is None
                    and event["choices"]
                    and event["choices"][0]["delta"].get("content")
                ):
                    first = time.perf_counter() - started
                if event.get("usage"):
                    usage = event["usage"]
        return (first if first is not None else time.perf_counter() - started), usage

    async def chat(self, message: str, conversation: str | None, tokens: int) -> dict:
        body: dict[str, Any] = {
            "message": message,
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }
        if conversation:
            body["conversation_id"] = conversation
        response = await self.http.post("/chat", json=body)
        response.raise_for_status()
        return response.json()

    async def unshared(self, message: str, tokens: int) -> dict:
        """A chat whose prompt starts with a system prompt nobody sent before."""
        system = f"Session {uuid.uuid4().hex}. {SYSTEM_PROMPT}"
        body = {
            "model": "bench-model",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": message},
            ],
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }
        response = await self.http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()


async def measure_ttft(mesh: Mesh, samples: int) -> dict:
    """Cold: a system prompt no worker has seen starts the prompt. Warm: the same
    system prompt, tiers and history as before, and a new question."""
    await mesh.ttft(SYSTEM_PROMPT, "Warm-up question?")
    cold, warm, warm_cached, prompt = [], [], [], 0
    for n in range(samples):
        seconds, usage = await mesh.ttft(f"Session {uuid.uuid4().hex}. {SYSTEM_PROMPT}", f"Q{n}?")
        cold.append(seconds)
        seconds, usage = await mesh.ttft(SYSTEM_PROMPT, f"And question {n}?")
        warm.append(seconds)
        warm_cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        prompt = usage["prompt_tokens"]
    return {
        "prompt_tokens": prompt,
        "warm_cached_tokens": int(statistics.median(warm_cached)),
        "cold_ttft_s": round(statistics.median(cold), 4),
        "warm_ttft_s": round(statistics.median(warm), 4),
        "warm_vs_cold": round(statistics.median(warm) / statistics.median(cold), 3),
    }


async def measure_session(mesh: Mesh, turns: int, tokens: int) -> dict:
    """One conversation of `turns` turns, each followed by a turn of one of two
    other conversations; the hit rate over every prompt token."""
    ids: dict[str, str | None] = {"main": None, "b": None, "c": None}
    prompt = cached = 0
    for turn in range(turns):
        for name in ("main", "b" if turn % 2 == 0 else "c"):
            reply = await mesh.chat(f"{name} turn {turn}: what next?", ids[name], tokens)
            ids[name] = reply["conversation_id"]
            prompt += reply["usage"]["prompt_tokens"]
            cached += reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    return {
        "requests": 2 * turns,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": round(cached / prompt, 3),
    }


async def concurrent_rate(
    mesh: Mesh, concurrency: int, tokens: int, rounds: int, shared: bool = True
) -> float:
    """Generated tokens/s of `concurrency` chats at once. `shared`: each carries the
    tiers (/chat); else each starts with a system prompt of its own, so nothing is
    ever found in the cache and only its cost shows."""
    generated, started = 0, time.perf_counter()
    for round_ in range(rounds):
        questions = [f"Chat {n}, round {round_}: status?" for n in range(concurrency)]
        if shared:
            calls = [mesh.chat(question, None, tokens) for question in questions]
        else:
            calls = [mesh.unshared(question, tokens) for question in questions]
        replies = await asyncio.gather(*calls)
        generated += sum(r["usage"]["completion_tokens"] for r in replies)
    return generated / (time.perf_counter() - started)


async def measure_throughput(model: Path, rounds: int, tokens: int) -> dict:
    async with Mesh(model, None) as on, Mesh(model, 0) as off:
        for mesh in (on, off):  # warm-up: the tiers in the cache, the code paths hot
            await concurrent_rate(mesh, 8, 4, 1)
        rates: dict[str, list[float]] = {"on": [], "off": [], "on_miss": [], "off_miss": []}
        for round_ in range(rounds):
            # Each pair in both orders over the rounds: the VM drifts within a minute.
            pairs = [("off", off), ("on", on)]
            for name, mesh in pairs if round_ % 2 == 0 else pairs[::-1]:
                rates[name].append(await concurrent_rate(mesh, 8, tokens, 1))
            for name, mesh in pairs[::-1] if round_ % 2 == 0 else pairs:
                miss = await concurrent_rate(mesh, 8, tokens, 1, shared=False)
                rates[f"{name}_miss"].append(miss)
    mean = {name: statistics.mean(values) for name, values in rates.items()}
    return {
        "concurrency": 8,
        "tokens_per_request": tokens,
        "cache_on_tokens_per_s": round(mean["on"], 1),
        "cache_off_tokens_per_s": round(mean["off"], 1),
        "on_vs_off": round(mean["on"] / mean["off"], 3),
        "all_miss_cache_on_tokens_per_s": round(mean["on_miss"], 1),
        "all_miss_cache_off_tokens_per_s": round(mean["off_miss"], 1),
        "all_miss_on_vs_off": round(mean["on_miss"] / mean["off_miss"], 3),
    }


async def bench_model(size: str, quick: bool) -> dict:
    model = model_folder(size)
    async with Mesh(model, None) as mesh:
        ttft = await measure_ttft(mesh, 2 if quick else 5)
        session = await measure_session(mesh, 6 if quick else 20, 8 if quick else 16)
    throughput = await measure_throughput(model, 2 if quick else 4, 16 if quick else 32)
    return {
        "model": size,
        "parameters": parameter_count(model),
        "ttft": ttft,
        "session": session,
        "throughput": throughput,
    }


def report(result: dict) -> None:
    t, s, p = result["ttft"], result["session"], result["throughput"]
    print(f"model {result['model']} ({result['parameters'] / 1e6:.1f}M parameters):")
    print(
        f"  TTFT, {t['prompt_tokens']} prompt tokens: cold {t['cold_ttft_s']:.3f} s, warm "
        f"{t['warm_ttft_s']:.3f} s ({t['warm_cached_tokens']} cached) -> warm/cold "
        f"{t['warm_vs_cold']:.3f} (goal <= 0.2 on ~100M)"
    )
    print(
        f"  session of {s['requests']} chats: {s['cached_tokens']}/{s['prompt_tokens']} prompt "
        f"tokens cached -> hit rate {s['hit_rate']:.1%} (goal >= 80%)"
    )
    print(
        f"  8 concurrent: cache on {p['cache_on_tokens_per_s']} tokens/s, off "
        f"{p['cache_off_tokens_per_s']} -> on/off {p['on_vs_off']:.3f} (goal >= 0.95)"
    )
    print(
        f"  8 concurrent, nothing shared (the cache's own cost): on "
        f"{p['all_miss_cache_on_tokens_per_s']} tokens/s, off "
        f"{p['all_miss_cache_off_tokens_per_s']} -> on/off {p['all_miss_on_vs_off']:.3f}"
    )


async def main(sizes: list[str], quick: bool) -> list[dict]:
    results = []
    for size in sizes:
        results.append(await bench_model(size, quick))
        report(results[-1])
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--size", choices=["demo", "100m"], nargs="+", default=["demo", "100m"], help="models"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_cache.json")
    args = parser.parse_args()
    results = asyncio.run(main(args.size, args.quick))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
