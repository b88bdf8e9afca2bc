"""Real OpenAI clients against the running mesh: tools, structured outputs, log
probabilities and who answered, through the official `openai` package (sync and
async, streamed and not) and LangChain's `ChatOpenAI`.

The demo model's template renders tools Mistral's way and its corpus has tool-use
chats; under tool_choice required or a named function, and under a response_format,
its output is grammar-constrained, so even this small model returns valid calls and
valid JSON, at temperature 1.0 too.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from services.launcher import MeshProcesses
from tests.schemas import TASK_SCHEMA, valid_task
from trainer_job.continuity_corpus import TOOLS

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
MODEL = "demo-model"
TIER_QUESTION = [{"role": "user", "content": "Show me the briefing tier."}]


@pytest.fixture(scope="module")
def client(mesh: MeshProcesses) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=mesh.api_key, max_retries=0)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def async_client(mesh: MeshProcesses) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key=mesh.api_key, max_retries=0)  # type: ignore[attr-defined]


# -- tools ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "host_status"}}, "auto"],
    ids=["required", "named", "auto"],
)
def test_a_tool_call_comes_back_in_openai_shape(client: openai.OpenAI, choice: Any) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=TIER_QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice=choice,
        temperature=0,
        max_tokens=60,
    )
    choice_out = completion.choices[0]
    assert choice_out.finish_reason == "tool_calls"
    calls = choice_out.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id
    arguments = json.loads(call.function.arguments)
    if isinstance(choice, dict):  # the named function, even for a question about tiers
        assert call.function.name == "host_status"
        assert arguments["host"] in ("desktop", "vps", "phone")
    else:  # the model picks the right tool for the question
        assert (call.function.name, arguments) == ("read_tier", {"tier": "briefing"})
    assert not choice_out.message.content


def test_a_streamed_tool_call_arrives_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=TIER_QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert pieces and {p.index for p in pieces} == {0}
    name = "".join(p.function.name or "" for p in pieces if p.function)
    arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
    assert (name, json.loads(arguments)) == ("read_tier", {"tier": "briefing"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].system_fingerprint == MODEL


def test_a_tool_result_is_answered(client: openai.OpenAI) -> None:
    """The whole loop: the call, the client runs it, the model answers from the result."""
    first = client.chat.completions.create(
        model=MODEL,
        messages=TIER_QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=60,
    )
    said = first.choices[0].message.model_dump(exclude_none=True)
    assert said["tool_calls"][0]["function"]["name"] == "read_tier"
    # Call ids are random, and the template writes them into the prompt: the one sent
    # back is pinned, so the greedy answer below reads the same prompt on every run.
    said["tool_calls"][0]["id"] = "A1b2C3d4E"
    messages = [
        *TIER_QUESTION,
        said,
        {"role": "tool", "tool_call_id": "A1b2C3d4E", "content": "Goal: ship the release."},
    ]
    second = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=60,
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    # A 4M-parameter model: it answers in the form its tool chats taught it, not always
    # about the right tier.
    assert answer.message.content and " tier says: " in answer.message.content


def test_a_pydantic_tool_with_references_is_called(client: openai.OpenAI) -> None:
    """openai.pydantic_function_tool writes nested models as $defs and $ref."""

    class Where(BaseModel):
        host: Literal["desktop", "vps", "phone"]

    class HostStatus(BaseModel):
        """Whether a host of the mesh is up."""

        where: Where
        also: list[Where] = Field(max_length=2)

    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the desktop up?"}],
        tools=[openai.pydantic_function_tool(HostStatus, name="host_status")],
        tool_choice="required",
        parallel_tool_calls=False,  # the small model repeats a call until max_tokens
        temperature=0,
        max_tokens=80,
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    HostStatus.model_validate_json(call.function.arguments)  # type: ignore[union-attr]


def test_tool_choice_none_and_plain_questions_get_text(client: openai.OpenAI) -> None:
    for choice in ("none", "auto"):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is continuity?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=choice,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=20,
        )
        assert completion.choices[0].message.tool_calls is None
        assert (completion.choices[0].message.content or "").startswith("Continuity means")
    # a question the model answers with a call when it may: under none, text
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the vps up?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    content = completion.choices[0].message.content or ""
    assert completion.choices[0].message.tool_calls is None and not content.startswith("[{")


def test_calls_from_other_clients_and_many_system_messages_are_accepted(
    client: openai.OpenAI,
) -> None:
    """Ids that are not Mistral's nine characters, two system messages, a developer
    message, content as parts, and a conversation that starts with the assistant."""
    messages = [
        {"role": "system", "content": "You are the owner's continuity assistant."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Is the desktop up?", "name": "owner"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_8f3a2b1c9d0e4f5a6b7c8d9e",
                    "type": "function",
                    "function": {"name": "host_status", "arguments": '{"host": "desktop"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_8f3a2b1c9d0e4f5a6b7c8d9e", "content": "up"},
    ]
    # ... and a user turn right after the result (no answer between them)
    for conversation in (messages, [*messages, {"role": "user", "content": "And the vps?"}]):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=conversation,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=30,
        )
        assert completion.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tools_are_a_400_naming_the_problem(client: openai.OpenAI) -> None:
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "missing"}},
            },
            "missing",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "if": {"required": ["a"]}},
                        },
                    }
                ]
            },
            '"if"',
        ),
    ]
    for extra, named in cases:
        # 422 for what the request's own schema refuses (the name's pattern), 400 else
        with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as caught:
            client.chat.completions.create(
                model=MODEL,
                messages=TIER_QUESTION,  # type: ignore[arg-type]
                max_tokens=5,
                **extra,
            )
        assert named in str(caught.value), (extra, caught.value)


# -- structured outputs ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_answers_validate_at_temperature_one(client: openai.OpenAI, seed: int) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the next task."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "task", "schema": TASK_SCHEMA, "strict": True},
        },
        temperature=1.0,
        seed=seed,
        max_tokens=300,
    )
    assert completion.choices[0].finish_reason == "stop"
    valid_task(json.loads(completion.choices[0].message.content or ""))


def test_json_object_streams_an_object(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is continuity? Answer in JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_a_schema_that_cannot_be_enforced_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=TIER_QUESTION,  # type: ignore[arg-type]
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                },
            },
            max_tokens=5,
        )
    assert "uniqueItems" in str(caught.value)
    assert caught.value.code == "unsupported_schema"


# -- log probabilities, and who answered ------------------------------------------------------


def test_chat_logprobs_in_openai_shape(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is continuity?"}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    tokens = choice.logprobs.content  # type: ignore[union-attr]
    assert tokens and len(tokens) == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in tokens) == choice.message.content
    for token in tokens:
        assert len(token.top_logprobs) == 3
        best = token.top_logprobs[0]
        # greedy: the picked token is the most likely one
        assert best.token == token.token and math.isclose(best.logprob, token.logprob)
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
    assert completion.system_fingerprint == MODEL


async def test_streamed_logprobs_and_completions_logprobs(
    async_client: openai.AsyncOpenAI,
) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is continuity?"}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    text, tokens = "", []
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                tokens += chunk.choices[0].logprobs.content
    assert len(tokens) == 8 and "".join(t.token for t in tokens) == text

    completion = await async_client.completions.create(
        model=MODEL, prompt="[INST] What is continuity? [/INST]", max_tokens=6, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 6
    assert "".join(logprobs.tokens or []) == completion.choices[0].text
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])
    assert (logprobs.text_offset or [])[0] == 0


async def test_async_client_streams_a_structured_answer(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the next task."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "t", "schema": TASK_SCHEMA},
        },
        temperature=1.0,
        seed=7,
        max_tokens=300,
        stream=True,
    )
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    valid_task(json.loads(text))


# -- LangChain ------------------------------------------------------------------------------


class Owner(BaseModel):
    site: Literal["desktop", "vps", "phone"]
    shift: int = Field(ge=0, le=3)


class Task(BaseModel):
    """The next task of the project."""

    title: str = Field(max_length=40)
    priority: Literal["low", "normal", "high"]
    tags: list[Annotated[str, Field(max_length=16)]] = Field(min_length=1, max_length=3)
    owner: Owner


def langchain_model(mesh: MeshProcesses, **options: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL,
        base_url=f"{mesh.url}/v1",
        api_key=mesh.api_key,  # type: ignore[attr-defined]
        max_retries=0,
        **options,
    )


def test_langchain_bind_tools_returns_tool_calls(mesh: MeshProcesses) -> None:
    def host_status(host: Literal["desktop", "vps", "phone"]) -> str:
        """Whether a host of the mesh is up."""
        return "up"

    model = langchain_model(mesh, temperature=0, max_tokens=60)
    reply = model.bind_tools([host_status], tool_choice="required").invoke("Is the vps up?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "host_status"
    assert reply.tool_calls[0]["args"]["host"] in ("desktop", "vps", "phone")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_returns_a_validated_object(
    mesh: MeshProcesses, method: str
) -> None:
    model = langchain_model(mesh, temperature=1.0, seed=3, max_tokens=300)
    structured = model.with_structured_output(Task, method=method, strict=True)
    task = structured.invoke("Describe the next task.")
    assert isinstance(task, Task)
