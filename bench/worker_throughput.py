"""Worker throughput: generated tokens/s with 1, 4, 8 and 16 concurrent chat requests
through the mesh, against the same requests run one at a time in-process.

    python bench/worker_throughput.py          # table + bench/results/worker_throughput.json
    python bench/worker_throughput.py --quick

The baseline is transformers' own `model.generate`, one request after another, with
the same settings (greedy, repetition penalty 1.15, exactly 64 new tokens). The
ratio (concurrent through the mesh / that baseline) shows what the worker's batching
buys, net of the mesh's own cost (gateway, broker, streaming back). The worker's
decoding loop run in-process one request at a time is reported too: at concurrency
1 the mesh should be close to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mesh_overhead import PROMPTS, SYSTEM_PROMPT, KeepAliveClient, _remove_namespace, free_port

from inference_worker.backends.base import Finished
from inference_worker.backends.transformers_backend import TransformersBackend
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.launcher import MeshProcesses
from services.settings import MeshSettings
from trainer_job.demo_model import (
    DemoModelSpec,
    build_random_model,
    ensure_demo_model,
    parameter_count,
)

MAX_TOKENS = 64
RESULTS = Path(__file__).parent / "results"


def job(index: int) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[
            ChatMessage(role="system", content=SYSTEM_PROMPT),
            ChatMessage(role="user", content=PROMPTS[index % len(PROMPTS)]),
        ],
        sampling=SamplingParams(
            max_tokens=MAX_TOKENS,
            min_tokens=MAX_TOKENS,
            temperature=0,
            top_p=1,
            repetition_penalty=1.15,
        ),
        created_at=__import__("datetime").datetime.now(__import__("datetime").UTC),
    )


# Random-weight Mistrals with the demo tokenizer, for figures on bigger models than
# the demo (answers are noise: benchmarks fix the number of tokens with min_tokens).
RANDOM_SHAPES = {
    # ~11M parameters: the size the 4.9x throughput was measured on
    "10m": DemoModelSpec(
        hidden_size=384,
        intermediate_size=1152,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
    # ~96M parameters: prefill costs like the 82M measurement
    "100m": DemoModelSpec(
        hidden_size=768,
        intermediate_size=2688,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}


def model_folder(size: str) -> Path:
    """The demo model, or a random one of RANDOM_SHAPES, built once into .cache."""
    demo = ensure_demo_model()
    if size == "demo":
        return demo
    folder = demo.parent / f"bench-{size}"
    if not (folder / "config.json").is_file():
        build_random_model(folder, RANDOM_SHAPES[size], demo)
    return folder


class SequentialGenerate:
    """The baseline: `model.generate` on each request in turn, in this process.

    Call it off the main thread (`asyncio.to_thread`), like the worker's own
    generation thread: once a process's main thread has run torch's OpenMP regions,
    other threads' regions run about 2x slower on this machine (libgomp), which would
    handicap the worker-loop figure measured in the same process.
    """

    def __init__(self, model: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from inference_worker.backends.prompts import encode_prompt

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.lm = AutoModelForCausalLM.from_pretrained(model).eval()
        self.prompts = [encode_prompt(self.tokenizer, job(index), 0) for index in range(8)]
        self.rates: list[float] = []
        self._one(self.prompts[0])  # warm-up

    def _one(self, prompt: list[int]) -> int:
        import torch

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = self.lm.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                do_sample=False,
                repetition_penalty=1.15,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return out.shape[1] - ids.shape[1]

    def rate(self, requests: int) -> float:
        """Tokens/s over `requests` requests, one after another."""
        started = time.perf_counter()
        tokens = sum(self._one(self.prompts[i % len(self.prompts)]) for i in range(requests))
        self.rates.append(tokens / (time.perf_counter() - started))
        return self.rates[-1]


async def sequential_backend(requests: int, model: Path) -> float:
    """The worker's own decoding loop, in-process, one request at a time."""
    backend = TransformersBackend(str(model), device="cpu", max_batch=1)
    await backend.start()
    tokens = 0
    started = time.perf_counter()
    for index in range(requests):
        async for event in backend.generate(job(index)):
            if isinstance(event, Finished):
                tokens += event.completion_tokens
    elapsed = time.perf_counter() - started
    await backend.close()
    return tokens / elapsed


