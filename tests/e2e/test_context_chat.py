"""The tiers reach the model: a chat's prompt holds exactly the assembled context."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from services.launcher import MeshProcesses
from services.settings import MeshSettings
from tests.conftest import SYSTEM_PROMPT

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
def tiers(mesh: MeshProcesses, mesh_settings: MeshSettings) -> Iterator[dict[str, str]]:
    """Briefing and log written through the API; removed again afterwards, so the
    other tests of this session keep an empty context."""
    headers = {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]
    httpx.put(
        f"{mesh.url}/context/briefing",
        headers={**headers, "If-Match": "v0"},
        json={"content": "Today: finish the context store."},
    )
    httpx.post(
        f"{mesh.url}/context/log",
        headers=headers,
        json={"text": "Yesterday the gateway got its OpenAI routes."},
    )
    yield headers
    client = redis.Redis.from_url(mesh_settings.redis_url)
    for key in client.scan_iter(match=f"{mesh_settings.namespace}:ctx:*"):
        client.delete(key)
    client.close()


def test_the_chat_prompt_carries_the_assembled_tiers(
    mesh: MeshProcesses,
    tiers: dict[str, str],
    reference_greedy: Callable[..., tuple[str, int, int]],
) -> None:
    preview = httpx.get(f"{mesh.url}/context/preview", headers=tiers).json()
    assert "finish the context store" in preview["text"]
    assert "OpenAI routes" in preview["text"]  # the log is in the prompt too
    response = httpx.post(
        f"{mesh.url}/chat",
        headers=tiers,
        timeout=60,
        json={"message": "What should the briefing contain?", "temperature": 0, "max_tokens": 30},
    ).json()
    assert response["context"] == preview["report"]
    system = f"{SYSTEM_PROMPT}\n\n{preview['text']}"
    expected, prompt_tokens, _ = reference_greedy(
        [
            {"role": "system", "content": system},
            {"role": "user", "content": "What should the briefing contain?"},
        ],
        30,
    )
    assert response["usage"]["prompt_tokens"] == prompt_tokens
    assert response["response"] == expected


def test_openai_chat_reports_the_tiers_as_an_extension(
    mesh: MeshProcesses, tiers: dict[str, str]
) -> None:
    body = {
        "model": "demo-model",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
    }
    completion = httpx.post(
        f"{mesh.url}/v1/chat/completions", json=body, headers=tiers, timeout=60
    ).json()
    tiers_in = {s["tier"] for s in completion["context"]["sections"] if s["included"]}
    assert tiers_in == {"briefing", "log"}
