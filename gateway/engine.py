"""The gateway's one boundary to whatever generates answers.

Routes and the chat service see only `Engine`: submit a job and read its reply
(text pieces, then one `Outcome`), abort it, and ask which models are served, how
deep the queue is and whether the engine is healthy — as vLLM's `EngineClient` or
TGI's `Backend` do. `BusEngine` is the real one (RabbitMQ jobs, worker liveness in
Redis); `gateway.memory_engine.MemoryEngine` answers in-process, for the HTTP
layer's own tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis

from gateway.metrics import Metrics
from gateway.settings import GatewaySettings
from proto.api import PromptTokensDetails, Usage
from proto.messages import (
    ChatJob,
    JobError,
    JobResult,
    TokenChunk,
    TokenLogprob,
    ToolCall,
    WorkerStatus,
)
from services import liveness
from services.bus import JobClient, ReplyStream, StreamRestarted, Topology
from services.errors import BusUnavailable, JobFailed, JobTimeout, MeshError, NoWorkers
from services.redis_client import Keys

log = logging.getLogger(__name__)


class Restart:
    """The job started over on another worker: drop the text received so far."""


@dataclass(frozen=True)
class Outcome:
    """How a job ended and what it cost; the tools it called; which model and adapter
    version answered ('demo-model+continuity@v3'), when the worker said."""

    finish_reason: str
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    served_by: str | None = None


@dataclass(frozen=True)
class Logprobs:
    """The log probabilities of the tokens of the text pieces before it (sent only
    when the job asked for them)."""

    tokens: tuple[TokenLogprob, ...]


Item = str | Logprobs | Outcome | Restart


class Relay:
    """A job's reply: text pieces (each followed by its Logprobs when the job asked),
    then one Outcome (a Restart when it started over on another worker). `cache` is
    "hit" or "miss" when the response cache applied to the request (routes send it as
    `X-Cache`), else None. Closing it before the
    Outcome aborts the job."""

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

    def wrap(self, items: AsyncIterator[Item], cache: str | None = None) -> Relay:
        """Other items (e.g. recording the turn) over this relay; its `cache` unless given."""
        return Relay(items, cache or self.cache)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Cache": self.cache} if self.cache else {}


@dataclass(frozen=True)
class Answer:
    """A whole answer: its text, its tokens' log probabilities (when asked), its end."""

    text: str
    logprobs: list[TokenLogprob]
    outcome: Outcome


async def collect_all(relay: AsyncIterator[Item]) -> Answer:
    """The whole answer of a relay (exactly once, also when a worker was lost midway)."""
    pieces: list[str] = []
    logprobs: list[TokenLogprob] = []
    outcome: Outcome | None = None
    async for item in relay:
        if isinstance(item, Outcome):
            outcome = item
        elif isinstance(item, Restart):
            pieces.clear()
            logprobs.clear()
        elif isinstance(item, Logprobs):
            logprobs.extend(item.tokens)
        else:
            pieces.append(item)
    if outcome is None:
        raise BusUnavailable("the reply stream ended without a result", code="bad_reply")
    return Answer("".join(pieces), logprobs, outcome)


async def collect(relay: AsyncIterator[Item]) -> tuple[str, Outcome]:
    """The text of a relay's whole answer, and its end."""
    answer = await collect_all(relay)
    return answer.text, answer.outcome


@dataclass(frozen=True)
class EngineHealth:
    broker: bool
    live_workers: int


class Engine(Protocol):
    async def generate(self, job: ChatJob) -> Relay:
        """Admit and submit `job`. Raises a MeshError before anything is sent (no
        worker, a full queue, no broker), so a route can still answer with an HTTP
        error; failures after that come out of the relay."""
        ...

    async def abort(self, job_id: str, reason: str) -> None:
        """Stop `job_id` wherever it runs (the relay does this when closed early)."""
        ...

    async def workers(self) -> list[WorkerStatus]:
        """The live workers of this gateway's model family."""
        ...

    async def queue_depth(self) -> int | None:
        """Jobs waiting for a worker; None when the broker cannot say."""
        ...

    async def health(self) -> EngineHealth:
        """Whether the engine is connected, and how many workers are live (never raises)."""
        ...

    async def close(self) -> None: ...


def served_models(workers: list[WorkerStatus]) -> list[str]:
    """The base models `workers` serve."""
    return sorted({w.base_model for w in workers})


def served_adapters(workers: list[WorkerStatus]) -> dict[str, str]:
    """Adapter name -> its base model, for adapters some of `workers` serve."""
    return {name: w.base_model for w in workers for name in w.adapters}


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

    async def live(self) -> list[WorkerStatus]:
        if not self._cache.fresh():
            workers = await liveness.live_workers(self.client, self.keys)
            self._cache.set([w for w in workers if w.model_family == self.family])
        return list(self._cache.value)


class BusEngine:
    """Jobs over RabbitMQ to the workers; admission from their liveness records."""

    def __init__(
        self,
        settings: GatewaySettings,
        jobs: JobClient,
        directory: WorkerDirectory,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.directory = directory
        self.metrics = metrics
        self._depth = Cached(settings.queue_depth_cache_s)
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls, settings: GatewaySettings, client: redis.Redis, metrics: Metrics
    ) -> BusEngine:
        jobs = JobClient(
            Topology(settings.namespace, settings.model_family),
            client_id=f"gateway-{uuid.uuid4().hex[:12]}",
            outage_grace_s=settings.broker_outage_grace_s,
        )
        await jobs.start(settings.amqp_url)
        directory = WorkerDirectory(
            client, Keys(settings.namespace), settings.model_family, settings.workers_cache_s
        )
        return cls(settings, jobs, directory, metrics)

    async def close(self) -> None:
        await self.jobs.close()

    async def workers(self) -> list[WorkerStatus]:
        return await self.directory.live()

    async def queue_depth(self) -> int | None:
        try:
            return await self.jobs.queue_depth()
        except MeshError:
            return None

    async def health(self) -> EngineHealth:
        try:
            live = len(await self.workers())
        except Exception:  # the liveness records are in Redis: unreadable counts as none
            live = 0
        return EngineHealth(self.jobs.connected, live)

    async def abort(self, job_id: str, reason: str) -> None:
        await self.jobs.cancel(job_id, reason)

    async def _admit(self) -> None:
        """503 at once when nobody can take the job soon, instead of waiting."""
        live = await self.directory.live()
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

    async def generate(self, job: ChatJob) -> Relay:
        await self._admit()
        replies = await self.jobs.submit(job, self.settings.request_timeout_s)
        return Relay(self._relay(job, replies))

    async def _relay(self, job: ChatJob, replies: ReplyStream) -> AsyncIterator[Item]:
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
                    if reply.logprobs:
                        yield Logprobs(tuple(reply.logprobs))
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
                self._in_background(self.abort(replies.job_id, "abandoned"))

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
        return Outcome(
            result.finish_reason,
            Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.prompt_tokens + usage.completion_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
            ),
            tuple(result.tool_calls or ()),
            result.served_by,
        )

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
