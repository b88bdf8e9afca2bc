"""Tool calls, per model family: how calls are rendered, constrained and parsed.

A family knows its model's tool-call syntax. The chat template (the tokenizer's own)
renders the tools and earlier calls; the family prepares the messages for it, gives
the grammar that makes decoding produce valid calls (constraints.py), and parses
the model's output back into calls.

Mistral's (v0.3 and later, and the demo model's): a turn that calls tools is the
special token `[TOOL_CALLS]` followed by a JSON list,
`[{"name": "get_weather", "arguments": {"city": "Paris"}}]`; results come back in
`[TOOL_RESULTS] … [/TOOL_RESULTS]` naming the call's id, which its template wants as
nine letters or digits. Another family is one more class with the same methods,
found by `family_of` from its tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proto.messages import ChatJob, ChatMessage, ToolCall, ToolUse

ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """Nine letters or digits: what Mistral's template accepts, and unique enough."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(9))


def mistral_call_id(call_id: str) -> str:
    """`call_id` as Mistral's template accepts it: kept when it is nine letters or
    digits, else the same nine characters every time for the same id (a call and its
    result must keep matching)."""
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        number, rest = divmod(number, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[rest])
    return "".join(chars)


def rebased(schema: Any, root: str) -> Any:
    """`schema` with its local references (`#`, `#/$defs/…`) made relative to `root`,
    the JSON pointer of the place it is put in a larger schema."""
    if isinstance(schema, list):
        return [rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$id":
            continue  # a base for references would make "#/…" mean its own root again
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = root + value[1:]
        elif key in ("const", "enum", "default", "examples"):
            out[key] = value  # data, not schema
        else:
            out[key] = rebased(value, root)
    return out


class ToolCallParseError(ValueError):
    """The model's tool-call text is not a list of calls."""


@dataclass
class CallParser:
    """Splits a streamed answer into its text and its tool calls.

    Text before the marker goes out as it comes (the end of a piece that might begin
    the marker is held back until the next piece shows it does not); everything after
    the marker is the calls' JSON, parsed at the end.
    """

    marker: str
    text_sent: bool = False
    calls_text: str | None = None  # set once the marker was seen
    _held: str = ""
    _names: set[str] = field(default_factory=set)

    def feed(self, text: str) -> str:
        """The text safe to send now."""
        if self.calls_text is not None:
            self.calls_text += text
            return ""
        buffer = self._held + text
        at = buffer.find(self.marker)
        if at >= 0:
            self._held = ""
            self.calls_text = buffer[at + len(self.marker) :]
            return buffer[:at]
        keep = next(
            (
                n
                for n in range(min(len(self.marker) - 1, len(buffer)), 0, -1)
                if self.marker.startswith(buffer[-n:])
            ),
            0,
        )
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end: what was held back was text after all."""
        held, self._held = self._held, ""
        return held

    def calls(self) -> list[ToolCall]:
        """The calls the model made (none when it wrote no marker)."""
        if self.calls_text is None:
            return []
        try:
            items = json.loads(self.calls_text.strip())
        except (ValueError, RecursionError) as exc:
            raise ToolCallParseError(f"the tool calls are not JSON: {exc}") from exc
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not items:
            raise ToolCallParseError("the tool calls are not a list of calls")
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ToolCallParseError("a tool call has no name")
            if not item["name"]:
                raise ToolCallParseError("a tool call has an empty name")
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):  # some models write the arguments as text
                try:
                    arguments = json.loads(arguments)
                except ValueError as exc:
                    raise ToolCallParseError(f"arguments of {item['name']} are not JSON") from exc
            if not isinstance(arguments, dict):
                raise ToolCallParseError(f"arguments of {item['name']} are not an object")
            calls.append(
                ToolCall(id=new_call_id(), name=item["name"], arguments=json.dumps(arguments))
            )
        return calls


class MistralTools:
    """Mistral's tool-call format (see the module's docstring)."""

    MARKER = "[TOOL_CALLS]"

    def __init__(self, marker_id: int) -> None:
        self.marker_id = marker_id

    @classmethod
    def of(cls, special_token: Callable[[str], int | None]) -> MistralTools | None:
        marker_id = special_token(cls.MARKER)
        return cls(marker_id) if marker_id is not None else None

    # -- prompts ------------------------------------------------------------------------

    @staticmethod
    def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
        """The messages as the chat template reads them: calls with their arguments
        as objects, ids in the form the template accepts."""
        out = []
        for message in messages:
            item: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": mistral_call_id(call.id),
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.loads(call.arguments)},
                    }
                    for call in message.tool_calls
                ]
            if message.tool_call_id is not None:
                item["tool_call_id"] = mistral_call_id(message.tool_call_id)
            out.append(item)
        return out

    @staticmethod
    def template_tools(use: ToolUse) -> list[dict[str, Any]]:
        return [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in use.tools
        ]

    # -- constraints --------------------------------------------------------------------

    @staticmethod
    def calls_schema(use: ToolUse) -> dict[str, Any]:
        """The JSON Schema of the list of calls that `use` allows."""
        tools = [t for t in use.tools if use.function is None or t.name == use.function]
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        # a tool's own references ("#/$defs/…") point into it, here
                        "arguments": rebased(
                            t.parameters, f"#/items/anyOf/{place}/properties/arguments"
                        ),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for place, t in enumerate(tools)
            ]
        }
        schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not use.parallel or use.function is not None:
            schema["maxItems"] = 1
        return schema

    def lark(self, calls: dict[str, Any], otherwise: dict[str, Any] | None = None) -> str:
        """A grammar in llguidance's Lark for the marker then `calls`; or, with
        `otherwise`, for that or an answer matching the schema `otherwise`."""
        from services.grammars import JSON_STYLE

        def inline(schema: dict[str, Any]) -> str:
            return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})

        rules = [f"start: <[{self.marker_id}]> calls", f"calls: {inline(calls)}"]
        if otherwise is not None:
            rules[0] += " | answer"
            rules.append(f"answer: {inline(otherwise)}")
        return "\n".join(rules)

    def grammar(self, calls: dict[str, Any], otherwise: dict[str, Any] | None = None) -> str:
        """`lark(...)` as a grammar llguidance's matcher takes."""
        import llguidance

        return llguidance.grammar_from("lark", self.lark(calls, otherwise))

    # -- output -------------------------------------------------------------------------

    def parser(self) -> CallParser:
        return CallParser(self.MARKER)


ToolFamily = MistralTools
FAMILIES: tuple[type[MistralTools], ...] = (MistralTools,)


def banned_marker(job: ChatJob, tools: ToolFamily | None) -> int | None:
    """The token a chat job offered no tools (or told not to call any) may not pick:
    its model's tool-call marker, so that it answers in text."""
    if tools is None or job.tools is not None or job.prompt is not None:
        return None
    return tools.marker_id


def family_of(tokenizer: Any) -> ToolFamily | None:
    """The tool-call format of the model whose (transformers) tokenizer this is; None
    when it has none."""
    specials = set(tokenizer.all_special_tokens) | {
        token.content for token in tokenizer.added_tokens_decoder.values() if token.special
    }
    vocab = tokenizer.get_vocab()
    return family_from(lambda text: vocab.get(text) if text in specials else None)


def family_from(special_token: Callable[[str], int | None]) -> ToolFamily | None:
    """The tool-call format of a model, from `special_token(text)`: the id of the
    special token written `text`, None when the model has no such token."""
    for family in FAMILIES:
        found = family.of(special_token)
        if found is not None:
            return found
    return None
