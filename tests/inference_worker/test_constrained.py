"""Constrained decoding, tool calls and log probabilities in every backend that picks
its own tokens: transformers (rows of a shared batch) and both llama.cpp backends,
on the demo model. Sampled at temperature 1.0, the answers still parse and validate;
the log probabilities equal the model's own, computed outside the backend."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from inference_worker.backends.base import Finished, TextDelta
from inference_worker.backends.tool_calls import CallParser
from proto.messages import (
    ChatJob,
    ChatMessage,
    ResponseFormat,
    SamplingParams,
    TokenLogprob,
    ToolSpec,
    ToolUse,
)
from tests.inference_worker.test_llamacpp import need_llama_cpp
from tests.schemas import TASK_SCHEMA, valid_task
from trainer_job.continuity_corpus import TOOLS

pytestmark = pytest.mark.slow
BACKENDS = ("transformers", "llamacpp-batched", "llamacpp-slots")
SPECS = [ToolSpec(**tool["function"]) for tool in TOOLS]


def job(question: str, **options: Any) -> ChatJob:
    sampling = {"max_tokens": 200, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0}
    sampling |= options.pop("sampling", {})
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=question)],
        sampling=SamplingParams(**sampling),
        created_at=datetime.now(UTC),
        **options,
    )


async def run(backend: Any, chat: ChatJob) -> tuple[str, list[TokenLogprob], Finished]:
    text, logprobs = [], []
    finished = None
    async for event in backend.generate(chat):
        if isinstance(event, TextDelta):
            text.append(event.text)
            logprobs += event.logprobs or ()
        else:
            finished = event
    assert finished is not None
    return "".join(text), logprobs, finished


@pytest.fixture(scope="module")
def gguf(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_llama_cpp()
    from services.gguf import export_base

    root = tmp_path_factory.mktemp("gguf")
    export_base(demo_model, root, "demo-model", ["f16"])
    return root / "_base/demo-model/model-f16.gguf"


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    if request.param == "transformers":
        from inference_worker.backends.transformers_backend import TransformersBackend

        served: Any = TransformersBackend(str(demo_model), device="cpu", max_batch=8)
    else:
        from inference_worker.backends.llamacpp_backend import LlamaCppBackend
        from inference_worker.backends.llamacpp_batched import LlamaCppBatchedBackend

        path = request.getfixturevalue("gguf")
        kind = LlamaCppBatchedBackend if request.param == "llamacpp-batched" else LlamaCppBackend
        served = kind(str(path), slots=4)
    await served.start()
    yield served
    await served.close()


async def test_json_schema_answers_validate_at_temperature_one(backend: Any) -> None:
    """Eight sampled answers at once (in one batch where the backend batches)."""
    schema = ResponseFormat(type="json_schema", json_schema=TASK_SCHEMA)
    jobs = [
        job(
            "Describe the next task.",
            response_format=schema,
            sampling={"temperature": 1.0, "seed": seed},
        )
        for seed in range(8)
    ]
    for text, _, finished in await asyncio.gather(*(run(backend, chat) for chat in jobs)):
        assert finished.reason == "stop", text
        valid_task(json.loads(text))


async def test_json_object_is_an_object(backend: Any) -> None:
    text, _, finished = await run(
        backend, job("What is continuity?", response_format=ResponseFormat(type="json_object"))
    )
    assert finished.reason == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize("choice", ["required", "function", "auto"])
async def test_tool_calls_are_written_after_the_marker_and_parse(backend: Any, choice: str) -> None:
    function = "host_status" if choice == "function" else None
    use = ToolUse(tools=SPECS, choice=choice, function=function)  # type: ignore[arg-type]
    text, _, finished = await run(backend, job("Show me the log tier.", tools=use))
    assert finished.reason == "stop"
    parser = CallParser(backend.tool_family.MARKER)
    assert parser.feed(text) + parser.flush() == ""  # nothing before the call
    calls = parser.calls()
    assert len(calls) == 1
    if choice == "function":
        assert calls[0].name == "host_status"
        assert json.loads(calls[0].arguments)["host"] in ("desktop", "vps", "phone")
    else:
        assert (calls[0].name, json.loads(calls[0].arguments)) == ("read_tier", {"tier": "log"})


async def test_without_tools_the_marker_is_never_written(backend: Any) -> None:
    """The demo model calls host_status for this question when tools are offered;
    offered none (or tool_choice none), it must answer in text."""
    text, _, _ = await run(backend, job("Is the vps up?", sampling={"max_tokens": 30}))
    assert backend.tool_family.MARKER not in text and not text.startswith('[{"name"')


async def test_sampled_tool_calls_parse(backend: Any) -> None:
    # Tools whose arguments are enums: a free string (append_log's entry) is where a
    # 4M-parameter model sampling at 1.0 can ramble until max_tokens.
    enums = [spec for spec in SPECS if spec.name != "append_log"]
    use = ToolUse(tools=enums, choice="required", parallel=False)
    for seed in range(4):
        chat = job("Is the phone up?", tools=use, sampling={"temperature": 1.0, "seed": seed})
        text, _, _ = await run(backend, chat)
        parser = CallParser(backend.tool_family.MARKER)
        parser.feed(text)
        calls = parser.calls()
        assert len(calls) == 1 and calls[0].name in {spec.name for spec in enums}


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "json"])
async def test_logprobs_are_the_models_own(
    backend: Any, demo_model: Path, constrained: bool
) -> None:
    """The greedy answer's log probabilities, against a plain forward pass of the
    transformers model over the same tokens (llama.cpp reads the f16 file: close).
    Under a grammar too: they are taken before the grammar's mask (and before
    min_tokens' hold on the end token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if constrained:
        structured = ResponseFormat(type="json_schema", json_schema=TASK_SCHEMA)
        chat = job("What is continuity?", logprobs=3, sampling={"max_tokens": 6})
        chat = chat.model_copy(update={"response_format": structured})
    else:
        sampling = {"max_tokens": 6, "min_tokens": 6}
        chat = job("What is continuity?", logprobs=3, sampling=sampling)
    text, logprobs, finished = await run(backend, chat)
    assert len(logprobs) == finished.completion_tokens == 6
    assert "".join(entry.token for entry in logprobs) == text
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is continuity?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids = prompt + [entry.token_id for entry in logprobs]
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    tolerance = 1e-4 if backend.device == "cpu" else 0.05  # llama.cpp: f16 weights
    for place, entry in enumerate(logprobs):
        row = expected[len(prompt) - 1 + place]
        assert math.isclose(entry.logprob, float(row[entry.token_id]), abs_tol=tolerance)
        if not constrained:  # greedy: the picked token is the most likely
            assert [alt.token_id for alt in entry.top][:1] == [entry.token_id]
        assert len(entry.top) == 3
        assert entry.top == sorted(entry.top, key=lambda alt: -alt.logprob)
        assert all(
            math.isclose(alt.logprob, float(row[alt.token_id]), abs_tol=tolerance)
            for alt in entry.top
        )
