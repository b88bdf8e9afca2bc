"""Whole answers kept in Redis for requests whose answer is fully determined: the
original guide's "response caching" for a slow VPS, made safe. Off unless
MESH_RESPONSE_CACHE_TTL_S is above 0.

- Only greedy (temperature 0) or seeded requests: any other answer is a fresh draw.
- The key is a sha256 over the base model, the adapter and the one version of it
  that every live worker serves, the whole rendered prompt (system prompt, tiers and
  history included) and every sampling option. While workers serve different
  versions of an adapter (a rollout), nothing is looked up or kept for it, so a new
  adapter version never serves an answer of an old one.
- Per API key: one key's answers are never served to another.
- A hit costs no worker and says so (`X-Cache: hit`); Redis failing makes a miss,
  never a failed request.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from gateway.engine import Item, Outcome, Restart
from proto.api import PromptTokensDetails, Usage
from proto.messages import ChatJob, WorkerStatus

log = logging.getLogger(__name__)
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str
    usage: Usage
    served_by: str | None = None


class ResponseCache:
    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        ttl_s: float,
        render: Callable[[ChatJob], str] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        # The prompt as the model sees it (the chat template applied); without a
        # tokenizer the messages themselves stand for it.
        self.render = render

    @staticmethod
    def determined(job: ChatJob) -> bool:
        # Log probabilities are not kept: an answer that asked for them is not served
        # from the cache.
        sampled = job.sampling.temperature > SAMPLING_EPS and job.sampling.seed is None
        return not sampled and job.logprobs is None

    def key_for(self, job: ChatJob, scope: str | None, workers: list[WorkerStatus]) -> str | None:
        """The key for `job` asked with the API key `scope`, or None when the cache does
        not apply: no key, a sampled answer, or `workers` (the live ones) disagreeing on
        the model or on the adapter's version."""
        if scope is None or not self.determined(job):
            return None
        bases = sorted({w.base_model for w in workers})
        if len(bases) != 1:
            return None
        model: dict[str, Any] = {"base": bases[0]}
        if job.model is not None:
            versions = {w.adapters.get(job.model) for w in workers}
            if len(versions) != 1 or None in versions:  # a rollout, or not everywhere
                return None
            model |= {"adapter": job.model, "version": versions.pop()}
        return self.key(job, scope, model)

    def key(self, job: ChatJob, scope: str, model: dict[str, Any]) -> str:
        """`model`: the base model's and adapter's identity (names and version)."""
        prompt: dict[str, Any]
        if job.prompt is not None:
            prompt = {"raw": job.prompt}
        elif self.render is not None:
            prompt = {"rendered": self.render(job)}
        else:
            prompt = {"messages": [m.model_dump() for m in job.messages]}
        # Serialized as given: a schema's property order is the answer's order.
        constraints = json.dumps(
            {
                "tools": job.tools.model_dump() if job.tools else None,
                "format": job.response_format.model_dump() if job.response_format else None,
            }
        )
        material = json.dumps(
            {
                "model": model,
                "prompt": prompt,
                "sampling": job.sampling.model_dump(),
                "constraints": constraints,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(material.encode()).hexdigest()
        scope_digest = hashlib.sha256(scope.encode()).hexdigest()[:32]
        return f"{self.namespace}:answers:{scope_digest}:{digest}"

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = await self.client.get(key)
        except redis.RedisError as exc:
            log.warning("response cache: lookup failed (%s); answering without it", exc)
            return None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return CachedAnswer(
                data["text"], data["finish_reason"], Usage(**data["usage"]), data.get("served_by")
            )
        except (ValueError, KeyError, TypeError) as exc:  # unreadable (another release's)
            log.warning("response cache: ignoring an unreadable entry (%s)", exc)
            return None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        value = json.dumps(
            {
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "usage": answer.usage.model_dump(),
                "served_by": answer.served_by,
            }
        )
        try:
            await self.client.set(key, value, ex=max(1, round(self.ttl_s)))
        except redis.RedisError as exc:
            log.warning("response cache: keeping an answer failed (%s)", exc)

    async def keep(self, key: str, items: AsyncIterator[Item]) -> AsyncIterator[Item]:
        """Pass `items` on, and keep the answer once it is complete."""
        pieces: list[str] = []
        try:
            async for item in items:
                if isinstance(item, Outcome) and item.finish_reason in ("stop", "length"):
                    answer = CachedAnswer(
                        "".join(pieces), item.finish_reason, item.usage, item.served_by
                    )
                    await self.put(key, answer)
                elif isinstance(item, Restart):
                    pieces.clear()
                elif isinstance(item, str):
                    pieces.append(item)
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    async def replay(answer: CachedAnswer) -> AsyncIterator[Item]:
        """A kept answer as a reply: no worker read any of the prompt this time."""
        if answer.text:
            yield answer.text
        details = PromptTokensDetails(cached_tokens=answer.usage.prompt_tokens)
        yield Outcome(
            answer.finish_reason,
            answer.usage.model_copy(update={"prompt_tokens_details": details}),
            served_by=answer.served_by,
        )
