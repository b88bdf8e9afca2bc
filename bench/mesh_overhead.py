"""What the mesh costs on top of the model: the same prompts in-process and through
HTTP → gateway → RabbitMQ → worker → gateway, at concurrency 1 and 32.

    python bench/mesh_overhead.py              # (make bench) table + bench/results/*.json
    python bench/mesh_overhead.py --quick      # fewer requests
    python bench/mesh_overhead.py --only echo  # the mesh's own cost, without the model

Measured in this one run:
- rpc:        a bare aio-pika request/reply round trip (the floor any bus-based mesh pays);
- in-process: the worker's backend called directly (`backend.generate(job)`);
- mesh:       POST /chat through the real gateway and worker processes;
- mesh x2:    the same with two gateway processes behind the same broker, the load
              split between them (echo only): does the mesh scale out?
- stages:     what each step of a /chat costs the gateway, in-process against the real
              Redis, as the gateway did it before (key lookup and rate limit apart, the
              tiers assembled on every chat) and as it does now (one round trip; the
              tiers kept behind the store's stamp).
Two backends: `echo` (zero work: what the mesh itself costs) and the demo model
(greedy, 32 tokens). Ratios are against the in-process run of the same backend, and
for echo also against the rpc floor (the goals: within +3 ms of it at concurrency 1,
at least 35 % of its requests/s at 32).
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
from collections.abc import AsyncIterator, Awaitable, Callable
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


Stream = tuple[float, float, int]  # time to first token, total time, tokens


async def measure_streams(
    call: Callable[[int], Awaitable[Stream]], requests: int, concurrency: int
) -> dict:
    """Time to first token (p50/p99) and mean time per generated token of each stream."""
    ttfts: list[float] = []
    totals: list[float] = []
    tokens: list[int] = []
    counter = iter(range(requests))

    async def lane() -> None:
        for index in counter:
            ttft, total, count = await call(index)
            ttfts.append(ttft * 1000)
            totals.append(total)
            tokens.append(count)

    await call(0)  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ttft_p50_ms": round(statistics.median(ttfts), 3),
        "ttft_p99_ms": round(percentile(ttfts, 0.99), 3),
        "per_token_us": round(sum(totals) / max(sum(tokens), 1) * 1e6, 1),
        "tokens_per_s": round(sum(tokens) / elapsed, 1),
    }


def in_process_stream(backend: Backend) -> Callable[[int], Awaitable[Stream]]:
    async def call(index: int) -> Stream:
        started = time.perf_counter()
        first = None
        count = 0
        async for event in backend.generate(chat_job(index)):
            if isinstance(event, TextDelta):
                if first is None and event.text:
                    first = time.perf_counter() - started
            else:
                count = event.completion_tokens
        return first or 0.0, time.perf_counter() - started, count

    return call


def openai_stream(client: KeepAliveClient, model: str) -> Callable[[int], Awaitable[Stream]]:
    async def call(index: int) -> Stream:
        body = {
            "model": model,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": PROMPTS[index % len(PROMPTS)]},
            ],
        }
        started = time.perf_counter()
        first = None
        count = 0
        async for data in _stream_events(client, "/v1/chat/completions", body):
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
            elif first is None and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started, count

    return call


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

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle:
            return self.idle.pop()
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: dict) -> bytes:
        payload = json.dumps(body).encode()
        request = f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(payload)}\r\n\r\n"
        for _attempt in range(2):  # an idle connection the server closed: once more, anew
            reader, writer = await self.open()
            writer.write(request.encode() + payload)
            status_line = await reader.readline()
            if status_line:
                break
            writer.close()
            for _, stale in self.idle:  # as old as this one: closed by the server too
                stale.close()
            self.idle.clear()
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


async def _stream_events(self_: KeepAliveClient, path: str, body: dict) -> AsyncIterator[bytes]:
    """POST and yield each SSE `data:` payload as it arrives (chunked transfer)."""
    reader, writer = await self_.open()
    payload = json.dumps(body).encode()
    request = f"POST {path} HTTP/1.1\r\n{self_.head}Content-Length: {len(payload)}\r\n\r\n"
    writer.write(request.encode() + payload)
    status_line = await reader.readline()
    while await reader.readline() not in (b"\r\n", b""):
        pass  # headers: the body is chunked
    if not status_line.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(status_line)
    buffer = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            await reader.readline()
            break
        buffer += await reader.readexactly(size)
        await reader.readline()
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                yield event[6:]
    self_.idle.append((reader, writer))


def split_call(clients: list[KeepAliveClient]) -> Callable[[int], Awaitable[None]]:
    """POST /chat to each gateway in turn."""
    calls = [mesh_call(client) for client in clients]

    async def call(index: int) -> None:
        await calls[index % len(calls)](index)

    return call


def _wait_ready(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


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


async def through_mesh(
    backend_name: str, capacity: int, runs: list[tuple[int, int]], scale_out: int = 0
) -> tuple[list[dict], list[dict], list[dict]]:
    """Plain and streamed rows through one gateway; with `scale_out` requests, also
    rows for the largest concurrency through one and then two gateways."""
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
        MESH_RATE_LIMIT_PER_MINUTE="0",
        MESH_SYSTEM_PROMPT=SYSTEM_PROMPT,
    )
    if backend_name == "echo":  # every chat carries the tiers, as in use (echo ignores them)
        await seed_tiers(MeshSettings(namespace=namespace))
    mesh = MeshProcesses(env, "127.0.0.1", port, output=LOG_DIR / backend_name)
    mesh.start()
    try:
        await asyncio.to_thread(mesh.wait_ready, 120)
        client = KeepAliveClient("127.0.0.1", port, key)
        plain = [await measure(mesh_call(client), n, c) for n, c in runs]
        model = "echo" if backend_name == "echo" else "demo-model"
        streams = [await measure_streams(openai_stream(client, model), n, c) for n, c in runs]
        scaling: list[dict] = []
        if scale_out:
            concurrency = max(c for _, c in runs)
            one = await measure(mesh_call(client), scale_out, concurrency)
            second = free_port()
            mesh.start_process("gateway-2", "gateway", extra_env={"MESH_HTTP_PORT": str(second)})
            await asyncio.to_thread(_wait_ready, f"http://127.0.0.1:{second}/ready", 60)
            both = [client, KeepAliveClient("127.0.0.1", second, key)]
            two = await measure(split_call(both), scale_out, concurrency)
            scaling = [{"gateways": 1, **one}, {"gateways": 2, **two}]
        return plain, streams, scaling
    finally:
        await asyncio.to_thread(mesh.stop)
        await _remove_namespace(MeshSettings(namespace=namespace))


async def seed_tiers(settings: MeshSettings) -> None:
    """The starter documents and a log, as `make run` seeds them: ~1,000 tokens of tiers."""
    from context_store.__main__ import STARTER
    from context_store.markdown import import_dir
    from context_store.store import ContextStore
    from services.redis_client import connect

    client = connect(settings.redis_url)
    try:
        context = ContextStore(client, settings.namespace, "bench")
        await import_dir(context, STARTER)
        for index in range(20):
            await context.append_log(f"entry {index}: worked on the gateway's hot path")
    finally:
        await client.aclose()


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


async def main(quick: bool, only: str) -> dict:
    scale = 0.25 if quick else 1.0
    plans = {
        "echo": {"capacity": 32, "runs": [(int(400 * scale), 1), (int(3000 * scale), 32)]},
        "demo": {"capacity": 8, "runs": [(int(40 * scale), 1), (int(128 * scale), 32)]},
    }
    if only != "all":
        plans = {only: plans[only]}
    settings = MeshSettings()
    results: dict = {
        "machine": {"cpus": os.cpu_count()},
        "max_tokens": MAX_TOKENS,
        "rows": [],
        "streams": [],
        "scale_out": [],
        "stages": await stage_costs(settings, int(400 * scale)),
    }
    for n, c in plans[next(iter(plans))]["runs"]:
        results["rows"].append({"backend": "-", "path": "rpc", **await bare_rpc(settings, n, c)})
    for name, plan in plans.items():
        backend = make_backend(name, plan["capacity"])
        await backend.start()
        for n, c in plan["runs"]:
            row = await measure(in_process_call(backend), n, c)
            results["rows"].append({"backend": name, "path": "in-process", **row})
            row = await measure_streams(in_process_stream(backend), n, c)
            results["streams"].append({"backend": name, "path": "in-process", **row})
        await backend.close()
        scale_out = int(3000 * scale) if name == "echo" else 0
        plain, streams, scaling = await through_mesh(
            name, plan["capacity"], plan["runs"], scale_out
        )
        results["rows"] += [{"backend": name, "path": "mesh", **row} for row in plain]
        results["streams"] += [{"backend": name, "path": "mesh-openai", **r} for r in streams]
        results["scale_out"] += scaling
    add_ratios(results["rows"])
    add_stream_ratios(results["streams"])
    results["goals"] = goals(results)
    return results


def goals(results: dict) -> dict:
    """The issue's targets for echo through the mesh against the rpc floor."""
    rows = {(r["backend"], r["path"], r["concurrency"]): r for r in results["rows"]}
    out: dict = {}
    if ("echo", "mesh", 1) in rows:
        added = rows[("echo", "mesh", 1)]["p50_ms"] - rows[("-", "rpc", 1)]["p50_ms"]
        out["c1_added_p50_ms_vs_rpc"] = {
            "value": round(added, 3),
            "goal": "<= 3",
            "met": added <= 3,
        }
    if ("echo", "mesh", 32) in rows:
        share = rows[("echo", "mesh", 32)]["req_per_s"] / rows[("-", "rpc", 32)]["req_per_s"]
        out["c32_req_per_s_share_of_rpc"] = {
            "value": round(share, 3),
            "goal": ">= 0.35",
            "met": share >= 0.35,
        }
    if len(results["scale_out"]) == 2:
        one, two = results["scale_out"]
        out["two_gateways_req_per_s_ratio"] = {
            "value": round(two["req_per_s"] / one["req_per_s"], 3)
        }
    return out


