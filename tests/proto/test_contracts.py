"""The bus contracts: committed schemas match the code; messages are strict."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from proto.messages import (
    REPLY_ADAPTER,
    ChatJob,
    ChatMessage,
    JobError,
    JobResult,
    SamplingParams,
    TokenChunk,
    Usage,
)
from proto.schema import SCHEMA_DIR, rendered_schemas


def make_job(**overrides: object) -> ChatJob:
    fields: dict[str, object] = {
        "job_id": "job-1",
        "messages": [ChatMessage(role="user", content="hello")],
        "sampling": SamplingParams(max_tokens=8, temperature=0, top_p=0.9, repetition_penalty=1.15),
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    fields.update(overrides)
    return ChatJob(**fields)  # type: ignore[arg-type]


def test_committed_schemas_match_the_code() -> None:
    rendered = rendered_schemas()
    committed = {path.name: path.read_text() for path in SCHEMA_DIR.glob("*.json")}
    assert committed.keys() == rendered.keys(), "run `make proto` and commit proto/schemas/"
    for name, text in rendered.items():
        assert committed[name] == text, f"{name} is stale: run `make proto` and commit it"


def test_every_field_is_described() -> None:
    for name, text in rendered_schemas().items():
        import json

        schema = json.loads(text)
        for field, spec in schema["properties"].items():
            assert "description" in spec, f"{name}.{field} has no description"


def test_job_round_trips_through_json() -> None:
    job = make_job()
    assert ChatJob.model_validate_json(job.model_dump_json()) == job
    assert job.type == "chat_job" and job.schema_version == 1


def test_messages_are_frozen_and_refuse_unknown_fields() -> None:
    job = make_job()
    with pytest.raises(ValidationError):
        job.job_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ChatJob.model_validate({**job.model_dump(), "surprise": 1})


@pytest.mark.parametrize(
    "overrides",
    [
        {"job_id": "../etc/passwd"},
        {"messages": []},
        {"sampling": {"max_tokens": 0, "temperature": 0, "top_p": 1, "repetition_penalty": 1}},
        {"sampling": {"max_tokens": 5, "temperature": -1, "top_p": 1, "repetition_penalty": 1}},
    ],
)
def test_invalid_jobs_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        make_job(**overrides)


def test_replies_dispatch_on_type() -> None:
    chunk = TokenChunk(job_id="j", seq=0, text="hi", token_count=1)
    result = JobResult(
        job_id="j",
        seq=1,
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        worker_id="w",
    )
    error = JobError(job_id="j", seq=0, code="backend_error", message="boom", retryable=True)
    for message in (chunk, result, error):
        assert REPLY_ADAPTER.validate_json(message.model_dump_json()) == message
    with pytest.raises(ValidationError):
        REPLY_ADAPTER.validate_json(b'{"type": "chat_job"}')


# What the release before this one (tools, structured outputs, logprobs) knew of each
# message: it refuses any other field.
PREVIOUS_FIELDS = {
    "ChatJob": {
        "type", "schema_version", "job_id", "model", "messages", "prompt", "sampling",
        "conversation_id", "created_at", "deadline", "stream",
    },
    "ChatMessage": {"role", "content"},
    "TokenChunk": {"type", "schema_version", "job_id", "seq", "text", "token_count"},
    "JobResult": {
        "type", "schema_version", "job_id", "seq", "finish_reason", "usage", "worker_id",
        "queued_ms",
    },
}  # fmt: skip


def test_a_plain_exchange_reads_on_the_release_before() -> None:
    """Null fields stay off the wire, and a worker sends `served_by` only to a gateway
    that says it reads it: a mixed-version mesh keeps answering plain chats."""
    import json

    from services.bus import READS, READS_HEADER, encode

    chat = ChatJob(
        job_id="j1",
        messages=[ChatMessage(role="user", content="hi")],
        sampling=SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0),
        created_at=datetime.now(UTC),
    )
    body = json.loads(encode(chat).body)
    assert set(body) <= PREVIOUS_FIELDS["ChatJob"]
    assert set(body["messages"][0]) <= PREVIOUS_FIELDS["ChatMessage"]
    chunk = json.loads(encode(TokenChunk(job_id="j1", seq=0, text="a", token_count=1)).body)
    assert set(chunk) <= PREVIOUS_FIELDS["TokenChunk"]
    result = JobResult(
        job_id="j1",
        seq=1,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=1),
        worker_id="w",
    )
    assert set(json.loads(encode(result).body)) <= PREVIOUS_FIELDS["JobResult"]
    assert encode(chat, headers={READS_HEADER: READS}).headers[READS_HEADER] == "served_by"
