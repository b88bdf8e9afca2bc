"""API keys: stored hashed in Redis, each with scopes. Revocation is immediate
because every request looks its key up — one Redis round trip, which also counts the
request against the key's rate limit when the route is limited."""

from __future__ import annotations

import builtins
import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal, cast

import redis.asyncio as redis

from services.redis_client import Keys

# worker: fetch adapter files from the gateway (workers on another site).
# metrics: read /metrics and nothing else (Prometheus).
Scope = Literal["chat", "context", "admin", "worker", "metrics"]
SCOPES: tuple[Scope, ...] = ("chat", "context", "admin", "worker", "metrics")
KEY_PREFIX = "mesh_"

# KEYS: the key index, the key's rate window counter ("" when not counted)
# ARGV: the key's hash, the window counter's TTL (ms)
# Returns {record or false, count in the window (0 when not counted)}.
_LOOKUP = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record or KEYS[2] == '' then return {record, 0} end
local count = redis.call('INCR', KEYS[2])
if count == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {record, count}
"""


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id(api_key: str) -> str:
    """The id stored with a key (`ApiKey.key_id`): stable, not secret."""
    return key_hash(api_key)[:16]


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
        self._lookup = client.register_script(_LOOKUP)

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
        record, _ = await self.lookup_counting(api_key)
        return record

    async def lookup_counting(
        self, api_key: str, counter: str = "", ttl_ms: int = 0
    ) -> tuple[ApiKey | None, int]:
        """The key's record (None when unknown) and, when `counter` (a rate window's
        key) is given, this request's number in it (else 0) — one Redis round trip."""
        raw, count = await self._lookup(
            keys=[self.index, counter], args=[key_hash(api_key), ttl_ms]
        )
        return (_load(raw) if raw else None), int(count)

    async def list(self) -> builtins.list[ApiKey]:
        records = cast("dict[str, str]", await self.client.hgetall(self.index))
        return sorted((_load(raw) for raw in records.values()), key=lambda k: k.created_at)

    async def revoke(self, key_id_or_name: str) -> builtins.list[ApiKey]:
        """Remove every key whose id or name matches; returns those removed."""
        removed = []
        records = cast("dict[str, str]", await self.client.hgetall(self.index))
        for hashed, raw in records.items():
            record = _load(raw)
            if key_id_or_name in (record.key_id, record.name):
                await self.client.hdel(self.index, hashed)
                removed.append(record)
        return removed


def _load(raw: str) -> ApiKey:
    data = json.loads(raw)
    return ApiKey(data["key_id"], data["name"], tuple(data["scopes"]), data["created_at"])
