"""A published adapter is served by the running worker without a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.launcher import MeshProcesses
from services.paths import REPO_ROOT
from tests.inference_worker.test_adapters import QUESTION, make_adapter, peft_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_publish_then_chat_with_the_adapter(
    mesh: MeshProcesses, demo_model: Path, tmp_path: Path, namespace: str
) -> None:
    headers = {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]
    worker_pid = mesh.children["worker"].pid
    source = make_adapter(demo_model, tmp_path / "lora", seed=3)
    env = {**os.environ, "MESH_NAMESPACE": namespace, "MESH_ADAPTER_REGISTRY": str(mesh.registry)}  # type: ignore[attr-defined]
    published = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer_job",
            "publish",
            str(source),
            "--name",
            "helper",
            "--base-model",
            "demo-model",
            "--force",  # a hand-made adapter has no evaluation to pass the gate with
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip() == "published helper v1 for demo-model"

    deadline = time.monotonic() + 30
    while "helper" not in httpx.get(f"{mesh.url}/info", headers=headers).json()["adapters"]:
        assert time.monotonic() < deadline, "the worker did not load the adapter"
        time.sleep(0.2)
    models = httpx.get(f"{mesh.url}/v1/models", headers=headers).json()["data"]
    assert {"id": "helper", "parent": "demo-model"}.items() <= next(
        m for m in models if m["id"] == "helper"
    ).items()

    fingerprints = []

    def ask(model: str) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 24,
        }
        reply = httpx.post(
            f"{mesh.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        ).json()
        fingerprints.append(reply["system_fingerprint"])
        return reply["choices"][0]["message"]["content"]

    expected = peft_greedy(demo_model, mesh.registry / "helper" / "1", 24)  # type: ignore[attr-defined]
    assert ask("helper") == expected != ask("demo-model")
    # Which model answered, with the adapter's version; /chat says the same.
    assert fingerprints == ["demo-model+helper@v1", "demo-model"]
    chat = httpx.post(
        f"{mesh.url}/chat",
        json={"message": QUESTION, "model": "helper", "max_tokens": 4},
        headers=headers,
        timeout=60,
    ).json()
    assert chat["served_by"] == "demo-model+helper@v1"
    assert mesh.children["worker"].pid == worker_pid and mesh.children["worker"].poll() is None
