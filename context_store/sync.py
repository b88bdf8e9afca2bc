"""The sync process of one site: publishes local changes, applies the other sites'.

- Local writes land in a Redis stream (the outbox) in the same Lua script as the
  write itself; this process publishes them (persistent, confirmed) to the
  `context` topic exchange and only then moves its marker. Nothing written while
  it was down is lost: it starts from its marker.
- Each site has a durable queue bound to the other sites' changes, so changes made
  elsewhere while this site was down wait for it in the broker.
- Events alone are not enough (a queue can be lost, a site can be new): at start,
  after a reconnect, and every `catch_up_s`, a site asks the others for those of
  their own changes it lacks. Each site numbers its own changes 1, 2, 3, ... and
  every site records which numbers it holds of each other site's (all of 1..n, and
  the few above n that arrived early), so the answer is exactly what is missing,
  read from an index, in bounded pages (`ContextSyncPage`, `more` until done).
Applying is idempotent and order does not matter (the current version and the
conflict records are a function of the set of versions held), so replays,
overlaps and reordered deliveries are harmless.

The process survives its world: Redis paused or restarted, the broker restarted or
unreachable at start, the other site gone. Each loop logs the failure, waits with
backoff (up to `max_backoff_s`) and goes on from where it was; only a stop ends it.
Its state (running, or what it waits for, and how many local changes are not yet
published) is kept in Redis with a short lifetime, for `make doctor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustExchange
from redis.exceptions import RedisError

from context_store.store import ContextStore
from proto.context import ContextChanged, ContextSyncPage, ContextSyncRequest, ContextSyncReturn
from services.bus import PUBLISH_FAILURES, Topology, connect, encode
from services.errors import BusUnavailable
from services.redis_client import Keys, worth_waiting_out

log = logging.getLogger(__name__)

# What a sync loop waits out instead of dying on: Redis or the broker away or slow.
TRANSIENT = (RedisError, OSError, BusUnavailable, *PUBLISH_FAILURES)
STATUS_TTL_S = 30
PUBLISH_TIMEOUT_S = 5
HEALTHY_RUN_S = 10  # a loop that ran this long before failing starts its backoff over


class Backoff:
    """0.5 s, doubling, up to `cap_s`, with jitter; `reset()` after a success."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s
        self.delay = 0.5

    async def wait(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.8, 1.2))
        self.delay = min(self.delay * 2, self.cap_s)

    def reset(self) -> None:
        self.delay = 0.5


