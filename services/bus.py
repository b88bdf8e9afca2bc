"""The bus: RabbitMQ topology, job publishing, reply streams and token coalescing.

Measured on this kind of machine (see DESIGN.md): persistent jobs with publisher
confirms cost ~0.25 ms and are worth it; per-token messages are not, so replies
are transient, unconfirmed and coalesced several tokens to a message. They go
to one exclusive reply queue per gateway process, which the robust channel
re-declares after a broker restart (the plain `amq.rabbitmq.reply-to` consumer
does not recover).

Faults (DESIGN.md, "When something fails"):
- the reply queue is the requesting gateway's liveness: it is exclusive, so the
  broker deletes it when the gateway's connection ends. Workers publish replies
  `mandatory` with confirms; a reply the broker returns means nobody waits for
  the job, and the worker stops it (RequesterGone).
- a lost broker connection does not fail the jobs in flight: their messages are
  durable and were confirmed. When the connection is back, every job whose
  caller can take a fresh start (a plain request, or a stream that has received
  nothing yet) is published again as a new attempt, and the attempt before it is
  cancelled; a stream already partly received ends with a clear error instead.
  A reply for a job nobody here waits for any more is answered with a cancel, so
  no worker keeps generating a superseded or abandoned attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
)

from proto.adapters import AdapterPublished
from proto.messages import (
    REPLY_ADAPTER,
    BusMessage,
    CancelJob,
    ChatJob,
    JobError,
    JobResult,
    TokenChunk,
)
from services.errors import BusUnavailable, JobTimeout, RequesterGone

log = logging.getLogger(__name__)

ReplyMessage = TokenChunk | JobResult | JobError
CONTENT_TYPE = "application/json"
# What a publish raises when the broker connection is gone, going or being restored.
PUBLISH_FAILURES = (
    TimeoutError,
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
REPLY_TIMEOUT_S = 10.0  # a reply's publish and confirm; past it the connection is taken as lost


def with_reconnect_interval(url: str, seconds: float = 1.0, heartbeat_s: int | None = None) -> str:
    """aio-pika waits 5 s between reconnect attempts by default; we want ~1 s.
    `heartbeat_s`: the AMQP heartbeat to ask for (the URL's own wins)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("reconnect_interval", str(seconds))
    if heartbeat_s is not None:
        query.setdefault("heartbeat", str(heartbeat_s))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def connect(url: str, name: str, heartbeat_s: int | None = None) -> AbstractRobustConnection:
    """A robust connection: channels, queues and consumers come back after a broker
    restart. `heartbeat_s`: how soon the broker gives up on a peer that went silent
    (default 60 s)."""
    try:
        return await aio_pika.connect_robust(
            with_reconnect_interval(url, heartbeat_s=heartbeat_s),
            client_properties={"connection_name": name},
            timeout=10,
        )
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BusUnavailable(f"cannot reach RabbitMQ at {_redact(url)}: {exc}") from exc


def _redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{host}{port}", query=""))


def _is_open(connection: AbstractRobustConnection | None) -> bool:
    """Connected now (a robust connection that is reconnecting is not)."""
    return connection is not None and not connection.is_closed and connection.connected.is_set()


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue name, in one place."""

    namespace: str
    model_family: str
    # Above the longest allowed generation, so the broker never closes a busy worker's channel.
    consumer_timeout_ms: int = 30 * 60 * 1000

    @property
    def jobs_exchange(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def job_queue(self) -> str:
        return f"{self.namespace}.jobs.{self.model_family}"

    @property
    def dead_letter_queue(self) -> str:
        """Jobs set aside after failing on too many workers, for a person to look at."""
        return f"{self.job_queue}.dead"

    @property
    def control_exchange(self) -> str:
        return f"{self.namespace}.control"

    @property
    def adapters_exchange(self) -> str:
        return f"{self.namespace}.adapters"

    @property
    def context_exchange(self) -> str:
        """Context changes between sites (topic: routed by the originating site)."""
        return f"{self.namespace}.context"

    def context_queue(self, site: str) -> str:
        return f"{self.namespace}.context.{site}"

    def adapters_queue(self, worker_id: str) -> str:
        return f"{self.namespace}.adapters.{worker_id}"

    def control_queue(self, worker_id: str) -> str:
        return f"{self.namespace}.control.{worker_id}"

    def reply_queue(self, client_id: str) -> str:
        return f"{self.namespace}.replies.{client_id}"

    async def declare_jobs(
        self, channel: AbstractRobustChannel
    ) -> tuple[AbstractRobustExchange, AbstractQueue]:
        exchange = await channel.declare_exchange(
            self.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            self.job_queue,
            durable=True,
            arguments={"x-consumer-timeout": self.consumer_timeout_ms},
        )
        await queue.bind(exchange, routing_key=self.model_family)
        return exchange, queue

    async def declare_control(self, channel: AbstractRobustChannel) -> AbstractRobustExchange:
        return await channel.declare_exchange(
            self.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )


Q = TypeVar("Q")


async def _get(queue: asyncio.Queue[Q], within_s: float | None) -> Q:
    """queue.get() that raises TimeoutError after `within_s` (None: wait forever),
    without the extra task wait_for creates on every call of this hot path."""
    if not queue.empty():
        return queue.get_nowait()
    if within_s is None:
        return await queue.get()
    if within_s <= 0:
        raise TimeoutError
    async with asyncio.timeout(within_s):
        return await queue.get()


# A job's header: the gateway that sent it reads the reply fields added with tools and
# structured outputs (JobResult.served_by); a worker leaves them out for an older one.
READS_HEADER = "x-mesh-reads"
READS = "served_by"


def encode(
    message: BusMessage, headers: dict[str, str] | None = None, **properties: object
) -> aio_pika.Message:
    """A bus message as an AMQP message: JSON body, `type`/`schema_version` headers.

    Fields that are null are left out: every optional field defaults to null, and a
    peer of the release before, which refuses fields it does not know, then reads
    the message of this one as long as it uses nothing new."""
    return aio_pika.Message(
        body=message.model_dump_json(exclude_none=True).encode(),
        content_type=CONTENT_TYPE,
        headers={
            "type": message.type,  # type: ignore[attr-defined]
            "schema_version": message.schema_version,  # type: ignore[attr-defined]
            **(headers or {}),
        },
        **properties,  # type: ignore[arg-type]
    )


def decode_reply(body: bytes) -> ReplyMessage:
    return REPLY_ADAPTER.validate_json(body)


# -- gateway side ---------------------------------------------------------------------


async def announce_adapter(url: str, topology: Topology, event: AdapterPublished) -> None:
    """Publish `event` on the adapters fanout exchange (confirmed, persistent), from a
    process that holds no bus connection of its own (trainer, gateway admin)."""
    connection = await connect(url, "adapter-publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            topology.adapters_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        await exchange.publish(
            encode(event, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=""
        )


class StreamRestarted:
    """The job's worker died and another one started the answer over (seq 0 again)."""


class ReplyStream:
    """The replies of one job, in order: TokenChunks, then one JobResult or JobError.

    Iterating raises JobTimeout when the deadline passes and BusUnavailable when the
    connection to the broker is lost and the job cannot start over. When the job
    starts over (on another worker after its own died, or as a new attempt after a
    broker outage: seq 0 after later ones) it yields StreamRestarted before the new
    first chunk, so the caller can drop what it has; any other gap ends the stream
    with an error rather than a silent mix of two streams.

    `job_id` is the attempt whose replies the stream takes now; `job` is the job as
    first submitted (None for a stream made by hand in a test).
    """

    def __init__(
        self,
        job_id: str,
        deadline: float,
        on_close: Callable[[], None],
        job: ChatJob | None = None,
    ) -> None:
        self.job_id = job_id
        self.job = job
        self.deadline = deadline
        self.attempts = 1
        self.received = 0  # chunks fed so far (read or not)
        self.ended = False  # its JobResult, JobError or an error has been fed
        self.closed = False  # its caller is done with it
        self._queue: asyncio.Queue[ReplyMessage | BaseException] = asyncio.Queue()
        self._next_seq = 0
        self._held: ReplyMessage | None = None
        self._finished = False
        self._on_close = on_close

    @property
    def restartable(self) -> bool:
        """Whether the caller can take the answer from a fresh start: a plain request
        (it drops what it has at StreamRestarted), or a stream with nothing yet."""
        if self.job is None or self.ended or self.closed:
            return False
        return not self.job.stream or self.received == 0

    def feed(self, item: ReplyMessage | BaseException) -> None:
        if isinstance(item, TokenChunk):
            self.received += 1
        else:
            self.ended = True
        self._queue.put_nowait(item)

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> ReplyMessage | StreamRestarted:
        if self._finished:
            raise StopAsyncIteration
        try:
            item: ReplyMessage | BaseException
            if self._held is not None:
                item, self._held = self._held, None
            else:
                item = await _get(self._queue, self.deadline - time.monotonic())
        except TimeoutError:
            self._finished = True
            raise JobTimeout(f"job {self.job_id}: no answer before the deadline") from None
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.seq == 0 and self._next_seq > 0:
            self._next_seq = 0
            self._held = item  # handed out right after the marker
            return StreamRestarted()
        if item.seq != self._next_seq:
            self._finished = True
            raise BusUnavailable(
                f"job {self.job_id}: reply {item.seq} arrived where {self._next_seq} was due",
                code="reply_out_of_order",
            )
        self._next_seq += 1
        if not isinstance(item, TokenChunk):
            self._finished = True
        return item

    def close(self) -> None:
        self._finished = True
        self.closed = True
        self._on_close()


def attempt_id(job_id: str, attempt: int) -> str:
    """The id of `job_id`'s `attempt`-th publication (the first keeps the job's own)."""
    return job_id if attempt == 1 else f"{job_id[:56]}-r{attempt}"


class JobClient:
    """Publishes jobs (persistent, confirmed) and routes their replies to ReplyStreams.

    Across a lost broker connection the streams of jobs that can start over wait
    (at most `outage_grace_s`, and never past their deadline) and are published
    again once the connection and the reply queue are back; see the module's notes.
    """

    def __init__(self, topology: Topology, client_id: str, outage_grace_s: float = 30.0) -> None:
        self.topology = topology
        self.client_id = client_id
        self.outage_grace_s = outage_grace_s
        self.resubmitted = 0  # attempts published again after an outage
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._control: AbstractRobustExchange | None = None
        self._channel: AbstractRobustChannel | None = None
        self._reply_queue_name = topology.reply_queue(client_id)
        self._streams: dict[str, ReplyStream] = {}  # by the attempt id
        # Streams whose attempt was cut by a lost connection, waiting to be published
        # again; they take no reply meanwhile (a stale attempt's must not mix in).
        self._interrupted: list[ReplyStream] = []
        self._outage: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs nobody here waits for that a worker still replied to: when each was
        # last told to stop (so a chatty one is not sent a cancel per reply).
        self._told: dict[str, float] = {}
        self._closing = False
        # Open and restored: aio-pika marks a robust connection connected before it has
        # reopened its channels (publishing then fails, and a reply could find no queue).
        self._ready = False

    @property
    def connected(self) -> bool:
        return self._ready and _is_open(self._connection)

    async def start(self, url: str) -> None:
        # A short heartbeat: a gateway whose host vanishes without closing its socket
        # (power, network) loses its reply queue, and so its jobs, within ~30 s.
        self._connection = await connect(url, f"gateway-{self.client_id}", heartbeat_s=15)
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._exchange, _ = await self.topology.declare_jobs(channel)
        self._channel = await self._connection.channel(publisher_confirms=False)
        self._control = await self.topology.declare_control(self._channel)
        replies = await self._connection.channel(publisher_confirms=False)
        queue = await replies.declare_queue(
            self._reply_queue_name, exclusive=True, auto_delete=True
        )
        await queue.consume(self._on_reply, no_ack=True)
        self._ready = True

    async def close(self) -> None:
        self._closing = True
        self._fail_all(BusUnavailable("gateway is shutting down"))
        if self._outage is not None:
            self._outage.cancel()
        if self._connection is not None:
            await self._connection.close()

    def _on_connection_lost(self, *_: object) -> None:
        """Replies sent to the old reply queue are gone with it. A job that can start
        over waits for the broker; a stream already partly received cannot be resumed
        without repeating or missing text, so it ends now, clearly."""
        self._ready = False
        if self._closing:
            return  # closing for good: close() has told every caller
        cut = 0
        for stream in list(self._streams.values()):
            if stream.ended or stream.closed:
                continue
            if stream.restartable:
                self._streams.pop(stream.job_id, None)
                self._interrupted.append(stream)
                cut += 1
            else:
                self._end(
                    stream,
                    BusUnavailable(
                        "the connection to RabbitMQ was lost in the middle of this answer",
                        code="stream_interrupted",
                    ),
                )
        if cut:  # (this runs again at every failed reconnect: say it once)
            log.warning(
                "connection to RabbitMQ lost; %d job(s) wait up to %.0f s for it",
                cut,
                self.outage_grace_s,
            )
        self._arm_outage_timer()

    def _arm_outage_timer(self) -> None:
        if self._interrupted and self._outage is None:
            loop = asyncio.get_running_loop()
            self._outage = loop.call_later(self.outage_grace_s, self._outage_too_long)

    def _outage_too_long(self) -> None:
        self._outage = None
        if self.connected:
            return  # back: the reconnect publishes them again
        waiting, self._interrupted = self._interrupted, []
        for stream in waiting:
            self._end(
                stream,
                BusUnavailable(
                    f"RabbitMQ was unreachable for {self.outage_grace_s:.0f} s",
                    code="broker_unavailable",
                ),
            )

    def _end(self, stream: ReplyStream, error: BaseException) -> None:
        """End `stream` with `error`; replies for it from now on are for nobody (and
        their worker is told to stop)."""
        stream.feed(error)
        self._streams.pop(stream.job_id, None)
        if stream in self._interrupted:
            self._interrupted.remove(stream)

    def _on_reconnected(self, *_: object) -> None:
        # Called once the channels, the reply queue and its consumer are restored.
        self._ready = True
        if self._outage is not None:
            self._outage.cancel()
            self._outage = None
        task = asyncio.get_running_loop().create_task(self._resubmit_interrupted())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resubmit_interrupted(self) -> None:
        waiting, self._interrupted = self._interrupted, []
        for index, stream in enumerate(waiting):
            if not self.connected:  # lost again: the rest wait for the next reconnect
                self._interrupted.extend(s for s in waiting[index:] if not s.closed)
                self._arm_outage_timer()
                return
            try:
                await self._resubmit(stream)
            except Exception as exc:  # never leave the others unpublished
                log.exception("job %s: could not be published again", stream.job_id)
                self._end(stream, BusUnavailable(f"could not publish the job again: {exc!r}"))

    async def _resubmit(self, stream: ReplyStream) -> None:
        """Publish `stream`'s job again as its next attempt, and cancel the one before:
        a finished answer lost with the old reply queue is asked for again, and a job
        still queued from before runs at most once (the other attempt is stopped)."""
        assert stream.job is not None
        if stream.closed or stream.ended:
            return  # its caller left (or was told) meanwhile
        before = stream.job_id
        stream.attempts += 1
        stream.job_id = attempt_id(stream.job.job_id, stream.attempts)
        self._streams[stream.job_id] = stream
        left = stream.deadline - time.monotonic()
        if left <= 0:
            return  # the stream times out by itself
        try:
            await self._publish(stream.job.model_copy(update={"job_id": stream.job_id}), left)
        except BusUnavailable as exc:
            self._end(stream, exc)
            return
        self.resubmitted += 1
        log.warning(
            "job %s: published again as %s after the broker connection came back",
            stream.job.job_id,
            stream.job_id,
        )
        await self.cancel(before, "superseded")
        if stream.closed:  # its caller left while it was being published
            await self.cancel(stream.job_id, "abandoned")

    def _fail_all(self, error: BaseException) -> None:
        waiting, self._interrupted = self._interrupted, []
        for stream in [*self._streams.values(), *waiting]:
            stream.feed(error)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        job_id = message.correlation_id or ""
        stream = self._streams.get(job_id)
        if stream is None:
            # A caller that gave up, a late reply after a timeout, or an attempt that a
            # newer one superseded: its worker must stop generating for nobody.
            if (message.headers or {}).get("type") == "token_chunk":
                self._tell_to_stop(job_id)
            return
        try:
            stream.feed(decode_reply(message.body))
        except ValueError as exc:
            stream.feed(BusUnavailable(f"unreadable reply: {exc}", code="bad_reply"))

    def _tell_to_stop(self, job_id: str) -> None:
        now = time.monotonic()
        if now - self._told.get(job_id, float("-inf")) < 1.0:
            return
        if len(self._told) > 1000:
            self._told = {k: t for k, t in self._told.items() if now - t < 60}
        self._told[job_id] = now

        async def tell() -> None:
            if not await self.cancel(job_id, "nobody waits for it"):
                self._told.pop(job_id, None)  # its next reply tries again

        task = asyncio.get_running_loop().create_task(tell())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Tell every worker to stop (or never start) `job_id`. Best effort: whether it
        was sent. (While a reconnect restores the channels, the control channel is
        back before the reply queue, so a stale attempt's first reply can be answered.)"""
        if self._control is None or not _is_open(self._connection):
            return False
        try:
            # Not mandatory: with no worker connected there is nobody to stop.
            await self._control.publish(
                encode(CancelJob(job_id=job_id, reason=reason)), routing_key="", mandatory=False
            )
            return True
        except PUBLISH_FAILURES as exc:
            log.warning("job %s: cancel not sent: %s", job_id, exc)
            return False

    async def queue_depth(self) -> int:
        """Jobs waiting in the queue (not yet delivered to a worker)."""
        if self._channel is None or not self.connected:
            raise BusUnavailable("not connected to RabbitMQ")
        # robust=False: a passive declare must reach the broker every time (a robust
        # channel answers a repeated one from its cache) and is nothing to restore.
        queue = await self._channel.declare_queue(
            self.topology.job_queue, passive=True, robust=False, timeout=5
        )
        return int(queue.declaration_result.message_count or 0)

    async def submit(self, job: ChatJob, timeout_s: float) -> ReplyStream:
        """Publish `job` and return the stream of its replies (close it when done)."""
        if self._exchange is None or not self.connected:
            raise BusUnavailable("not connected to RabbitMQ")
        deadline = time.monotonic() + timeout_s

        def forget() -> None:
            self._streams.pop(stream.job_id, None)
            if stream in self._interrupted:  # its caller left during the outage
                self._interrupted.remove(stream)

        stream = ReplyStream(job.job_id, deadline, forget, job)
        self._streams[job.job_id] = stream
        # A caller that never reads its stream must not leak it.
        asyncio.get_running_loop().call_later(timeout_s + 30, stream.close)
        try:
            await self._publish(job, timeout_s)
        except BusUnavailable:
            stream.close()
            raise
        return stream

    async def _publish(self, job: ChatJob, timeout_s: float) -> None:
        if self._exchange is None or not self.connected:
            raise BusUnavailable(f"could not publish job {job.job_id}: not connected to RabbitMQ")
        expiration = None
        if job.deadline is not None:
            expiration = max((job.deadline - datetime.now(UTC)).total_seconds(), 0.001)
        message = encode(
            job,
            headers={READS_HEADER: READS},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job.job_id,
            correlation_id=job.job_id,
            reply_to=self._reply_queue_name,
            expiration=expiration,
            timestamp=job.created_at,
        )
        try:
            await asyncio.wait_for(
                self._exchange.publish(
                    message, routing_key=self.topology.model_family, mandatory=True
                ),
                timeout=min(timeout_s, 10),
            )
        except PUBLISH_FAILURES as exc:
            raise BusUnavailable(f"could not publish job {job.job_id}: {exc!r}") from exc


# -- worker side ----------------------------------------------------------------------

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class WorkerBus:
    """Consumes jobs with manual ack and publishes replies (transient, confirmed,
    mandatory: a reply whose queue is gone comes back as RequesterGone).

    Replies go out on the same channel the jobs come in on: after a reconnect the
    robust channel restores the consumer only once the channel itself is open, so a
    redelivered job can always publish its replies. A confirm costs ~0.25 ms, and
    only the job's own relay waits for it: the backend decodes on meanwhile.
    """

    def __init__(
        self, topology: Topology, worker_id: str, capacity: int, priority: int = 0
    ) -> None:
        self.topology = topology
        self.worker_id = worker_id
        self.capacity = capacity
        self.priority = priority
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._control: AbstractQueue | None = None
        self._channel: AbstractRobustChannel | None = None
        self._consumer_tag: str | None = None

    @property
    def connected(self) -> bool:
        return _is_open(self._connection)

    async def start(self, url: str) -> None:
        self._connection = await connect(url, f"worker-{self.worker_id}")
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._channel.set_qos(prefetch_count=self.capacity)
        # The control queue first: after a reconnect the channel restores its queues
        # and consumers in the order they were declared, so cancels are heard again
        # before jobs (a stale job the gateway already cancelled) arrive.
        exchange = await self.topology.declare_control(self._channel)
        self._control = await self._channel.declare_queue(
            self.topology.control_queue(self.worker_id), exclusive=True, auto_delete=True
        )
        await self._control.bind(exchange)
        _, self._queue = await self.topology.declare_jobs(self._channel)
        await self._channel.declare_queue(self.topology.dead_letter_queue, durable=True)

    async def consume_control(self, on_cancel: Callable[[CancelJob], None]) -> None:
        """Receive CancelJob commands (fanout: every worker hears every cancel)."""
        assert self._control is not None, "start() first"
        queue = self._control

        async def handle(message: AbstractIncomingMessage) -> None:
            try:
                on_cancel(CancelJob.model_validate_json(message.body))
            except ValueError:
                log.warning("ignoring an unreadable control message")

        await queue.consume(handle, no_ack=True)

    async def consume_adapters(self, on_published: Callable[[AdapterPublished], Any]) -> None:
        """Receive AdapterPublished events (fanout: every worker hears every one)."""
        assert self._channel is not None, "start() first"
        exchange = await self._channel.declare_exchange(
            self.topology.adapters_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await self._channel.declare_queue(
            self.topology.adapters_queue(self.worker_id), exclusive=True, auto_delete=True
        )
        await queue.bind(exchange)

        async def handle(message: AbstractIncomingMessage) -> None:
            try:
                event = AdapterPublished.model_validate_json(message.body)
            except ValueError:
                log.warning("ignoring an unreadable adapter event")
                return
            await on_published(event)

        await queue.consume(handle, no_ack=True)

    async def consume(self, handler: Handler) -> None:
        assert self._queue is not None, "start() first"
        self._consumer_tag = await self._queue.consume(
            handler, no_ack=False, arguments={"x-priority": self.priority}
        )

    async def stop_consuming(self) -> None:
        """Take no new jobs; those already delivered keep running."""
        if self._queue is not None and self._consumer_tag is not None:
            await self._queue.cancel(self._consumer_tag)
            self._consumer_tag = None

    async def reply(self, reply_to: str, message: ReplyMessage) -> None:
        """Publish one reply; RequesterGone when the broker returns it (its reply queue
        is gone: the gateway that asked, or its connection, is no more)."""
        assert self._channel is not None, "start() first"
        try:
            # Bounded: a publish begun while the connection is being restored can wait
            # for a confirmation that never comes.
            await asyncio.wait_for(
                self._channel.default_exchange.publish(
                    encode(message, correlation_id=message.job_id),
                    routing_key=reply_to,
                    mandatory=True,
                ),
                REPLY_TIMEOUT_S,
            )
        except aio_pika.exceptions.PublishError as exc:
            raise RequesterGone(
                f"job {message.job_id}: its reply queue {reply_to} is gone"
            ) from exc
        except PUBLISH_FAILURES as exc:
            raise BusUnavailable(
                f"job {message.job_id}: reply not sent, the broker connection is lost: {exc!r}"
            ) from exc

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Park a job in the dead-letter queue, as it came, with the reason."""
        assert self._channel is not None, "start() first"
        parked = aio_pika.Message(
            body=message.body,
            content_type=message.content_type,
            headers={**(message.headers or {}), "x-mesh-dead-reason": reason},
            message_id=message.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._channel.default_exchange.publish(
            parked, routing_key=self.topology.dead_letter_queue
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


T = TypeVar("T")


async def coalesce(
    items: AsyncIterator[T], max_items: int, max_delay_s: float
) -> AsyncGenerator[Sequence[T], None]:
    """Group `items` into batches of at most `max_items`, never holding one back longer
    than `max_delay_s`: several tokens per message, and a slow model still streams.

    The first item goes out alone and at once: time to first token is what a
    person waiting for the answer notices.
    """
    queue: asyncio.Queue[tuple[bool, T | BaseException | None]] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                await queue.put((False, item))
        except Exception as exc:  # handed to the consumer, re-raised there
            await queue.put((True, exc))
            return
        await queue.put((True, None))

    task = asyncio.create_task(pump())
    batch: list[T] = []
    flush_at = 0.0
    first = True
    try:
        while True:
            timeout = None if not batch else flush_at - time.monotonic()
            try:
                done, item = await _get(queue, timeout)
            except TimeoutError:
                yield batch
                batch = []
                continue
            if done:
                if batch:
                    yield batch
                if isinstance(item, BaseException):
                    raise item
                return
            if not batch:
                flush_at = time.monotonic() + max_delay_s
            batch.append(item)  # type: ignore[arg-type]
            if first or len(batch) >= max_items:
                first = False
                yield batch
                batch = []
    finally:
        # Cancelling the pump interrupts the source where it waits, so its own
        # clean-up (e.g. stopping generation) runs before we return.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
