"""A zero-work backend that echoes the user's last message word by word.

It exists only to measure what the mesh itself costs (bench/mesh_overhead.py):
no model, no tokenizer, no thread hop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from inference_worker.backends.base import Finished, FinishReason, GenerationEvent, TextDelta
from inference_worker.backends.tool_calls import ToolFamily
from proto.messages import ChatJob
from services.errors import PermanentError


class EchoBackend:
    base_model = "echo"
    tool_family: ToolFamily | None = None  # it repeats the prompt: no tool calls
    device = "cpu"
    tokens_generated = 0

    async def start(self) -> None:
        return None

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        text = job.prompt if job.prompt is not None else job.messages[-1].content
        words = text.split(" ")[: job.sampling.max_tokens]
        for index, word in enumerate(words):
            self.tokens_generated += 1
            yield TextDelta(word if index == 0 else " " + word, 1)
        reason: FinishReason = "length" if len(words) == job.sampling.max_tokens else "stop"
        yield Finished(reason, len(words), len(words))

    adapters: dict[str, int] = {}  # noqa: RUF012 - never changes
    prefix_cache = None

    async def load_adapter(self, name: str, version: int, folder: Path) -> None:
        raise PermanentError("the echo backend serves no adapters", "adapters_unsupported")

    async def health(self) -> dict[str, object]:
        return {"backend": "echo"}

    async def close(self) -> None:
        return None
