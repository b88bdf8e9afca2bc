"""CPU decoding: transformers fp32 against llama.cpp f16, q8_0 and Q4_K_M on the same
demo model, in one run: generated tokens/s for one request at a time and for 4
concurrent requests.

    python bench/llamacpp.py           # table + bench/results/llamacpp.json (needs make llamacpp)

transformers batches the 4 requests into one forward pass; llama.cpp runs them on
its slots (one context each, one per core here) and the rest wait their turn.
Ratios are against transformers fp32 in the same column.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_worker.backends.base import TextDelta
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.adapters import AdapterRegistry
from trainer_job.demo_model import ensure_demo_model

TOKENS = 128
RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is continuity?",
    "What does the phone do?",
    "What is an adapter?",
    "What does the gateway do?",
]


def job(index: int) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=QUESTIONS[index % len(QUESTIONS)])],
        sampling=SamplingParams(
            max_tokens=TOKENS, min_tokens=TOKENS, temperature=0, top_p=1, repetition_penalty=1.0
        ),
        created_at=datetime.now(UTC),
    )


async def tokens_per_second(backend, concurrency: int, rounds: int = 2) -> float:
    async def one(index: int) -> int:
        return sum(
            [e.tokens async for e in backend.generate(job(index)) if isinstance(e, TextDelta)]
        )

    await one(0)  # warm-up
    started = time.perf_counter()
    total = 0
    for _ in range(rounds):
        total += sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
    return total / (time.perf_counter() - started)


async def measure(make) -> dict[str, float]:
    single = make(1)
    await single.start()
    batch1 = await tokens_per_second(single, 1, rounds=4)
    await single.close()
    many = make(4)
    await many.start()
    concurrent = await tokens_per_second(many, 4)
    await many.close()
    return {"batch1_tok_s": batch1, "concurrent4_tok_s": concurrent}


async def main() -> None:
    from inference_worker.backends.llamacpp_backend import LlamaCppBackend
    from inference_worker.backends.transformers_backend import TransformersBackend
    from trainer_job.gguf_export import export_base

    demo = ensure_demo_model()
    cores = os.cpu_count() or 1
    rows: dict[str, dict[str, float]] = {}
    rows["transformers fp32"] = await measure(
        lambda n: TransformersBackend(str(demo), device="cpu", max_batch=n)
    )
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp)
        export_base(demo, registry, "demo-model", ["f16", "q8_0", "q4_k_m"])
        for kind in ("f16", "q8_0", "q4_k_m"):
            path = str(AdapterRegistry(registry).base_gguf("demo-model", kind))
            # One thread per slot, one slot per core (four requests: the rest queue).
            rows[f"llama.cpp {kind}"] = await measure(
                lambda n, path=path: LlamaCppBackend(path, slots=min(n, cores), threads=1)
            )
        # The same single request on every core: on a model this small, syncing the
        # threads at every layer costs more than the work they share.
        path = str(AdapterRegistry(registry).base_gguf("demo-model", "q8_0"))
        rows[f"llama.cpp q8_0, {cores} threads"] = await measure(
            lambda n: LlamaCppBackend(path, slots=min(n, cores), threads=cores)
        )
    base = rows["transformers fp32"]
    print(f"demo model, {TOKENS} tokens per request, {cores} cores")
    print(f"{'':<26}{'1 request tok/s':>17}{'ratio':>8}{'4 concurrent tok/s':>20}{'ratio':>8}")
    for name, row in rows.items():
        row["batch1_ratio"] = row["batch1_tok_s"] / base["batch1_tok_s"]
        row["concurrent4_ratio"] = row["concurrent4_tok_s"] / base["concurrent4_tok_s"]
        print(
            f"{name:<26}{row['batch1_tok_s']:>17.0f}{row['batch1_ratio']:>7.2f}x"
            f"{row['concurrent4_tok_s']:>20.0f}{row['concurrent4_ratio']:>7.2f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llamacpp.json").write_text(
        json.dumps({"tokens": TOKENS, "cores": cores, "rows": rows}, indent=2) + "\n"
    )
    print(f"written: {RESULTS / 'llamacpp.json'}")


if __name__ == "__main__":
    asyncio.run(main())
