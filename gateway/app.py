"""The gateway's FastAPI application; clients are built in the lifespan, not at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from context_store.store import ContextStore
from gateway import (
    adapter_routes,
    context_routes,
    device_routes,
    errors,
    openai_routes,
    routes,
    web_routes,
)
from gateway.body_limit import BodyLimitMiddleware
from gateway.chat import ChatService
from gateway.deps import MeshApp, Services
from gateway.engine import BusEngine, Engine
from gateway.keys import SCOPES, KeyStore
from gateway.metrics import Metrics, MetricsMiddleware
from gateway.prompts import PromptCounter, token_counter
from gateway.ratelimit import RateLimiter
from gateway.response_cache import ResponseCache
from gateway.settings import GatewaySettings
from gateway.tiers import TierCache
from services.adapters import AdapterRegistry, Adapters, CurrentVersions
from services.conversations import ConversationStore
from services.paths import adapter_registry, demo_model_dir
from services.redis_client import Keys, connect

log = logging.getLogger(__name__)


def tokenizer_ref(settings: GatewaySettings) -> str | None:
    """Where the prompt-counting tokenizer comes from (None: the check is off)."""
    if settings.tokenizer.lower() == "none":
        return None
    return settings.tokenizer or settings.model or str(demo_model_dir())


async def _bootstrap_keys(settings: GatewaySettings, keys: KeyStore) -> None:
    if settings.api_key:
        await keys.add(settings.api_key, "bootstrap (MESH_API_KEY)", list(SCOPES))
    if settings.api_key_sha256:
        await keys.add_hash(
            settings.api_key_sha256, "bootstrap (MESH_API_KEY_SHA256)", list(SCOPES)
        )
    if settings.metrics_api_key:
        await keys.add(settings.metrics_api_key, "metrics (MESH_METRICS_API_KEY)", ["metrics"])


def create_app(settings: GatewaySettings, engine: Engine | None = None) -> MeshApp:
    """The gateway. `engine`: what answers (default: jobs over RabbitMQ to the workers;
    tests of the HTTP layer pass a `MemoryEngine`)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = Keys(settings.namespace)
        redis = connect(settings.redis_url)
        key_store = KeyStore(redis, keys)
        await _bootstrap_keys(settings, key_store)
        ref = tokenizer_ref(settings)
        prompts = (
            await asyncio.to_thread(PromptCounter.load, ref, settings.max_context) if ref else None
        )
        engine_ = engine or await BusEngine.connect(settings, redis, metrics)
        responses = None
        if settings.response_cache_ttl_s > 0:
            render = prompts.render if prompts is not None else None
            responses = ResponseCache(
                redis, settings.namespace, settings.response_cache_ttl_s, render
            )
        count_tokens = token_counter(prompts)
        context = ContextStore(
            redis, settings.namespace, settings.site, history_keep=settings.context_history_keep
        )
        conversations = ConversationStore(redis, keys)
        tiers = TierCache(context, count_tokens, settings.context_budget, settings.default_project)
        mesh.services = Services(
            settings=settings,
            engine=engine_,
            chat=ChatService(settings, engine_, conversations, tiers, metrics, prompts, responses),
            context=context,
            conversations=conversations,
            keys=key_store,
            limiter=RateLimiter(keys, settings.rate_limit_per_minute),
            metrics=metrics,
            count_tokens=count_tokens,
            adapters=Adapters(
                AdapterRegistry(settings.adapter_registry or adapter_registry()),
                CurrentVersions(settings, redis),
            ),
            redis=redis,
        )
        chat = mesh.services.chat
        held_turns = asyncio.create_task(chat.turns.run())
        log.info("gateway ready on %s:%d", settings.http_host, settings.http_port)
        try:
            yield
        finally:
            mesh.services = None
            held_turns.cancel()
            await engine_.close()
            await chat.turns.close()
            await redis.aclose()

    mesh = MeshApp(
        title="Continuity mesh",
        version=routes.VERSION,
        description="Chat with the owner's continuity assistant across desktop, VPS and phone. "
        "Every route but /health and /ready needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    errors.install(mesh)
    mesh.include_router(routes.router)
    mesh.include_router(openai_routes.router)
    mesh.include_router(context_routes.router)
    mesh.include_router(adapter_routes.router)
    mesh.include_router(device_routes.router)
    mesh.include_router(web_routes.router)
    mesh.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    mesh.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        mesh.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "Range"],
            expose_headers=[
                "ETag",
                "X-Context-Version",
                "Retry-After",
                "X-Cache",
                "Content-Range",
                "Content-Length",
            ],
        )
    return mesh