async def through_mesh(
    levels: list[int], rounds: int, model: Path, baseline: Callable[[], Awaitable[float]]
) -> list[dict]:
    """Each level's tokens/s through the mesh, with the baseline measured just before
    and just after it: on a shared 2-core VM the speed drifts by several per cent
    within a minute, so each ratio uses the baseline of its own moment."""
    port, key = free_port(), secrets.token_urlsafe(16)
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_NAMESPACE=namespace,
        MESH_HTTP_PORT=str(port),
        MESH_API_KEY=key,
        MESH_CAPACITY=str(max(levels)),
        MESH_LOG_LEVEL="WARNING",
        MESH_RATE_LIMIT_PER_MINUTE="0",
        MESH_SYSTEM_PROMPT=SYSTEM_PROMPT,
        MESH_CONTEXT_BUDGET="0",
        MESH_MODEL=str(model),
        MESH_MODEL_NAME="bench-model",
    )
    mesh = MeshProcesses(env, "127.0.0.1", port)
    mesh.start()
    try:
        await asyncio.to_thread(mesh.wait_ready, 120)
        client = KeepAliveClient("127.0.0.1", port, key)
        body = {"temperature": 0, "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS}
        await client.post("/chat", {"message": PROMPTS[0], **body})  # warm-up
        rows = []
        before = await baseline()
        for level in levels:
            tokens = 0

            async def one(index: int) -> int:
                reply = await client.post(
                    "/chat", {"message": PROMPTS[index % len(PROMPTS)], **body}
                )
                return int(json.loads(reply)["usage"]["completion_tokens"])

            started = time.perf_counter()
            for _ in range(rounds):
                tokens += sum(await asyncio.gather(*(one(i) for i in range(level))))
            rate = tokens / (time.perf_counter() - started)
            after = await baseline()
            around = (before + after) / 2
            rows.append(
                {
                    "concurrency": level,
                    "tokens_per_s": round(rate, 1),
                    "baseline_tokens_per_s": round(around, 1),
                    "vs_sequential": round(rate / around, 2),
                }
            )
            before = after
        return rows
    finally:
        await asyncio.to_thread(mesh.stop)
        await _remove_namespace(MeshSettings(namespace=namespace))


async def main(quick: bool, size: str, levels: list[int], rounds: int) -> dict:
    model = model_folder(size)
    block = 2 if quick else 6  # baseline requests before and after each level
    sequential = await asyncio.to_thread(SequentialGenerate, model)
    loop = await sequential_backend(8 if quick else 24, model)
    loop_baseline = await asyncio.to_thread(sequential.rate, block)
    rows = await through_mesh(
        levels,
        1 if quick else rounds,
        model,
        lambda: asyncio.to_thread(sequential.rate, block),
    )
    baseline = sum(sequential.rates) / len(sequential.rates)
    return {
        "model": size,
        "parameters": parameter_count(model),
        "max_tokens": MAX_TOKENS,
        "sequential_generate_tokens_per_s": round(baseline, 1),
        "sequential_generate_range": [
            round(min(sequential.rates), 1),
            round(max(sequential.rates), 1),
        ],
        "sequential_worker_loop_tokens_per_s": round(loop, 1),
        "worker_loop_vs_generate": round(loop / loop_baseline, 2),
        "rows": rows,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--size",
        choices=["demo", "10m"],
        default="demo",
        help="the demo model (3.6M parameters) or a random ~10M one",
    )
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrency levels"
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="bursts of `level` requests per level"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "worker_throughput.json")
    args = parser.parse_args()
    result = asyncio.run(main(args.quick, args.size, args.levels, args.rounds))
    print(f"model: {result['model']} ({result['parameters'] / 1e6:.1f}M parameters)")
    low, high = result["sequential_generate_range"]
    print(
        f"sequential model.generate in-process: {result['sequential_generate_tokens_per_s']} "
        f"tokens/s (the baseline, measured around each level: {low}-{high})"
    )
    print(
        f"sequential worker loop in-process: {result['sequential_worker_loop_tokens_per_s']} "
        f"tokens/s ({result['worker_loop_vs_generate']}x generate)"
    )
    print(f"{'concurrency':>11} {'tokens/s':>9} {'baseline':>9} {'x sequential':>13}")
    for row in result["rows"]:
        print(
            f"{row['concurrency']:>11} {row['tokens_per_s']:>9} "
            f"{row['baseline_tokens_per_s']:>9} {row['vs_sequential']:>13}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
