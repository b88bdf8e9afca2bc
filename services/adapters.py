"""The adapter registry and the "current version" of each adapter, shared by the
trainer (publish), the gateway (rollback, file serving) and the workers.

Registry layout: `<registry>/<name>/<version>/{adapter_config.json,
adapter_model.safetensors, manifest.json}`. The current version of each name is a
field of one Redis hash (state: a worker started later reads it) and every change
is also announced on the adapters fanout exchange (event: running workers switch now).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import aio_pika
import redis.asyncio as redis
from pydantic import ValidationError

from proto.adapters import ADAPTER_NAME, MANIFEST, AdapterManifest, AdapterPublished
from services.bus import Topology, connect, encode
from services.redis_client import Keys
from services.redis_client import connect as connect_redis
from services.settings import MeshSettings


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (GGUF files can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions(registry: Path, name: str) -> list[int]:
    """Version numbers present for `name`, ascending (empty for an unknown name)."""
    if not re.fullmatch(ADAPTER_NAME, name):
        return []
    folder = registry / name
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def names(registry: Path) -> list[str]:
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if re.fullmatch(ADAPTER_NAME, p.name))


def read_manifest(registry: Path, name: str, version: int) -> AdapterManifest | None:
    path = registry / name / str(version) / MANIFEST
    try:
        return AdapterManifest.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None


async def current_versions(
    settings: MeshSettings, client: redis.Redis | None = None
) -> dict[str, dict]:
    """Adapter name -> {"version", "base_model"} as recorded in Redis."""
    own = client is None
    client = client or connect_redis(settings.redis_url)
    try:
        raw = await client.hgetall(Keys(settings.namespace).adapters())
    finally:
        if own:
            await client.aclose()
    return {name: json.loads(value) for name, value in raw.items()}


async def make_current(
    settings: MeshSettings, manifest: AdapterManifest, client: redis.Redis | None = None
) -> None:
    """Point `manifest.name` at its version: state in Redis first, then the event, so
    a worker that misses the event still finds the version when it (re)starts."""
    own = client is None
    client = client or connect_redis(settings.redis_url)
    try:
        record = {"version": manifest.version, "base_model": manifest.base_model}
        await client.hset(Keys(settings.namespace).adapters(), manifest.name, json.dumps(record))
    finally:
        if own:
            await client.aclose()
    topology = Topology(settings.namespace, settings.model_family)
    connection = await connect(settings.amqp_url, "adapter-publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            topology.adapters_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        event = AdapterPublished(
            name=manifest.name, version=manifest.version, base_model=manifest.base_model
        )
        await exchange.publish(
            encode(event, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=""
        )
