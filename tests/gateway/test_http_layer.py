"""The HTTP layer on its own: the routes over an in-process engine (no broker, no
worker), with Redis for real. What goes in (the job each route makes), what comes
out (bodies, SSE framing) and how every failure reaches a client: before the
answer starts as an HTTP error, after it as the stream's last event."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as redis

from gateway.memory_engine import MODEL, MemoryEngine
from gateway.settings import GatewaySettings
from services.errors import JobFailed, NoWorkers
from services.redis_client import Keys
from tests.conftest import remove_namespace
from tests.gateway.conftest import gateway_client

pytestmark = pytest.mark.integration
KEY = "http-layer-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "You are the test's assistant."


@pytest.fixture
async def engine() -> MemoryEngine:
    return MemoryEngine(adapters={"helper": 3})


@pytest.fixture
async def settings(namespace: str) -> AsyncIterator[GatewaySettings]:
    settings = GatewaySettings(
        namespace=f"{namespace}-http-{uuid.uuid4().hex[:6]}",
        api_key=KEY,
        tokenizer="none",
        system_prompt=SYSTEM,
        max_tokens_cap=64,
        default_max_tokens=32,
    )
    yield settings
    await remove_namespace(settings)


@pytest.fixture
async def client(
    settings: GatewaySettings, engine: MemoryEngine
) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(settings, engine) as http:
        yield http


def sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) of each event of a `/chat/stream` body."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def openai_sse(text: str) -> list[str]:
    """The `data:` payloads of an OpenAI stream, in order."""
    return [block.removeprefix("data: ") for block in text.strip().split("\n\n")]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "code"}
    return body["error"]


async def test_a_chat_turn_is_answered_and_recorded(
    client: httpx.AsyncClient, engine: MemoryEngine
) -> None:
    first = await client.post("/chat", json={"message": "hello there"}, headers=AUTH)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["response"] == "hello there ."
    assert body["finish_reason"] == "stop"
    conversation_id = body["conversation_id"]
    second = await client.post(
        "/chat",
        json={"message": "and again", "conversation_id": conversation_id, "max_tokens": 2},
        headers=AUTH,
    )
    assert second.json()["finish_reason"] == "length"
    job = engine.jobs[-1]
    # The one system-prompt rule, then the history, then the new message.
    assert [(m.role, m.content) for m in job.messages] == [
        ("system", SYSTEM),
        ("user", "hello there"),
        ("assistant", "hello there ."),
        ("user", "and again"),
    ]
    assert job.sampling.max_tokens == 2 and job.stream is False
    history = await client.get(
        "/conversation", params={"conversation_id": conversation_id}, headers=AUTH
    )
    assert [m["content"] for m in history.json()["messages"]] == [
        "hello there",
        "hello there .",
        "and again",
        "and again ",  # cut at max_tokens, before the "."
    ]


async def test_openai_requests_follow_the_same_system_prompt_rule(
    client: httpx.AsyncClient, engine: MemoryEngine
) -> None:
    """The client's own system and developer messages, joined in order; none: none."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "Answer in English."},
    ]
    response = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    assert [(m.role, m.content) for m in engine.jobs[-1].messages] == [
        ("system", "Be brief.\n\nAnswer in English."),
        ("user", "hi"),
    ]
    bare = [{"role": "user", "content": "hi"}]
    await client.post("/v1/chat/completions", json={"model": MODEL, "messages": bare}, headers=AUTH)
    assert [m.role for m in engine.jobs[-1].messages] == ["user"]
    raw = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x y"}, headers=AUTH)
    assert raw.json()["choices"][0]["text"] == "x y ."
    assert engine.jobs[-1].prompt == "x y" and engine.jobs[-1].messages == []


async def test_models_name_what_the_engine_serves(
    client: httpx.AsyncClient, engine: MemoryEngine
) -> None:
    listed = (await client.get("/v1/models", headers=AUTH)).json()["data"]
    assert [(m["id"], m.get("parent")) for m in listed] == [(MODEL, None), ("helper", MODEL)]
    await client.post("/chat", json={"message": "hi", "model": "helper"}, headers=AUTH)
    assert engine.jobs[-1].model == "helper"
    await client.post("/chat", json={"message": "hi", "model": MODEL}, headers=AUTH)
    assert engine.jobs[-1].model is None  # the base model
    unknown = await client.post("/chat", json={"message": "hi", "model": "nope"}, headers=AUTH)
    assert error_of(unknown, 404)["code"] == "model_not_found"
    info = (await client.get("/info", headers=AUTH)).json()
    assert info["models"] == [MODEL] and info["adapters"] == {"helper": MODEL}
    assert info["queue_depth"] == 0
    assert (await client.get("/ready")).json()["ready"] is True


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/chat", {"message": "hi", "max_tokens": 65}, 400, "max_tokens_too_large"),
        ("/chat", {"message": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "invalid_min_tokens"),
        ("/chat", {"message": ""}, 422, "invalid_body"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "unsupported_n"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
            400,
            "too_many_stops",
        ),
        ("/generate", {"prompt": "x", "max_tokens": 100}, 400, "max_tokens_too_large"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "system", "content": "only this"}]},
            400,
            "invalid_messages",
        ),
        (  # beyond int64 (OpenAI's range): refused at the edge, never a worker's 5xx
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "seed": 4471673211359695009604972838912,
            },
            422,
            "invalid_body",
        ),
        ("/chat", {"message": "x", "seed": 2**63}, 422, "invalid_body"),
        (  # the options are checked before anything else is read
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}], "n": 3},
            400,
            "unsupported_n",
        ),
    ],
)
async def test_bad_input_is_a_4xx_with_the_one_error_body(
    client: httpx.AsyncClient,
    engine: MemoryEngine,
    path: str,
    body: dict,
    status: int,
    code: str,
) -> None:
    assert error_of(await client.post(path, json=body, headers=AUTH), status)["code"] == code
    assert engine.jobs == []  # refused before any job


