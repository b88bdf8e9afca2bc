"""The job runner over the real RabbitMQ: how an answer is grouped into reply messages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from inference_worker.backends.base import Finished, GenerationEvent, TextDelta
from inference_worker.jobs import JobRunner, Pacing
from proto.messages import ChatJob, ChatMessage, JobResult, SamplingParams, TokenChunk
from services.bus import JobClient, Topology, WorkerBus
from services.settings import MeshSettings
from tests.conftest import remove_namespace

TOKENS = 40


class PacedBackend:
    """One word every 5 ms: a model whose tokens arrive over time."""

    base_model = "paced"
    adapters: dict[str, int] = {}  # noqa: RUF012 - never changes

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        for index in range(TOKENS):
            await asyncio.sleep(0.005)
            yield TextDelta(f" w{index}", 1)
        yield Finished("length", 3, TOKENS)


@pytest.fixture
async def settings(namespace: str) -> AsyncIterator[MeshSettings]:
    settings = MeshSettings(namespace=f"{namespace}-jobs")
    yield settings
    await remove_namespace(settings)


def chat_job(stream: bool) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content="hello")],
        sampling=SamplingParams(max_tokens=TOKENS, temperature=0, top_p=1, repetition_penalty=1),
        created_at=datetime.now(UTC),
        stream=stream,
    )


@pytest.mark.integration
async def test_an_unstreamed_answer_travels_in_fewer_messages(settings: MeshSettings) -> None:
    topology = Topology(settings.namespace, settings.model_family)
    bus = WorkerBus(topology, "w-paced", capacity=2)
    await bus.start(settings.amqp_url)
    runner = JobRunner(PacedBackend(), bus, Pacing(8, 0.02), Pacing(256, 1.0))
    await bus.consume(runner.handle)
    client = JobClient(topology, f"test-{uuid.uuid4().hex[:8]}")
    await client.start(settings.amqp_url)
    try:
        replies = {}
        for stream in (True, False):
            reply_stream = await client.submit(chat_job(stream), timeout_s=10)
            replies[stream] = [reply async for reply in reply_stream]
            reply_stream.close()
    finally:
        await client.close()
        await bus.close()
    expected = "".join(f" w{index}" for index in range(TOKENS))
    for stream, received in replies.items():
        chunks = [r for r in received if isinstance(r, TokenChunk)]
        assert "".join(c.text for c in chunks) == expected, stream
        assert sum(c.token_count for c in chunks) == TOKENS
        assert isinstance(received[-1], JobResult)
    streamed = [r for r in replies[True] if isinstance(r, TokenChunk)]
    unstreamed = [r for r in replies[False] if isinstance(r, TokenChunk)]
    # streamed: every 8 tokens or 20 ms; unstreamed: the first token at once (time to
    # first token stays measurable), then the rest together
    assert len(streamed) >= TOKENS // 8
    assert [c.token_count for c in unstreamed] == [1, TOKENS - 1]
