"""llama.cpp on CPU: the batched backend (one context, every running request one
sequence of a shared decode) against today's slot-per-request backend (one context per
request), same GGUF, same threads, same run: generated tokens/s at 1, 2, 4 and 8
concurrent requests, on the demo model and on a random ~0.55B-parameter Mistral in
Q4_K_M (large enough that reading the weights dominates each decoding step).

    python bench/llamacpp.py                        # table + bench/results/llamacpp.json
    python bench/llamacpp.py --only large --levels 1 4 --rounds 3
    python bench/llamacpp.py --only demo --tokens 16 --rounds 1      # a quick check
    python bench/llamacpp.py --bandwidth            # + this host's memory bandwidth, and the
                                                    #   larger model against its bound
    python bench/llamacpp.py --bandwidth --only large --levels 1     # that part alone
    python bench/llamacpp.py --compare-transformers # transformers fp32 against llama.cpp
                                                    #   f16, q8_0, Q4_K_M on the demo model

Both backends get the same total threads (--threads, this machine's cores by
default): the batched one all of them for its one context, the slot one
max(1, total // slots) per slot. For each concurrency c, in alternating order (slot,
then batched, at each level, so load drift hits both), a backend is started with c
slots, warmed up with c concurrent short requests, then runs --rounds bursts of c
concurrent greedy requests of exactly --tokens new tokens (min_tokens = max_tokens);
tokens/s = generated tokens / wall time of the bursts. Every request has its own
prompt (a request number first), so neither backend reuses a cached prefix. The
slot backend runs as in the worker: each slot's decoding through asyncio's default
executor (min(32, cores + 4) threads, so 6 of 8 slots at once on 2 cores).
A full run takes a few minutes on 2 cores (the larger model is built and exported
once, ~1 minute, into .cache/bench-models/).

Goals (issue #19): at 4 concurrent, batched >= 2x slot on the larger model; one
request at a time, batched >= 0.95x slot (within 5 %).

--bandwidth measures memory bandwidth with numpy on all cores (a copy, counted as
read + write, and a STREAM-style triad a = b + s*c, counted as 3 arrays; best of
several) and reports the larger model's one-request tokens/s as a fraction of the
bound `triad bandwidth / GGUF bytes` (bench/README.md, "the memory-bandwidth bound").

Needs `make llamacpp`. If the batched backend cannot be imported, only the slot
backend is measured (and the goals are reported as not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_worker.backends.base import TextDelta
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.adapters import AdapterRegistry
from services.gguf import export_base
from services.paths import cache_dir
from trainer_job.demo_model import (
    DemoModelSpec,
    build_random_model,
    ensure_demo_model,
    parameter_count,
)

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is continuity?",
    "What does the phone do?",
    "What is an adapter?",
    "What does the gateway do?",
]
LEVELS = [1, 2, 4, 8]
# New tokens per request by default: a full run on 2 cores stays within ~10 minutes.
TOKENS = {"demo": 128, "large": 64}
ROUNDS = 4
N_CTX = 2048  # tokens per request's context, both backends (a slot; a sequence)
WARMUP_TOKENS = 4
KIND = "q4_k_m"
GOAL_CONCURRENT = (4, 2.0)  # (concurrency, batched/slot at least), on the larger model
GOAL_SINGLE = 0.95  # batched/slot one request at a time, each model

# The larger model: a random-weight Mistral with the demo tokenizer (its answers are
# noise; min_tokens fixes their length). ~0.55B parameters, ~0.35 GB in Q4_K_M.
LARGE = DemoModelSpec(
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=22,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    seed=0,
)

_request_numbers = itertools.count()


def job(index: int, tokens: int, unique: bool = False) -> ChatJob:
    question = QUESTIONS[index % len(QUESTIONS)]
    if unique:  # a prompt of its own: no prefix in common with any other request
        question = f"Request {next(_request_numbers)}. {question}"
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=question)],
        sampling=SamplingParams(
            max_tokens=tokens, min_tokens=tokens, temperature=0, top_p=1, repetition_penalty=1.0
        ),
        created_at=datetime.now(UTC),
    )


async def generated(backend, request: ChatJob) -> int:
    return sum([e.tokens async for e in backend.generate(request) if isinstance(e, TextDelta)])


# -- models -------------------------------------------------------------------------------


def bench_models_dir() -> Path:
    return cache_dir() / "bench-models"


def gguf_of(model_dir: Path, name: str) -> Path:
    """`name`'s Q4_K_M GGUF, exported once into the bench cache (again when the model
    folder is newer than it)."""
    registry = bench_models_dir() / "registry"
    path = AdapterRegistry(registry).base_gguf(name, KIND)
    source = max(p.stat().st_mtime for p in model_dir.iterdir() if p.is_file())
    if not path.is_file() or path.stat().st_mtime < source:
        print(f"exporting {name} to {KIND} GGUF ...", flush=True)
        export_base(model_dir, registry, name, [KIND])
    return path


def large_model_dir() -> Path:
    """The random Mistral of LARGE's shape (fp16 safetensors), built once into the cache."""
    folder = bench_models_dir() / (
        f"mistral-h{LARGE.hidden_size}-i{LARGE.intermediate_size}"
        f"-l{LARGE.num_hidden_layers}-s{LARGE.seed}"
    )
    if not (folder / "config.json").is_file():  # written whole or not at all
        print(f"building the random Mistral {folder.name} ...", flush=True)
        build_random_model(folder, LARGE, ensure_demo_model(), dtype="float16")
    return folder


