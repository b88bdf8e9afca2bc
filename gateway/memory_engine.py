"""An engine that answers in-process, for the HTTP layer's own tests (validation,
errors, SSE framing, recording turns) without a broker or a worker. It echoes the
job's last user message (or raw prompt) word by word, like the workers' `echo`
backend, and can be told to fail before or during a reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

from gateway.engine import EngineHealth, Item, Outcome, Relay
from proto.api import PromptTokensDetails, Usage
from proto.messages import ChatJob, WorkerStatus
from services.errors import MeshError

MODEL = "memory-model"


class MemoryEngine:
    def __init__(self, base_model: str = MODEL, adapters: dict[str, int] | None = None) -> None:
        self.worker = WorkerStatus(
            worker_id="memory-0",
            model_family="mistral",
            base_model=base_model,
            device="cpu",
            site="local",
            capacity=4,
            in_flight=0,
            adapters=adapters or {},
            started_at=datetime.now(UTC),
            updated_at=datetime.now(UTC),
        )
        self.jobs: list[ChatJob] = []  # every job it was given, in order
        self.aborted: list[str] = []
        self.fail_at_start: MeshError | None = None  # raised by generate()
        self.fail_after: tuple[int, BaseException] | None = None  # (pieces sent, error)
        self.depth: int | None = 0
        self.connected = True

    @staticmethod
    def answer(job: ChatJob) -> list[str]:
        """The pieces it sends for `job`: the words of what it was asked, then "."."""
        if job.prompt is not None:
            text = job.prompt
        else:
            text = next((m.content for m in reversed(job.messages) if m.role == "user"), "")
        words = [f"{w} " for w in text.split()] + ["."]
        return words[: job.sampling.max_tokens]

    async def generate(self, job: ChatJob) -> Relay:
        if self.fail_at_start is not None:
            raise self.fail_at_start
        self.jobs.append(job)
        return Relay(self._reply(job))

    async def _reply(self, job: ChatJob) -> AsyncIterator[Item]:
        pieces = self.answer(job)
        finished = False
        try:
            for index, piece in enumerate(pieces):
                if self.fail_after is not None and index == self.fail_after[0]:
                    raise self.fail_after[1]
                yield piece
            prompt = sum(len(m.content.split()) for m in job.messages) + len(
                (job.prompt or "").split()
            )
            finished = True
            reason = "length" if len(pieces) == job.sampling.max_tokens else "stop"
            yield Outcome(
                reason,
                Usage(
                    prompt_tokens=prompt,
                    completion_tokens=len(pieces),
                    total_tokens=prompt + len(pieces),
                    prompt_tokens_details=PromptTokensDetails(cached_tokens=0),
                ),
            )
        finally:
            if not finished:
                await self.abort(job.job_id, "abandoned")

    async def abort(self, job_id: str, reason: str) -> None:
        self.aborted.append(job_id)

    async def workers(self) -> list[WorkerStatus]:
        return [self.worker]

    async def queue_depth(self) -> int | None:
        return self.depth

    async def health(self) -> EngineHealth:
        return EngineHealth(self.connected, 1)

    async def close(self) -> None:
        return None
