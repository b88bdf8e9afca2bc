"""The prefix cache: its bookkeeping on made-up tensors, then the transformers backend
on the demo model, where a warm cache must answer exactly as the cache off does."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from inference_worker.backends.base import Finished, TextDelta
from inference_worker.backends.prefix_cache import PrefixCache
from inference_worker.backends.transformers_backend import TransformersBackend
from proto.messages import ChatJob, ChatMessage, SamplingParams
from tests.inference_worker.test_adapters import make_adapter
from trainer_job.publish import write_version

LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4


def fake_kv(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One row of per-layer keys/values whose entries name their token and layer."""
    token = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [
        (token.expand(1, HEADS, -1, DIM) + layer, -token.expand(1, HEADS, -1, DIM) - layer)
        for layer in range(LAYERS)
    ]


def block_bytes() -> int:
    return 2 * LAYERS * HEADS * BLOCK * DIM * 4


def cached(cache: PrefixCache, namespace: str, ids: list[int]) -> list:
    hit = cache.lookup(namespace, ids)
    return cache.insert(namespace, ids, fake_kv(ids), 0, 0, hit.blocks)


def test_a_prompt_finds_its_longest_cached_start_and_reads_at_least_its_last_token() -> None:
    cache = PrefixCache(100 * block_bytes(), BLOCK)
    ids = list(range(1, 11))  # 10 tokens: two full blocks and a half
    cache.release(cached(cache, "base", ids))
    assert len(cache) == 2

    assert cache.lookup("base", ids).tokens == 8  # ends mid-block: its full blocks
    assert cache.lookup("base", ids[:9]).tokens == 8  # all but its last token
    assert cache.lookup("base", ids[:8]).tokens == 7  # the last token is still read
    assert cache.lookup("base", [*ids[:6], 99, 100, 101]).tokens == 4  # diverges in block 2
    assert cache.lookup("base", [99, *ids]).tokens == 0  # same tokens, other position
    assert cache.lookup("lora__v1__1", ids).tokens == 0  # another namespace

    hit = cache.lookup("base", ids[:9])
    past = cache.past(hit)
    assert len(past) == LAYERS
    keys, values = past[1]
    assert keys.shape == (1, HEADS, 8, DIM)
    assert keys[0, 0, :, 0].tolist() == [t + 1.0 for t in ids[:8]]
    assert values[0, 1, :, 0].tolist() == [-t - 1.0 for t in ids[:8]]


def test_counters() -> None:
    cache = PrefixCache(100 * block_bytes(), BLOCK)
    ids = list(range(1, 10))
    cache.release(cached(cache, "base", ids))
    cache.lookup("base", ids)
    stats = cache.stats()
    assert (stats.lookups, stats.lookup_tokens, stats.hit_tokens) == (2, 18, 8)
    assert (stats.blocks, stats.bytes, stats.evictions) == (2, 2 * block_bytes(), 0)


def test_least_recently_used_blocks_no_row_holds_are_evicted_end_first() -> None:
    cache = PrefixCache(4 * block_bytes(), BLOCK)
    first, second = list(range(1, 9)), list(range(101, 109))
    cache.release(cached(cache, "base", first))
    cache.release(cached(cache, "base", second))
    assert len(cache) == 4 and cache.bytes == 4 * block_bytes()

    cache.release(cache.lookup("base", [*first, 0]).blocks)  # `first` used more recently
    third = cached(cache, "base", list(range(201, 209)))  # needs two blocks of room
    assert cache.evictions == 2 and cache.bytes <= cache.capacity_bytes
    assert cache.lookup("base", [*first, 0]).tokens == 8
    assert cache.lookup("base", [*second, 0]).tokens == 0
    assert len(third) == 2


def test_a_block_a_running_row_holds_is_never_evicted() -> None:
    cache = PrefixCache(2 * block_bytes(), BLOCK)
    held = cached(cache, "base", list(range(1, 9)))  # the row is still running
    assert len(held) == 2
    other = cached(cache, "base", list(range(101, 109)))
    assert other == [] and cache.evictions == 0  # no room: not cached, nothing dropped
    cache.release(held)
    assert len(cached(cache, "base", list(range(101, 109)))) == 2
    assert cache.evictions == 2


