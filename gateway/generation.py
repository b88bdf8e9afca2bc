"""Runs jobs for the HTTP routes: admission (workers, queue depth, prompt length),
submission, relaying the replies, and cancelling jobs nobody waits for any more."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from gateway.errors import ApiError
from gateway.metrics import Metrics
from gateway.response_cache import CachedAnswer, ResponseCache
from gateway.settings import GatewaySettings
from proto.api import PromptTokensDetails, SamplingOptions, Usage
from proto.messages import ChatJob, ChatMessage, JobError, JobResult, SamplingParams, TokenChunk
from services import liveness
from services.bus import JobClient, ReplyStream, StreamRestarted
from services.errors import BusUnavailable, JobFailed, JobTimeout, NoWorkers
from services.redis_client import Keys

log = logging.getLogger(__name__)


class Restart:
    """The job started over on another worker: drop the text received so far."""


@dataclass(frozen=True)
class Outcome:
    """How a job ended and what it cost."""

    finish_reason: str
    usage: Usage


Item = str | Outcome | Restart


class Relay:
    """A job's reply: text pieces, then one Outcome (a Restart when it started over on
    another worker). `cache` is "hit" or "miss" when the response cache applied to
    the request (routes send it as `X-Cache`), else None."""

    def __init__(self, items: AsyncIterator[Item], cache: str | None = None) -> None:
        self._items = items
        self.cache = cache

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> Item:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()

    def wrap(self, items: AsyncIterator[Item]) -> Relay:
        """The same relay's `cache` over other items (e.g. recording the turn)."""
        return Relay(items, self.cache)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Cache": self.cache} if self.cache else {}


class Cached:
    """A value read at most once per `ttl_s` (admission checks on every request)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.value: Any = None
        self.read_at = float("-inf")

    def fresh(self) -> bool:
        return time.monotonic() - self.read_at <= self.ttl_s

    def set(self, value: Any) -> Any:
        self.value, self.read_at = value, time.monotonic()
        return value


class WorkerDirectory:
    """Live workers of this gateway's model family, cached for a moment."""

    def __init__(self, client: redis.Redis, keys: Keys, family: str, cache_s: float) -> None:
        self.client = client
        self.keys = keys
        self.family = family
        self._cache = Cached(cache_s)

    async def live(self) -> list[Any]:
        if not self._cache.fresh():
            workers = await liveness.live_workers(self.client, self.keys)
            self._cache.set([w for w in workers if w.model_family == self.family])
        return list(self._cache.value)


