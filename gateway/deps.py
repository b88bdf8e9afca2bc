"""What routes depend on, as `Annotated` dependencies.

`gateway.app` builds one `Services` in its lifespan and hands it to the app; every
route and dependency takes what it needs from here, typed, and nothing else reads
the app's state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import redis.asyncio as redis
from fastapi import Depends, FastAPI, Request

from context_store.assembly import TokenCounter
from context_store.store import ContextStore
from gateway.chat import ChatService
from gateway.engine import Engine
from gateway.keys import KeyStore
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.settings import GatewaySettings
from services.adapters import Adapters as AdapterAdmin
from services.conversations import ConversationStore


@dataclass
class Services:
    settings: GatewaySettings
    engine: Engine
    chat: ChatService
    context: ContextStore
    conversations: ConversationStore
    keys: KeyStore
    limiter: RateLimiter
    metrics: Metrics
    count_tokens: TokenCounter
    adapters: AdapterAdmin
    redis: redis.Redis


class MeshApp(FastAPI):
    """The gateway's app: FastAPI with its services once the lifespan has started."""

    services: Services | None = None


def _of(request: Request) -> Services:
    app: MeshApp = request.app
    if app.services is None:
        raise RuntimeError("the gateway's lifespan has not started")
    return app.services


# The dependencies are coroutines: FastAPI runs a plain function in a thread pool,
# a hand-off that cost more than the whole lookup on every request.


async def services(request: Request) -> Services:
    return _of(request)


def _part(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency giving one of the services (typed by its `Annotated` alias below)."""

    async def dependency(request: Request) -> Any:
        return getattr(_of(request), name)

    return dependency


Mesh = Annotated[Services, Depends(services)]
Settings = Annotated[GatewaySettings, Depends(_part("settings"))]
EngineDep = Annotated[Engine, Depends(_part("engine"))]
Chat = Annotated[ChatService, Depends(_part("chat"))]
Context = Annotated[ContextStore, Depends(_part("context"))]
Conversations = Annotated[ConversationStore, Depends(_part("conversations"))]
MetricsDep = Annotated[Metrics, Depends(_part("metrics"))]
CountTokens = Annotated[TokenCounter, Depends(_part("count_tokens"))]
Adapters = Annotated[AdapterAdmin, Depends(_part("adapters"))]
Redis = Annotated[redis.Redis, Depends(_part("redis"))]
