"""The mesh's processes under a broker outage and a Redis outage, for real.

A gateway and a demo-model worker run on a RabbitMQ node and a redis-server of this
module's own (services.private_servers), so the restarts, pauses and kills here
never reach the shared broker and Redis the other tests use.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
import pytest
import redis.asyncio as redis

from proto.messages import WorkerStatus
from services import liveness
from services.bus import Topology
from services.launcher import MeshProcesses, until_ready
from services.private_servers import PrivateRabbit, PrivateRedis
from services.redis_client import Keys
from tests.conftest import free_port, mesh_env

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]
QUESTION = "What is the four-tier handoff system?"
# Greedy, so every answer to it is the same text; ~4 s of decoding here, two at a time.
MEDIUM = {"message": QUESTION, "temperature": 0, "max_tokens": 600, "min_tokens": 600}


@dataclass
class Site:
    rabbit: PrivateRabbit
    store: PrivateRedis
    mesh: MeshProcesses
    namespace: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.mesh.url

    async def worker(self) -> WorkerStatus:
        client = redis.Redis.from_url(self.store.url, decode_responses=True)
        try:
            [status] = await liveness.live_workers(client, Keys(self.namespace))
            return status
        finally:
            await client.aclose()

    async def settled_worker(self) -> WorkerStatus:
        """The worker's record once it runs nothing and the record is fresh."""
        for _ in range(300):
            try:
                status = await self.worker()
                if status.in_flight == 0:
                    await asyncio.sleep(0.5)  # a record written after the last change
                    return await self.worker()
            except (ValueError, redis.RedisError):
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("the worker never settled")

    async def queue_depth(self) -> int:
        connection = await aio_pika.connect(self.rabbit.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(
                Topology(self.namespace, "mistral").job_queue, passive=True
            )
            return int(queue.declaration_result.message_count or 0)

    async def wait_ready(self, timeout_s: float = 60) -> None:
        await until_ready(self.url, timeout_s)


@pytest.fixture(scope="module")
def site(
    namespace: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    if not (PrivateRabbit.available() and PrivateRedis.available()):
        pytest.skip("needs rabbitmq-server and redis-server (Debian's packages)")
    rabbit = PrivateRabbit(tmp_path_factory.mktemp("rabbit"))
    store = PrivateRedis(tmp_path_factory.mktemp("redis"))
    ns = f"{namespace}-faults"
    api_key = secrets.token_urlsafe(16)
    env = mesh_env(
        ns,
        free_port(),
        api_key,
        MESH_AMQP_URL=rabbit.url,
        MESH_REDIS_URL=store.url,
    )
    env["MESH_CAPACITY"] = "2"
    # One core for the model, one for rabbitmqctl: with both busy decoding, the CLI
    # takes seconds to boot and the outage would land after the answers it is for.
    env["OMP_NUM_THREADS"] = "1"
    mesh = MeshProcesses(
        env, "127.0.0.1", int(env["MESH_HTTP_PORT"]), output=tmp_path_factory.mktemp("logs")
    )
    try:
        rabbit.start()
        store.start()
        mesh.start()
        mesh.wait_ready(timeout_s=120)
        yield Site(rabbit, store, mesh, ns, {"Authorization": f"Bearer {api_key}"})
    finally:
        mesh.stop()
        store.stop()
        rabbit.shutdown()


def sse(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines.get("data", "{}"))))
    return events


class Stream:
    """A streamed chat read to its end in the background."""

    def __init__(self, client: httpx.AsyncClient, site: Site, body: dict[str, object]) -> None:
        self.first_chunk = asyncio.Event()
        self.events: list[tuple[str, dict[str, object]]] = []
        self.task = asyncio.create_task(self._read(client, site, body))

    async def _read(self, client: httpx.AsyncClient, site: Site, body: dict[str, object]) -> None:
        async with client.stream(
            "POST", f"{site.url}/chat/stream", json=body, headers=site.headers
        ) as response:
            assert response.status_code == 200
            buffer = ""
            async for piece in response.aiter_text():
                buffer += piece
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self.events.extend(sse(block + "\n\n"))
                    if self.events and self.events[-1][0] == "chunk":
                        self.first_chunk.set()

    @property
    def text(self) -> str:
        return "".join(str(data.get("text", "")) for kind, data in self.events if kind == "chunk")

    @property
    def last(self) -> str:
        return self.events[-1][0] if self.events else ""


