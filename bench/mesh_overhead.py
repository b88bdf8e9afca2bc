"""What the mesh costs on top of the model: the same prompts in-process and through
HTTP → gateway → RabbitMQ → worker → gateway, at concurrency 1 and 32.

    python bench/mesh_overhead.py            # (make bench) table + bench/results/*.json
    python bench/mesh_overhead.py --quick    # fewer requests

Three paths, measured in this one run:
- rpc:        a bare aio-pika request/reply round trip (the floor any bus-based mesh pays);
- in-process: the worker's backend called directly (`backend.generate(job)`);
- mesh:       POST /chat through the real gateway and worker processes.
Two backends: `echo` (zero work: what the mesh itself costs) and the demo model
(greedy, 32 tokens). Ratios are against the in-process run of the same backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference_worker.backends.base import Backend, TextDelta
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.launcher import MeshProcesses
from services.settings import MeshSettings

PROMPTS = [
    "What is the four-tier handoff system?",
    "What does the phone do?",
    "How do I maintain continuity?",
    "Why is the session log append-only?",
    "What is an adapter?",
    "What should the briefing contain?",
]
SYSTEM_PROMPT = "You are the owner's continuity assistant."
MAX_TOKENS = 32
LOG_DIR = Path(__file__).parent / "results" / "logs"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(call: Callable[[int], Awaitable[None]], requests: int, concurrency: int) -> dict:
    """Run `requests` calls, `concurrency` at a time; latency percentiles in ms."""
    latencies: list[float] = []
    counter = iter(range(requests))

    async def lane() -> None:
        for index in counter:
            started = time.perf_counter()
            await call(index)
            latencies.append((time.perf_counter() - started) * 1000)

    await call(0)  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": requests,
        "concurrency": concurrency,
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "req_per_s": round(requests / elapsed, 1),
    }


def chat_job(index: int) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        messages=[
            ChatMessage(role="system", content=SYSTEM_PROMPT),
            ChatMessage(role="user", content=PROMPTS[index % len(PROMPTS)]),
        ],
        sampling=SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0, top_p=1, repetition_penalty=1.15
        ),
        created_at=datetime.now(UTC),
    )


def in_process_call(backend: Backend) -> Callable[[int], Awaitable[None]]:
    async def call(index: int) -> None:
        text = []
        async for event in backend.generate(chat_job(index)):
            if isinstance(event, TextDelta):
                text.append(event.text)

    return call


class KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client for the load generator.

    The load generator shares two cores with the mesh: httpx spent about twice the
    gateway's own CPU per request here, so with it the benchmark measured itself.
    """

    def __init__(self, host: str, port: int, api_key: str) -> None:
        self.host, self.port = host, port
        self.head = (
            f"Host: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\n"
        )
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: dict) -> bytes:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        request = f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(payload)}\r\n\r\n"
        writer.write(request.encode() + payload)
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await reader.readexactly(length)
        self.idle.append((reader, writer))
        if not status_line.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{status_line!r}: {data[:200]!r}")
        return data


def mesh_call(client: KeepAliveClient) -> Callable[[int], Awaitable[None]]:
    async def call(index: int) -> None:
        prompt = PROMPTS[index % len(PROMPTS)]
        await client.post("/chat", {"message": prompt, "temperature": 0, "max_tokens": MAX_TOKENS})

    return call


