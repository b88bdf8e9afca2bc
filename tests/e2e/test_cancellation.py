"""Clients that go away: the worker must stop generating within a second.

Measured from the worker's own counters (its liveness record in Redis): tokens
decoded after the disconnect stay under what one second of decoding produces.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from proto.messages import WorkerStatus
from services import liveness
from services.launcher import MeshProcesses, until_ready
from services.redis_client import Keys
from services.settings import MeshSettings
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]
# min_tokens keeps the model talking: about 4 s of decoding on this machine.
LONG = {"message": "Tell me everything.", "max_tokens": 1800, "min_tokens": 1800}


async def worker_status(settings: MeshSettings) -> WorkerStatus:
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        [status] = await liveness.live_workers(client, Keys(settings.namespace))
        return status
    finally:
        await client.aclose()


async def tokens_after_disconnect(settings: MeshSettings, disconnected_at: float) -> int:
    """Tokens the worker decoded from the disconnect until it settled."""
    heartbeat = 0.2
    await asyncio.sleep(heartbeat * 2)  # a record written after the disconnect
    at_disconnect = (await worker_status(settings)).tokens_generated
    await asyncio.sleep(1.5)
    settled = await worker_status(settings)
    assert settled.in_flight == 0
    return settled.tokens_generated - at_disconnect


async def decode_rate(mesh: MeshProcesses) -> float:
    """Tokens per second the worker decodes, measured on a short job."""
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        body = {**LONG, "max_tokens": 300, "min_tokens": 300}
        response = await client.post(f"{mesh.url}/chat", json=body, headers=auth(mesh))
        return response.json()["usage"]["completion_tokens"] / (time.monotonic() - started)


def auth(mesh: MeshProcesses) -> dict[str, str]:
    return {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]


async def test_a_streaming_client_that_leaves_stops_generation(
    mesh: MeshProcesses, mesh_settings: MeshSettings
) -> None:
    rate = await decode_rate(mesh)
    cancelled_before = (await worker_status(mesh_settings)).jobs_cancelled
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{mesh.url}/chat/stream", json=LONG, headers=auth(mesh)) as stream,
    ):
        chunks = 0
        async for line in stream.aiter_lines():
            chunks += line.startswith("event: chunk")
            if chunks == 3:
                break
    disconnected_at = time.monotonic()
    extra = await tokens_after_disconnect(mesh_settings, disconnected_at)
    status = await worker_status(mesh_settings)
    assert status.jobs_cancelled == cancelled_before + 1
    # the stale heartbeat adds up to 0.4 s of tokens to `extra` on top of the lag
    assert extra < rate * 1.0, f"{extra} tokens after the disconnect at {rate:.0f} tokens/s"


async def test_a_non_streaming_client_that_leaves_stops_generation(
    mesh: MeshProcesses, mesh_settings: MeshSettings
) -> None:
    rate = await decode_rate(mesh)
    cancelled_before = (await worker_status(mesh_settings)).jobs_cancelled
    async with httpx.AsyncClient(timeout=60) as client:
        request = asyncio.create_task(
            client.post(f"{mesh.url}/chat", json=LONG, headers=auth(mesh))
        )
        await asyncio.sleep(0.8)  # generating by now
        request.cancel()  # the client gives up and closes its connection
        with pytest.raises(asyncio.CancelledError):
            await request
    disconnected_at = time.monotonic()
    extra = await tokens_after_disconnect(mesh_settings, disconnected_at)
    status = await worker_status(mesh_settings)
    assert status.jobs_cancelled == cancelled_before + 1
    assert extra < rate * 1.0, f"{extra} tokens after the disconnect at {rate:.0f} tokens/s"


async def test_past_the_deadline_the_client_gets_504_and_the_job_stops(
    mesh: MeshProcesses, mesh_settings: MeshSettings
) -> None:
    # A second gateway on the same mesh with a 1-second deadline.
    port = free_port()
    mesh.start_process(
        "gateway-short",
        "gateway",
        {
            "MESH_HTTP_PORT": str(port),
            "MESH_REQUEST_TIMEOUT_S": "1",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await until_ready(url, 20)
            rate = await decode_rate(mesh)
            cancelled_before = (await worker_status(mesh_settings)).jobs_cancelled
            response = await client.post(f"{url}/chat", json=LONG, headers=auth(mesh))
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "timeout"
        extra = await tokens_after_disconnect(mesh_settings, time.monotonic())
        assert (await worker_status(mesh_settings)).jobs_cancelled == cancelled_before + 1
        assert extra < rate * 1.0
    finally:
        mesh.stop_process("gateway-short")


async def test_conversations_survive_a_gateway_restart(mesh: MeshProcesses) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        first = await client.post(
            f"{mesh.url}/chat",
            headers=auth(mesh),
            json={"message": "What is continuity?", "max_tokens": 16},
        )
        conversation_id = first.json()["conversation_id"]
        before = (
            await client.get(
                f"{mesh.url}/conversation",
                headers=auth(mesh),
                params={"conversation_id": conversation_id},
            )
        ).json()
    mesh.stop_process("gateway")
    mesh.start_process("gateway", "gateway")
    await asyncio.to_thread(mesh.wait_ready, 60)
    async with httpx.AsyncClient(timeout=60) as client:
        after = (
            await client.get(
                f"{mesh.url}/conversation",
                headers=auth(mesh),
                params={"conversation_id": conversation_id},
            )
        ).json()
        assert after == before and len(after["messages"]) == 2
        more = await client.post(
            f"{mesh.url}/chat",
            headers=auth(mesh),
            json={"message": "And the log?", "conversation_id": conversation_id, "max_tokens": 16},
        )
        assert more.status_code == 200
        history = (
            await client.get(
                f"{mesh.url}/conversation",
                headers=auth(mesh),
                params={"conversation_id": conversation_id},
            )
        ).json()
        assert len(history["messages"]) == 4


async def test_a_gateway_killed_mid_answer_leaves_its_worker_idle_within_a_second(
    mesh: MeshProcesses, mesh_settings: MeshSettings
) -> None:
    """The requesting gateway dies (SIGKILL: no cancel is sent) with a streamed and a
    plain answer under way. Its reply queue dies with its connection; the worker's
    next reply for each comes back from the broker, and it stops both jobs."""
    port = free_port()
    mesh.start_process("gateway-doomed", "gateway", {"MESH_HTTP_PORT": str(port)})
    url = f"http://127.0.0.1:{port}"
    log_file = mesh.output / "worker.log"  # type: ignore[operator]
    async with httpx.AsyncClient(timeout=60) as client:
        await until_ready(url, 20)
        rate = await decode_rate(mesh)
        await asyncio.sleep(0.5)  # a liveness record written after that job
        before = await worker_status(mesh_settings)
        log_before = log_file.stat().st_size
        plain = asyncio.create_task(client.post(f"{url}/chat", json=LONG, headers=auth(mesh)))
        first_chunk = asyncio.Event()

        async def read_stream() -> None:
            # Reads to the end (leaving early would disconnect: another test's case).
            async with client.stream(
                "POST", f"{url}/chat/stream", json=LONG, headers=auth(mesh)
            ) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: chunk"):
                        first_chunk.set()

        streamed = asyncio.create_task(read_stream())
        await asyncio.wait_for(first_chunk.wait(), 30)
        for _ in range(100):  # both jobs on the worker
            if (await worker_status(mesh_settings)).in_flight == 2:
                break
            await asyncio.sleep(0.05)
        assert (await worker_status(mesh_settings)).in_flight == 2
        child = mesh.children.pop("gateway-doomed")
        child.kill()
        child.wait()
        for request in (plain, streamed):
            with pytest.raises(httpx.HTTPError):
                await request  # its gateway is gone
    extra = await tokens_after_disconnect(mesh_settings, time.monotonic())
    status = await worker_status(mesh_settings)
    assert status.jobs_cancelled == before.jobs_cancelled + 2
    assert status.jobs_completed == before.jobs_completed
    # two rows decode at most twice one row's rate; the stale heartbeat adds up to 0.4 s
    assert extra < 2 * rate * 1.0, f"{extra} tokens after the kill at {rate:.0f} tokens/s"
    written = await asyncio.to_thread(log_file.read_bytes)
    lines = written[log_before:].decode(errors="replace").splitlines()
    assert sum("nobody waits for it any more" in line for line in lines) == 2
    assert not [line for line in lines if "Unhandled message" in line or "ERROR" in line]
