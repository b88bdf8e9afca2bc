"""The caches as users and operators see them, against the running processes: the
worker's prefix cache in every route's usage, /info and /metrics; the gateway's
response cache (per key, only for determined answers, a hit costs no worker)."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis.asyncio as redis

from gateway.keys import KeyStore
from services.launcher import MeshProcesses
from services.redis_client import Keys
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
MODEL = "demo-model"
SYSTEM = "You answer for the owner. Their tiers: portfolio, project, briefing, log. " * 8


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def cached_tokens(usage: dict) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def sse_data(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_every_route_reports_the_prompt_tokens_the_worker_had_cached(mesh: MeshProcesses) -> None:
    key = mesh.api_key  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=key, max_retries=0)

    def chat(question: str, **extra: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=8,
            temperature=0,
            **extra,  # type: ignore[arg-type]
        )

    chat("What is the first tier?")
    warm = chat("And what does the phone do?")
    assert warm.usage is not None and warm.usage.prompt_tokens_details is not None
    cached = warm.usage.prompt_tokens_details.cached_tokens or 0
    assert 100 < cached < warm.usage.prompt_tokens  # the system prompt, not the question

    stream = chat("And the gateway?", stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[0].prompt_tokens_details.cached_tokens > 100  # type: ignore[union-attr]

    prompt = "[INST] " + SYSTEM + " What is a tier? [/INST]"
    for _ in range(2):
        completion = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0
        )
    usage_of = completion.usage
    assert usage_of is not None and usage_of.prompt_tokens_details is not None
    assert (usage_of.prompt_tokens_details.cached_tokens or 0) >= usage_of.prompt_tokens - 16
    streamed_completion = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in streamed_completion if chunk.usage is not None]
    assert usage[0].prompt_tokens_details.cached_tokens >= usage[0].prompt_tokens - 16  # type: ignore[union-attr]

    # /chat: the system prompt and tiers lead every prompt.
    body = {"message": "Hello", "max_tokens": 4, "temperature": 0}
    first = httpx.post(f"{mesh.url}/chat", json=body, headers=auth(key), timeout=60).json()
    again = {**body, "conversation_id": first["conversation_id"]}
    second = httpx.post(f"{mesh.url}/chat", json=again, headers=auth(key), timeout=60).json()
    assert cached_tokens(second["usage"]) > 0
    streamed = httpx.post(f"{mesh.url}/chat/stream", json=body, headers=auth(key), timeout=60)
    done = [e for e in sse_data(streamed.text) if "finish_reason" in e]
    assert cached_tokens(done[0]["usage"]) > 0

    # Liveness records are refreshed every heartbeat and read by the gateway at most
    # once a second: wait (boundedly) for one that has seen these chats.
    deadline = time.monotonic() + 15
    while True:
        info = httpx.get(f"{mesh.url}/info", headers=auth(key), timeout=10).json()
        workers = [w for site in info["workers"].values() for ws in site.values() for w in ws]
        caches = [w["prefix_cache"] for w in workers if w["prefix_cache"]]
        if any(c["bytes"] > 0 and c["hit_rate"] for c in caches) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(cache["capacity_bytes"] > 0 for cache in caches)
    assert any(cache["bytes"] > 0 and 0 < cache["hit_rate"] < 1 for cache in caches), caches

    metrics = httpx.get(f"{mesh.url}/metrics", headers=auth(key), timeout=10).text
    hits = re.findall(r"^mesh_worker_prefix_cache_hit_tokens_total\{.*\} (\S+)$", metrics, re.M)
    assert any(float(hit) > 0 for hit in hits)
    assert re.search(r"^mesh_worker_prefix_cache_bytes\{.*\} [1-9]", metrics, re.M)
    assert re.search(r"^mesh_cached_prompt_tokens_total [1-9]", metrics, re.M)


@pytest.fixture(scope="module")
def caching_gateway(mesh: MeshProcesses) -> Iterator[str]:
    """A second gateway on the running mesh, with the response cache on."""
    port = free_port()
    mesh.start_process(
        "gateway-cache", "gateway", {"MESH_HTTP_PORT": str(port), "MESH_RESPONSE_CACHE_TTL_S": "60"}
    )
    try:
        MeshProcesses(mesh.env, "127.0.0.1", port).wait_ready(60)
        yield f"http://127.0.0.1:{port}"
    finally:
        mesh.stop_process("gateway-cache")


async def answered_jobs(http: httpx.AsyncClient, url: str, key: str) -> float:
    metrics = (await http.get(f"{url}/metrics", headers=auth(key))).text
    found = re.search(r'^mesh_jobs_total\{outcome="answered"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


async def test_the_response_cache_serves_a_key_its_own_determined_answers(
    mesh: MeshProcesses, caching_gateway: str, redis_client: redis.Redis, namespace: str
) -> None:
    key = mesh.api_key  # type: ignore[attr-defined]
    other = secrets.token_urlsafe(16)
    await KeyStore(redis_client, Keys(namespace)).add(other, "other", ["chat"])
    url = f"{caching_gateway}/v1/chat/completions"
    question = f"Cache probe {secrets.token_hex(4)}: what is a tier?"
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    http = httpx.AsyncClient(timeout=60)

    async def post(payload: dict, api_key: str = key, to: str = url) -> httpx.Response:
        response = await http.post(to, json=payload, headers=auth(api_key))
        assert response.status_code == 200, response.text
        return response

    greedy = {**body, "temperature": 0}
    miss = await post(greedy)
    assert miss.headers["X-Cache"] == "miss"
    jobs = await answered_jobs(http, caching_gateway, key)
    hit = await post(greedy)
    assert hit.headers["X-Cache"] == "hit"
    assert hit.json()["choices"] == miss.json()["choices"]
    assert await answered_jobs(http, caching_gateway, key) == jobs  # no worker was asked

    # Streamed, the same answer comes from the cache as events.
    streamed = await post({**greedy, "stream": True})
    assert streamed.headers["X-Cache"] == "hit"
    events = [e for e in sse_data(streamed.text) if e["choices"]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == miss.json()["choices"][0]["message"]["content"]

    # Never across keys; another option is another answer.
    assert (await post(greedy, other)).headers["X-Cache"] == "miss"
    assert (await post({**greedy, "max_tokens": 7})).headers["X-Cache"] == "miss"
    # A seeded sample is determined too; an unseeded one is never cached.
    seeded = {**body, "temperature": 0.9, "seed": 11}
    assert (await post(seeded)).headers["X-Cache"] == "miss"
    assert (await post(seeded)).headers["X-Cache"] == "hit"
    sampled = {**body, "temperature": 0.9}
    assert "X-Cache" not in (await post(sampled)).headers
    assert "X-Cache" not in (await post(sampled)).headers

    # The gateway without the cache says nothing of it.
    plain = await post(greedy, to=f"{mesh.url}/v1/chat/completions")
    assert "X-Cache" not in plain.headers
    await http.aclose()
