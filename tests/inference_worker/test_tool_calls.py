"""The Mistral tool-call format: parsing streamed output, ids the template accepts,
the calls' schema, and the gateway's translation of OpenAI messages into turns."""

from __future__ import annotations

import json

import pytest

from gateway.translate import chat_turns, closed
from inference_worker.backends.tool_calls import (
    CallParser,
    MistralTools,
    ToolCallParseError,
    mistral_call_id,
)
from proto.messages import ChatMessage, ToolCall, ToolSpec, ToolUse
from proto.openai import OpenAIMessage
from services.errors import InvalidRequest

MARKER = MistralTools.MARKER


def feed_all(pieces: list[str]) -> tuple[str, CallParser]:
    parser = CallParser(MARKER)
    sent = "".join(parser.feed(piece) for piece in pieces) + parser.flush()
    return sent, parser


def test_text_before_a_marker_split_over_pieces_is_sent_and_the_calls_are_parsed() -> None:
    call = '[{"name": "read_tier", "arguments": {"tier": "log"}}, {"name": "f", "arguments": {}}]'
    text = "Let me look. " + MARKER + call
    for size in (1, 3, 7, len(text)):  # every way of splitting it into pieces
        sent, parser = feed_all([text[i : i + size] for i in range(0, len(text), size)])
        assert sent == "Let me look. "
        calls = parser.calls()
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("read_tier", {"tier": "log"}),
            ("f", {}),
        ]
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
        assert len({c.id for c in calls}) == 2


def test_a_partial_marker_at_the_end_is_text_after_all() -> None:
    sent, parser = feed_all(["The answer is [TOOL", "_CA"])
    assert sent == "The answer is [TOOL_CA"
    assert parser.calls() == []


@pytest.mark.parametrize(
    "tail",
    ['[{"name": "f", "argu', '{"nombre": 1}', "[]", '[{"name": "f", "arguments": [1]}]'],
)
def test_calls_that_do_not_parse_raise(tail: str) -> None:
    _, parser = feed_all([MARKER + tail])
    with pytest.raises(ToolCallParseError):
        parser.calls()


def test_ids_become_nine_alphanumerics_and_stay_matched() -> None:
    assert mistral_call_id("abcDEF123") == "abcDEF123"
    other = mistral_call_id("call_8f3a2b1c9d0e4f5a6b7c8d9e")
    assert len(other) == 9 and other.isalnum()
    assert other == mistral_call_id("call_8f3a2b1c9d0e4f5a6b7c8d9e")
    messages = [
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="call_x", name="f", arguments='{"a": 1}')],
        ),
        ChatMessage(role="tool", content="done", tool_call_id="call_x"),
    ]
    rendered = MistralTools.template_messages(messages)
    assert rendered[0]["tool_calls"][0]["id"] == rendered[1]["tool_call_id"]
    assert rendered[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


def test_the_calls_schema_follows_the_choice() -> None:
    specs = [ToolSpec(name="a"), ToolSpec(name="b")]
    schema = MistralTools.calls_schema(ToolUse(tools=specs, choice="required"))
    assert "maxItems" not in schema and len(schema["items"]["anyOf"]) == 2
    single = MistralTools.calls_schema(ToolUse(tools=specs, choice="required", parallel=False))
    assert single["maxItems"] == 1
    named = MistralTools.calls_schema(ToolUse(tools=specs, choice="function", function="b"))
    assert [option["properties"]["name"] for option in named["items"]["anyOf"]] == [{"const": "b"}]


def message(**fields: object) -> OpenAIMessage:
    return OpenAIMessage.model_validate(fields)


def test_turns_merge_same_roles_keep_calls_apart_and_start_with_the_user() -> None:
    turns = chat_turns(
        [
            message(role="system", content="s"),
            message(role="assistant", content="Hello."),
            message(role="user", content="a"),
            message(role="user", content=[{"type": "text", "text": "b"}]),
            message(
                role="assistant",
                tool_calls=[
                    {"id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}},
                ],
            ),
            message(role="tool", tool_call_id="c1", content="r1"),
            message(role="tool", tool_call_id="c1", content="r2"),
        ]
    )
    assert [(t.role, t.content) for t in turns] == [
        ("user", ""),
        ("assistant", "Hello."),
        ("user", "a\n\nb"),
        ("assistant", ""),
        ("tool", "r1"),
        ("tool", "r2"),
    ]
    assert turns[3].tool_calls == [ToolCall(id="c1", name="f", arguments='{"x": 1}')]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"role": "tool", "content": "r"}, "tool_call_id"),
        (
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}],
            },
            "not JSON",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
            },
            "not a JSON object",
        ),
        ({"role": "user", "content": [{"type": "image_url"}]}, "image_url"),
    ],
)
def test_bad_messages_are_refused_naming_the_problem(fields: dict, says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        chat_turns([message(role="user", content="q"), message(**fields)])
    assert says in caught.value.message


def test_results_then_a_user_turn_get_an_empty_answer_between_them() -> None:
    call = {"id": "c1", "function": {"name": "f", "arguments": "{}"}}
    said_then_called = chat_turns(
        [
            message(role="user", content="q"),
            message(role="assistant", content="Let me check."),
            message(role="assistant", tool_calls=[call]),
            message(role="tool", tool_call_id="c1", content="r"),
        ]
    )
    assert [(t.role, t.content, bool(t.tool_calls)) for t in said_then_called] == [
        ("user", "q", False),
        ("assistant", "Let me check.", True),
        ("tool", "r", False),
    ]
    turns = chat_turns(
        [
            message(role="user", content="q"),
            message(role="assistant", tool_calls=[call]),
            message(role="tool", tool_call_id="c1", content="r"),
            message(role="user", content="and now?"),
        ]
    )
    assert [(t.role, t.content) for t in turns][2:] == [
        ("tool", "r"),
        ("assistant", ""),
        ("user", "and now?"),
    ]
    for unanswered in (
        [message(role="assistant", tool_calls=[call]), message(role="user", content="x")],
        [message(role="assistant", content="text"), message(role="tool", tool_call_id="c1")],
    ):
        with pytest.raises(InvalidRequest):
            chat_turns([message(role="user", content="q"), *unanswered])


def test_strict_closes_every_object_that_does_not_say_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "c": {"type": "array", "items": {"type": "object", "properties": {}}},
            "d": {"type": "object", "additionalProperties": True},
        },
        "$defs": {"e": {"type": "object", "properties": {}}},
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["properties"]["d"]["additionalProperties"] is True
    assert out["$defs"]["e"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's own is left alone
