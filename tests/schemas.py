"""A JSON schema with what structured outputs must handle, and its validator."""

from __future__ import annotations

from typing import Any

# Nested objects, arrays, enums and required fields; closed objects (as OpenAI's strict
# mode wants them) and bounded strings, so that a sampled answer ends.
TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "priority": {"enum": ["low", "normal", "high"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "site": {"enum": ["desktop", "vps", "phone"]},
                "shift": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["site", "shift"],
            "additionalProperties": False,
        },
        "done": {"type": "boolean"},
    },
    "required": ["title", "priority", "tags", "owner", "done"],
    "additionalProperties": False,
}


def valid_task(data: Any) -> None:
    """Raises unless `data` matches TASK_SCHEMA (checked by hand: no validator here)."""
    assert isinstance(data, dict) and set(data) == set(TASK_SCHEMA["required"])
    assert isinstance(data["title"], str) and len(data["title"]) <= 40
    assert data["priority"] in ("low", "normal", "high")
    assert 1 <= len(data["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 16 for t in data["tags"])
    assert set(data["owner"]) == {"site", "shift"} and data["owner"]["site"] in (
        "desktop",
        "vps",
        "phone",
    )
    assert type(data["owner"]["shift"]) is int and 0 <= data["owner"]["shift"] <= 3
    assert type(data["done"]) is bool
