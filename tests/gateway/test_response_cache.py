"""Which requests the response cache may answer, and what its key covers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from gateway.response_cache import ResponseCache
from proto.messages import ChatJob, ChatMessage, SamplingParams


class Workers:
    """What live workers serve: (base model, {adapter: version}) each."""

    def __init__(self, *served: tuple[str, dict[str, int]]) -> None:
        self.records: list[Any] = [SimpleNamespace(base_model=b, adapters=a) for b, a in served]


def job(model: str | None = None, **sampling: Any) -> ChatJob:
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.1}
    return ChatJob(
        job_id=uuid.uuid4().hex,
        model=model,
        messages=[ChatMessage(role="user", content="hi")],
        sampling=SamplingParams(**{**params, **sampling}),
        created_at=datetime.now(UTC),
    )


class Keys:
    """The cache's key for a job, as the chat service asks it with these live workers."""

    def __init__(self, workers: Workers) -> None:
        self.cache = ResponseCache(None, "ns", 60)  # type: ignore[arg-type]  # keys only: no Redis
        self.workers = workers

    async def _response_key(self, job: ChatJob, scope: str | None) -> str | None:
        return self.cache.key_for(job, scope, self.workers.records)


def generation(workers: Workers) -> Keys:
    return Keys(workers)


async def test_only_determined_answers_of_one_model_have_a_key() -> None:
    one = generation(Workers(("demo", {"continuity": 2}), ("demo", {"continuity": 2})))
    assert await one._response_key(job(), "key-a") is not None
    assert await one._response_key(job(temperature=0.7, seed=3), "key-a") is not None
    assert await one._response_key(job(temperature=0.7), "key-a") is None  # a fresh draw
    assert await one._response_key(job(), None) is None  # no key to scope it by
    assert await one._response_key(job("continuity"), "key-a") is not None
    rollout = generation(Workers(("demo", {"continuity": 2}), ("demo", {"continuity": 3})))
    assert await rollout._response_key(job("continuity"), "key-a") is None
    partial = generation(Workers(("demo", {"continuity": 2}), ("demo", {})))
    assert await partial._response_key(job("continuity"), "key-a") is None


async def test_the_key_covers_the_api_key_the_adapter_version_and_every_option() -> None:
    v2 = generation(Workers(("demo", {"continuity": 2})))
    v3 = generation(Workers(("demo", {"continuity": 3})))
    same = job("continuity")
    key = await v2._response_key(same, "key-a")
    assert key == await v2._response_key(same.model_copy(update={"job_id": "other"}), "key-a")
    assert key != await v3._response_key(same, "key-a")  # a new version: never an old answer
    assert key != await v2._response_key(same, "key-b")
    assert key != await v2._response_key(job(), "key-a")  # the base model
    for option in ({"max_tokens": 9}, {"repetition_penalty": 1.2}, {"stop": ["x"]}, {"seed": 1}):
        assert key != await v2._response_key(job("continuity", **option), "key-a")
    other_prompt = same.model_copy(update={"messages": [ChatMessage(role="user", content="ho")]})
    assert key != await v2._response_key(other_prompt, "key-a")