# -- batched against slot-per-request -------------------------------------------------------


def backend_kinds(threads: int) -> tuple[dict, str | None]:
    """name -> factory(path, slots, n_ctx) for each backend importable here."""
    from inference_worker.backends.llamacpp_backend import LlamaCppBackend

    kinds = {
        "slot": lambda path, slots, n_ctx: LlamaCppBackend(
            path, slots=slots, threads=max(1, threads // slots), n_ctx=n_ctx
        )
    }
    try:
        from inference_worker.backends.llamacpp_batched import LlamaCppBatchedBackend
    except Exception as exc:  # not written yet, or broken: measure the slot backend alone
        return kinds, f"{type(exc).__name__}: {exc}"
    kinds["batched"] = lambda path, slots, n_ctx: LlamaCppBatchedBackend(
        path, slots=slots, threads=threads, n_ctx=n_ctx
    )
    return kinds, None


async def measure_level(make, concurrency: int, tokens: int, rounds: int) -> dict:
    backend = make(concurrency)
    try:
        started = time.perf_counter()
        await backend.start()
        load_s = time.perf_counter() - started
        # Every slot (or sequence) decodes once before the clock starts.
        await asyncio.gather(
            *(generated(backend, job(i, WARMUP_TOKENS, True)) for i in range(concurrency))
        )
        per_round = []
        total = 0
        elapsed = 0.0
        for _ in range(rounds):
            requests = [job(i, tokens, True) for i in range(concurrency)]
            started = time.perf_counter()
            count = sum(await asyncio.gather(*(generated(backend, r) for r in requests)))
            wall = time.perf_counter() - started
            total += count
            elapsed += wall
            per_round.append(round(count / wall, 2))
    finally:
        await backend.close()
    return {
        "tokens_per_s": round(total / elapsed, 2),
        "rounds_tokens_per_s": per_round,
        "tokens_generated": total,
        "load_s": round(load_s, 2),
    }


async def measure_model(
    kinds: dict, label: str, path: Path, levels: list[int], tokens: int, rounds: int, n_ctx: int
) -> list[dict]:
    rows = []
    for concurrency in levels:
        row: dict = {"concurrency": concurrency}
        for name, factory in kinds.items():  # alternating: slot c, batched c, slot c', ...
            result = await measure_level(
                lambda slots, factory=factory: factory(str(path), slots, n_ctx),
                concurrency,
                tokens,
                rounds,
            )
            row[name] = result
            print(
                f"  {label} {name:>7} x{concurrency}: {result['tokens_per_s']:8.1f} tokens/s "
                f"(rounds {result['rounds_tokens_per_s']}, loaded in {result['load_s']} s)",
                flush=True,
            )
        if "batched" in row:
            row["batched_over_slot"] = round(
                row["batched"]["tokens_per_s"] / row["slot"]["tokens_per_s"], 3
            )
        rows.append(row)
    return rows


def goals(models: dict) -> list[dict]:
    def ratio(model: str, concurrency: int) -> float | None:
        for row in models.get(model, {}).get("levels", []):
            if row["concurrency"] == concurrency:
                return row.get("batched_over_slot")
        return None

    level, target = GOAL_CONCURRENT
    wanted = [("large", level, target, f"{level} concurrent, larger model: batched/slot")]
    wanted += [(m, 1, GOAL_SINGLE, f"1 request, {m} model: batched/slot") for m in models]
    out = []
    for model, concurrency, minimum, what in wanted:
        value = ratio(model, concurrency)
        out.append(
            {
                "goal": f"{what} >= {minimum}",
                "model": model,
                "concurrency": concurrency,
                "target": minimum,
                "ratio": value,
                "met": None if value is None else value >= minimum,
            }
        )
    return out


# -- the ceiling: llama.cpp's own batched decode, no backend -------------------------------


def decode_ceiling(path: Path, levels: list[int], threads: int, steps: int = 24) -> dict:
    """Tokens/s of bare `llama_decode` steps of k sequences (one token each) in one
    context: what batching can give on this host at all. Where a step of 4 costs
    about 4 steps of 1, decoding is bound by the cores, not by memory bandwidth, and
    no backend can multiply its throughput by batching."""
    import llama_cpp
    from llama_cpp import _internals as internals
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    model = internals.LlamaModel(
        path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    out: dict = {}
    try:
        for k in levels:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_seq_max, params.kv_unified = 256 * k, k, True  # as the backend
            params.n_batch = params.n_ubatch = 512
            params.n_threads = params.n_threads_batch = threads
            ctx = internals.LlamaContext(model=model, params=params, verbose=False)
            batch = internals.LlamaBatch(n_tokens=512, embd=0, n_seq_max=1, verbose=False)

            def step(position: int, ctx=ctx, batch=batch, k=k) -> None:
                b = batch.batch
                b.n_tokens = k
                for i in range(k):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = 100 + i, position, 1, True
                    b.seq_id[i][0] = i
                if llama_cpp.llama_decode(ctx.ctx, b) != 0:
                    raise RuntimeError("llama_decode failed")

            for position in range(4):  # warm-up
                step(position)
            started = time.perf_counter()
            for position in range(4, 4 + steps):
                step(position)
            elapsed = time.perf_counter() - started
            out[str(k)] = {
                "ms_per_step": round(elapsed / steps * 1000, 2),
                "tokens_per_s": round(k * steps / elapsed, 1),
            }
            batch.close()
            ctx.close()
    finally:
        model.close()
    one = out[str(levels[0])]["tokens_per_s"]
    for row in out.values():
        row["over_one_sequence"] = round(row["tokens_per_s"] / one, 2)
    return out


# -- memory bandwidth -----------------------------------------------------------------------


def memory_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> dict:
    """GB/s (10^9 bytes) of a numpy copy (read + write counted) and of a STREAM triad
    a = b + s*c (3 arrays counted), on `threads` threads (numpy lets go of the GIL in
    both), best of `repeats`; the copy on one thread too."""
    import numpy as np

    n = mib * 2**20 // 8
    a, b, c = np.empty(n), np.empty(n), np.empty(n)
    for array, value in ((a, 0.0), (b, 1.0), (c, 2.0)):
        array.fill(value)  # every page touched before the clock starts
    chunk = 2**17  # 1 MiB of float64: the triad's temporary stays in cache

    def ranges(parts: int) -> list[tuple[int, int]]:
        step = -(-n // parts)
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def copy(span: tuple[int, int]) -> None:
        np.copyto(b[span[0] : span[1]], a[span[0] : span[1]])

    def triad(span: tuple[int, int]) -> None:
        scratch = np.empty(chunk)
        for lo in range(span[0], span[1], chunk):
            hi = min(span[1], lo + chunk)
            tmp = scratch[: hi - lo]
            np.multiply(c[lo:hi], 3.0, out=tmp)
            np.add(b[lo:hi], tmp, out=a[lo:hi])

    def best(kernel, workers: int, arrays: int) -> float:
        spans = ranges(workers)
        fastest = float("inf")
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(repeats):
                started = time.perf_counter()
                list(pool.map(kernel, spans))
                fastest = min(fastest, time.perf_counter() - started)
        return arrays * n * 8 / fastest / 1e9

    result = {
        "array_mib": mib,
        "threads": threads,
        "copy_1_thread_gb_s": round(best(copy, 1, 2), 2),
        "copy_gb_s": round(best(copy, threads, 2), 2),
        "triad_gb_s": round(best(triad, threads, 3), 2),
    }
    return result


def bandwidth_bound(bandwidth: dict, models: dict, large_gguf: Path | None) -> dict:
    out = dict(bandwidth)
    out["bandwidth_gb_s"] = bandwidth["triad_gb_s"]
    if large_gguf is None or not large_gguf.is_file():
        out["note"] = "the larger model was not measured in this run"
        return out
    size = large_gguf.stat().st_size
    bound = bandwidth["triad_gb_s"] * 1e9 / size
    out["large_gguf_bytes"] = size
    out["bound_tokens_per_s"] = round(bound, 2)
    single = next((r for r in models["large"]["levels"] if r["concurrency"] == 1), None)
    if single is None:
        out["note"] = "no one-request figure for the larger model in this run (--levels 1)"
        return out
    for name in ("slot", "batched"):
        if name in single:
            speed = single[name]["tokens_per_s"]
            out[f"{name}_tokens_per_s"] = speed
            out[f"{name}_fraction_of_bound"] = round(speed / bound, 3)
    return out


# -- the run --------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict:
    threads = args.threads or os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"load average {load:.2f} before the run: other work shares the cores", flush=True)
    kinds, missing = backend_kinds(threads)
    if missing:
        print(
            f"batched backend not available ({missing}): measuring the slot backend only",
            flush=True,
        )
    wanted = [args.only] if args.only else ["demo", "large"]
    models: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    for label in wanted:
        folder = ensure_demo_model() if label == "demo" else large_model_dir()
        path = paths[label] = gguf_of(folder, "demo-model" if label == "demo" else folder.name)
        tokens = args.tokens or TOKENS[label]
        info = {
            "model": folder.name,
            "parameters": parameter_count(folder),
            "gguf": str(path),
            "gguf_bytes": path.stat().st_size,
            "tokens_per_request": tokens,
        }
        print(
            f"{label}: {info['model']}, {info['parameters'] / 1e6:.1f}M parameters, "
            f"{KIND} GGUF {info['gguf_bytes'] / 1e6:.1f} MB; {tokens} tokens per request, "
            f"{args.rounds} round(s), {threads} threads",
            flush=True,
        )
        info["levels"] = await measure_model(
            kinds, label, path, args.levels, tokens, args.rounds, args.n_ctx
        )
        info["decode_ceiling"] = decode_ceiling(path, args.levels, threads)
        models[label] = info
    result = {
        "created_at": datetime.now(UTC).isoformat(),
        "threads": threads,
        "load_average_before": round(load, 2),
        "slot_threads_per_context": {c: max(1, threads // c) for c in args.levels},
        "rounds": args.rounds,
        "n_ctx": args.n_ctx,
        "backends": list(kinds),
        "batched_unavailable": missing,
        "models": models,
        "goals": goals(models),
    }
    if args.bandwidth:
        print("measuring memory bandwidth ...", flush=True)
        result["bandwidth"] = bandwidth_bound(memory_bandwidth(threads), models, paths.get("large"))
    return result


def report(result: dict) -> None:
    for label, info in result["models"].items():
        print(
            f"\n{label}: {info['model']} ({info['parameters'] / 1e6:.1f}M parameters, "
            f"{info['gguf_bytes'] / 1e6:.1f} MB {KIND}), {info['tokens_per_request']} tokens "
            f"per request, {result['threads']} threads"
        )
        print(f"{'concurrent':>10}{'slot tok/s':>12}{'batched tok/s':>15}{'batched/slot':>14}")
        for row in info["levels"]:
            batched = row.get("batched", {}).get("tokens_per_s")
            ratio = row.get("batched_over_slot")
            print(
                f"{row['concurrency']:>10}{row['slot']['tokens_per_s']:>12.1f}"
                f"{'-' if batched is None else f'{batched:.1f}':>15}"
                f"{'-' if ratio is None else f'{ratio:.2f}x':>14}"
            )
        ceiling = info.get("decode_ceiling", {})
        if ceiling:
            scaling = ", ".join(
                f"{k}: {row['tokens_per_s']} tok/s ({row['over_one_sequence']}x)"
                for k, row in ceiling.items()
            )
            print(f"  llama_decode alone, k sequences a step (the ceiling): {scaling}")
    print()
    for goal in result["goals"]:
        met = {None: "not measured", True: "met", False: "NOT met"}[goal["met"]]
        value = "-" if goal["ratio"] is None else f"{goal['ratio']:.2f}"
        print(f"goal: {goal['goal']}: {value} ({met})")
    bandwidth = result.get("bandwidth")
    if bandwidth:
        print(
            f"\nmemory bandwidth ({bandwidth['threads']} threads, {bandwidth['array_mib']} MiB "
            f"arrays): copy {bandwidth['copy_gb_s']} GB/s (1 thread: "
            f"{bandwidth['copy_1_thread_gb_s']}), triad {bandwidth['triad_gb_s']} GB/s"
        )
        if "bound_tokens_per_s" in bandwidth:
            print(
                f"larger model: {bandwidth['large_gguf_bytes'] / 1e6:.1f} MB, bound "
                f"{bandwidth['bandwidth_gb_s']} GB/s / size = "
                f"{bandwidth['bound_tokens_per_s']} tokens/s for one request"
            )
            for name in ("slot", "batched"):
                if f"{name}_tokens_per_s" in bandwidth:
                    print(
                        f"  {name}: {bandwidth[f'{name}_tokens_per_s']} tokens/s = "
                        f"{bandwidth[f'{name}_fraction_of_bound'] * 100:.1f} % of the bound"
                    )
        if "note" in bandwidth:
            print(f"  ({bandwidth['note']})")


# -- transformers fp32 against llama.cpp f16, q8_0, Q4_K_M (--compare-transformers) ---------

COMPARE_TOKENS = 128


async def tokens_per_second(backend, concurrency: int, rounds: int = 2) -> float:
    async def one(index: int) -> int:
        return await generated(backend, job(index, COMPARE_TOKENS))

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


async def compare_transformers() -> dict:
    """transformers batches the 4 requests into one forward pass; llama.cpp's slot
    backend runs them on its slots (one context each, one per core here) and the rest
    wait their turn. Ratios are against transformers fp32 in the same column."""
    from inference_worker.backends.llamacpp_backend import LlamaCppBackend
    from inference_worker.backends.transformers_backend import TransformersBackend

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
    print(f"demo model, {COMPARE_TOKENS} tokens per request, {cores} cores")
    print(f"{'':<26}{'1 request tok/s':>17}{'ratio':>8}{'4 concurrent tok/s':>20}{'ratio':>8}")
    for name, row in rows.items():
        row["batch1_ratio"] = row["batch1_tok_s"] / base["batch1_tok_s"]
        row["concurrent4_ratio"] = row["concurrent4_tok_s"] / base["concurrent4_tok_s"]
        print(
            f"{name:<26}{row['batch1_tok_s']:>17.0f}{row['batch1_ratio']:>7.2f}x"
            f"{row['concurrent4_tok_s']:>20.0f}{row['concurrent4_ratio']:>7.2f}x"
        )
    return {"tokens": COMPARE_TOKENS, "cores": cores, "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["demo", "large"], help="one model only")
    parser.add_argument("--levels", type=int, nargs="+", default=LEVELS, help="concurrent requests")
    parser.add_argument(
        "--tokens",
        type=int,
        default=0,
        help=f"new tokens per request (default: {TOKENS['demo']} demo, {TOKENS['large']} large)",
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="bursts per level")
    parser.add_argument(
        "--threads", type=int, default=0, help="total threads for each backend (default: cores)"
    )
    parser.add_argument("--n-ctx", type=int, default=N_CTX, help="context size, both backends")
    parser.add_argument(
        "--bandwidth",
        action="store_true",
        help="measure memory bandwidth; the larger model against bandwidth / GGUF bytes",
    )
    parser.add_argument(
        "--compare-transformers",
        action="store_true",
        help="transformers fp32 against llama.cpp f16, q8_0, Q4_K_M on the demo model",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    args = parser.parse_args()
    if args.compare_transformers:
        result = asyncio.run(compare_transformers())
        out = args.out or RESULTS / "llamacpp_transformers.json"
    else:
        result = asyncio.run(main(args))
        report(result)
        out = args.out or RESULTS / "llamacpp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
