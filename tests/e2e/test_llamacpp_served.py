"""A llama.cpp worker process serving the demo model through the mesh, as the CPU
deployments run it: the greedy answers through gateway -> RabbitMQ -> worker equal
llama.cpp called directly on the same files, for the base model (converted by the
worker at start) and for each adapter version made current while it runs."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path

import httpx
import pytest

from services.adapters import AdapterRegistry, file_sha256, make_current
from services.launcher import MeshProcesses
from services.settings import MeshSettings
from tests.conftest import free_port, mesh_env, remove_namespace
from tests.inference_worker.test_adapters import make_adapter
from tests.inference_worker.test_llamacpp import direct, job, need_llama_cpp
from trainer_job.publish import write_version

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


# The random adapters' answers are near-ties after a dozen tokens, where Q4_K_M in a
# two-request batch and llama.cpp called alone can round apart: compare the first ten.
TOKENS = 10


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


def test_a_llama_cpp_worker_converts_its_model_and_serves_each_new_version(
    demo_model: Path, tmp_path: Path, namespace: str
) -> None:
    """The worker starts from the Hugging Face folder (MESH_MODEL), converts it to
    Q4_K_M in the registry itself, and serves every version made current while it
    runs without a restart or a manual export: v1 published with no GGUF form (the
    worker exports it), v2 published by the trainer (which exports it first), and a
    rollback. Each answer equals llama.cpp's own on the same files."""
    need_llama_cpp()
    from trainer_job.publish import publish

    registry = tmp_path / "registry"
    write_version(make_adapter(demo_model, tmp_path / "lora1", 5), registry, "helper", "demo-model")
    settings = MeshSettings(namespace=f"{namespace}-gguf")
    port, key = free_port(), secrets.token_urlsafe(16)
    env = mesh_env(settings.namespace, port, key, MESH_ADAPTER_REGISTRY=str(registry))
    mesh = MeshProcesses(env, "127.0.0.1", port, output=tmp_path / "logs")
    mesh.start_process(
        "worker",
        "inference_worker",
        extra_env={"MESH_BACKEND": "llamacpp", "MESH_MODEL": str(demo_model), "MESH_CAPACITY": "2"},
    )
    mesh.start_process("gateway", "gateway")
    headers = {"Authorization": f"Bearer {key}"}

    def ask(model: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "What is continuity?"}],
            "temperature": 0,
            "top_p": 1,
            "max_tokens": TOKENS,
            "repetition_penalty": 1.0,
        }
        reply = httpx.post(
            f"{mesh.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    def served_version() -> int | None:
        info = httpx.get(f"{mesh.url}/info", headers=headers).json()
        [worker] = info["workers"]["local"]["cpu (llama.cpp)"]
        return worker["adapters"].get("helper")

    def wait_for(version: int) -> None:
        deadline = time.monotonic() + 60
        while served_version() != version:
            assert time.monotonic() < deadline, f"the llama.cpp worker did not serve v{version}"
            time.sleep(0.2)

    try:
        mesh.wait_ready(timeout_s=180)
        gguf = registry / "_base/demo-model/model-q4_k_m.gguf"
        manifest = json.loads((gguf.parent / "manifest.json").read_text())
        assert manifest["files"]["model-q4_k_m.gguf"] == file_sha256(gguf)
        log = (tmp_path / "logs/worker.log").read_text()
        assert "converted" in log and "model-q4_k_m.gguf in" in log  # and how long it took
        ids = prompt_ids(gguf)
        base = ask("demo-model")
        assert base == direct(gguf, ids, TOKENS)

        asyncio.run(make_current(settings, AdapterRegistry(registry).manifest("helper", 1)))
        wait_for(1)  # exported by the worker: v1 had no GGUF form
        v1 = registry / "helper/1/adapter-f16.gguf"
        assert AdapterRegistry(registry).manifest("helper", 1).files["adapter-f16.gguf"]
        first = ask("helper")
        assert first == direct(gguf, ids, TOKENS, v1) != base

        run = tmp_path / "run2"
        make_adapter(demo_model, run, 6)
        asyncio.run(
            publish(
                settings, run, registry, "helper", "demo-model", force=True, gguf_base=demo_model
            )
        )
        wait_for(2)
        v2 = registry / "helper/2/adapter-f16.gguf"
        second = ask("helper")
        assert second == direct(gguf, ids, TOKENS, v2) != first

        reply = httpx.post(
            f"{mesh.url}/admin/adapters/helper/rollback", json={"version": 1}, headers=headers
        )
        assert reply.status_code == 200, reply.text
        wait_for(1)
        assert ask("helper") == first
        info = httpx.get(f"{mesh.url}/info", headers=headers).json()
        [worker] = info["workers"]["local"]["cpu (llama.cpp)"]
        assert worker["capacity"] == 2
    finally:
        mesh.stop()
        asyncio.run(remove_namespace(settings))
