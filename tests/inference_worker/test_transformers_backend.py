"""The transformers backend on the demo model: streamed text equals a direct decode."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from inference_worker.backends import batching
from inference_worker.backends.base import Finished, TextDelta
from inference_worker.backends.detokenizer import IncrementalDetokenizer
from inference_worker.backends.transformers_backend import TransformersBackend
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.errors import PermanentError

QUESTION = "What is the four-tier handoff system?"


def job(messages: list[dict[str, str]], max_tokens: int = 48, **sampling: float) -> ChatJob:
    params = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.15, **sampling}
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(**m) for m in messages],  # type: ignore[arg-type]
        sampling=SamplingParams(max_tokens=max_tokens, **params),
        created_at=datetime.now(UTC),
    )


@pytest.fixture(scope="module")
async def backend(demo_model: Path) -> TransformersBackend:
    instance = TransformersBackend(str(demo_model), device="cpu")
    await instance.start()
    return instance


async def run(backend: TransformersBackend, chat_job: ChatJob) -> tuple[str, Finished]:
    pieces = []
    finished = None
    async for event in backend.generate(chat_job):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            finished = event
    assert finished is not None
    return "".join(pieces), finished


async def test_streamed_greedy_text_equals_a_direct_generate(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    messages = [
        {"role": "system", "content": "You are the owner's continuity assistant."},
        {"role": "user", "content": QUESTION},
    ]
    text, finished = await run(backend, job(messages))
    expected, prompt_tokens, completion_tokens = reference_greedy(messages, 48)
    assert text == expected
    assert "handoff" in text  # the demo model answers about its domain
    assert (finished.prompt_tokens, finished.completion_tokens) == (
        prompt_tokens,
        completion_tokens,
    )


async def test_min_tokens_without_a_repetition_penalty(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    text, finished = await run(
        backend, job(messages, max_tokens=40, min_tokens=30, repetition_penalty=1.0)
    )
    expected, _, tokens = reference_greedy(messages, 40, repetition_penalty=1.0, min_tokens=30)
    assert (text, finished.completion_tokens) == (expected, tokens)
    assert tokens >= 30


async def test_max_tokens_ends_with_length(backend: TransformersBackend) -> None:
    _, finished = await run(backend, job([{"role": "user", "content": QUESTION}], max_tokens=5))
    assert (finished.reason, finished.completion_tokens) == ("length", 5)


async def test_concurrent_jobs_keep_their_own_text(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    first = [{"role": "user", "content": QUESTION}]
    second = [{"role": "user", "content": "What does the phone do?"}]
    (a, _), (b, _) = await asyncio.gather(run(backend, job(first)), run(backend, job(second)))
    assert a == reference_greedy(first, 48)[0]
    assert b == reference_greedy(second, 48)[0]


async def test_concurrent_jobs_share_batches_with_their_own_sampling(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    questions = [
        "What does the phone do?",
        QUESTION,
        "What is an adapter?",
        "Why is the session log append-only?",
    ] * 2
    assert backend.scheduler is not None
    steps_before = backend.scheduler.steps
    greedy = [
        job([{"role": "user", "content": q}], max_tokens=30 + i) for i, q in enumerate(questions)
    ]
    sampled = job([{"role": "user", "content": "Hello"}], max_tokens=30, temperature=1.2)
    results = await asyncio.gather(*(run(backend, j) for j in [*greedy, sampled]))
    for (text, finished), chat_job, question in zip(results, greedy, questions, strict=False):
        expected, _, tokens = reference_greedy(
            [{"role": "user", "content": question}], chat_job.sampling.max_tokens
        )
        assert text == expected  # a sampled neighbour does not change a greedy row
        assert finished.completion_tokens == tokens
    # nine jobs at once shared their decoding steps: far fewer forwards than tokens
    tokens = sum(finished.completion_tokens for _, finished in results)
    assert backend.scheduler.steps - steps_before < tokens / 4


async def test_a_job_joins_a_running_batch_instead_of_waiting_for_it(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    # min_tokens keeps the long job decoding for 300 tokens.
    question = [{"role": "user", "content": QUESTION}]
    long_job = job(question, max_tokens=300, min_tokens=300)
    decoded: list[int] = []
    pieces: list[str] = []
    started = asyncio.Event()

    async def long_answer() -> Finished:
        async for event in backend.generate(long_job):
            if isinstance(event, Finished):
                return event
            decoded.append(event.tokens)
            pieces.append(event.text)
            started.set()
        raise AssertionError("no Finished event")

    running = asyncio.create_task(long_answer())
    await started.wait()
    short = [{"role": "user", "content": "What does the phone do?"}]
    text, finished = await run(backend, job(short, max_tokens=20))
    # the short job was answered while the long one was still far from its end ...
    assert sum(decoded) < 300 - 100
    assert not running.done()
    # ... and neither its joining midway nor its leaving changed either answer
    assert (text, finished.completion_tokens) == (
        reference_greedy(short, 20)[0],
        reference_greedy(short, 20)[2],
    )
    assert (await running).completion_tokens == 300
    assert "".join(pieces) == reference_greedy(question, 300, min_tokens=300)[0]


async def test_a_failed_step_fails_its_jobs_and_the_next_jobs_are_served(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    assert backend.scheduler is not None
    model = backend.scheduler.model
    real_forward = model.forward
    failed = False

    def forward_failing_once_with_both_rows(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed and kwargs["input_ids"].shape == (2, 1):  # a step of both jobs
            failed = True
            raise RuntimeError("out of memory (simulated)")
        return real_forward(*args, **kwargs)

    model.forward = forward_failing_once_with_both_rows
    try:
        question = [{"role": "user", "content": QUESTION}]
        results = await asyncio.gather(
            run(backend, job(question)), run(backend, job(question)), return_exceptions=True
        )
    finally:
        del model.forward
    assert [str(r) for r in results] == ["out of memory (simulated)"] * 2
    text, _ = await run(backend, job(question))
    assert text == reference_greedy(question, 48)[0]


async def test_a_long_prompt_is_read_in_chunks_while_the_running_job_keeps_decoding(
    backend: TransformersBackend, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    assert backend.scheduler is not None
    question = [{"role": "user", "content": QUESTION}]
    long_prompt = [
        {"role": "user", "content": "Tell me about the tiers. " * 30 + "What does the phone do?"}
    ]
    started = asyncio.Event()

    async def long_answer() -> str:
        pieces = []
        async for event in backend.generate(job(question, max_tokens=300, min_tokens=300)):
            if isinstance(event, TextDelta):
                pieces.append(event.text)
                started.set()
        return "".join(pieces)

    backend.scheduler.prefill_chunk_tokens = 16
    # The same prompt twice: with the prefix cache on, the second would not be read.
    capacity, backend.scheduler.prefix_cache.capacity_bytes = (
        backend.scheduler.prefix_cache.capacity_bytes,
        0,
    )
    try:
        # alone: read chunk after chunk with nothing else to decode in between
        alone, _ = await run(backend, job(long_prompt, max_tokens=12))
        running = asyncio.create_task(long_answer())
        await started.wait()
        before = backend.tokens_generated
        joining = backend.generate(job(long_prompt, max_tokens=12))
        first = await anext(joining)
        decoded_meanwhile = backend.tokens_generated - before
        pieces = [first.text] + [e.text async for e in joining if isinstance(e, TextDelta)]
    finally:
        backend.scheduler.prefill_chunk_tokens = 512
        backend.scheduler.prefix_cache.capacity_bytes = capacity
    prompt_tokens = reference_greedy(long_prompt, 1)[1]
    assert prompt_tokens > 150
    # one decoding step of the running job per 16-token chunk of the new prompt
    assert decoded_meanwhile >= prompt_tokens // 16 - 1
    assert "".join(pieces) == alone == reference_greedy(long_prompt, 12)[0]
    assert await running == reference_greedy(question, 300, min_tokens=300)[0]


async def test_a_seeded_job_samples_the_same_with_or_without_neighbours(
    backend: TransformersBackend,
) -> None:
    hello = [{"role": "user", "content": "Hello"}]
    seeded = job(hello, max_tokens=24, temperature=1.5, seed=7)
    alone, _ = await run(backend, seeded)
    neighbours = [job(hello, max_tokens=30, temperature=1.5) for _ in range(3)]
    together = await asyncio.gather(run(backend, seeded), *(run(backend, n) for n in neighbours))
    assert together[0][0] == alone
    other_seed, _ = await run(backend, job(hello, max_tokens=24, temperature=1.5, seed=8))
    assert other_seed != alone


async def test_a_failure_anywhere_in_the_loop_ends_its_jobs_and_the_loop_goes_on(
    backend: TransformersBackend,
    reference_greedy: Callable[..., tuple[str, int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    question = [{"role": "user", "content": QUESTION}]
    started = asyncio.Event()

    async def long_answer() -> None:
        async for _ in backend.generate(job(question, max_tokens=300, min_tokens=300)):
            started.set()

    running = asyncio.create_task(long_answer())
    await started.wait()

    def failing_extend(self: Any, other: Any) -> None:
        raise MemoryError("cannot grow the cache (simulated)")

    # the next job's cache cannot be appended: not a forward, so no narrower handler
    monkeypatch.setattr(batching._Batch, "extend", failing_extend)
    with pytest.raises(MemoryError, match="simulated"):
        await run(backend, job(question))
    with pytest.raises(MemoryError, match="simulated"):
        await running
    monkeypatch.undo()
    text, _ = await run(backend, job(question))
    assert text == reference_greedy(question, 48)[0]


async def test_closing_finishes_what_was_submitted_and_refuses_the_rest(
    demo_model: Path, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    own = TransformersBackend(str(demo_model), device="cpu")
    await own.start()
    question = [{"role": "user", "content": QUESTION}]
    answers = [asyncio.create_task(run(own, job(question, max_tokens=16))) for _ in range(3)]
    await asyncio.sleep(0)  # the three are submitted ...
    await own.close()  # ... before the close
    for answer in answers:
        assert (await answer)[0] == reference_greedy(question, 16)[0]
    with pytest.raises(RuntimeError, match="stopped"):
        await run(own, job(question))
    with pytest.raises(RuntimeError, match="stopped"):
        own.scheduler.call(lambda: None)  # type: ignore[union-attr]


async def test_closing_the_stream_stops_generation(backend: TransformersBackend) -> None:
    # min_tokens keeps the model talking: 1,500 tokens would take seconds.
    long_job = job([{"role": "user", "content": QUESTION}], max_tokens=1500, min_tokens=1500)
    stream = backend.generate(long_job)
    async for event in stream:
        if isinstance(event, TextDelta):
            break
    at_close = backend.tokens_generated
    await stream.aclose()
    await asyncio.sleep(0.3)
    settled = backend.tokens_generated
    await asyncio.sleep(0.3)
    # The thread stopped at its next token: nothing more is decoded, and far fewer
    # tokens than the job asked for were.
    assert backend.tokens_generated == settled
    assert settled - at_close < 50


async def test_a_prompt_beyond_the_context_is_refused(backend: TransformersBackend) -> None:
    huge = "handoff " * 3000
    with pytest.raises(PermanentError, match="context"):
        await run(backend, job([{"role": "user", "content": huge}]))


async def test_roles_that_do_not_alternate_are_refused(backend: TransformersBackend) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(PermanentError, match="alternate"):
        await run(backend, job(messages))


@pytest.mark.parametrize("text", ["plain words", "naïve café — ünïcödé", "emoji 🚀🧠 and 中文"])
def test_incremental_detokenizer_reassembles_multibyte_text(
    reference_model: tuple[Any, Any], text: str
) -> None:
    _, tokenizer = reference_model
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token_id) for token_id in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


async def test_4bit_weights_load_and_answer_on_cpu(
    demo_model: Path, backend: TransformersBackend
) -> None:
    quantized = TransformersBackend(str(demo_model), device="cpu", quantization="4bit")
    await quantized.start()
    try:
        assert type(quantized.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        footprint = quantized.model.get_memory_footprint()
        assert footprint < 0.4 * backend.model.get_memory_footprint()
        text, finished = await run(quantized, job([{"role": "user", "content": QUESTION}]))
        assert "handoff" in text and finished.completion_tokens > 5
    finally:
        await quantized.close()
