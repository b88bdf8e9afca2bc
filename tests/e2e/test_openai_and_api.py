"""The whole public API against the running processes, with a real OpenAI client.

Greedy answers are compared with the demo model called directly in the test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from services.launcher import MeshProcesses

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
MODEL = "demo-model"
QUESTION = "What is the four-tier handoff system?"


@pytest.fixture(scope="module")
def client(mesh: MeshProcesses) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=mesh.api_key, max_retries=0)  # type: ignore[attr-defined]


def auth(mesh: MeshProcesses) -> dict[str, str]:
    return {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]


def raw_greedy(reference_model: tuple[Any, Any], prompt: str, max_tokens: int) -> str:
    """The demo model continuing a raw prompt (with its BOS), outside the mesh."""
    import torch

    model, tokenizer = reference_model
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=1.15,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_models_lists_the_served_base_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert models[0].id == MODEL
    assert all(m.parent == MODEL for m in models[1:])  # type: ignore[attr-defined]  # adapters


def test_chat_completion_equals_direct_greedy(
    client: openai.OpenAI, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    completion = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type]
    )
    expected, prompt_tokens, completion_tokens = reference_greedy(messages, 40)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        prompt_tokens,
        completion_tokens,
    )


def test_streamed_chat_completion_equals_direct_greedy_and_reports_usage(
    client: openai.OpenAI, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=40,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected, _, completion_tokens = reference_greedy(messages, 40)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == completion_tokens


def test_completion_takes_the_prompt_verbatim(
    client: openai.OpenAI, reference_model: tuple[Any, Any]
) -> None:
    prompt = f"[INST] {QUESTION} [/INST]"
    completion = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30)
    assert completion.choices[0].text == raw_greedy(reference_model, prompt, 30)
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=30, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text


def test_stop_strings_cut_the_answer(
    client: openai.OpenAI, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    full, _, _ = reference_greedy(messages, 40)
    assert " tiers" in full
    completion = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=40,
        stop=[" tiers"],  # type: ignore[arg-type]
    )
    assert completion.choices[0].message.content == full[: full.index(" tiers")]
    assert completion.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello"}],
            temperature=1.5,
            top_p=1.0,
            max_tokens=24,
            seed=seed,
        )
        return completion.choices[0].message.content or ""

    assert sample(11) == sample(11)


def test_the_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=str(client.base_url), api_key="wrong-key-1", max_retries=0
        ).models.list()


def test_generate_continues_a_raw_prompt(
    mesh: MeshProcesses, reference_model: tuple[Any, Any]
) -> None:
    prompt = "[INST] What does the phone do? [/INST]"
    response = httpx.post(
        f"{mesh.url}/generate",
        headers=auth(mesh),
        timeout=60,
        json={"prompt": prompt, "max_tokens": 30, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    assert response.json()["text"] == raw_greedy(reference_model, prompt, 30)


def test_context_goes_into_the_system_prompt(
    mesh: MeshProcesses, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    from tests.conftest import SYSTEM_PROMPT

    body = {
        "message": "What should the briefing contain?",
        "context": "Working on the gateway.",
        "temperature": 0,
        "max_tokens": 30,
    }
    response = httpx.post(f"{mesh.url}/chat", json=body, headers=auth(mesh), timeout=60)
    system = f"{SYSTEM_PROMPT}\n\nWorking on the gateway."
    expected, prompt_tokens, _ = reference_greedy(
        [{"role": "system", "content": system}, {"role": "user", "content": body["message"]}], 30
    )
    assert response.json()["response"] == expected
    assert response.json()["usage"]["prompt_tokens"] == prompt_tokens


def test_conversation_history_can_be_read_and_deleted(mesh: MeshProcesses) -> None:
    headers = auth(mesh)
    first = httpx.post(
        f"{mesh.url}/chat",
        headers=headers,
        timeout=60,
        json={"message": "What is an adapter?", "max_tokens": 20},
    ).json()
    conversation_id = first["conversation_id"]
    latest = httpx.get(f"{mesh.url}/conversation", headers=headers).json()
    assert latest["conversation_id"] == conversation_id
    assert [(m["role"], m["content"]) for m in latest["messages"]] == [
        ("user", "What is an adapter?"),
        ("assistant", first["response"]),
    ]
    by_id = httpx.get(
        f"{mesh.url}/conversation", params={"conversation_id": conversation_id}, headers=headers
    ).json()
    assert by_id == latest
    deleted = httpx.delete(f"{mesh.url}/conversation", headers=headers).json()
    assert deleted == {"conversation_id": conversation_id, "deleted": True}
    gone = httpx.get(
        f"{mesh.url}/conversation", params={"conversation_id": conversation_id}, headers=headers
    )
    assert gone.status_code == 404


def test_info_shows_workers_by_site_and_device(mesh: MeshProcesses) -> None:
    info = httpx.get(f"{mesh.url}/info", headers=auth(mesh)).json()
    assert info["models"] == [MODEL]
    assert info["queue_depth"] == 0
    [worker] = info["workers"]["local"]["cpu"]
    assert worker["base_model"] == MODEL and worker["capacity"] == 4


def test_metrics_count_requests_tokens_and_time_to_first_token(mesh: MeshProcesses) -> None:
    httpx.post(
        f"{mesh.url}/chat", json={"message": "hi", "max_tokens": 8}, headers=auth(mesh), timeout=60
    )
    text = httpx.get(f"{mesh.url}/metrics", headers=auth(mesh)).text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['mesh_http_requests_total{route="/chat",status="200"}'] >= 1
    assert samples["mesh_time_to_first_token_seconds_count"] >= 1
    assert samples["mesh_completion_tokens_total"] >= 1
    assert samples["mesh_queue_wait_seconds_count"] >= 1
    assert samples["mesh_live_workers"] == 1
    # The fleet, from the workers' liveness records: what the dashboard shows.
    assert samples['mesh_workers{device="cpu",site="local"}'] == 1
    assert samples["mesh_queue_depth"] == 0
    [capacity] = [v for k, v in samples.items() if k.startswith("mesh_worker_capacity{")]
    assert capacity == 4
    deadline = time.monotonic() + 10  # the liveness record is refreshed every heartbeat
    while True:
        text = httpx.get(f"{mesh.url}/metrics", headers=auth(mesh)).text
        tokens = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mesh_worker_tokens_generated{")
        ]
        if tokens and tokens[0] >= 1:
            break
        assert time.monotonic() < deadline, "the worker's token count never reached /metrics"
        time.sleep(0.2)