class SyncDaemon:
    def __init__(
        self,
        store: ContextStore,
        namespace: str,
        catch_up_s: float = 30.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.store = store
        self.site = store.site
        self.namespace = namespace
        topology = Topology(namespace, "")  # the context names do not depend on a family
        self.exchange_name = topology.context_exchange
        self.queue_name = topology.context_queue(self.site)
        self.catch_up_s = catch_up_s
        self.max_backoff_s = max_backoff_s
        self._exchange: AbstractRobustExchange | None = None
        self._channel: AbstractRobustChannel | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.applied = 0
        self.published = 0
        self.state = "starting"  # or "running", or what it waits for
        self.unpublished = 0  # local changes not yet published (at the last look)
        self.last_published_at: float | None = None
        # Loops whose last attempt failed, and how; cleared when that loop gets on again.
        self._failing: dict[str, str] = {}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def run(self, amqp_url: str) -> None:
        """Sync until stopped; a broker that is not there yet is waited for."""
        backoff = Backoff(self.max_backoff_s)
        while True:
            try:
                connection = await connect(amqp_url, f"context-sync-{self.site}")
                break
            except BusUnavailable as exc:
                self.state = "waiting for the broker"  # (not in Redis yet: no loop runs)
                log.warning("context sync: %s; trying again", exc)
                await backoff.wait()
        self._connection = connection
        connection.reconnect_callbacks.add(lambda *_: self._request_catch_up_soon())
        try:
            self._channel = await connection.channel(publisher_confirms=True)
            await self._channel.set_qos(prefetch_count=64)
            self._exchange = await self._channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._channel.declare_queue(self.queue_name, durable=True)
            for key in ("change.*", f"to.{self.site}", "sync.*"):
                await queue.bind(self._exchange, routing_key=key)
            await queue.consume(self._on_message)
            log.info("context sync for site %s running", self.site)
            self.state = "running"
            await asyncio.gather(
                self._forever("publishing local changes", self._publish_outbox),
                self._forever("asking the other sites to catch up", self._catch_up_loop),
                self._forever("recording its state", self._report_loop),
                self._forever("upgrading the store", self._upgrade),
            )
        finally:
            await connection.close()

    async def _forever(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run `loop` until stopped; a transient failure is logged and waited out."""
        backoff = Backoff(self.max_backoff_s)
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await loop()
            except Exception as exc:
                if time.monotonic() - started > HEALTHY_RUN_S:
                    backoff.reset()  # it had been working: this is a new outage
                kind = "waiting" if _transient(exc) else "failing"
                self._failing[what] = f"{kind}: {what}: {type(exc).__name__}"
                log.warning("context sync: %s failed: %s; trying again", what, exc)
                await backoff.wait()

    def _going(self, what: str) -> None:
        """`what` got through again (its failure, if any, is over)."""
        self._failing.pop(what, None)

    def _state(self) -> str:
        if self._connection is not None and not self._connection.connected.is_set():
            return "waiting: the broker connection is down"
        return "; ".join(self._failing.values()) or "running"

    async def _report_loop(self) -> None:
        """The state, for `make doctor`: kept in Redis for STATUS_TTL_S."""
        while not self._stopping.is_set():
            self.unpublished = await self.store.unpublished()
            self.state = self._state()
            status = {
                "site": self.site,
                "state": self.state,
                "unpublished": self.unpublished,
                "published": self.published,
                "applied": self.applied,
                "last_published_at": self.last_published_at,
                "at": time.time(),
            }
            await self.store.client.set(
                Keys(self.namespace).context_sync(self.site), json.dumps(status), ex=STATUS_TTL_S
            )
            self._going("recording its state")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 2)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _request_catch_up_soon(self) -> None:
        self._wake.set()

    async def _upgrade(self) -> None:
        """A store from an earlier release numbers its own changes (once). Answers given
        before that are still right: the numbers it adds come after the rest."""
        await self.store.upgrade()
        self._going("upgrading the store")
        await self._stopping.wait()

    async def _catch_up_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before asking: a wake during the ask is not lost
            request = await self.store.catch_up_request()
            await self._publish(request, f"sync.{self.site}")
            self._going("asking the other sites to catch up")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.catch_up_s)

    async def _publish_outbox(self) -> None:
        marker = await self.store.sent_marker()
        while not self._stopping.is_set():
            batch = await self.store.read_outbox(marker)
            self._going("publishing local changes")
            if not batch:
                # Block on the stream itself: a write wakes us at once.
                await self.store.client.xread({self.store.outbox: marker}, count=1, block=500)
                continue
            for entry_id, event in batch:
                await self._publish(event, f"change.{self.site}")
                self.published += 1
                marker = entry_id
            await self.store.mark_sent(marker)
            self.last_published_at = time.time()

    async def _publish(
        self,
        message: ContextChanged | ContextSyncRequest | ContextSyncPage | ContextSyncReturn,
        key: str,
    ) -> None:
        assert self._exchange is not None
        # Bounded: a publish begun while the connection is being restored can wait for a
        # confirmation that never comes; then it is a failure like any other, retried.
        await asyncio.wait_for(
            self._exchange.publish(
                encode(message, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=key
            ),
            PUBLISH_TIMEOUT_S,
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except Exception as exc:
            if _transient(exc):
                # Back to the queue, after a pause (an immediate redelivery would spin
                # while Redis is away).
                log.warning("context sync: a change could not be applied yet: %s", exc)
                await asyncio.sleep(1.0)
                with contextlib.suppress(*TRANSIENT):
                    await message.nack(requeue=True)
                return
            log.exception("context sync: dropping a message it cannot apply")
            with contextlib.suppress(*TRANSIENT):
                await message.reject(requeue=False)
            return
        with contextlib.suppress(*TRANSIENT):
            await message.ack()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        kind = (message.headers or {}).get("type")
        if kind == "context_changed":
            event = ContextChanged.model_validate_json(message.body)
            if event.origin != self.site and await self.store.apply(event):
                self.applied += 1
        elif kind == "context_sync_request":
            request = ContextSyncRequest.model_validate_json(message.body)
            if request.site != self.site:
                await self._answer(request)
        elif kind == "context_sync_page":
            page = ContextSyncPage.model_validate_json(message.body)
            if page.site == self.site and page.origin != self.site:
                await self._apply_page(page)
        elif kind == "context_sync_return":
            returned = ContextSyncReturn.model_validate_json(message.body)
            if returned.site == self.site and returned.origin != self.site:
                self.applied += await self.store.apply_return(returned)
                if returned.more:
                    self._request_catch_up_soon()

    async def _answer(self, request: ContextSyncRequest) -> None:
        """One page of what the asker lacks of this site's changes."""
        if request.after is None:
            log.error(
                "context sync: site %s runs an earlier release and cannot catch up from "
                "this one; upgrade it",
                request.site,
            )
            return
        returned = await self.store.give_back(request)
        if returned is not None:  # its Redis restarted: what it may have lost, first
            await self._publish(returned, f"to.{request.site}")
            log.info("sent %d of its own change(s) back to %s", len(returned.changes), request.site)
        page = await self.store.answer(request)
        if page is None:
            return  # it holds everything already
        await self._publish(page, f"to.{request.site}")
        if page.changes:
            log.info("sent %d change(s) to %s to catch up", len(page.changes), request.site)

    async def _apply_page(self, page: ContextSyncPage) -> None:
        self.applied += await self.store.apply_page(page)
        if page.more:
            self._request_catch_up_soon()


def _transient(exc: BaseException) -> bool:
    """Redis or the broker away or slow (waited out), as opposed to a bug or bad data."""
    if isinstance(exc, RedisError):
        return worth_waiting_out(exc)
    return isinstance(exc, TRANSIENT)
