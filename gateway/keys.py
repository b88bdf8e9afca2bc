"""API keys: stored hashed in Redis, each with scopes. Revocation is immediate
because every request looks its key up (one Redis HGET, ~0.1 ms)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as redis

from services.redis_client import Keys

# worker: fetch adapter files from the gateway (workers on another site).
# metrics: read /metrics and nothing else (Prometheus).
Scope = Literal["chat", "context", "admin", "worker", "metrics"]
SCOPES: tuple[Scope, ...] = ("chat", "context", "admin", "worker", "metrics")
KEY_PREFIX = "mesh_"


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """What is stored for a key: never the key itself."""

    key_id: str  # first 16 hex digits of the hash: stable, not secret
    name: str
    scopes: tuple[str, ...]
    created_at: str

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class KeyStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.index = keys.api_keys()

    async def create(self, name: str, scopes: list[str]) -> tuple[str, ApiKey]:
        """A new random key; the clear key is returned once and never stored."""
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        return api_key, await self.add(api_key, name, scopes)

    async def add(self, api_key: str, name: str, scopes: list[str]) -> ApiKey:
        """Store `api_key` (e.g. the bootstrap key from MESH_API_KEY); idempotent."""
        return await self.add_hash(key_hash(api_key), name, scopes)

    async def add_hash(self, hashed: str, name: str, scopes: list[str]) -> ApiKey:
        """Store a key known only by its sha256 (MESH_API_KEY_SHA256: the clear key
        never reaches the server); idempotent."""
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise ValueError(f"scopes must be among {', '.join(SCOPES)}; got {scopes}")
        if not re.fullmatch(r"[0-9a-f]{64}", hashed):
            raise ValueError("a key hash is 64 lowercase hex digits (sha256)")
        record = ApiKey(hashed[:16], name, tuple(scopes), datetime.now(UTC).isoformat())
        await self.client.hset(self.index, hashed, json.dumps(asdict(record)))
        return record

    async def lookup(self, api_key: str) -> ApiKey | None:
        raw = await self.client.hget(self.index, key_hash(api_key))
        return _load(raw) if raw else None

    async def list(self) -> list[ApiKey]:
        records = await self.client.hgetall(self.index)
        return sorted((_load(raw) for raw in records.values()), key=lambda k: k.created_at)

    async def revoke(self, key_id_or_name: str) -> list[ApiKey]:
        """Remove every key whose id or name matches; returns those removed."""
        removed = []
        for hashed, raw in (await self.client.hgetall(self.index)).items():
            record = _load(raw)
            if key_id_or_name in (record.key_id, record.name):
                await self.client.hdel(self.index, hashed)
                removed.append(record)
        return removed


def _load(raw: str) -> ApiKey:
    data = json.loads(raw)
    return ApiKey(data["key_id"], data["name"], tuple(data["scopes"]), data["created_at"])
