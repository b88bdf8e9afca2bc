"""The one backend interface. Job handlers never branch on which backend runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from inference_worker.backends.tool_calls import ToolFamily
from proto.messages import ChatJob, PrefixCacheStats, TokenLogprob

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text of the answer, how many generated tokens it holds, and their log
    probabilities when the job asked for them (one per token, in order)."""

    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of a generation."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the backend's prefix cache already held


GenerationEvent = TextDelta | Finished


class Backend(Protocol):
    """What a worker needs from a model runtime."""

    base_model: str  # the name clients use for it
    device: str
    # The model's tool-call format (its text marker and output parser); None when the
    # model has none. Backends render the marker in the text they stream.
    tool_family: ToolFamily | None

    @property
    def tokens_generated(self) -> int:
        """Tokens decoded since start, including ones nobody read (a cancelled job's)."""
        ...

    async def start(self) -> None:
        """Load the model (off the event loop)."""

    def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        """Stream the answer: TextDeltas, then exactly one Finished.

        Closing the iterator early (aclose) stops generation.
        """
        ...

    @property
    def adapters(self) -> dict[str, int]:
        """Adapter name -> version being served."""
        ...

    @property
    def prefix_cache(self) -> PrefixCacheStats | None:
        """The prefix cache's size and counters; None for a backend without one."""
        ...

    async def load_adapter(self, name: str, version: int, folder: Path) -> None:
        """Serve `name` from a verified adapter folder, without failing running jobs."""

    async def health(self) -> dict[str, object]:
        """A small dict for logs and liveness records; `"ok": False` when the backend
        can no longer serve (the worker then stops taking jobs and fails its probe)."""
        ...

    async def close(self) -> None:
        """Release the model."""
