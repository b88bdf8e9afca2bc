"""The vLLM backend for real, on vLLM's CPU build, in its own virtualenv
(`make test-vllm`): same answers as transformers, LoRA per request as peft,
and a closed stream frees the engine's slot."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inference_worker.backends.base import Finished, TextDelta
from inference_worker.backends.vllm_backend import VllmBackend
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.paths import demo_model_dir
from tests.conftest import unsaid
from tests.inference_worker.test_adapters import QUESTION, make_adapter, peft_greedy
from trainer_job.publish import write_version

DEMO = demo_model_dir()


def job(
    question: str, max_tokens: int = 24, model: str | None = None, **sampling: object
) -> ChatJob:
    params: dict[str, object] = {
        "temperature": 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.15,
        "max_tokens": max_tokens,
        **sampling,
    }
    return ChatJob(
        job_id=uuid.uuid4().hex,
        model=model,
        messages=[ChatMessage(role="user", content=question)],
        sampling=SamplingParams(**params),
        created_at=datetime.now(UTC),
    )  # type: ignore[arg-type]


async def run(backend: VllmBackend, chat: ChatJob) -> tuple[str, Finished]:
    text, finished = [], None
    async for event in backend.generate(chat):
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            finished = event
    assert finished is not None
    return "".join(text), finished


def transformers_greedy(question: str, max_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=1.15,
            pad_token_id=tokenizer.pad_token_id,
            **unsaid(tokenizer),
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[VllmBackend]:
    instance = VllmBackend(
        str(DEMO),
        dtype="float32",
        max_lora_rank=8,
        max_model_len=1024,
        kv_cache_memory_bytes=256 << 20,  # the demo model needs little; RAM may be busy
    )
    await instance.start()
    yield instance
    await instance.close()


async def test_greedy_answers_equal_transformers(backend: VllmBackend) -> None:
    questions = [QUESTION, "What does the phone do?"]
    results = await asyncio.gather(*(run(backend, job(q)) for q in questions))
    for question, (text, finished) in zip(questions, results, strict=True):
        assert text == transformers_greedy(question, 24)
        assert finished.completion_tokens > 0


async def test_stop_strings_and_length(backend: VllmBackend) -> None:
    full, _ = await run(backend, job(QUESTION, 40))
    cut, finished = await run(backend, job(QUESTION, 40, stop=[" tiers"]))
    assert cut == full[: full.index(" tiers")] and finished.reason == "stop"
    _, short = await run(backend, job(QUESTION, 3))
    assert (short.reason, short.completion_tokens) == ("length", 3)


async def test_a_lora_per_request_matches_peft(backend: VllmBackend, tmp_path: Path) -> None:
    source = make_adapter(DEMO, tmp_path / "lora", seed=5)
    manifest = write_version(source, tmp_path / "registry", "helper", backend.base_model)
    folder = tmp_path / "registry" / "helper" / str(manifest.version)
    await backend.load_adapter("helper", 1, folder)
    tuned, base = await asyncio.gather(
        run(backend, job(QUESTION, model="helper")), run(backend, job(QUESTION))
    )
    assert tuned[0] == peft_greedy(DEMO, folder, 24) != base[0]
    assert backend.adapters == {"helper": 1}


async def test_closing_the_stream_aborts_the_request(backend: VllmBackend) -> None:
    stream = backend.generate(job(QUESTION, 900, min_tokens=900))
    async for event in stream:
        if isinstance(event, TextDelta) and event.text:
            break
    await stream.aclose()
    await asyncio.sleep(0.5)
    assert backend.engine.output_processor.get_num_unfinished_requests() == 0


async def test_a_second_request_with_the_same_prefix_reads_only_the_rest(
    backend: VllmBackend,
) -> None:
    tiers = "The four tiers: portfolio, project, briefing and the session log. " * 30
    first = await run(backend, job(tiers + "What is the first tier?"))
    second = await run(backend, job(tiers + "And what does the phone do?"))
    assert first[1].cached_tokens == 0
    assert 0 < second[1].cached_tokens < second[1].prompt_tokens
    # vLLM caches whole blocks: all of them but the one where the prompts part.
    assert second[1].cached_tokens >= second[1].prompt_tokens // 2


async def test_structured_outputs_tool_calls_and_logprobs(backend: VllmBackend) -> None:
    """The same constraints as the other backends, through vLLM's structured outputs
    (llguidance): sampled JSON validates, a required call parses, and the greedy
    tokens' log probabilities are the model's own."""
    import json
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_worker.backends.tool_calls import CallParser
    from proto.messages import ResponseFormat, ToolSpec, ToolUse
    from tests.schemas import TASK_SCHEMA, valid_task
    from trainer_job.continuity_corpus import TOOLS

    structured = ResponseFormat(type="json_schema", json_schema=TASK_SCHEMA)
    sampled = [
        job("Describe the next task.", 300, temperature=1.0, seed=seed).model_copy(
            update={"response_format": structured}
        )
        for seed in range(4)
    ]
    for text, finished in await asyncio.gather(*(run(backend, chat) for chat in sampled)):
        assert finished.reason == "stop", text
        valid_task(json.loads(text))

    use = ToolUse(tools=[ToolSpec(**t["function"]) for t in TOOLS], choice="required")
    text, _ = await run(backend, job("Show me the log tier.", 60).model_copy(update={"tools": use}))
    assert backend.tool_family is not None
    parser = CallParser(backend.tool_family.MARKER)
    assert parser.feed(text) + parser.flush() == ""
    assert [c.name for c in parser.calls()] == ["read_tier"]

    chat = job(QUESTION, 5, repetition_penalty=1.0).model_copy(update={"logprobs": 2})
    logprobs = [
        lp
        async for event in backend.generate(chat)
        if isinstance(event, TextDelta)
        for lp in event.logprobs or ()
    ]
    assert len(logprobs) == 5
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=False
    )
    with torch.inference_mode():
        rows = model(torch.tensor([prompt + [lp.token_id for lp in logprobs]])).logits[0]
    expected = rows.log_softmax(-1)
    for place, entry in enumerate(logprobs):
        row = expected[len(prompt) - 1 + place]
        assert math.isclose(entry.logprob, float(row[entry.token_id]), abs_tol=1e-3)
        assert [alt.token_id for alt in entry.top] == row.topk(2).indices.tolist()
