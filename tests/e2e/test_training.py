"""The training loop end to end, on the demo model with the gateway and a worker
running as processes: mark a conversation, `python -m trainer_job run`, chat with the
new adapter (no worker restart), the gate refusing a run that is not better, rollback
through the admin endpoint, and a worker on another site fetching the adapter from
the gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.launcher import MeshProcesses
from services.paths import REPO_ROOT
from services.settings import MeshSettings
from tests.inference_worker.test_adapters import QUESTION, make_adapter, peft_greedy

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]
TRAIN = [
    "--max_steps=32",
    "--batch_size=8",
    "--gradient_accumulation_steps=1",
    "--lora_r=8",
    "--lora_alpha=16",
    "--learning_rate=2e-3",
    "--save_steps=16",
    "--no-progress",
]


def _trainer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer_job", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _wait_for_version(mesh: MeshProcesses, headers: dict, name: str, version: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        info = httpx.get(f"{mesh.url}/info", headers=headers).json()
        workers = [w for site in info["workers"].values() for ws in site.values() for w in ws]
        if workers and all(w["adapters"].get(name) == version for w in workers):
            return
        assert time.monotonic() < deadline, f"workers did not switch to {name} v{version}"
        time.sleep(0.2)


def test_train_publish_serve_and_roll_back(
    mesh: MeshProcesses, demo_model: Path, tmp_path: Path, namespace: str
) -> None:
    headers = {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]
    registry: Path = mesh.registry  # type: ignore[attr-defined]
    worker = mesh.children["worker"]
    # Earlier tests (schemathesis among them) leave context tiers in this namespace;
    # every chat carries them in its system prompt, and the answers below are compared
    # with peft called on the bare question.
    client = redis.Redis.from_url(MeshSettings().redis_url)
    stale = list(client.scan_iter(match=f"{namespace}:ctx:*"))
    if stale:
        client.delete(*stale)
    client.close()

    # The owner marks a conversation for training through the gateway.
    chat = httpx.post(
        f"{mesh.url}/chat",
        json={"message": "Remember: the garden bed faces south.", "max_tokens": 8},
        headers=headers,
        timeout=60,
    ).json()
    marked = httpx.put(
        f"{mesh.url}/conversation/training",
        params={"conversation_id": chat["conversation_id"]},
        headers=headers,
    )
    assert marked.status_code == 200 and marked.json()["marked"] is True

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        "MESH_NAMESPACE": namespace,
        "MESH_ADAPTER_REGISTRY": str(registry),
        "MESH_MODEL": str(demo_model),
    }
    work = tmp_path / "work"
    result = _trainer(env, "run", "--name", "continuity", "--work-dir", str(work), *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "published continuity v1 for demo-model" in result.stdout
    (run_dir,) = (work / "continuity").iterdir()
    dataset = json.loads((run_dir / "dataset" / "dataset.json").read_text())
    assert dataset["sources"]["marked_conversations"] == 1
    assert dataset["train"] + dataset["eval"] >= 500

    manifest = json.loads((registry / "continuity" / "1" / "manifest.json").read_text())
    assert manifest["eval"]["eval_loss_after"] < manifest["eval"]["eval_loss_before"]
    assert manifest["dataset_sha256"] == dataset["sha256"] and len(manifest["probes"]) == 5

    _wait_for_version(mesh, headers, "continuity", 1)

    def answer(model: str) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 24,
            "logprobs": True,
        }
        reply = httpx.post(
            f"{mesh.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        )
        assert reply.status_code == 200, reply.text
        return dict(reply.json()["choices"][0])

    def ask(model: str) -> str:
        return str(answer(model)["message"]["content"])

    tuned, base = answer("continuity"), answer("demo-model")
    v1_answer = tuned["message"]["content"]
    assert v1_answer == peft_greedy(demo_model, registry / "continuity" / "1", 24)
    # The adapter is applied: 32 steps on the owner's documents need not change a
    # greedy answer the demo model already knows well, but they move its probabilities.
    shift = max(
        abs(a["logprob"] - b["logprob"])
        for a, b in zip(tuned["logprobs"]["content"], base["logprobs"]["content"], strict=False)
    )
    assert tuned["message"]["content"] != base["message"]["content"] or shift > 1e-3

    # The same run again is not better than what is served: refused, nothing written.
    again = _trainer(env, "publish", str(run_dir / "run"), "--name", "continuity")
    assert again.returncode == 1
    assert (
        again.stderr.strip()
        .splitlines()[-1]
        .startswith("trainer_job publish: not published: held-out loss")
    )
    assert sorted(p.name for p in (registry / "continuity").iterdir()) == ["1"]

    # v2 (forced), then roll back to v1 through the admin endpoint.
    other = make_adapter(demo_model, tmp_path / "other", seed=11)
    forced = _trainer(env, "publish", str(other), "--name", "continuity", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    _wait_for_version(mesh, headers, "continuity", 2)
    assert ask("continuity") != v1_answer

    listed = httpx.get(f"{mesh.url}/admin/adapters", headers=headers).json()["adapters"]
    entry = next(a for a in listed if a["name"] == "continuity")
    assert entry["current_version"] == 2 and [v["version"] for v in entry["versions"]] == [1, 2]
    rolled = httpx.post(f"{mesh.url}/admin/adapters/continuity/rollback", headers=headers)
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["current_version"] == 1
    _wait_for_version(mesh, headers, "continuity", 1)
    assert ask("continuity") == v1_answer
    missing = httpx.post(
        f"{mesh.url}/admin/adapters/continuity/rollback", json={"version": 9}, headers=headers
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    assert worker.poll() is None and mesh.children["worker"] is worker  # never restarted


def test_a_remote_worker_fetches_adapters_from_the_gateway(
    mesh: MeshProcesses, demo_model: Path, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]
    registry: Path = mesh.registry  # type: ignore[attr-defined]
    if not (registry / "continuity" / "1").is_dir():
        pytest.skip("needs the adapter published by the test above")
    # Files are only for keys with the worker scope.
    chat_only = httpx.get(f"{mesh.url}/adapters/continuity/1/manifest.json")
    assert chat_only.status_code == 401
    escape = httpx.get(f"{mesh.url}/adapters/continuity/1/..%2f..%2fsecret", headers=headers)
    assert escape.status_code == 404

    own_registry = tmp_path / "remote-registry"
    mesh.start_process(
        "remote-worker",
        "inference_worker",
        extra_env={
            "MESH_ADAPTER_SOURCE": mesh.url,
            "MESH_ADAPTER_KEY": mesh.api_key,  # type: ignore[attr-defined]
            "MESH_ADAPTER_REGISTRY": str(own_registry),
            "MESH_SITE": "vps",
        },
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            info = httpx.get(f"{mesh.url}/info", headers=headers).json()
            remote = [w for ws in info["workers"].get("vps", {}).values() for w in ws]
            if remote and remote[0]["adapters"].get("continuity"):
                break
            assert time.monotonic() < deadline, "the remote worker did not load the adapter"
            time.sleep(0.3)
        loaded = remote[0]["adapters"]["continuity"]
        listed = httpx.get(f"{mesh.url}/admin/adapters", headers=headers).json()["adapters"]
        assert loaded == next(a for a in listed if a["name"] == "continuity")["current_version"]
        for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
            assert (own_registry / "continuity" / str(loaded) / name).read_bytes() == (
                registry / "continuity" / str(loaded) / name
            ).read_bytes()
    finally:
        mesh.stop_process("remote-worker")
