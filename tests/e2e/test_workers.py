"""Two real worker processes behind one gateway: GPU-class priority first, overflow
to the other, redelivery when a worker is killed, poison jobs set aside, and a
draining SIGTERM. (Both run on CPU here; one is given the GPU priority class.)"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import httpx
import pytest
import redis.asyncio as redis

from proto.messages import WorkerStatus
from services import liveness
from services.bus import Topology
from services.launcher import MeshProcesses
from services.redis_client import Keys
from services.settings import MeshSettings
from tests.conftest import SYSTEM_PROMPT, free_port, mesh_env, remove_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]
GPU = {"MESH_PRIORITY": "10", "MESH_CAPACITY": "1", "MESH_WORKER_ID": "gpu", "MESH_SITE": "desktop"}
CPU = {"MESH_PRIORITY": "0", "MESH_CAPACITY": "1", "MESH_WORKER_ID": "cpu", "MESH_SITE": "vps"}
QUESTION = "What is the four-tier handoff system?"
# min_tokens keeps the model talking for ~1.5 s; greedy, so the text is known.
LONG = {"message": QUESTION, "temperature": 0, "max_tokens": 700, "min_tokens": 700}


class Pair:
    def __init__(self, namespace: str, logs: Path) -> None:
        self.settings = MeshSettings(namespace=namespace)
        port = free_port()
        self.api_key = secrets.token_urlsafe(16)
        env = mesh_env(namespace, port, self.api_key, MESH_MAX_DELIVERIES="2")
        self.mesh = MeshProcesses(env, "127.0.0.1", port, output=logs)
        self.headers = {"Authorization": f"Bearer {self.api_key}"}

    def start_worker(self, env: dict[str, str]) -> None:
        self.mesh.start_process(env["MESH_WORKER_ID"], "inference_worker", env)

    async def status(self) -> dict[str, WorkerStatus]:
        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        try:
            workers = await liveness.live_workers(client, Keys(self.settings.namespace))
        finally:
            await client.aclose()
        return {w.worker_id: w for w in workers}

    async def wait_for(
        self, check: Callable[[dict[str, WorkerStatus]], bool], timeout_s: float = 60
    ) -> dict[str, WorkerStatus]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.status()
            if check(status):
                return status
            assert time.monotonic() < deadline, f"timed out; workers: {status}"
            await asyncio.sleep(0.1)

    def kill(self, name: str) -> None:
        child = self.mesh.children.pop(name)
        child.send_signal(signal.SIGKILL)
        child.wait()


@pytest.fixture
async def pair(namespace: str, demo_model: Path, tmp_path: Path) -> AsyncIterator[Pair]:
    ns = f"{namespace}-w{secrets.token_hex(2)}"
    pair = Pair(ns, tmp_path / "logs")
    pair.mesh.start_process("gateway", "gateway")
    pair.start_worker(GPU)
    pair.start_worker(CPU)
    try:
        await asyncio.to_thread(pair.mesh.wait_ready, 120)
        await pair.wait_for(lambda s: {"gpu", "cpu"} <= s.keys())
        yield pair
    finally:
        pair.mesh.stop()
        await remove_namespace(pair.settings)


@pytest.fixture(scope="module")
def long_answer(reference_greedy: Callable[..., tuple[str, int, int]]) -> Iterator[str]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    yield reference_greedy(messages, 700, min_tokens=700)[0]


def completed(status: dict[str, WorkerStatus]) -> dict[str, int]:
    return {name: w.jobs_completed for name, w in status.items()}


async def test_the_gpu_class_takes_work_first_and_the_cpu_takes_the_overflow(pair: Pair) -> None:
    async with httpx.AsyncClient(base_url=pair.mesh.url, headers=pair.headers, timeout=60) as http:
        for done in range(1, 5):  # one at a time: the GPU worker always has room
            assert (await http.post("/chat", json={"message": "hi", "max_tokens": 8})).is_success
            # The answer can arrive before the worker's ack reaches the broker; until
            # then the GPU worker has no credit and the next job would go to the CPU.
            await pair.wait_for(
                lambda s, done=done: (
                    completed(s) == {"gpu": done, "cpu": 0} and s["gpu"].in_flight == 0
                )
            )

        # The GPU worker is busy (capacity 1): the next job overflows to the CPU worker.
        first = asyncio.create_task(http.post("/chat", json=LONG))
        await pair.wait_for(lambda s: s["gpu"].in_flight == 1)
        second = asyncio.create_task(http.post("/chat", json=LONG))
        await pair.wait_for(lambda s: s["cpu"].in_flight == 1)
        assert all(r.is_success for r in await asyncio.gather(first, second))

        pair.kill("gpu")  # the desktop goes to sleep: everything goes to the VPS
        for _ in range(3):
            assert (await http.post("/chat", json={"message": "hi", "max_tokens": 8})).is_success
        await pair.wait_for(lambda s: s["cpu"].jobs_completed == 4)


async def test_a_killed_worker_job_is_answered_once_by_another(
    pair: Pair, long_answer: str
) -> None:
    async with httpx.AsyncClient(base_url=pair.mesh.url, headers=pair.headers, timeout=60) as http:
        request = asyncio.create_task(http.post("/chat", json=LONG))
        await pair.wait_for(lambda s: s["gpu"].in_flight == 1)
        await asyncio.sleep(0.4)  # part of the answer is on its way
        pair.kill("gpu")
        response = await request
    assert response.status_code == 200, response.text
    assert response.json()["response"] == long_answer  # whole, once, no mix
    await pair.wait_for(lambda s: s["cpu"].jobs_completed == 1)


async def test_a_killed_worker_mid_stream_ends_in_a_clear_error(
    pair: Pair, long_answer: str
) -> None:
    received = []
    async with (
        httpx.AsyncClient(base_url=pair.mesh.url, headers=pair.headers, timeout=60) as http,
        http.stream("POST", "/chat/stream", json=LONG) as stream,
    ):
        events = stream.aiter_lines()
        async for line in events:
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
                if len(received) == 3:
                    pair.kill("gpu")
                    break
        async for line in events:
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
    *chunks, last = received
    assert last["error"]["code"] == "worker_lost"
    text = "".join(chunk["text"] for chunk in chunks)
    assert long_answer.startswith(text)  # what arrived is a true prefix, nothing mixed in


async def test_a_poison_job_is_set_aside_and_other_jobs_keep_flowing(pair: Pair) -> None:
    pair.kill("cpu")  # one worker, killed each time it takes the job
    async with httpx.AsyncClient(base_url=pair.mesh.url, headers=pair.headers, timeout=90) as http:
        request = asyncio.create_task(http.post("/chat", json=LONG))
        since = datetime.now(UTC) - timedelta(minutes=5)
        for _ in range(2):  # MESH_MAX_DELIVERIES=2: two deliveries, both fatal

            def fresh_and_busy(s: dict[str, WorkerStatus], after: datetime = since) -> bool:
                return "gpu" in s and s["gpu"].started_at > after and s["gpu"].in_flight == 1

            await pair.wait_for(fresh_and_busy)
            pair.kill("gpu")
            since = datetime.now(UTC)
            pair.start_worker(GPU)
        response = await request
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "poison_job" and "set aside" in error["message"]
        assert (await http.post("/chat", json={"message": "hi", "max_tokens": 8})).is_success
    connection = await aio_pika.connect(pair.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        topology = Topology(pair.settings.namespace, pair.settings.model_family)
        dead = await channel.declare_queue(topology.dead_letter_queue, passive=True)
        assert dead.declaration_result.message_count == 1
        await channel.queue_delete(topology.dead_letter_queue)


async def test_sigterm_drains_the_running_job_before_exiting(pair: Pair, long_answer: str) -> None:
    pair.kill("cpu")
    async with httpx.AsyncClient(base_url=pair.mesh.url, headers=pair.headers, timeout=60) as http:
        request = asyncio.create_task(http.post("/chat", json=LONG))
        await pair.wait_for(lambda s: s["gpu"].in_flight == 1)
        worker = pair.mesh.children.pop("gpu")
        worker.send_signal(signal.SIGTERM)
        response = await request
        assert response.status_code == 200 and response.json()["response"] == long_answer
        assert await asyncio.to_thread(worker.wait, 30) == 0
