"""Adapter hot-swap under load: time from publishing a new version to the first
answer that comes from it, and how many requests failed meanwhile (must be 0).

    python bench/adapter_swap.py              # table + bench/results/adapter_swap.json

Four clients keep asking the adapter the same greedy question; v1 and v2 give
different answers, so each reply shows which version served it. The swap time is
compared with one request's latency measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mesh_overhead import KeepAliveClient, _remove_namespace, free_port

from services.adapters import make_current
from services.launcher import MeshProcesses
from services.settings import MeshSettings
from tests.inference_worker.test_adapters import QUESTION, make_adapter, peft_greedy
from trainer_job.demo_model import ensure_demo_model
from trainer_job.publish import write_version

RESULTS = Path(__file__).parent / "results"
MAX_TOKENS = 24


async def main(seconds: float) -> dict:
    demo = ensure_demo_model()
    work = Path(tempfile.mkdtemp(prefix="swap-"))
    registry = work / "registry"
    sources = [make_adapter(demo, work / f"lora{seed}", seed) for seed in (1, 2)]
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    settings = MeshSettings(namespace=namespace)
    port, key = free_port(), secrets.token_urlsafe(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_NAMESPACE=namespace,
        MESH_HTTP_PORT=str(port),
        MESH_API_KEY=key,
        MESH_CAPACITY="8",
        MESH_LOG_LEVEL="WARNING",
        MESH_RATE_LIMIT_PER_MINUTE="0",
        MESH_ADAPTER_REGISTRY=str(registry),
        MESH_CONTEXT_BUDGET="0",
    )
    mesh = MeshProcesses(env, "127.0.0.1", port)
    mesh.start()
    try:
        await asyncio.to_thread(mesh.wait_ready, 120)
        v1 = write_version(sources[0], registry, "swap", "demo-model")
        await make_current(settings, v1)
        answers = {
            peft_greedy(demo, registry / "swap" / "1", MAX_TOKENS): 1,
        }
        client = KeepAliveClient("127.0.0.1", port, key)
        body = {
            "model": "swap",
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
        }
        while True:  # until v1 serves (404 until a worker has loaded it)
            try:
                reply = json.loads(await client.post("/v1/chat/completions", body))
                if reply["choices"][0]["message"]["content"] in answers:
                    break
            except RuntimeError:
                pass
            await asyncio.sleep(0.1)
        latencies: list[float] = []
        served: list[tuple[float, int | None]] = []
        failures = 0
        stop_at = time.monotonic() + seconds

        async def lane() -> None:
            nonlocal failures
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    reply = json.loads(await client.post("/v1/chat/completions", body))
                except RuntimeError:
                    failures += 1
                    continue
                latencies.append((time.monotonic() - started) * 1000)
                served.append(
                    (time.monotonic(), answers.get(reply["choices"][0]["message"]["content"]))
                )

        lanes = [asyncio.create_task(lane()) for _ in range(4)]
        await asyncio.sleep(seconds / 3)
        v2 = write_version(sources[1], registry, "swap", "demo-model")
        answers[peft_greedy(demo, registry / "swap" / "2", MAX_TOKENS)] = 2
        published_at = time.monotonic()
        await make_current(settings, v2)
        await asyncio.gather(*lanes)
        first_v2 = min((t for t, version in served if version == 2), default=None)
        unknown = sum(1 for _, version in served if version is None)
        p50 = statistics.median(latencies)
        swap_ms = (first_v2 - published_at) * 1000 if first_v2 else None
        return {
            "requests": len(served),
            "failed": failures,
            "unrecognised_answers": unknown,
            "request_p50_ms": round(p50, 1),
            "publish_to_first_v2_answer_ms": round(swap_ms, 1) if swap_ms else None,
            "swap_vs_request_p50": round(swap_ms / p50, 2) if swap_ms else None,
        }
    finally:
        await asyncio.to_thread(mesh.stop)
        await _remove_namespace(settings)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "adapter_swap.json")
    args = parser.parse_args()
    result = asyncio.run(main(args.seconds))
    for name, value in result.items():
        print(f"{name:32} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
