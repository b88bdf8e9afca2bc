"""JSON schemas as grammars for constrained decoding (llguidance's), without a
tokenizer: what the gateway checks before a job is published and what the workers
compile per row (inference_worker/backends/constraints.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:  # a type of the stub only
    from llguidance._lib import JsonCompileOptions

# Compact JSON, as json.dumps writes it: no room for a model to wander off into
# whitespace (llguidance's default allows any amount of it between tokens).
JSON_STYLE: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def json_grammar(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` cannot be enforced (a keyword llguidance does not implement, a
    reference it cannot resolve), or None when it can."""
    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            json_grammar(schema)
        )
    except Exception as exc:  # not even a grammar: e.g. a schema that is not an object
        return str(exc)
    if is_error:
        return "; ".join(messages) or "the schema cannot be enforced"
    return None
