"""What grammar-constrained decoding costs: a constrained row's tokens/s against an
unconstrained one's, 8 rows decoding at once in the transformers backend's batch.

    python bench/constrained_decoding.py     # table + bench/results/constrained_decoding.json

Three batches of 8 concurrent jobs on the demo model, sampled at temperature 1.0:
all free text (the baseline), all under a JSON schema (tests/schemas.py: nested
objects, arrays, enums), and half and half. Each row's rate is its tokens after the
first over the time from its first token to its last (decoding, not prompt reading),
so rows of different lengths compare. The target: a constrained row within 30 % of
an unconstrained one (ratio >= 0.7).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_worker.backends.base import TextDelta
from inference_worker.backends.transformers_backend import TransformersBackend
from proto.messages import ChatJob, ChatMessage, ResponseFormat, SamplingParams
from tests.schemas import TASK_SCHEMA, valid_task
from trainer_job.demo_model import ensure_demo_model

RESULTS = Path(__file__).parent / "results"
ROWS = 8
FREE_TOKENS = 64


def job(seed: int, constrained: bool) -> ChatJob:
    tokens = {"max_tokens": 300} if constrained else {"max_tokens": FREE_TOKENS}
    if not constrained:
        tokens["min_tokens"] = FREE_TOKENS
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content="Describe the next task.")],
        sampling=SamplingParams(
            temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=seed, **tokens
        ),
        created_at=datetime.now(UTC),
        response_format=ResponseFormat(type="json_schema", json_schema=TASK_SCHEMA)
        if constrained
        else None,
    )


async def row_rate(backend: TransformersBackend, chat: ChatJob) -> dict[str, Any]:
    """Tokens/s of one row from its first token to its last."""
    first = last = None
    tokens = 0
    text = []
    async for event in backend.generate(chat):
        if isinstance(event, TextDelta) and event.tokens:
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            tokens += event.tokens
            text.append(event.text)
    if chat.response_format is not None:
        valid_task(json.loads("".join(text)))  # the constraint held
    assert first is not None and last is not None and tokens > 1
    return {"tokens": tokens, "tokens_per_s": (tokens - 1) / max(last - first, 1e-9)}


async def batch(backend: TransformersBackend, constrained: list[bool], seed: int) -> list[dict]:
    rows = await asyncio.gather(
        *(row_rate(backend, job(seed + i, c)) for i, c in enumerate(constrained))
    )
    return [{**row, "constrained": c} for row, c in zip(rows, constrained, strict=True)]


def median_rate(rows: list[dict], constrained: bool) -> float:
    return statistics.median(r["tokens_per_s"] for r in rows if r["constrained"] == constrained)


async def main(repeats: int) -> dict[str, Any]:
    backend = TransformersBackend(str(ensure_demo_model()), device="cpu", max_batch=ROWS)
    await backend.start()
    try:
        await batch(backend, [False, True] * (ROWS // 2), seed=1000)  # warm up
        runs: dict[str, list[dict]] = {"free": [], "constrained": [], "mixed": []}
        for repeat in range(repeats):  # interleaved, so drift hits every kind alike
            seed = repeat * 100
            runs["free"] += await batch(backend, [False] * ROWS, seed)
            runs["constrained"] += await batch(backend, [True] * ROWS, seed)
            runs["mixed"] += await batch(backend, [False, True] * (ROWS // 2), seed)
    finally:
        await backend.close()
    free = median_rate(runs["free"], False)
    constrained = median_rate(runs["constrained"], True)
    mixed_free, mixed_constrained = (median_rate(runs["mixed"], c) for c in (False, True))
    result = {
        "rows": ROWS,
        "repeats": repeats,
        "free_row_tokens_per_s": round(free, 1),
        "constrained_row_tokens_per_s": round(constrained, 1),
        "constrained_vs_free": round(constrained / free, 3),
        "mixed_batch": {
            "free_row_tokens_per_s": round(mixed_free, 1),
            "constrained_row_tokens_per_s": round(mixed_constrained, 1),
            "constrained_vs_free": round(mixed_constrained / mixed_free, 3),
            "free_rows_vs_an_all_free_batch": round(mixed_free / free, 3),
        },
        "target": "constrained_vs_free >= 0.7",
    }
    print(f"{ROWS} rows at once, demo model, temperature 1.0, median per-row tokens/s:")
    print(f"  all free:         {free:8.1f}")
    print(f"  all constrained:  {constrained:8.1f}   ratio {constrained / free:.2f}")
    print(
        f"  mixed 4+4:        free {mixed_free:.1f}, constrained {mixed_constrained:.1f}"
        f"   ratio {mixed_constrained / mixed_free:.2f}"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "constrained_decoding.json")
    args = parser.parse_args()
    result = asyncio.run(main(args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
