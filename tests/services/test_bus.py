"""The bus against the real RabbitMQ: publish, consume, reply, coalesce, recover."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest

from proto.messages import (
    ChatJob,
    ChatMessage,
    JobError,
    JobResult,
    SamplingParams,
    TokenChunk,
    Usage,
)
from services.bus import JobClient, ReplyStream, Topology, WorkerBus, coalesce
from services.errors import BusUnavailable, JobTimeout
from services.settings import MeshSettings
from tests.conftest import remove_namespace


@pytest.fixture(scope="module")
async def bus_settings(namespace: str) -> AsyncIterator[MeshSettings]:
    """A namespace of this module's own: no other test's worker takes these jobs."""
    settings = MeshSettings(namespace=f"{namespace}-bus")
    yield settings
    await remove_namespace(settings)


@pytest.fixture(scope="module")
def bus_topology(bus_settings: MeshSettings) -> Topology:
    return Topology(bus_settings.namespace, bus_settings.model_family)


def new_job(text: str = "hello world") -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=text)],
        sampling=SamplingParams(max_tokens=16, temperature=0, top_p=1, repetition_penalty=1),
        created_at=datetime.now(UTC),
    )


async def items_with_gaps(values: list[int], gap_after: int, gap_s: float) -> AsyncIterator[int]:
    for index, value in enumerate(values):
        if index == gap_after:
            await asyncio.sleep(gap_s)
        yield value


async def test_coalesce_groups_up_to_max_items() -> None:
    batches = [list(b) async for b in coalesce(items_with_gaps(list(range(21)), -1, 0), 8, 1.0)]
    # the first item alone (time to first token), then full batches
    assert batches == [[0], list(range(1, 9)), list(range(9, 17)), list(range(17, 21))]


async def test_coalesce_flushes_on_the_timer_when_the_source_is_slow() -> None:
    # Three items, then a pause far longer than the flush delay: the first three must
    # not wait for the rest.
    source = items_with_gaps([1, 2, 3, 4], gap_after=3, gap_s=0.3)
    started = time.monotonic()
    arrivals = []
    async for batch in coalesce(source, 8, 0.02):
        arrivals.append((list(batch), time.monotonic() - started))
    assert [b for b, _ in arrivals] == [[1], [2, 3], [4]]
    assert arrivals[0][1] < arrivals[1][1]  # the first batch left before the pause ended


async def test_coalesce_passes_source_errors_through() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("model crashed")

    got = []
    with pytest.raises(RuntimeError, match="model crashed"):
        async for batch in coalesce(failing(), 8, 0.01):
            got.extend(batch)
    assert got == [1]


async def test_reply_stream_refuses_out_of_order_replies() -> None:
    stream = ReplyStream("j", time.monotonic() + 5, lambda: None)
    stream.feed(TokenChunk(job_id="j", seq=0, text="a", token_count=1))
    stream.feed(TokenChunk(job_id="j", seq=2, text="c", token_count=1))
    assert (await anext(stream)).text == "a"  # type: ignore[union-attr]
    with pytest.raises(BusUnavailable, match="arrived where"):
        await anext(stream)


async def test_a_stream_that_starts_over_is_marked_not_mixed() -> None:
    stream = ReplyStream("j", time.monotonic() + 5, lambda: None)
    for seq, text in [(0, "a"), (1, "b"), (0, "A"), (1, "B")]:
        stream.feed(TokenChunk(job_id="j", seq=seq, text=text, token_count=1))
    stream.feed(
        JobResult(
            job_id="j",
            seq=2,
            finish_reason="stop",
            usage=Usage(prompt_tokens=1, completion_tokens=2),
            worker_id="w",
        )
    )
    seen = [item async for item in stream]
    kinds = [type(item).__name__ for item in seen]
    assert kinds == [
        "TokenChunk",
        "TokenChunk",
        "StreamRestarted",
        "TokenChunk",
        "TokenChunk",
        "JobResult",
    ]
    assert [item.text for item in seen if isinstance(item, TokenChunk)] == ["a", "b", "A", "B"]


async def test_reply_stream_times_out_at_its_deadline() -> None:
    stream = ReplyStream("j", time.monotonic() + 0.05, lambda: None)
    with pytest.raises(JobTimeout):
        await anext(stream)


@pytest.mark.integration
async def test_job_round_trip_through_the_broker(
    bus_settings: MeshSettings, bus_topology: Topology
) -> None:
    client = JobClient(bus_topology, f"test-{uuid.uuid4().hex[:8]}")
    await client.start(bus_settings.amqp_url)
    worker = WorkerBus(bus_topology, "w-test", capacity=2)
    await worker.start(bus_settings.amqp_url)
    received: list[ChatJob] = []
    headers: list[dict] = []

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job = ChatJob.model_validate_json(message.body)
        received.append(job)
        headers.append(dict(message.headers))
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        for seq, word in enumerate(["one", " two", " three"]):
            await worker.reply(
                message.reply_to, TokenChunk(job_id=job.job_id, seq=seq, text=word, token_count=1)
            )
        await worker.reply(
            message.reply_to,
            JobResult(
                job_id=job.job_id,
                seq=3,
                finish_reason="stop",
                usage=Usage(prompt_tokens=2, completion_tokens=3),
                worker_id=worker.worker_id,
            ),
        )
        await message.ack()

    await worker.consume(handle)
    try:
        job = new_job()
        stream = await client.submit(job, timeout_s=10)
        replies = [reply async for reply in stream]
        stream.close()
        assert received == [job]
        # type and version for dispatch; what the gateway reads in replies (served_by)
        assert headers[0] == {
            "type": "chat_job",
            "schema_version": 1,
            "x-mesh-reads": "served_by",
        }
        assert "".join(r.text for r in replies if isinstance(r, TokenChunk)) == "one two three"
        assert isinstance(replies[-1], JobResult) and replies[-1].worker_id == "w-test"
    finally:
        await worker.close()
        await client.close()


@pytest.mark.integration
async def test_unacked_job_is_redelivered_when_its_worker_disconnects(
    bus_settings: MeshSettings, bus_topology: Topology
) -> None:
    client = JobClient(bus_topology, f"test-{uuid.uuid4().hex[:8]}")
    await client.start(bus_settings.amqp_url)
    first = WorkerBus(bus_topology, "w-dies", capacity=1)
    await first.start(bus_settings.amqp_url)
    got_it = asyncio.Event()

    async def never_finish(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        got_it.set()  # take the job, then die without acking

    await first.consume(never_finish)
    job = new_job()
    stream = await client.submit(job, timeout_s=15)
    await asyncio.wait_for(got_it.wait(), 5)
    await first.close()

    second = WorkerBus(bus_topology, "w-second", capacity=1)
    await second.start(bus_settings.amqp_url)

    async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert message.redelivered
        await second.reply(
            message.reply_to,
            JobError(job_id=job.job_id, seq=0, code="test", message="ok", retryable=False),
        )
        await message.ack()

    await second.consume(answer)
    try:
        replies = [reply async for reply in stream]
        assert isinstance(replies[-1], JobError) and replies[-1].code == "test"
    finally:
        stream.close()
        await second.close()
        await client.close()


@pytest.mark.integration
async def test_unroutable_job_is_refused_not_lost(bus_settings: MeshSettings) -> None:
    # A family nobody declared a queue for: the broker returns the job and the
    # caller hears about it instead of waiting for an answer that never comes.
    topology = Topology(bus_settings.namespace, "other")
    client = JobClient(topology, f"test-{uuid.uuid4().hex[:8]}")
    await client.start(bus_settings.amqp_url)
    try:
        channel = await client._connection.channel()  # type: ignore[union-attr]
        await channel.queue_delete(topology.job_queue)
        with pytest.raises(BusUnavailable):
            await client.submit(new_job(), timeout_s=5)
    finally:
        await client.close()
