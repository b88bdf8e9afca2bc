"""Run one job: parse it, stream the backend's answer back, then ack.

This is the worker's one edge for errors: whatever goes wrong becomes a JobError
reply (when there is someone to reply to) and an ack or reject decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as redis
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from inference_worker.backends.base import (
    Backend,
    Finished,
    FinishReason,
    GenerationEvent,
    TextDelta,
)
from inference_worker.backends.tool_calls import CallParser, ToolCallParseError
from proto.adapters import served_label
from proto.messages import (
    CancelJob,
    ChatJob,
    JobError,
    JobResult,
    TokenChunk,
    TokenLogprob,
    ToolCall,
    Usage,
)
from services.bus import READS_HEADER, WorkerBus, coalesce
from services.errors import BusUnavailable, MeshError, RequesterGone
from services.redis_client import Keys

log = logging.getLogger(__name__)


class DeliveryCounter:
    """How often each job was delivered, in Redis so that every worker counts."""

    def __init__(self, client: redis.Redis, keys: Keys, limit: int) -> None:
        self.client = client
        self.keys = keys
        self.limit = limit

    async def count(self, job_id: str) -> int:
        """Deliveries so far, this one included (called on redeliveries only)."""
        key = self.keys.deliveries(job_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 86400)
            redeliveries, _ = await pipe.execute()
        return int(redeliveries) + 1


@dataclass(frozen=True)
class Pacing:
    """How replies are grouped: at most `tokens` per message, and no token held back
    longer than `seconds`. The first piece of an answer always goes out at once."""

    tokens: int
    seconds: float


class JobRunner:
    """Turns delivered ChatJobs into reply streams; stops them on CancelJob."""

    def __init__(
        self,
        backend: Backend,
        bus: WorkerBus,
        streamed: Pacing,
        unstreamed: Pacing,
        cancel_memory_s: float = 600.0,
        deliveries: DeliveryCounter | None = None,
    ) -> None:
        self.backend = backend
        self.bus = bus
        # A client reading the answer as it comes wants small, frequent messages; one
        # waiting for the whole answer does not, and every message costs the worker,
        # the broker and the gateway CPU time that decoding could use.
        self.streamed = streamed
        self.unstreamed = unstreamed
        self.cancel_memory_s = cancel_memory_s
        self.deliveries = deliveries
        self.dead_lettered = 0
        self.in_flight = 0
        self.completed = 0
        self.cancelled = 0
        self._running: dict[str, asyncio.Task[int | None]] = {}
        # Cancels for jobs this worker has not seen (yet): job id -> forget after.
        self._cancel_before_start: dict[str, float] = {}

    def cancel(self, command: CancelJob) -> None:
        task = self._running.get(command.job_id)
        if task is not None:
            log.info("job %s: cancelled (%s)", command.job_id, command.reason)
            task.cancel()
            return
        now = time.monotonic()
        self._cancel_before_start = {
            job_id: until for job_id, until in self._cancel_before_start.items() if until > now
        }
        self._cancel_before_start[command.job_id] = now + self.cancel_memory_s

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
        if not reply_to:
            log.error("job %s has no reply_to; dropped", job.job_id)
            await message.reject(requeue=False)
            return
        if self._drop_before_start(job):
            await message.ack()
            return
        if await self._set_aside(job, message, reply_to):
            return
        reads = str((message.headers or {}).get(READS_HEADER, "")).split(",")
        task = asyncio.create_task(self._stream(job, reply_to, "served_by" in reads))
        self._running[job.job_id] = task
        try:
            seq = await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the worker is shutting down: not acked, the broker redelivers
            self.cancelled += 1  # CancelJob: nobody waits for it; done with it
            await message.ack()
            return
        except RequesterGone:
            # Its gateway is gone (the broker returned a reply): generation has
            # stopped with the relay; one line, and the job is done with.
            log.info(
                "job %s: nobody waits for it any more (its reply queue is gone); stopped",
                job.job_id,
            )
            self.cancelled += 1
            await message.ack()
            return
        except BusUnavailable:
            # A reply could not be published (the connection went, or the broker
            # refused it): generation has stopped; hand the job back. On a closed
            # channel the broker has it back already and the nack does nothing.
            log.warning(
                "job %s: its replies could not be published; handed back for redelivery",
                job.job_id,
            )
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        except Exception:
            # Anything else that escaped: hand the job back rather than sit on it.
            log.warning("job %s: replies not delivered; handing the job back", job.job_id)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            raise
        finally:
            self._running.pop(job.job_id, None)
        if seq is not None:
            self.completed += 1
        await message.ack()  # only after the final reply was published

    async def _set_aside(
        self, job: ChatJob, message: AbstractIncomingMessage, reply_to: str
    ) -> bool:
        """A job that keeps taking its workers down (a poison job) goes to the
        dead-letter queue instead of taking down the next one."""
        if self.deliveries is None or not message.redelivered:
            return False
        try:
            count = await self.deliveries.count(job.job_id)
        except Exception as exc:  # Redis unreachable: serve it rather than hold it
            log.warning("job %s: redelivered; its delivery count is unknown: %s", job.job_id, exc)
            return False
        if count <= self.deliveries.limit:
            return False
        reason = f"delivered {count} times; its workers never finished it"
        log.error("job %s: %s; moved to the dead-letter queue", job.job_id, reason)
        await self.bus.dead_letter(message, reason)
        await self._reply_error(
            reply_to,
            job.job_id,
            0,
            "poison_job",
            f"this request failed on {count - 1} workers and was set aside for inspection",
            False,
        )
        await message.ack()
        self.dead_lettered += 1
        return True

    def _drop_before_start(self, job: ChatJob) -> bool:
        if self._cancel_before_start.pop(job.job_id, None) is not None:
            log.info("job %s: cancelled before it started; dropped", job.job_id)
            self.cancelled += 1
            return True
        if job.deadline is not None and job.deadline <= datetime.now(UTC):
            log.info("job %s: deadline passed before it started; dropped", job.job_id)
            self.cancelled += 1
            return True
        return False

    async def _stream(self, job: ChatJob, reply_to: str, says_who: bool = True) -> int | None:
        """Publish the job's chunks and its result; returns the last seq, None on error.
        `says_who`: whether the requester reads `served_by` (an older gateway does not)."""
        seq = 0
        queued_ms = max((datetime.now(UTC) - job.created_at).total_seconds() * 1000, 0)
        log.info("job %s: started (conversation %s)", job.job_id, job.conversation_id)
        try:
            served_by = self._served_by(job)
            events = self.backend.generate(job)
            finished: Finished | None = None
            pacing = self.streamed if job.stream else self.unstreamed
            family = self.backend.tool_family if job.tools is not None else None
            calls = family.parser() if family is not None else None
            # aclosing: when a reply fails (nobody waits, no broker), generation stops
            # now, not when the generator is collected.
            async with contextlib.aclosing(
                coalesce(events, pacing.tokens, pacing.seconds)
            ) as batches:
                async for batch in batches:
                    text, tokens, logprobs, finished = _merge(batch, finished)
                    if calls is not None:
                        text = calls.feed(text) + (calls.flush() if finished else "")
                    if text or tokens:
                        chunk = TokenChunk(
                            job_id=job.job_id,
                            seq=seq,
                            text=text,
                            token_count=tokens,
                            logprobs=logprobs if job.logprobs is not None else None,
                        )
                        await self.bus.reply(reply_to, chunk)
                        seq += 1
            if finished is None:
                raise MeshError("the backend ended without finishing", "backend_error")
            tool_calls, tail = _calls_of(job, calls)
            if tail:  # calls that did not parse (cut by max_tokens): the text as written
                await self.bus.reply(
                    reply_to, TokenChunk(job_id=job.job_id, seq=seq, text=tail, token_count=0)
                )
                seq += 1
            usage = Usage(
                prompt_tokens=finished.prompt_tokens,
                completion_tokens=finished.completion_tokens,
                cached_tokens=finished.cached_tokens,
            )
            reason: FinishReason | Literal["tool_calls"] = finished.reason
            if tool_calls and reason in ("stop", "length"):  # the calls parsed: complete
                reason = "tool_calls"
            result = JobResult(
                job_id=job.job_id,
                seq=seq,
                finish_reason=reason,
                usage=usage,
                worker_id=self.bus.worker_id,
                queued_ms=round(queued_ms, 3),
                tool_calls=tool_calls or None,
                served_by=served_by if says_who else None,
            )
            await self.bus.reply(reply_to, result)
            log.info(
                "job %s: done, %d tokens (%s)", job.job_id, usage.completion_tokens, finished.reason
            )
            return seq
        except (RequesterGone, BusUnavailable):
            raise  # nobody to tell, or no way to tell them
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

    def _served_by(self, job: ChatJob) -> str:
        """'base' or 'base+adapter@vN': the model and adapter version answering `job`."""
        base = self.backend.base_model
        if job.model is None or job.model == base:
            return base
        version = self.backend.adapters.get(job.model)
        if version is None:
            raise MeshError(f"model {job.model!r} is not served here", "model_not_found")
        return served_label(base, job.model, version)

    async def _reply_error(
        self, reply_to: str, job_id: str, seq: int, code: str, text: str, retryable: bool
    ) -> None:
        """Tell the requester the job failed (nobody to tell when it is gone)."""
        error = JobError(job_id=job_id, seq=seq, code=code, message=text, retryable=retryable)
        try:
            await self.bus.reply(reply_to, error)
        except RequesterGone:
            log.info("job %s: its requester is gone; the error was not delivered", job_id)


def _merge(
    batch: Sequence[GenerationEvent], finished: Finished | None
) -> tuple[str, int, list[TokenLogprob], Finished | None]:
    texts = []
    tokens = 0
    logprobs: list[TokenLogprob] = []
    for event in batch:
        if isinstance(event, TextDelta):
            texts.append(event.text)
            tokens += event.tokens
            logprobs.extend(event.logprobs or ())
        else:
            finished = event
    return "".join(texts), tokens, logprobs, finished


def _calls_of(job: ChatJob, parser: CallParser | None) -> tuple[list[ToolCall], str]:
    """The tool calls the answer made, or (none, the calls' text as written) when they
    do not parse; a call of a tool that was not offered is text too."""
    if parser is None or parser.calls_text is None:
        return [], ""
    try:
        calls = parser.calls()
    except ToolCallParseError as exc:
        log.info("job %s: its tool calls do not parse (%s); sent as text", job.job_id, exc)
        return [], parser.marker + parser.calls_text
    offered = {tool.name for tool in job.tools.tools} if job.tools else set()
    if any(call.name not in offered for call in calls):
        log.info("job %s: it called a tool it was not offered; sent as text", job.job_id)
        return [], parser.marker + parser.calls_text
    return calls, ""