def test_a_dropped_namespace_is_gone_and_capacity_zero_is_off() -> None:
    cache = PrefixCache(100 * block_bytes(), BLOCK)
    ids = list(range(1, 10))
    cache.release(cached(cache, "lora__v1__1", ids))
    cache.release(cached(cache, "base", ids))
    assert cache.drop("lora__v1__1") == 2
    assert cache.lookup("lora__v1__1", ids).tokens == 0
    assert cache.lookup("base", ids).tokens == 8 and cache.bytes == 2 * block_bytes()

    off = PrefixCache(0, BLOCK)
    assert cached(off, "base", ids) == [] and off.lookup("base", ids).tokens == 0
    assert off.stats() is None and len(off) == 0


def test_a_hash_collision_never_replaces_or_serves_another_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from inference_worker.backends import prefix_cache

    monkeypatch.setattr(prefix_cache, "hash", lambda _: 7, raising=False)  # every key alike
    cache = PrefixCache(100 * block_bytes(), BLOCK)
    first = list(range(1, 10))
    held = cached(cache, "base", first)
    assert len(held) == 1  # its second block's key was taken: not cached
    cache.release(held)
    cache.release(cached(cache, "base", list(range(101, 110))))  # the same key again
    assert len(cache) == 1 and cache.bytes == block_bytes()
    assert cache.lookup("base", first).tokens == 4
    assert cache.lookup("base", list(range(101, 110))).tokens == 0


# --- the transformers backend on the demo model -----------------------------------

TIERS = (
    "You are the owner's continuity assistant.\n\n"
    "## Portfolio (PORTFOLIO_CONTEXT.md)\nThe mesh, the phone app and the trainer; the "
    "gateway is shared by all of them.\n"
    "## Project context: mesh (PROJECT_CONTEXT.md)\nA gateway, RabbitMQ, inference "
    "workers, a context store in Redis and a trainer that publishes adapters.\n"
    "## Session briefing (SESSION_BRIEFING.md)\nToday: the prefix cache of the worker.\n"
    "## Recent session log (SESSION_LOG.md)\n- Finished the gateway.\n- Wrote the tests.\n"
)


def job(user: str, system: str = TIERS, model: str | None = None, max_tokens: int = 24) -> ChatJob:
    messages = [ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)]
    return ChatJob(
        job_id=uuid.uuid4().hex,
        model=model,
        messages=messages,
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.15
        ),
        created_at=datetime.now(UTC),
    )


async def answer(
    backend: TransformersBackend, chat_job: ChatJob, started: asyncio.Event | None = None
) -> tuple[str, Finished]:
    pieces, finished = [], None
    async for event in backend.generate(chat_job):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
            if started is not None:
                started.set()
        else:
            finished = event
    assert finished is not None
    return "".join(pieces), finished


async def answers(backend: TransformersBackend, jobs: list[ChatJob]) -> list[tuple[str, Finished]]:
    return list(await asyncio.gather(*(answer(backend, j) for j in jobs)))


async def started(model: Path, cache_bytes: int, block: int = 16) -> TransformersBackend:
    backend = TransformersBackend(
        str(model),
        device="cpu",
        max_batch=8,
        prefix_cache_bytes=cache_bytes,
        prefix_cache_block_tokens=block,
    )
    await backend.start()
    return backend


@pytest.fixture(scope="module")
async def cold(demo_model: Path) -> TransformersBackend:
    """The cache off: the reference every warm answer must equal."""
    return await started(demo_model, 0)