async def bare_rpc(settings: MeshSettings, requests: int, concurrency: int) -> dict:
    """aio-pika request/reply with an exclusive reply queue: the floor."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        server_channel = await connection.channel()
        await server_channel.set_qos(prefetch_count=64)
        queue = await server_channel.declare_queue(
            f"bench-rpc-{uuid.uuid4().hex[:8]}", exclusive=True
        )

        async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await server_channel.default_exchange.publish(
                aio_pika.Message(message.body, correlation_id=message.correlation_id),
                routing_key=message.reply_to,
            )
            await message.ack()

        await queue.consume(serve)
        client_channel = await connection.channel()
        replies = await client_channel.declare_queue(exclusive=True)
        waiting: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future:
                future.set_result(message.body)

        await replies.consume(on_reply, no_ack=True)

        async def call(index: int) -> None:
            correlation = uuid.uuid4().hex
            future = asyncio.get_running_loop().create_future()
            waiting[correlation] = future
            await client_channel.default_exchange.publish(
                aio_pika.Message(b"x" * 200, correlation_id=correlation, reply_to=replies.name),
                routing_key=queue.name,
            )
            await future

        return await measure(call, requests, concurrency)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def through_mesh(backend_name: str, capacity: int, runs: list[tuple[int, int]]) -> list[dict]:
    port, key = free_port(), secrets.token_urlsafe(16)
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_NAMESPACE=namespace,
        MESH_HTTP_PORT=str(port),
        MESH_API_KEY=key,
        MESH_BACKEND="echo" if backend_name == "echo" else "transformers",
        MESH_CAPACITY=str(capacity),
        MESH_LOG_LEVEL="WARNING",
        MESH_SYSTEM_PROMPT=SYSTEM_PROMPT,
    )
    mesh = MeshProcesses(env, "127.0.0.1", port, output=LOG_DIR / backend_name)
    mesh.start()
    try:
        await asyncio.to_thread(mesh.wait_ready, 120)
        client = KeepAliveClient("127.0.0.1", port, key)
        return [await measure(mesh_call(client), n, c) for n, c in runs]
    finally:
        await asyncio.to_thread(mesh.stop)
        await _remove_namespace(MeshSettings(namespace=namespace))


async def _remove_namespace(settings: MeshSettings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{settings.namespace}.jobs.{settings.model_family}")
        await channel.exchange_delete(f"{settings.namespace}.jobs")
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.redis_url)
    names = [n async for n in client.scan_iter(match=f"{settings.namespace}:*")]
    if names:
        await client.delete(*names)
    await client.aclose()


def make_backend(name: str, capacity: int) -> Backend:
    if name == "echo":
        from inference_worker.backends.echo import EchoBackend

        return EchoBackend()
    from inference_worker.backends.transformers_backend import TransformersBackend
    from trainer_job.demo_model import ensure_demo_model

    return TransformersBackend(str(ensure_demo_model()), device="cpu")


async def main(quick: bool) -> dict:
    scale = 0.25 if quick else 1.0
    plans = {
        "echo": {"capacity": 32, "runs": [(int(400 * scale), 1), (int(3000 * scale), 32)]},
        "demo": {"capacity": 8, "runs": [(int(40 * scale), 1), (int(128 * scale), 32)]},
    }
    settings = MeshSettings()
    results: dict = {"machine": {"cpus": os.cpu_count()}, "max_tokens": MAX_TOKENS, "rows": []}
    for n, c in plans["echo"]["runs"]:
        results["rows"].append({"backend": "-", "path": "rpc", **await bare_rpc(settings, n, c)})
    for name, plan in plans.items():
        backend = make_backend(name, plan["capacity"])
        await backend.start()
        for n, c in plan["runs"]:
            row = await measure(in_process_call(backend), n, c)
            results["rows"].append({"backend": name, "path": "in-process", **row})
        await backend.close()
        for row in await through_mesh(name, plan["capacity"], plan["runs"]):
            results["rows"].append({"backend": name, "path": "mesh", **row})
    add_ratios(results["rows"])
    return results


def add_ratios(rows: list[dict]) -> None:
    base = {(r["backend"], r["concurrency"]): r for r in rows if r["path"] == "in-process"}
    rpc = {r["concurrency"]: r for r in rows if r["path"] == "rpc"}
    for row in rows:
        if row["path"] != "mesh":
            continue
        ref = base[(row["backend"], row["concurrency"])]
        row["added_p50_ms"] = round(row["p50_ms"] - ref["p50_ms"], 3)
        row["throughput_vs_in_process"] = round(row["req_per_s"] / ref["req_per_s"], 3)
        if row["concurrency"] in rpc:
            row["p50_vs_bare_rpc"] = round(row["p50_ms"] / rpc[row["concurrency"]]["p50_ms"], 2)


def print_table(results: dict) -> None:
    header = (
        f"{'backend':8} {'path':11} {'conc':>4} {'reqs':>5} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'req/s':>8} {'+p50 ms':>8} {'thr ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results["rows"]:
        print(
            f"{r['backend']:8} {r['path']:11} {r['concurrency']:>4} {r['requests']:>5} "
            f"{r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['req_per_s']:>8.1f} "
            f"{r.get('added_p50_ms', ''):>8} {r.get('throughput_vs_in_process', ''):>9}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "mesh_overhead.json"
    )
    args = parser.parse_args()
    outcome = asyncio.run(main(args.quick))
    print_table(outcome)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"\nwrote {args.out}")
