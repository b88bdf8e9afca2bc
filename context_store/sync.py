"""The sync process of one site: publishes local changes, applies the other sites'.

- Local writes land in a Redis stream (the outbox) in the same Lua script as the
  write itself; this process publishes them (persistent, confirmed) to the
  `context` topic exchange and only then moves its marker. Nothing written while
  it was down is lost: it starts from its marker.
- Each site has a durable queue bound to the other sites' changes, so changes made
  elsewhere while this site was down wait for it in the broker.
- Events alone are not enough (a queue can be lost, a site can be new): at start,
  after a reconnect, and every `catch_up_s`, a site asks the others for their own
  changes newer than what it has applied from them, and applies the answer.
Applying is idempotent, so replays and overlaps are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustExchange

from context_store.store import ContextStore
from proto.context import ContextChanged, ContextSyncRequest
from services.bus import Topology, connect, encode

log = logging.getLogger(__name__)


class SyncDaemon:
    def __init__(self, store: ContextStore, namespace: str, catch_up_s: float = 30.0) -> None:
        self.store = store
        self.site = store.site
        topology = Topology(namespace, "")  # the context names do not depend on a family
        self.exchange_name = topology.context_exchange
        self.queue_name = topology.context_queue(self.site)
        self.catch_up_s = catch_up_s
        self._exchange: AbstractRobustExchange | None = None
        self._channel: AbstractRobustChannel | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.applied = 0
        self.published = 0

    async def run(self, amqp_url: str) -> None:
        connection = await connect(amqp_url, f"context-sync-{self.site}")
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
            await asyncio.gather(self._publish_outbox(), self._catch_up_loop())
        finally:
            await connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _request_catch_up_soon(self) -> None:
        self._wake.set()

    async def _catch_up_loop(self) -> None:
        while not self._stopping.is_set():
            since = await self.store.seen()
            request = ContextSyncRequest(site=self.site, since=since)
            await self._publish(request, f"sync.{self.site}")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.catch_up_s)

    async def _publish_outbox(self) -> None:
        marker = await self.store.sent_marker()
        while not self._stopping.is_set():
            batch = await self.store.read_outbox(marker)
            if not batch:
                # Block on the stream itself: a write wakes us at once.
                await self.store.client.xread({self.store.outbox: marker}, count=1, block=500)
                continue
            for entry_id, event in batch:
                await self._publish(event, f"change.{self.site}")
                self.published += 1
                marker = entry_id
            await self.store.mark_sent(marker)

    async def _publish(self, message: ContextChanged | ContextSyncRequest, key: str) -> None:
        assert self._exchange is not None
        await self._exchange.publish(
            encode(message, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=key
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process(requeue=True):
            kind = (message.headers or {}).get("type")
            if kind == "context_changed":
                event = ContextChanged.model_validate_json(message.body)
                if event.origin != self.site and await self.store.apply(event):
                    self.applied += 1
            elif kind == "context_sync_request":
                request = ContextSyncRequest.model_validate_json(message.body)
                if request.site != self.site:
                    await self._answer(request)

    async def _answer(self, request: ContextSyncRequest) -> None:
        since = int(request.since.get(self.site, "0"))
        changes = await self.store.changes_since(since)
        for change in changes:
            await self._publish(change, f"to.{request.site}")
        if changes:
            log.info("sent %d change(s) to %s to catch up", len(changes), request.site)
