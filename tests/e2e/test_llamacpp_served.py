"""A llama.cpp worker process serving the exported demo model through the mesh: the
greedy answers through gateway -> RabbitMQ -> worker equal llama.cpp called directly
on the same file, for the base model and for a GGUF adapter served by name."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import pytest

from inference_worker.adapters import verify
from services.adapters import AdapterRegistry, make_current
from services.launcher import MeshProcesses
from services.settings import MeshSettings
from tests.conftest import free_port, mesh_env, remove_namespace
from tests.inference_worker.test_adapters import make_adapter
from tests.inference_worker.test_llamacpp import direct, job, need_llama_cpp
from trainer_job.publish import write_version

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def prompt_ids(gguf: Path) -> list[int]:
    """The prompt as the backend builds it (the GGUF's own chat template)."""
    from inference_worker.backends.llamacpp_backend import LlamaCppBackend

    async def encode() -> list[int]:
        backend = LlamaCppBackend(str(gguf))
        await backend.start()
        try:
            return backend._encode(job())
        finally:
            await backend.close()

    return asyncio.run(encode())


def test_the_mesh_serves_gguf_models_and_adapters_with_llama_cpp(
    demo_model: Path, tmp_path: Path, namespace: str
) -> None:
    need_llama_cpp()
    from trainer_job.gguf_export import export_adapter, export_base

    registry = tmp_path / "registry"
    export_base(demo_model, registry, "demo-model", ["q8_0"])
    write_version(make_adapter(demo_model, tmp_path / "lora", 5), registry, "helper", "demo-model")
    export_adapter(registry, "helper", 1, demo_model)
    verify(registry, "helper", 1, "demo-model")
    gguf = registry / "_base/demo-model/model-q8_0.gguf"

    settings = MeshSettings(namespace=f"{namespace}-gguf")
    port, key = free_port(), secrets.token_urlsafe(16)
    env = mesh_env(settings.namespace, port, key, MESH_ADAPTER_REGISTRY=str(registry))
    mesh = MeshProcesses(env, "127.0.0.1", port, output=tmp_path / "logs")
    mesh.start_process(
        "worker",
        "inference_worker",
        extra_env={"MESH_BACKEND": "llamacpp", "MESH_GGUF_TYPE": "q8_0", "MESH_CAPACITY": "2"},
    )
    mesh.start_process("gateway", "gateway")
    headers = {"Authorization": f"Bearer {key}"}

    def ask(model: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "What is continuity?"}],
            "temperature": 0,
            "top_p": 1,
            "max_tokens": 24,
            "repetition_penalty": 1.0,
        }
        reply = httpx.post(
            f"{mesh.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    try:
        mesh.wait_ready(timeout_s=120)
        asyncio.run(make_current(settings, AdapterRegistry(registry).manifest("helper", 1)))
        deadline = time.monotonic() + 30
        while "helper" not in httpx.get(f"{mesh.url}/info", headers=headers).json()["adapters"]:
            assert time.monotonic() < deadline, "the llama.cpp worker did not load the adapter"
            time.sleep(0.2)
        ids = prompt_ids(gguf)
        assert ask("demo-model") == direct(gguf, ids, 24)
        adapter = registry / "helper/1/adapter-f16.gguf"
        assert ask("helper") == direct(gguf, ids, 24, adapter) != ask("demo-model")
        info = httpx.get(f"{mesh.url}/info", headers=headers).json()
        [worker] = info["workers"]["local"]["cpu (llama.cpp)"]
        assert worker["capacity"] == 2 and worker["adapters"] == {"helper": 1}
    finally:
        mesh.stop()
        asyncio.run(remove_namespace(settings))
