"""Shared fixtures. Integration and e2e tests use the real RabbitMQ and Redis.

Every test session works under its own namespace (exchanges, queues, Redis keys),
so it never touches a mesh that `make run` may have running beside it, and it
removes what it declared when it ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as redis

from services.bus import Topology
from services.launcher import MeshProcesses
from services.paths import demo_model_dir
from services.settings import MeshSettings

NAMESPACE = f"t{uuid.uuid4().hex[:10]}"
SYSTEM_PROMPT = "You are the owner's continuity assistant."


@pytest.fixture(scope="session")
def namespace() -> str:
    return NAMESPACE


@pytest.fixture(scope="session")
def mesh_settings(namespace: str) -> MeshSettings:
    return MeshSettings(namespace=namespace)


@pytest.fixture(scope="session")
def topology(mesh_settings: MeshSettings) -> Topology:
    return Topology(mesh_settings.namespace, mesh_settings.model_family)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model folder (built once; `make test` builds it before pytest)."""
    from trainer_job.demo_model import ensure_demo_model

    return ensure_demo_model(demo_model_dir())


def unsaid(tokenizer: Any) -> dict[str, Any]:
    """`generate` options for a chat offered no tools, as the workers decode one: the
    model's tool-call marker is never picked (inference_worker.backends.tool_calls)."""
    from inference_worker.backends.tool_calls import family_of

    tools = family_of(tokenizer)
    return {"suppress_tokens": [tools.marker_id]} if tools is not None else {}


@pytest.fixture(scope="session")
def reference_model(demo_model: Path) -> tuple[Any, Any]:
    """The demo model loaded straight from disk with transformers, outside the mesh."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def reference_greedy(reference_model: tuple[Any, Any]) -> Callable[..., tuple[str, int, int]]:
    """Greedy answer of the model called directly: (text, prompt_tokens, completion_tokens)."""
    import torch

    model, tokenizer = reference_model

    def generate(
        messages: list[dict[str, str]],
        max_tokens: int,
        repetition_penalty: float = 1.15,
        min_tokens: int = 0,
    ) -> tuple[str, int, int]:
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(
                **prompt,
                max_new_tokens=max_tokens,
                min_new_tokens=min_tokens,
                do_sample=False,
                repetition_penalty=repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
                **unsaid(tokenizer),
            )
        new = out[0, prompt["input_ids"].shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text, prompt["input_ids"].shape[1], new.shape[0]

    return generate


@pytest.fixture
async def redis_client(mesh_settings: MeshSettings) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(mesh_settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def remove_namespace(settings: MeshSettings) -> None:
    """Delete a namespace's job queue, exchange and Redis keys."""
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=5)
    except Exception:
        return
    async with connection:
        channel = await connection.channel()
        topo = Topology(settings.namespace, settings.model_family)
        await channel.queue_delete(topo.job_queue)
        for site in ("local", "desktop", "vps"):
            await channel.queue_delete(f"{settings.namespace}.context.{site}")
        for exchange in (
            topo.jobs_exchange,
            topo.control_exchange,
            f"{settings.namespace}.context",
        ):
            await channel.exchange_delete(exchange)
    client = redis.Redis.from_url(settings.redis_url)
    names = [name async for name in client.scan_iter(match=f"{settings.namespace}:*")]
    if names:
        await client.delete(*names)
    await client.aclose()


@pytest.fixture(scope="session", autouse=True)
async def _clean_namespace(mesh_settings: MeshSettings) -> AsyncIterator[None]:
    """Remove this session's queues, exchanges and Redis keys at the end."""
    yield
    await remove_namespace(mesh_settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mesh_env(namespace: str, port: int, api_key: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        MESH_NAMESPACE=namespace,
        MESH_HTTP_HOST="127.0.0.1",
        MESH_HTTP_PORT=str(port),
        MESH_API_KEY=api_key,
        MESH_SYSTEM_PROMPT=SYSTEM_PROMPT,
        MESH_CAPACITY="4",
        MESH_LOG_LEVEL="INFO",
        MESH_HEARTBEAT_S="0.2",
        MESH_RATE_LIMIT_PER_MINUTE="0",
        **extra,
    )
    return env


@contextlib.contextmanager
def running_mesh(
    namespace: str, logs: Path, registry: Path, **extra: str
) -> Iterator[MeshProcesses]:
    """A gateway and a demo-model worker as separate processes, ready to serve, with
    a key of their own (`.api_key`) and `registry` as their adapter registry."""
    port = free_port()
    api_key = secrets.token_urlsafe(16)
    env = mesh_env(namespace, port, api_key, MESH_ADAPTER_REGISTRY=str(registry), **extra)
    processes = MeshProcesses(env, "127.0.0.1", port, output=logs)
    processes.api_key = api_key  # type: ignore[attr-defined]
    processes.registry = registry  # type: ignore[attr-defined]
    processes.namespace = namespace  # type: ignore[attr-defined]
    processes.start()
    try:
        processes.wait_ready(timeout_s=120)
        yield processes
    finally:
        processes.stop()


@pytest.fixture(scope="session")
def mesh(
    namespace: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshProcesses]:
    """A gateway and a demo-model worker as separate processes, ready to serve."""
    logs = tmp_path_factory.mktemp("mesh-logs")
    registry = tmp_path_factory.mktemp("adapter-registry")
    with running_mesh(namespace, logs, registry) as processes:
        yield processes
