"""Chat: turn a request into a ChatJob, relay its replies, record the turn."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as redis

from gateway.conversations import ConversationStore
from gateway.errors import ApiError
from gateway.settings import GatewaySettings
from proto.api import ChatRequest, Usage
from proto.messages import ChatJob, ChatMessage, JobError, JobResult, SamplingParams, TokenChunk
from services import liveness
from services.bus import JobClient
from services.errors import JobFailed, NoWorkers
from services.redis_client import Keys

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """The end of a job: how it finished and what it cost."""

    finish_reason: str
    usage: Usage


class WorkerDirectory:
    """Live workers of this gateway's model family, cached for a moment."""

    def __init__(self, client: redis.Redis, keys: Keys, family: str, cache_s: float) -> None:
        self.client = client
        self.keys = keys
        self.family = family
        self.cache_s = cache_s
        self._count = 0
        self._read_at = float("-inf")

    async def live_count(self) -> int:
        if time.monotonic() - self._read_at > self.cache_s:
            workers = await liveness.live_workers(self.client, self.keys)
            self._count = sum(1 for w in workers if w.model_family == self.family)
            self._read_at = time.monotonic()
        return self._count


class ChatService:
    def __init__(
        self,
        settings: GatewaySettings,
        jobs: JobClient,
        conversations: ConversationStore,
        workers: WorkerDirectory,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.conversations = conversations
        self.workers = workers

    def sampling(self, request: ChatRequest) -> SamplingParams:
        s = self.settings
        max_tokens = request.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_cap:
            raise ApiError(
                400,
                "invalid_request_error",
                f"max_tokens {max_tokens} is above the cap of {s.max_tokens_cap}",
                "max_tokens_too_large",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature if request.temperature is None else request.temperature,
            top_p=request.top_p or s.top_p,
            repetition_penalty=request.repetition_penalty or s.repetition_penalty,
        )

    async def build_job(self, owner: str, request: ChatRequest, conversation_id: str) -> ChatJob:
        history: list[ChatMessage] = []
        if request.conversation_id:  # a new conversation has none: skip the round trip
            history = await self.conversations.history(
                owner, conversation_id, self.settings.history_messages
            )
        messages = [ChatMessage(role="system", content=self.settings.system_prompt)]
        messages += history
        messages.append(ChatMessage(role="user", content=request.message))
        now = datetime.now(UTC)
        return ChatJob(
            job_id=uuid.uuid4().hex,
            messages=messages,
            sampling=self.sampling(request),
            conversation_id=conversation_id,
            created_at=now,
            deadline=now + timedelta(seconds=self.settings.request_timeout_s),
        )

    async def stream(
        self, owner: str, request: ChatRequest, conversation_id: str
    ) -> AsyncIterator[str | Outcome]:
        """Yields the answer's text pieces, then one Outcome; records the turn at the end.

        Raises before the first yield when the job cannot be started (no worker,
        broker down), so a route can still answer with a plain HTTP error.
        """
        job = await self.build_job(owner, request, conversation_id)
        if await self.workers.live_count() == 0:
            raise NoWorkers("no live worker can serve this model; try again shortly")
        replies = await self.jobs.submit(job, self.settings.request_timeout_s)
        log.info("job %s: submitted (conversation %s)", job.job_id, conversation_id)
        return self._relay(owner, request, conversation_id, job, replies)

    async def _relay(
        self,
        owner: str,
        request: ChatRequest,
        conversation_id: str,
        job: ChatJob,
        replies: AsyncIterator[TokenChunk | JobResult | JobError],
    ) -> AsyncIterator[str | Outcome]:
        pieces: list[str] = []
        try:
            async for reply in replies:
                if isinstance(reply, TokenChunk):
                    if reply.text:
                        pieces.append(reply.text)
                        yield reply.text
                elif isinstance(reply, JobError):
                    raise JobFailed(reply.message, reply.code, reply.retryable)
                else:
                    answer = "".join(pieces)
                    await self.conversations.append_turn(
                        owner, conversation_id, request.message, answer
                    )
                    usage = Usage(
                        prompt_tokens=reply.usage.prompt_tokens,
                        completion_tokens=reply.usage.completion_tokens,
                        total_tokens=reply.usage.prompt_tokens + reply.usage.completion_tokens,
                    )
                    log.info(
                        "job %s: answered by %s (%s)",
                        job.job_id,
                        reply.worker_id,
                        reply.finish_reason,
                    )
                    yield Outcome(reply.finish_reason, usage)
        finally:
            replies.close()  # type: ignore[attr-defined]