class PromptCounter:
    """Counts prompt tokens with the model's own tokenizer, before any worker sees them.

    Rendering the chat template and tokenizing cost ~1 ms of the gateway's CPU per
    request, most of its share. A token holds at least one byte of text, so a prompt
    whose bytes plus the template's own tokens fit the context is let through
    uncounted; only prompts near the limit are tokenized.
    """

    def __init__(self, tokenizer: Any, max_context: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        # The template's own tokens: a fixed part and a part per message.
        one = self._template_tokens([{"role": "user", "content": ""}])
        three = self._template_tokens(
            [{"role": r, "content": ""} for r in ("user", "assistant", "user")]
        )
        self.per_message = max((three - one) // 2, 0) + 2
        self.fixed = one + 8

    def _template_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(
            self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
        )

    def upper_bound(self, job: ChatJob) -> int:
        """At least as many tokens as the prompt has."""
        if job.prompt is not None:
            return len(job.prompt.encode()) + self.fixed
        text = sum(len(m.content.encode()) for m in job.messages)
        return text + self.fixed + self.per_message * len(job.messages)

    @classmethod
    def load(cls, ref: str, max_context: int) -> PromptCounter:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref)
        if not max_context:
            config = Path(ref) / "config.json"
            if config.is_file():
                max_context = int(json.loads(config.read_text()).get("max_position_embeddings", 0))
        return cls(tokenizer, max_context or 32768)

    def render(self, job: ChatJob) -> str:
        """The prompt as the model sees it (the chat template applied)."""
        if job.prompt is not None:
            return job.prompt
        messages = [m.model_dump() for m in job.messages]
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            )
        except Exception as exc:  # the template's raise_exception
            raise ApiError(400, "invalid_request_error", str(exc), "invalid_messages") from exc

    def count(self, job: ChatJob) -> int:
        if job.prompt is not None:
            return len(self.tokenizer.encode(job.prompt, add_special_tokens=True))
        messages = [m.model_dump() for m in job.messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
        except Exception as exc:  # the template's raise_exception
            raise ApiError(400, "invalid_request_error", str(exc), "invalid_messages") from exc
        return len(ids)

    def check(self, job: ChatJob) -> None:
        if self.upper_bound(job) + job.sampling.max_tokens <= self.max_context:
            return
        tokens = self.count(job)
        if tokens + job.sampling.max_tokens > self.max_context:
            raise ApiError(
                400,
                "invalid_request_error",
                f"the prompt has {tokens} tokens; with max_tokens {job.sampling.max_tokens} "
                f"that exceeds the model's context of {self.max_context}",
                "context_length_exceeded",
            )


class Generation:
    def __init__(
        self,
        settings: GatewaySettings,
        jobs: JobClient,
        workers: WorkerDirectory,
        metrics: Metrics,
        prompts: PromptCounter | None,
        responses: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.responses = responses  # whole answers of determined requests (off: None)
        self.jobs = jobs
        self.workers = workers
        self.metrics = metrics
        self.prompts = prompts
        self._depth = Cached(settings.queue_depth_cache_s)
        self._background: set[asyncio.Task[None]] = set()

    def sampling(self, options: SamplingOptions) -> SamplingParams:
        s = self.settings
        max_tokens = options.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_cap:
            raise ApiError(
                400,
                "invalid_request_error",
                f"max_tokens {max_tokens} is above the cap of {s.max_tokens_cap}",
                "max_tokens_too_large",
            )
        if (options.min_tokens or 0) > max_tokens:
            raise ApiError(
                400, "invalid_request_error", "min_tokens is above max_tokens", "invalid_min_tokens"
            )
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=options.min_tokens or 0,
            temperature=s.temperature if options.temperature is None else options.temperature,
            top_p=options.top_p or s.top_p,
            repetition_penalty=options.repetition_penalty or s.repetition_penalty,
            stop=options.stop or [],
            seed=options.seed,
        )

    def new_job(
        self,
        sampling: SamplingParams,
        *,
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
        model: str | None = None,
        conversation_id: str | None = None,
        stream: bool = True,
    ) -> ChatJob:
        now = datetime.now(UTC)
        return ChatJob(
            job_id=uuid.uuid4().hex,
            model=model,
            messages=messages or [],
            prompt=prompt,
            sampling=sampling,
            conversation_id=conversation_id,
            created_at=now,
            deadline=now + timedelta(seconds=self.settings.request_timeout_s),
            stream=stream,
        )

    async def models(self) -> list[str]:
        return sorted({w.base_model for w in await self.workers.live()})

    async def adapters(self) -> dict[str, str]:
        """Adapter name -> its base model, for adapters some live worker serves."""
        return {name: w.base_model for w in await self.workers.live() for name in w.adapters}

    async def resolve_model(self, requested: str | None) -> str | None:
        """None for the base model, the name for an adapter; 404 when nobody serves it."""
        if requested is None or requested in await self.models():
            return None
        if requested in await self.adapters():
            return requested
        raise ApiError(
            404,
            "invalid_request_error",
            f"model {requested!r} is not served; see GET /v1/models",
            "model_not_found",
        )

    async def admit(self) -> None:
        """503 at once when nobody can take the job soon, instead of waiting."""
        live = await self.workers.live()
        self.metrics.live_workers.set(len(live))
        if not live:
            raise NoWorkers("no live worker can serve this model; try again shortly")
        if self.settings.max_queue_depth > 0:
            depth = self._depth.value if self._depth.fresh() else None
            if depth is None:
                depth = self._depth.set(await self.jobs.queue_depth())
            if depth >= self.settings.max_queue_depth:
                raise BusUnavailable(
                    f"{depth} jobs are already waiting; try again shortly", code="queue_full"
                )

    async def start(self, job: ChatJob, scope: str | None = None) -> Relay:
        """Admit and submit `job`; returns its relay (text pieces, then one Outcome).

        Raises before anything is sent, so a route can still answer with an HTTP
        error. Closing the relay early cancels the job on its worker. `scope` (the API
        key's id) lets the response cache serve the key's own earlier answer.
        """
        if self.prompts is not None:
            self.prompts.check(job)
        cache_key = await self._response_key(job, scope)
        if cache_key is not None:
            assert self.responses is not None
            hit = await self.responses.get(cache_key)
            self.metrics.response_cache.labels("hit" if hit else "miss").inc()
            if hit is not None:
                log.info("job %s: answered from the response cache", job.job_id)
                return Relay(_replay(hit), cache="hit")
        await self.admit()
        replies = await self.jobs.submit(job, self.settings.request_timeout_s)
        relay = self._relay(job, replies)
        if cache_key is None:
            return Relay(relay)
        return Relay(self._keep(cache_key, relay), cache="miss")

    async def _response_key(self, job: ChatJob, scope: str | None) -> str | None:
        """The response cache's key for `job`, or None when the cache does not apply:
        off, no key, a sampled answer, or live workers disagreeing on the model."""
        if self.responses is None or scope is None or not self.responses.determined(job):
            return None
        live = await self.workers.live()
        bases = sorted({w.base_model for w in live})
        if len(bases) != 1:
            return None
        model: dict[str, Any] = {"base": bases[0]}
        if job.model is not None:
            versions = {w.adapters.get(job.model) for w in live}
            if len(versions) != 1 or None in versions:  # a rollout, or not everywhere
                return None
            model |= {"adapter": job.model, "version": versions.pop()}
        return self.responses.key(job, scope, model)

    async def _keep(self, key: str, relay: AsyncIterator[Item]) -> AsyncIterator[Item]:
        """Relay `relay` and keep its answer once it is complete."""
        pieces: list[str] = []
        try:
            async for item in relay:
                if isinstance(item, Outcome) and item.finish_reason in ("stop", "length"):
                    assert self.responses is not None
                    answer = CachedAnswer("".join(pieces), item.finish_reason, item.usage)
                    await self.responses.put(key, answer)
                elif isinstance(item, Restart):
                    pieces.clear()
                elif isinstance(item, str):
                    pieces.append(item)
                yield item
        finally:
            await relay.aclose()  # type: ignore[attr-defined]

    async def _relay(
        self, job: ChatJob, replies: ReplyStream
    ) -> AsyncIterator[str | Outcome | Restart]:
        submitted = time.perf_counter()
        first = True
        finished = False
        try:
            async for reply in replies:
                if isinstance(reply, StreamRestarted):
                    self.metrics.jobs.labels("restarted").inc()
                    log.warning("job %s: its worker was lost; another one started over", job.job_id)
                    yield Restart()
                elif isinstance(reply, TokenChunk):
                    if first and reply.text:
                        self.metrics.ttft.observe(time.perf_counter() - submitted)
                        first = False
                    if reply.text:
                        yield reply.text
                elif isinstance(reply, JobError):
                    finished = True
                    self.metrics.jobs.labels("error").inc()
                    raise JobFailed(reply.message, reply.code, reply.retryable)
                else:
                    finished = True
                    yield self._finish(reply)
        except JobTimeout:
            self.metrics.jobs.labels("timeout").inc()
            raise
        finally:
            replies.close()
            if not finished:
                # The client left, the deadline passed, or the broker went away.
                self.metrics.jobs.labels("abandoned").inc()
                self._in_background(self.jobs.cancel(job.job_id, "abandoned"))

    def _finish(self, result: JobResult) -> Outcome:
        usage = result.usage
        self.metrics.jobs.labels("answered").inc()
        self.metrics.tokens_in.inc(usage.prompt_tokens)
        self.metrics.tokens_out.inc(usage.completion_tokens)
        self.metrics.tokens_cached.inc(usage.cached_tokens)
        if result.queued_ms is not None:
            self.metrics.queue_wait.observe(result.queued_ms / 1000)
        log.info(
            "job %s: answered by %s (%s)", result.job_id, result.worker_id, result.finish_reason
        )
        total = usage.prompt_tokens + usage.completion_tokens
        return Outcome(
            result.finish_reason,
            Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=total,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
            ),
        )

    def _in_background(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _replay(answer: CachedAnswer) -> AsyncIterator[Item]:
    if answer.text:
        yield answer.text
    # No worker read any of the prompt this time.
    details = PromptTokensDetails(cached_tokens=answer.usage.prompt_tokens)
    yield Outcome(
        answer.finish_reason, answer.usage.model_copy(update={"prompt_tokens_details": details})
    )


async def collect(relay: AsyncIterator[str | Outcome | Restart]) -> tuple[str, Outcome]:
    """The whole answer of a relay (exactly once, also when a worker was lost midway)."""
    pieces: list[str] = []
    outcome: Outcome | None = None
    async for item in relay:
        if isinstance(item, Outcome):
            outcome = item
        elif isinstance(item, Restart):
            pieces.clear()
        else:
            pieces.append(item)
    if outcome is None:
        raise BusUnavailable("the reply stream ended without a result", code="bad_reply")
    return "".join(pieces), outcome
