"""What routes depend on, as `Annotated` dependencies.

`gateway.app` builds one `Services` in its lifespan and hands it to the app; every
route and dependency takes what it needs from here, typed, and nothing else reads
the app's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

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


async def _settings(request: Request) -> GatewaySettings:
    return _of(request).settings


async def _engine(request: Request) -> Engine:
    return _of(request).engine


async def _chat(request: Request) -> ChatService:
    return _of(request).chat


async def _context(request: Request) -> ContextStore:
    return _of(request).context


async def _conversations(request: Request) -> ConversationStore:
    return _of(request).conversations


async def _metrics(request: Request) -> Metrics:
    return _of(request).metrics


async def _count_tokens(request: Request) -> TokenCounter:
    return _of(request).count_tokens


async def _adapters(request: Request) -> AdapterAdmin:
    return _of(request).adapters


async def _redis(request: Request) -> redis.Redis:
    return _of(request).redis


Mesh = Annotated[Services, Depends(services)]
Settings = Annotated[GatewaySettings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
Chat = Annotated[ChatService, Depends(_chat)]
Context = Annotated[ContextStore, Depends(_context)]
Conversations = Annotated[ConversationStore, Depends(_conversations)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
CountTokens = Annotated[TokenCounter, Depends(_count_tokens)]
Adapters = Annotated[AdapterAdmin, Depends(_adapters)]
Redis = Annotated[redis.Redis, Depends(_redis)]
