"""Worker liveness records in Redis: written by workers, read by gateways.

Each worker's record is a key with a TTL; a sorted set indexes them by expiry so a
reader never SCANs the keyspace.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as redis
from pydantic import ValidationError

from proto.messages import WorkerStatus
from services.redis_client import Keys

log = logging.getLogger(__name__)


async def publish_status(
    client: redis.Redis, keys: Keys, status: WorkerStatus, ttl_s: float
) -> None:
    """Write (or refresh) one worker's record; it vanishes `ttl_s` after the last write."""
    expires = time.time() + ttl_s
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker(status.worker_id), status.model_dump_json(), px=int(ttl_s * 1000))
        pipe.zadd(keys.workers_index(), {status.worker_id: expires})
        await pipe.execute()


async def remove_status(client: redis.Redis, keys: Keys, worker_id: str) -> None:
    async with client.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(worker_id))
        pipe.zrem(keys.workers_index(), worker_id)
        await pipe.execute()


async def live_workers(client: redis.Redis, keys: Keys) -> list[WorkerStatus]:
    """Every worker whose record has not expired."""
    now = time.time()
    async with client.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(keys.workers_index(), "-inf", now)
        pipe.zrangebyscore(keys.workers_index(), now, "+inf")
        _, ids = await pipe.execute()
    if not ids:
        return []
    workers = []
    for raw in await client.mget([keys.worker(worker_id) for worker_id in ids]):
        if raw is None:  # expired since the index was read
            continue
        try:
            workers.append(WorkerStatus.model_validate_json(raw))
        except ValidationError:
            log.warning("ignoring an unreadable worker record")
    return workers