async def test_a_failure_before_the_answer_is_an_http_error(
    client: httpx.AsyncClient, engine: MemoryEngine
) -> None:
    engine.fail_at_start = NoWorkers("no live worker can serve this model")
    for path, body in (
        ("/chat", {"message": "hi"}),
        ("/chat/stream", {"message": "hi"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
    ):
        response = await client.post(path, json=body, headers=AUTH)
        assert error_of(response, 503)["code"] == "no_live_workers"
        assert response.headers["Retry-After"] == "1"


async def test_streams_are_framed_as_sse(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/stream", json={"message": "one two"}, headers=AUTH)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert events[:-1] == [("chunk", {"text": "one "}), ("chunk", {"text": "two "}),
                           ("chunk", {"text": "."})]  # fmt: skip
    kind, done = events[-1]
    assert kind == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 3 and done["conversation_id"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "one"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames = openai_sse((await client.post("/v1/chat/completions", json=body, headers=AUTH)).text)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "one "}
    assert [c["choices"][0].get("finish_reason") for c in chunks[:-1]] == [None, None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


async def test_a_failure_after_the_stream_started_is_its_last_event(
    client: httpx.AsyncClient, engine: MemoryEngine
) -> None:
    engine.fail_after = (1, JobFailed("the worker ran out of memory", "worker_oom", True))
    response = await client.post("/chat/stream", json={"message": "one two"}, headers=AUTH)
    assert response.status_code == 200
    events = sse(response.text)
    assert events == [
        ("chunk", {"text": "one "}),
        (
            "error",
            {
                "error": {
                    "type": "worker_error",
                    "message": "the worker ran out of memory",
                    "code": "worker_oom",
                }
            },
        ),
    ]
    assert engine.aborted == [engine.jobs[-1].job_id]  # the job was stopped, not left running
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a b"}], "stream": True}
    frames = openai_sse((await client.post("/v1/chat/completions", json=body, headers=AUTH)).text)
    assert json.loads(frames[-2])["error"]["code"] == "worker_oom" and frames[-1] == "[DONE]"


async def test_redis_failing_while_the_turn_is_recorded_ends_the_stream_with_an_error(
    client: httpx.AsyncClient, settings: GatewaySettings, redis_client: redis.Redis
) -> None:
    """The answer is complete but recording it fails: the client is told (an `error`
    event, not a cut connection), so it knows the turn is not in the history."""
    owner = (await client.app.services.keys.lookup(KEY)).key_id  # type: ignore[attr-defined]
    # A real Redis error on the recording's last write: its key holds the wrong type.
    await redis_client.set(Keys(settings.namespace).conversation_index(owner), "not a zset")
    response = await client.post("/chat/stream", json={"message": "hi"}, headers=AUTH)
    assert response.status_code == 200
    events = sse(response.text)
    assert [kind for kind, _ in events] == ["chunk", "chunk", "error"]
    assert events[-1][1]["error"]["code"] == "redis_unavailable"
    plain = await client.post("/chat", json={"message": "hi"}, headers=AUTH)
    assert error_of(plain, 503)["code"] == "redis_unavailable"


async def test_openai_message_shapes_reach_the_model_as_one_turn_per_role(
    client: httpx.AsyncClient, engine: MemoryEngine
) -> None:
    """Text parts, `name`, and consecutive messages of one role (what agents send):
    the model gets alternating turns. A part it cannot read is a 400 naming it."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}],
        },
        {"role": "user", "content": "three", "name": "owner"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "four"},
    ]
    response = await client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    assert [(m.role, m.content) for m in engine.jobs[-1].messages] == [
        ("user", "one two\n\nthree"),
        ("assistant", "ok"),
        ("user", "four"),
    ]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    refused = await client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": [image]}]},
        headers=AUTH,
    )
    error = error_of(refused, 400)
    assert error["code"] == "unsupported_content" and "image_url" in error["message"]
    assert len(engine.jobs) == 1