async def stage_costs(settings: MeshSettings, requests: int) -> list[dict]:
    """Each stage of a /chat in the gateway, before and now: mean ms per request,
    one request at a time against the real Redis (no worker, no HTTP)."""
    from context_store.assembly import assemble
    from context_store.store import ContextStore
    from gateway.keys import KeyStore
    from gateway.ratelimit import WINDOW_TTL_MS, RateLimiter
    from gateway.tiers import TierCache
    from services.conversations import ConversationStore
    from services.redis_client import Keys, connect

    stage_settings = MeshSettings(namespace=f"bench{uuid.uuid4().hex[:6]}")
    keys = Keys(stage_settings.namespace)
    client = connect(settings.redis_url)
    try:
        key_store = KeyStore(client, keys)
        api_key = secrets.token_urlsafe(16)
        record = await key_store.add(api_key, "bench", ["chat"])
        limiter = RateLimiter(keys, 10**9)
        context = ContextStore(client, stage_settings.namespace, "bench")
        await seed_tiers(stage_settings)
        count = lambda text: len(text.encode()) // 3 + 1  # noqa: E731  # the gateway without a tokenizer
        tiers = TierCache(context, count, 1024, None)
        conversations = ConversationStore(client, keys)
        for _ in range(10):
            await conversations.append_turn(
                record.key_id, "c1", "a question " * 10, "an answer " * 40
            )
        legacy_limit = client.register_script(
            "local c = redis.call('INCR', KEYS[1]) "
            "if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end "
            "return {c, redis.call('PTTL', KEYS[1])}"
        )

        async def key_then_limit() -> None:  # before: HGET, then the rate-limit script
            await key_store.lookup(api_key)
            await legacy_limit(keys=[limiter.window(record.key_id).key], args=[WINDOW_TTL_MS])

        async def key_and_limit() -> None:
            window = limiter.window(record.key_id)
            await key_store.lookup_counting(api_key, window.key, WINDOW_TTL_MS)

        async def assembled() -> None:  # before: on every chat
            await assemble(context, count, 1024, None)

        async def kept() -> None:
            await tiers.get(None)

        async def history() -> None:
            await conversations.history(record.key_id, "c1", 20)

        async def record_turn() -> None:
            await conversations.append_turn(record.key_id, "c2", "q", "a")

        stages = [
            ("auth + rate limit", key_then_limit, key_and_limit),
            ("tiers (~1,000 tokens)", assembled, kept),
            ("history (20 messages)", history, history),
            ("record the turn", record_turn, record_turn),
        ]
        rows = []
        for name, before, now in stages:
            rows.append(
                {
                    "stage": name,
                    "before_ms": round(await _mean_ms(before, requests), 3),
                    "now_ms": round(await _mean_ms(now, requests), 3),
                }
            )
        return rows
    finally:
        names = [n async for n in client.scan_iter(match=f"{stage_settings.namespace}:*")]
        if names:
            await client.delete(*names)
        await client.aclose()