# stop_app: the broker application restarted, the node up. crash: the node killed
# (SIGKILL) and booted again; only what it had on disk survives. (A graceful full
# stop is tested on the bus alone: under this load it takes seconds to begin.)
@pytest.mark.parametrize("outage", ["stop_app", "crash"])
async def test_requests_in_flight_survive_a_broker_outage(site: Site, outage: str) -> None:
    await site.wait_ready()
    async with httpx.AsyncClient(timeout=120) as client:
        reference = (
            await client.post(f"{site.url}/chat", json=MEDIUM, headers=site.headers)
        ).json()
        before = await site.settled_worker()
        # Two jobs running (capacity 2): a plain one, and a stream already partly sent;
        # two more waiting in the queue: a plain one and a stream that has nothing yet.
        running = asyncio.create_task(
            client.post(f"{site.url}/chat", json=MEDIUM, headers=site.headers)
        )
        partly_sent = Stream(client, site, MEDIUM)
        await asyncio.wait_for(partly_sent.first_chunk.wait(), 30)
        queued = asyncio.create_task(
            client.post(f"{site.url}/chat", json=MEDIUM, headers=site.headers)
        )
        not_started = Stream(client, site, MEDIUM)
        await asyncio.sleep(0.3)  # both published

        try:
            if outage == "stop_app":
                await asyncio.to_thread(site.rabbit.stop_app)
            else:
                await asyncio.to_thread(site.rabbit.kill)
            # The outage hit the jobs as intended (else the test says so, not something else).
            kinds = [kind for kind, _ in partly_sent.events]
            assert "done" not in kinds and not not_started.events, "the outage came too late"
            # New requests meanwhile: a prompt 503, not a wait.
            refused = await client.post(f"{site.url}/chat", json=MEDIUM, headers=site.headers)
            assert refused.status_code == 503 and refused.headers.get("retry-after")
            await asyncio.sleep(3)
        finally:
            up = site.rabbit.start_app if outage == "stop_app" else site.rabbit.start
            await asyncio.to_thread(up)

        answers = await asyncio.wait_for(asyncio.gather(running, queued), 90)
        await asyncio.wait_for(asyncio.gather(partly_sent.task, not_started.task), 90)
    # Plain requests: answered in full, once (greedy: the same text as before).
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"] == reference["response"]
    # A stream that had nothing yet: the whole answer, no error.
    assert not_started.last == "done", not_started.events[-2:]
    assert not_started.text == reference["response"]
    # A stream partly sent: what it got is the answer's start, then a clear error.
    assert partly_sent.last == "error", partly_sent.events[-3:]
    assert partly_sent.events[-1][1]["error"]["code"] == "stream_interrupted"  # type: ignore[index]
    assert reference["response"].startswith(partly_sent.text)
    # Nobody's answer generated twice, nothing left behind in the queue.
    after = await site.settled_worker()
    assert after.jobs_completed - before.jobs_completed == 3
    assert await site.queue_depth() == 0


async def test_redis_refusing_then_hung_gives_prompt_503s_and_loses_no_turn(site: Site) -> None:
    await site.wait_ready()
    async with httpx.AsyncClient(timeout=60) as client:
        first = await client.post(
            f"{site.url}/chat",
            json={**MEDIUM, "max_tokens": 8, "min_tokens": 0},
            headers=site.headers,
        )
        assert first.status_code == 200
        conversation = first.json()["conversation_id"]
        # A stream under way when Redis goes away finishes; its turn waits for Redis.
        long_turn = {**MEDIUM, "conversation_id": conversation}
        running = Stream(client, site, long_turn)
        await asyncio.wait_for(running.first_chunk.wait(), 30)
        await asyncio.to_thread(site.store.stop)  # refused
        started = time.monotonic()
        refused = await client.post(f"{site.url}/chat", json=MEDIUM, headers=site.headers)
        refused_s = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "redis_unavailable"
        assert refused.headers.get("retry-after")
        ready = await client.get(f"{site.url}/ready")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        await asyncio.wait_for(running.task, 60)
        assert running.last == "done", running.events[-2:]

        await asyncio.to_thread(site.store.start)  # back, with what it had (AOF)
        await site.wait_ready()
        history = await eventually_history(client, site, conversation, turns=2)
        assert [m["role"] for m in history] == ["user", "assistant"] * 2
        assert history[-1]["content"] == running.text  # the held turn, recorded

        await asyncio.to_thread(site.store.pause)  # hung: accepts, never answers
        try:
            started = time.monotonic()
            hung = await client.post(f"{site.url}/chat", json=MEDIUM, headers=site.headers)
            hung_s = time.monotonic() - started
            assert hung.status_code == 503, hung.text
            assert hung.json()["error"]["code"] == "redis_unavailable"
        finally:
            await asyncio.to_thread(site.store.resume)
        await site.wait_ready()
        again = await client.post(
            f"{site.url}/chat",
            json={**MEDIUM, "max_tokens": 8, "min_tokens": 0},
            headers=site.headers,
        )
        assert again.status_code == 200
    print(f"503 after {refused_s:.2f} s with Redis refusing, {hung_s:.2f} s with it hung")


async def eventually_history(
    client: httpx.AsyncClient, site: Site, conversation: str, turns: int
) -> list[dict[str, str]]:
    for _ in range(100):
        response = await client.get(
            f"{site.url}/conversation",
            headers=site.headers,
            params={"conversation_id": conversation},
        )
        if response.status_code == 200 and len(response.json()["messages"]) >= 2 * turns:
            return list(response.json()["messages"])
        await asyncio.sleep(0.2)
    raise AssertionError(f"the conversation never held {turns} turns: {response.text}")
