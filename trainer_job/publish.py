"""Publish an adapter version: copy it into the registry with a manifest of sha256s,
record it as current in Redis, and announce it so every worker loads it in place.

    python -m trainer_job publish OUTPUT_DIR --name continuity --base-model demo-model
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import aio_pika

from proto.adapters import ADAPTER_FILES, ADAPTER_NAME, MANIFEST, AdapterManifest, AdapterPublished
from services.bus import Topology, connect, encode
from services.redis_client import Keys
from services.redis_client import connect as connect_redis
from services.settings import MeshSettings


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_version(
    source: Path,
    registry: Path,
    name: str,
    base_model: str,
    evaluation: dict[str, float] | None = None,
) -> AdapterManifest:
    """Copy a peft output folder into the registry as the next version of `name`."""
    import re

    if not re.fullmatch(ADAPTER_NAME, name):
        raise ValueError(f"adapter names match {ADAPTER_NAME}")
    missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (safetensors only)")
    folder = registry / name
    folder.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name) for p in folder.iterdir() if p.name.isdigit()]
    version = max(versions, default=0) + 1
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=folder))
    for file_name in ADAPTER_FILES:
        shutil.copyfile(source / file_name, staging / file_name)
    manifest = AdapterManifest(
        name=name,
        version=version,
        base_model=base_model,
        files={f: _sha256(staging / f) for f in ADAPTER_FILES},
        eval=evaluation or {},
        created_at=datetime.now(UTC).isoformat(),
    )
    (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(staging, folder / str(version))  # a version appears whole or not at all
    return manifest


async def announce(settings: MeshSettings, manifest: AdapterManifest) -> None:
    """Make it current (state in Redis) and tell the workers (event on the bus)."""
    client = connect_redis(settings.redis_url)
    try:
        record = {"version": manifest.version, "base_model": manifest.base_model}
        await client.hset(Keys(settings.namespace).adapters(), manifest.name, json.dumps(record))
    finally:
        await client.aclose()
    topology = Topology(settings.namespace, settings.model_family)
    connection = await connect(settings.amqp_url, "trainer-publish")
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
