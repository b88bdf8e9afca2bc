"""Run one job: parse it, stream the backend's answer back, then ack.

This is the worker's one edge for errors: whatever goes wrong becomes a JobError
reply (when there is someone to reply to) and an ack or reject decision.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from inference_worker.backends.base import Backend, Finished, GenerationEvent, TextDelta
from proto.messages import ChatJob, JobError, JobResult, TokenChunk, Usage
from services.bus import WorkerBus, coalesce
from services.errors import MeshError

log = logging.getLogger(__name__)


class JobRunner:
    """Turns delivered ChatJobs into reply streams."""

    def __init__(self, backend: Backend, bus: WorkerBus, coalesce_tokens: int, coalesce_ms: float):
        self.backend = backend
        self.bus = bus
        self.coalesce_tokens = coalesce_tokens
        self.coalesce_s = coalesce_ms / 1000
        self.in_flight = 0
        self.completed = 0

    async def handle(self, message: AbstractIncomingMessage) -> None:
        self.in_flight += 1
        try:
            await self._handle(message)
        finally:
            self.in_flight -= 1

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        reply_to = message.reply_to
        try:
            job = ChatJob.model_validate_json(message.body)
        except ValidationError as exc:
            log.error("refusing unreadable job %s: %s", message.message_id, exc.errors()[:3])
            if reply_to and message.correlation_id:
                await self._reply_error(
                    reply_to,
                    message.correlation_id,
                    0,
                    "invalid_job",
                    "the job does not match the ChatJob schema",
                    False,
                )
            await message.reject(requeue=False)
            return
        if job.deadline is not None and job.deadline <= datetime.now(UTC):
            log.info("job %s: deadline passed before it started; dropped", job.job_id)
            await message.ack()
            return
        if not reply_to:
            log.error("job %s has no reply_to; dropped", job.job_id)
            await message.reject(requeue=False)
            return
        try:
            seq = await self._stream(job, reply_to)
        except Exception:
            # The replies could not be published (connection lost mid-stream): hand
            # the job back rather than sit on it. If the channel is gone the broker
            # has already requeued it.
            log.warning("job %s: replies not delivered; handing the job back", job.job_id)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            raise
        if seq is not None:
            self.completed += 1
        await message.ack()  # only after the final reply was published

    async def _stream(self, job: ChatJob, reply_to: str) -> int | None:
        """Publish the job's chunks and its result; returns the last seq, None on error."""
        seq = 0
        log.info("job %s: started (conversation %s)", job.job_id, job.conversation_id)
        try:
            events = self.backend.generate(job)
            finished: Finished | None = None
            async for batch in coalesce(events, self.coalesce_tokens, self.coalesce_s):
                text, tokens, finished = _merge(batch, finished)
                if text or tokens:
                    await self.bus.reply(
                        reply_to,
                        TokenChunk(job_id=job.job_id, seq=seq, text=text, token_count=tokens),
                    )
                    seq += 1
            if finished is None:
                raise MeshError("the backend ended without finishing", "backend_error")
            usage = Usage(
                prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens
            )
            await self.bus.reply(
                reply_to,
                JobResult(
                    job_id=job.job_id,
                    seq=seq,
                    finish_reason=finished.reason,
                    usage=usage,
                    worker_id=self.bus.worker_id,
                ),
            )
            log.info(
                "job %s: done, %d tokens (%s)", job.job_id, usage.completion_tokens, finished.reason
            )
            return seq
        except MeshError as exc:
            log.warning("job %s: failed: %s", job.job_id, exc.message)
            await self._reply_error(reply_to, job.job_id, seq, exc.code, exc.message, exc.retryable)
        except Exception as exc:
            log.exception("job %s: backend error", job.job_id)
            await self._reply_error(
                reply_to,
                job.job_id,
                seq,
                "backend_error",
                f"generation failed: {type(exc).__name__}",
                True,
            )
        return None

    async def _reply_error(
        self, reply_to: str, job_id: str, seq: int, code: str, text: str, retryable: bool
    ) -> None:
        await self.bus.reply(
            reply_to, JobError(job_id=job_id, seq=seq, code=code, message=text, retryable=retryable)
        )


def _merge(
    batch: list[GenerationEvent] | tuple[GenerationEvent, ...], finished: Finished | None
) -> tuple[str, int, Finished | None]:
    texts = []
    tokens = 0
    for event in batch:
        if isinstance(event, TextDelta):
            texts.append(event.text)
            tokens += event.tokens
        else:
            finished = event
    return "".join(texts), tokens, finished
