"""One chat end to end: HTTP → gateway process → RabbitMQ → worker process → back.

The mesh must neither lose nor alter a token: its answers equal the demo model's
greedy output computed here, in the test, through the same chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from services.launcher import MeshProcesses
from tests.conftest import SYSTEM_PROMPT

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
GREEDY = {"temperature": 0, "max_tokens": 48}


def auth(mesh: MeshProcesses) -> dict[str, str]:
    return {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]


def read_sse(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_ready_reports_the_live_worker(mesh: MeshProcesses) -> None:
    body = httpx.get(f"{mesh.url}/ready").json()
    assert body == {"ready": True, "broker": True, "redis": True, "live_workers": 1}


def test_chat_answer_equals_direct_greedy_decoding(
    mesh: MeshProcesses, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    question = "What is the four-tier handoff system?"
    response = httpx.post(
        f"{mesh.url}/chat", json={"message": question, **GREEDY}, headers=auth(mesh), timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected, prompt_tokens, completion_tokens = reference_greedy(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}], 48
    )
    assert body["response"] == expected
    usage = dict(body["usage"])
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]  # earlier tests' prefixes
    assert usage == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    assert 0 <= cached < prompt_tokens
    assert body["finish_reason"] in {"stop", "length"}


def test_streamed_answer_equals_direct_greedy_decoding(
    mesh: MeshProcesses, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    question = "How do I maintain continuity?"
    with httpx.stream(
        "POST",
        f"{mesh.url}/chat/stream",
        json={"message": question, **GREEDY},
        headers=auth(mesh),
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events = read_sse(response)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"chunk"}
    assert len(kinds) > 2  # it streamed in pieces, not one blob
    text = "".join(data["text"] for kind, data in events if kind == "chunk")
    expected, prompt_tokens, completion_tokens = reference_greedy(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}], 48
    )
    assert text == expected
    done = events[-1][1]
    assert done["usage"]["completion_tokens"] == completion_tokens
    assert done["usage"]["prompt_tokens"] == prompt_tokens
    assert done["conversation_id"]


def test_a_conversation_carries_its_history_to_the_model(
    mesh: MeshProcesses, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    first_q, second_q = "What does the phone do?", "What does the desktop do?"
    first = httpx.post(
        f"{mesh.url}/chat", json={"message": first_q, **GREEDY}, headers=auth(mesh), timeout=60
    ).json()
    with httpx.stream(
        "POST",
        f"{mesh.url}/chat/stream",
        json={"message": second_q, "conversation_id": first["conversation_id"], **GREEDY},
        headers=auth(mesh),
        timeout=60,
    ) as response:
        response.read()
    events = read_sse(response)
    second_text = "".join(data["text"] for kind, data in events if kind == "chunk")
    assert events[-1][1]["conversation_id"] == first["conversation_id"]
    expected, _, _ = reference_greedy(
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": first_q},
            {"role": "assistant", "content": first["response"]},
            {"role": "user", "content": second_q},
        ],
        48,
    )
    assert second_text == expected


def test_the_processes_refuse_a_wrong_key(mesh: MeshProcesses) -> None:
    response = httpx.post(
        f"{mesh.url}/chat", json={"message": "hi"}, headers={"Authorization": "Bearer not-the-key"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
