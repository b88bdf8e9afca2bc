"""JSON Schema files for the bus messages, committed beside the code."""

from __future__ import annotations

import json
from pathlib import Path

from proto.messages import BUS_MESSAGES

SCHEMA_DIR = Path(__file__).parent / "schemas"


def rendered_schemas() -> dict[str, str]:
    """File name -> JSON text, exactly as `write_schemas` writes it."""
    return {
        f"{model.__name__}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        + "\n"
        for model in BUS_MESSAGES
    }


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
