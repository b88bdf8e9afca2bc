"""The bus across faults: a requester that is gone, and a broker restarted under jobs
in flight. The restarts happen on a private RabbitMQ node (services.private_servers),
so no other test sees the outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest

from proto.messages import (
    ChatJob,
    ChatMessage,
    JobResult,
    SamplingParams,
    TokenChunk,
    Usage,
)
from services.bus import JobClient, StreamRestarted, Topology, WorkerBus
from services.errors import BusUnavailable, RequesterGone
from services.private_servers import PrivateRabbit
from services.settings import MeshSettings

pytestmark = pytest.mark.integration
ANSWER = [chr(ord("a") + n) for n in range(20)]  # one answer's chunks, 50 ms apart


def job(text: str, stream: bool = False) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=text)],
        sampling=SamplingParams(max_tokens=16, temperature=0, top_p=1, repetition_penalty=1),
        stream=stream,
        created_at=datetime.now(UTC),
    )


def result(job_id: str, seq: int) -> JobResult:
    return JobResult(
        job_id=job_id,
        seq=seq,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=seq),
        worker_id="w",
    )


async def test_a_reply_to_a_queue_that_is_gone_raises_requester_gone(namespace: str) -> None:
    topology = Topology(f"{namespace}-gone", "mistral")
    worker = WorkerBus(topology, "w-gone", capacity=1)
    await worker.start(MeshSettings().amqp_url)
    try:
        with pytest.raises(RequesterGone):
            await worker.reply(
                f"{namespace}.replies.nobody",
                TokenChunk(job_id="j", seq=0, text="a", token_count=1),
            )
        # the channel is still usable: a reply to a live queue goes through
        client = JobClient(topology, f"c-{uuid.uuid4().hex[:6]}")
        await client.start(MeshSettings().amqp_url)
        await worker.reply(
            client._reply_queue_name, TokenChunk(job_id="j", seq=0, text="a", token_count=1)
        )
        await client.close()
    finally:
        await worker.close()


@pytest.fixture(scope="module")
async def rabbit(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrivateRabbit]:
    if not PrivateRabbit.available():
        pytest.skip("needs rabbitmq-server (Debian's package)")
    node = PrivateRabbit(Path(tmp_path_factory.mktemp("rabbit")))
    try:
        await asyncio.to_thread(node.start)
        yield node
    finally:
        await asyncio.to_thread(node.shutdown)


class ScriptedWorker:
    """A worker on the real bus whose jobs answer as their text says:
    "hold" (first delivery: take it, answer nothing until the broker goes), "part"
    (one chunk first), anything else at once: ANSWER, a chunk every 50 ms (as a model
    decodes), and a result. It stops a job it is told to cancel, between chunks, and
    acks a job whose requester is gone."""

    def __init__(self, topology: Topology) -> None:
        self.bus = WorkerBus(topology, f"w-{uuid.uuid4().hex[:6]}", capacity=8)
        self.deliveries: list[str] = []
        self.finished = 0
        self.cancels: set[str] = set()
        self.answered: list[str] = []
        self.lost = asyncio.Event()

    async def start(self, url: str) -> None:
        await self.bus.start(url)
        self.bus._connection.close_callbacks.add(lambda *_: self.lost.set())  # type: ignore[union-attr]
        await self.bus.consume_control(lambda c: self.cancels.add(c.job_id))
        await self.bus.consume(self.handle)

    async def handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        item = ChatJob.model_validate_json(message.body)
        self.deliveries.append(item.job_id)
        text = item.messages[-1].content
        first_time = not message.redelivered and "-r" not in item.job_id
        reply_to = message.reply_to or ""
        try:
            if text == "hold" and first_time:
                await self.lost.wait()
            for seq, piece in enumerate(ANSWER):
                if seq and item.job_id in self.cancels:
                    await message.ack()
                    return
                chunk = TokenChunk(job_id=item.job_id, seq=seq, text=piece, token_count=1)
                await self.bus.reply(reply_to, chunk)
                if seq == 0 and text == "part" and first_time:
                    await self.lost.wait()
                await asyncio.sleep(0.05)
            await self.bus.reply(reply_to, result(item.job_id, len(ANSWER)))
            self.answered.append(item.job_id)
            await message.ack()
        except RequesterGone:
            await message.ack()
        except (BusUnavailable, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
            pass  # the connection is gone: the broker has the job back
        finally:
            self.finished += 1


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def texts(stream: AsyncIterator[object]) -> list[str]:
    seen = []
    async for reply in stream:
        if isinstance(reply, StreamRestarted):
            seen.clear()
        elif isinstance(reply, TokenChunk):
            seen.append(reply.text)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["stop_app", "restart"])
async def test_jobs_in_flight_across_a_broker_outage(rabbit: PrivateRabbit, outage: str) -> None:
    topology = Topology(f"faults-{uuid.uuid4().hex[:6]}", "mistral")
    client = JobClient(topology, f"c-{uuid.uuid4().hex[:6]}")
    await client.start(rabbit.url)
    worker = ScriptedWorker(topology)
    await worker.start(rabbit.url)
    held, part = job("hold"), job("part")
    waiting = job("hold", stream=True)  # a stream that has received nothing yet
    streams = {j.job_id: await client.submit(j, timeout_s=90) for j in (held, part, waiting)}
    streamed = await client.submit(job("part", stream=True), timeout_s=90)
    assert isinstance(await asyncio.wait_for(anext(streamed), 10), TokenChunk)
    await eventually(
        lambda: len(worker.deliveries) == 4 and streams[part.job_id].received == 1,
        "every job on the worker, the plain 'part' job's chunk received",
    )

    if outage == "stop_app":
        await asyncio.to_thread(rabbit.stop_app)
    else:
        await asyncio.to_thread(rabbit.stop)
    # A stream already partly received cannot start over: it ends at once, clearly.
    with pytest.raises(BusUnavailable) as lost:
        await asyncio.wait_for(anext(streamed), 10)
    assert lost.value.code == "stream_interrupted"
    streamed.close()
    # New work is refused while the broker is away, not queued in the gateway.
    with pytest.raises(BusUnavailable):
        await client.submit(job("new"), timeout_s=5)
    await asyncio.sleep(2)
    await asyncio.to_thread(rabbit.start_app if outage == "stop_app" else rabbit.start)

    # Every caller that can take a fresh start gets its whole answer, once.
    answers = await asyncio.wait_for(
        asyncio.gather(*(texts(s) for s in streams.values())), timeout=60
    )
    assert answers == [ANSWER] * 3
    for stream in streams.values():
        stream.close()
    assert client.resubmitted == 3
    # Only the new attempts ran to the end: an attempt from before the outage that the
    # broker delivered again was stopped (cancelled, or its reply queue was not back).
    await eventually(lambda: worker.finished == len(worker.deliveries), "every job handled")
    assert sorted(worker.answered) == sorted(f"{j.job_id}-r2" for j in (held, part, waiting))
    await worker.bus.close()
    assert await client.queue_depth() == 0  # nothing left behind, nothing unacked
    await client.close()


async def test_a_job_waits_no_longer_than_the_outage_grace(rabbit: PrivateRabbit) -> None:
    topology = Topology(f"faults-{uuid.uuid4().hex[:6]}", "mistral")
    client = JobClient(topology, f"c-{uuid.uuid4().hex[:6]}", outage_grace_s=1.0)
    await client.start(rabbit.url)
    worker = ScriptedWorker(topology)
    await worker.start(rabbit.url)
    stream = await client.submit(job("hold"), timeout_s=90)
    await eventually(lambda: bool(worker.deliveries), "the job delivered")
    await asyncio.to_thread(rabbit.stop_app)
    try:
        with pytest.raises(BusUnavailable, match="unreachable for 1 s"):
            await asyncio.wait_for(anext(stream), 20)
    finally:
        stream.close()
        await asyncio.to_thread(rabbit.start_app)
        await worker.bus.close()
        await client.close()