def message_with_length(backend: TransformersBackend, base: str, remainder: int) -> str:
    """`base` with words added until its prompt's length is `remainder` mod 16."""
    words = "the gateway sends each job to a worker and the phone reads it".split()
    for count in range(64):
        text = " ".join([base, *words[: count % len(words)], *["again"] * (count // len(words))])
        if len(backend.encode_prompt(job(text))) % 16 == remainder:
            return text
    raise AssertionError(f"no message of {base!r} leaves {remainder} tokens past a block")


async def test_warm_answers_equal_the_cache_off_for_prefixes_of_several_lengths(
    demo_model: Path, cold: TransformersBackend
) -> None:
    warm = await started(demo_model, 64 << 20)
    first = job("What is the four-tier handoff system?")
    assert (await answer(warm, first))[1].cached_tokens == 0  # cold start: nothing cached
    questions = [
        "What is the four-tier handoff system?",  # the same prompt again
        message_with_length(warm, "Which tier changes most often?", 1),  # all but its last
        message_with_length(warm, "What does the phone do?", 7),  # ends mid-block
        "Hello",
    ]
    prefix = len(warm.encode_prompt(job(""))) - 8  # the shared system prompt, about
    for question in questions:
        ids = warm.encode_prompt(job(question))
        text, finished = await answer(warm, job(question))
        reference, ref_finished = await answer(cold, job(question))
        assert (text, finished.completion_tokens) == (reference, ref_finished.completion_tokens)
        assert finished.prompt_tokens == len(ids)
        assert finished.cached_tokens >= prefix // 16 * 16 - 16
        assert ref_finished.cached_tokens == 0
    # The same question twice: the second time only its last token is not cached
    # when its prompt is one token past a block's end.
    again = questions[1]
    _, finished = await answer(warm, job(again))
    assert finished.cached_tokens == finished.prompt_tokens - 1
    stats = warm.prefix_cache
    assert stats is not None and stats.hit_tokens > 0 and stats.bytes > 0
    await warm.close()


async def test_a_shared_batch_mixes_hits_and_misses(
    demo_model: Path, cold: TransformersBackend
) -> None:
    warm = await started(demo_model, 64 << 20)
    await answer(warm, job("Warm the tiers up."))
    jobs = [
        job("What is the four-tier handoff system?"),  # hit: the shared tiers
        job("Hello", system="A different system prompt entirely."),  # miss
        job("What does the phone do?"),  # hit
        job("Tell me about the gateway.", system="Another one; nothing shared."),  # miss
    ]
    warm_answers = await answers(warm, jobs)
    cold_answers = await answers(
        cold, [j.model_copy(update={"job_id": "x" + j.job_id}) for j in jobs]
    )
    assert [text for text, _ in warm_answers] == [text for text, _ in cold_answers]
    hits = [finished.cached_tokens for _, finished in warm_answers]
    assert hits[0] > 0 and hits[2] > 0 and hits[1] == 0 and hits[3] == 0


async def test_adapter_rows_use_their_own_blocks_and_a_new_version_none_of_the_old(
    demo_model: Path, cold: TransformersBackend, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    for seed in (1, 2):
        write_version(
            make_adapter(demo_model, tmp_path / f"lora{seed}", seed),
            registry,
            "continuity",
            "demo-model",
        )
    warm = await started(demo_model, 64 << 20)
    for backend in (warm, cold):
        await backend.load_adapter("continuity", 1, registry / "continuity" / "1")
    question = "What is the four-tier handoff system?"
    await answer(warm, job(question))  # base blocks only
    text, finished = await answer(warm, job(question, model="continuity"))
    assert finished.cached_tokens == 0  # base blocks are not the adapter's
    mixed = [job(question, model="continuity"), job(question), job("Hello", model="continuity")]
    warm_answers = await answers(warm, mixed)
    cold_answers = await answers(cold, mixed)
    assert [t for t, _ in warm_answers] == [t for t, _ in cold_answers]
    assert all(f.cached_tokens > 0 for _, f in warm_answers)
    assert warm_answers[0][0] == text and warm_answers[0][0] != warm_answers[1][0]

    for backend in (warm, cold):
        await backend.load_adapter("continuity", 2, registry / "continuity" / "2")
    v2, finished = await answer(warm, job(question, model="continuity"))
    assert finished.cached_tokens == 0  # nothing of v1 is reused for v2
    assert v2 == (await answer(cold, job(question, model="continuity")))[0]
    assert v2 != text
    _, finished = await answer(warm, job(question, model="continuity"))
    assert finished.cached_tokens > 0
    # v1 was unloaded once unused, and its blocks went with it.
    assert not [b for b in warm.scheduler.prefix_cache._blocks.values() if "__v1__" in b.namespace]  # type: ignore[union-attr]
    for backend in (warm,):
        await backend.close()
    # `cold` is shared with other tests: serve the base only again.
    cold.loaded.clear()


async def test_sliding_window_attention(demo_model: Path, tmp_path: Path) -> None:
    """A window shorter than the prompt: cached columns must sit where they would."""
    model = tmp_path / "windowed"
    shutil.copytree(demo_model, model)
    config = json.loads((model / "config.json").read_text())
    config["sliding_window"] = 24
    (model / "config.json").write_text(json.dumps(config))
    warm, off = await started(model, 64 << 20), await started(model, 0)
    await answer(warm, job("Warm the tiers up."))
    jobs = [
        job("What is the four-tier handoff system?"),
        job("Hello", system="Unshared."),
        job("What does the phone do?"),
    ]
    warm_answers = await answers(warm, jobs)
    assert warm_answers[0][1].cached_tokens > 24 * 2
    assert [t for t, _ in warm_answers] == [t for t, _ in await answers(off, jobs)]
    # The window is in effect: it changes what the model computes for these prompts.
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([warm.encode_prompt(jobs[0])])
    with torch.inference_mode():
        windowed = AutoModelForCausalLM.from_pretrained(model)(ids).logits
        full = AutoModelForCausalLM.from_pretrained(demo_model)(ids).logits
    assert not torch.allclose(windowed, full, atol=1e-3)
    for backend in (warm, off):
        await backend.close()


async def test_eviction_under_a_tiny_budget_while_rows_run(
    demo_model: Path, cold: TransformersBackend
) -> None:
    """Room for the blocks of two prompts: while a long answer runs (holding its
    prompt's blocks), each short chat evicts the one before it, never the running one."""
    probe = await started(demo_model, 64 << 20)
    long_job = job("Tell me everything.", system="The long one. " + TIERS[:200], max_tokens=160)
    long_job = long_job.model_copy(
        update={"sampling": long_job.sampling.model_copy(update={"min_tokens": 160})}
    )
    shorts = [job(f"Question {n}?", system=f"Short number {n}. " + TIERS[:150]) for n in range(3)]
    lengths = [len(probe.encode_prompt(j)) for j in (long_job, *shorts)]
    blocks = [length // 16 for length in lengths]
    await answer(probe, job("Hello"))
    per_block = probe.prefix_cache.bytes // probe.prefix_cache.blocks  # type: ignore[union-attr]
    await probe.close()
    assert min(blocks) >= 2
    tiny = await started(demo_model, (blocks[0] + max(blocks[1:])) * per_block)

    decoding = asyncio.Event()
    running = asyncio.create_task(answer(tiny, long_job, decoding))
    await decoding.wait()
    short_answers = [await answer(tiny, j) for j in shorts]
    assert not running.done()  # the short chats came and went while it ran
    stats = tiny.prefix_cache
    assert stats is not None and stats.evictions >= sum(blocks[1:-1])
    assert stats.bytes <= stats.capacity_bytes
    long_answer = await running

    # The running row's blocks survived (its answer's, added as it ended, evicted
    # the short chats' instead).
    again = await answers(tiny, [long_job, shorts[-1]])
    assert again[0][1].cached_tokens == min(blocks[0] * 16, lengths[0] - 1)
    assert [t for t, _ in again] == [long_answer[0], short_answers[-1][0]]
    reference = [await answer(cold, j) for j in (long_job, *shorts)]
    assert [long_answer[0], *(t for t, _ in short_answers)] == [t for t, _ in reference]
    await tiny.close()


@pytest.mark.parametrize(
    ("dtype", "quantization"), [("float16", "none"), ("bfloat16", "none"), ("auto", "4bit")]
)
async def test_warm_answers_equal_the_cache_off_in_other_precisions(
    demo_model: Path, dtype: str, quantization: str
) -> None:
    """fp16 and bf16 keys and values, and NF4 weights (the KV stays in the compute
    dtype): blocks are sized and copied in whatever the model computes in."""

    async def precise(cache_bytes: int) -> TransformersBackend:
        backend = TransformersBackend(
            str(demo_model),
            device="cpu",
            dtype=dtype,
            quantization=quantization,
            prefix_cache_bytes=cache_bytes,
        )
        await backend.start()
        return backend

    warm, off = await precise(64 << 20), await precise(0)
    await answer(warm, job("Warm the tiers up."))
    jobs = [job("What is the four-tier handoff system?"), job("What does the phone do?")]
    warm_answers = await answers(warm, jobs)
    assert all(finished.cached_tokens > 100 for _, finished in warm_answers)
    assert [t for t, _ in warm_answers] == [t for t, _ in await answers(off, jobs)]
    block = next(iter(warm.scheduler.prefix_cache._blocks.values()))  # type: ignore[union-attr]
    expected = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
    assert block.keys.dtype == expected
    for backend in (warm, off):
        await backend.close()


async def test_the_uncached_rest_of_a_prompt_is_still_read_in_chunks(
    demo_model: Path, cold: TransformersBackend
) -> None:
    """A hit with a long new part: read 16 tokens a turn, a running job decoding one
    token after each, and the answer unchanged."""
    warm = await started(demo_model, 64 << 20)
    await answer(warm, job("Warm the tiers up."))
    question = "Tell me about the tiers and the phone and the gateway. " * 8 + "Which first?"
    decoding = asyncio.Event()
    long_job = job("Hello", max_tokens=200)
    long_job = long_job.model_copy(
        update={"sampling": long_job.sampling.model_copy(update={"min_tokens": 200})}
    )
    running = asyncio.create_task(answer(warm, long_job, decoding))
    await decoding.wait()
    warm.scheduler.prefill_chunk_tokens = 16  # type: ignore[union-attr]
    before = warm.tokens_generated
    joining = warm.generate(job(question))
    first = await anext(joining)
    decoded_meanwhile = warm.tokens_generated - before
    rest = [e async for e in joining]
    text = first.text + "".join(e.text for e in rest if isinstance(e, TextDelta))  # type: ignore[union-attr]
    finished = rest[-1]
    assert isinstance(finished, Finished)
    uncached = finished.prompt_tokens - finished.cached_tokens
    assert finished.cached_tokens > 100 and uncached > 64
    assert decoded_meanwhile >= uncached // 16 - 1
    assert text == (await answer(cold, job(question)))[0]
    await running
    await warm.close()


async def test_the_next_turn_finds_the_previous_answer_cached(
    demo_model: Path, cold: TransformersBackend
) -> None:
    """The answer's blocks are kept too: the next turn repeats the prompt and the
    answer (as text, which the tokenizer turns back into the same ids)."""
    warm = await started(demo_model, 64 << 20)
    first = job("What is the four-tier handoff system?", max_tokens=48)
    text, finished = await answer(warm, first)
    assert finished.completion_tokens > 32
    history = [
        *first.messages,
        ChatMessage(role="assistant", content=text),
        ChatMessage(role="user", content="And what does the phone do?"),
    ]
    second = first.model_copy(update={"job_id": uuid.uuid4().hex, "messages": history})
    ids = warm.encode_prompt(second)
    assert ids[: finished.prompt_tokens] == warm.encode_prompt(first)
    next_text, next_finished = await answer(warm, second)
    # Cached: the first prompt and the answer's full blocks, not only the prompt's.
    through_answer = finished.prompt_tokens + finished.completion_tokens - 1
    assert next_finished.cached_tokens >= through_answer // 16 * 16 > finished.prompt_tokens
    assert next_text == (await answer(cold, second))[0]
    # A cancelled answer adds nothing.
    blocks = len(warm.scheduler.prefix_cache)  # type: ignore[union-attr]
    stream = warm.generate(job("Something new entirely, to be cut short.", max_tokens=200))
    await anext(stream)
    await stream.aclose()
    await answer(warm, job("Hello"))  # a step after the cancellation
    assert len(warm.scheduler.prefix_cache) - blocks <= 16  # type: ignore[union-attr]
    await warm.close()


def test_the_default_size_respects_a_containers_memory_limit(tmp_path: Path) -> None:
    from services.host_memory import available_ram

    assert available_ram(()) > 0  # the host's, read from the system
    host = 8 << 30  # fixed: the system's own figure moves between two reads
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{2 << 30}\n")
    usage.write_text(f"{1 << 30}\n")
    assert available_ram(((limit, usage),), host) == 1 << 30
    assert available_ram(((limit, usage),), 1 << 29) == 1 << 29  # the host has less
    limit.write_text("max\n")  # cgroup v2 without a limit
    assert available_ram(((limit, usage),), host) == host
    assert available_ram(((tmp_path / "absent", usage), (limit, usage)), host) == host
