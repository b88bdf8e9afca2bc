"""The Python SDK against a running mesh (gateway + worker processes, real broker and
Redis): chat, stream, generate, conversations, context tiers, failover across gateway
URLs, typed errors, and the original SDK's conveniences. Sync and async."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from mesh_client import (
    AsyncMeshClient,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    GatewayUnreachable,
    MeshClient,
    MistralOrchestrator,
    NotFoundError,
)
from services.launcher import MeshProcesses
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
GREEDY = {"temperature": 0, "max_tokens": 16}


@pytest.fixture
def client(mesh: MeshProcesses):
    with MeshClient(mesh.url, api_key=mesh.api_key) as client:  # type: ignore[attr-defined]
        yield client


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_chat_stream_and_generate(client: MeshClient) -> None:
    reply = client.chat("What does the phone do?", **GREEDY)
    assert reply.response and reply.usage.completion_tokens <= 16
    stream = client.stream("What does the phone do?", **GREEDY)
    pieces = list(stream)
    assert len(pieces) >= 1 and stream.text == "".join(pieces) == reply.response
    assert stream.done is not None and stream.done["finish_reason"] in {"stop", "length"}
    raw = client.generate("[INST] What is continuity? [/INST]", max_tokens=8, temperature=0)
    assert raw.text and raw.usage.completion_tokens <= 8
    assert "demo-model" in client.models()
    assert client.health().status == "ok"


def test_conversations_and_training_marks(client: MeshClient) -> None:
    first = client.chat("Hello there.", **GREEDY)
    client.chat("And again.", conversation_id=first.conversation_id, **GREEDY)
    history = client.conversation(first.conversation_id)
    listed = client.conversations(limit=5).conversations
    assert listed[0].conversation_id == first.conversation_id and listed[0].messages == 4
    assert listed[0].title == "Hello there."
    assert [m.role for m in history.messages] == ["user", "assistant"] * 2
    assert client.mark_for_training(first.conversation_id).marked is True
    assert client.mark_for_training(first.conversation_id, marked=False).marked is False
    assert client.delete_conversation(first.conversation_id).deleted is True
    with pytest.raises(NotFoundError):
        client.conversation(first.conversation_id)


def test_context_tiers_with_version_conflicts(client: MeshClient) -> None:
    project = f"sdk-{uuid.uuid4().hex[:8]}"
    saved = client.put_tier("project", "# Plan\n\nShip the SDK.\n", 0, project=project)
    assert client.get_tier("project", project=project).content == saved.content
    client.put_tier("project", "# Plan\n\nShipped.\n", saved.version, project=project)
    with pytest.raises(ConflictError) as stale:
        client.put_tier("project", "# Plan\n\nOld edit.\n", saved.version, project=project)
    assert stale.value.status == 412 and stale.value.current_version == saved.version + 1
    entry = client.append_log(f"SDK test {project}")
    assert any(e.entry_id == entry.entry_id for e in client.log(limit=20).entries)


def test_failover_to_the_next_gateway_and_typed_errors(mesh: MeshProcesses) -> None:
    key = mesh.api_key  # type: ignore[attr-defined]
    with MeshClient([dead_url(), mesh.url], api_key=key, connect_timeout=1) as client:
        assert client.chat("Hi", **GREEDY).response
        assert client.active_url == mesh.url
        assert "".join(client.stream("Hi", **GREEDY))
    with MeshClient([dead_url(), dead_url()], api_key=key, connect_timeout=1) as client:
        with pytest.raises(GatewayUnreachable, match="no gateway answered"):
            client.chat("Hi")
    with MeshClient(mesh.url, api_key="mesh_wrong") as client:
        with pytest.raises(AuthenticationError) as denied:
            client.chat("Hi")
        assert denied.value.status == 401 and denied.value.code == "invalid_api_key"
    with MeshClient(mesh.url, api_key=key) as client:
        with pytest.raises(NotFoundError):
            client.chat("Hi", model="no-such-adapter")
        with pytest.raises(BadRequestError) as too_many:
            client.chat("Hi", max_tokens=10**6)
        assert too_many.value.status == 400


def test_the_original_sdk_quick_start_still_reads_the_same(
    mesh: MeshProcesses, tmp_path: Path
) -> None:
    briefing = tmp_path / "SESSION_BRIEFING.md"
    briefing.write_text("Today: write the SDK tests.")
    orch = MistralOrchestrator(mesh.url, api_key=mesh.api_key)  # type: ignore[attr-defined]
    context = orch.load_session_context(briefing)
    assert context == "Today: write the SDK tests."
    # Seeded, and at least two tokens: the answers are sampled (temperature 0.7), and
    # an unseeded draw may end the second one at once.
    first = orch.generate_response(
        "How do I maintain continuity?", system_context=context, seed=1, min_tokens=2
    )
    second = orch.generate_response("And after that?", max_tokens=8, seed=1, min_tokens=2)
    assert first and second and orch.conversation_id
    saved = json.loads(orch.save_conversation(tmp_path / "conversation.json").read_text())
    assert saved["conversation_id"] == orch.conversation_id
    assert [m["content"] for m in saved["messages"]] == [
        "How do I maintain continuity?",
        first,
        "And after that?",
        second,
    ]
    # A tier's file name that is not on disk comes from the gateway's context store.
    try:
        version = orch.get_tier("briefing").version
    except NotFoundError:
        version = 0
    orch.put_tier("briefing", "The briefing from the store.", version)
    elsewhere = tmp_path / "not-here" / "SESSION_BRIEFING.md"
    assert orch.load_session_context(elsewhere) == "The briefing from the store."
    with pytest.raises(FileNotFoundError):
        orch.load_session_context(tmp_path / "notes.md")
    orch.close()


async def test_the_async_client(mesh: MeshProcesses) -> None:
    key = mesh.api_key  # type: ignore[attr-defined]
    async with AsyncMeshClient([dead_url(), mesh.url], api_key=key, connect_timeout=1) as client:
        reply = await client.chat("What does the phone do?", **GREEDY)
        stream = await client.stream("What does the phone do?", **GREEDY)
        pieces = [piece async for piece in stream]
        assert stream.text == "".join(pieces) == reply.response
        assert client.active_url == mesh.url
        assert (await client.info()).models == ["demo-model"]
        with pytest.raises(NotFoundError):
            await client.chat("Hi", model="no-such-adapter")