async def _mean_ms(call: Callable[[], Awaitable[None]], requests: int) -> float:
    await call()  # warm-up
    started = time.perf_counter()
    for _ in range(requests):
        await call()
    return (time.perf_counter() - started) / requests * 1000


def add_stream_ratios(rows: list[dict]) -> None:
    base = {(r["backend"], r["concurrency"]): r for r in rows if r["path"] == "in-process"}
    for row in rows:
        if row["path"] == "in-process":
            continue
        ref = base[(row["backend"], row["concurrency"])]
        row["added_ttft_p50_ms"] = round(row["ttft_p50_ms"] - ref["ttft_p50_ms"], 3)
        row["added_per_token_us"] = round(row["per_token_us"] - ref["per_token_us"], 1)


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


def print_extra(results: dict) -> None:
    print("\nper-request stages in the gateway (ms, mean, one at a time)")
    for r in results["stages"]:
        print(f"  {r['stage']:24} before {r['before_ms']:7.3f}   now {r['now_ms']:7.3f}")
    if results["scale_out"]:
        print("\nscale-out (echo, /chat)")
        for r in results["scale_out"]:
            print(
                f"  {r['gateways']} gateway(s): {r['req_per_s']:8.1f} req/s, "
                f"p50 {r['p50_ms']:.2f} ms"
            )
    print("\ngoals")
    for name, goal in results["goals"].items():
        print(f"  {name}: {goal}")


def print_streams(results: dict) -> None:
    header = (
        f"{'backend':8} {'path':11} {'conc':>4} {'ttft p50':>9} {'ttft p99':>9} "
        f"{'us/token':>9} {'tok/s':>8} {'+ttft ms':>9} {'+us/token':>9}"
    )
    print("\nstreaming (OpenAI chat completions, stream=true)")
    print(header)
    print("-" * len(header))
    for r in results["streams"]:
        print(
            f"{r['backend']:8} {r['path']:11} {r['concurrency']:>4} {r['ttft_p50_ms']:>9.2f} "
            f"{r['ttft_p99_ms']:>9.2f} {r['per_token_us']:>9.1f} {r['tokens_per_s']:>8.1f} "
            f"{r.get('added_ttft_p50_ms', ''):>9} {r.get('added_per_token_us', ''):>9}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    parser.add_argument("--only", choices=["all", "echo", "demo"], default="all")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "mesh_overhead.json"
    )
    args = parser.parse_args()
    outcome = asyncio.run(main(args.quick, args.only))
    print_table(outcome)
    print_streams(outcome)
    print_extra(outcome)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"\nwrote {args.out}")
