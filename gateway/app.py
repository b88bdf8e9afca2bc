"""The gateway's FastAPI application; clients are built in the lifespan, not at import."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from context_store.assembly import TokenCounter, cached
from context_store.store import ContextStore
from gateway import adapter_routes, context_routes, errors, openai_routes, routes, web_routes
from gateway.body_limit import BodyLimitMiddleware
from gateway.chat import ChatService
from gateway.conversations import ConversationStore
from gateway.generation import Generation, PromptCounter, WorkerDirectory
from gateway.keys import SCOPES, KeyStore
from gateway.metrics import Metrics, MetricsMiddleware
from gateway.ratelimit import RateLimiter
from gateway.response_cache import ResponseCache
from gateway.settings import GatewaySettings
from services.bus import JobClient, Topology
from services.paths import demo_model_dir
from services.redis_client import Keys, connect

log = logging.getLogger(__name__)


def tokenizer_ref(settings: GatewaySettings) -> str | None:
    """Where the prompt-counting tokenizer comes from (None: the check is off)."""
    if settings.tokenizer.lower() == "none":
        return None
    return settings.tokenizer or settings.model or str(demo_model_dir())


def token_counter(prompts: PromptCounter | None) -> TokenCounter:
    """Tokens of a piece of text with the model's tokenizer (about 3 bytes each without)."""
    if prompts is None:
        return lambda text: len(text.encode()) // 3 + 1
    tokenizer = prompts.tokenizer
    return cached(lambda text: len(tokenizer.encode(text, add_special_tokens=False)))


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = Keys(settings.namespace)
        redis = connect(settings.redis_url)
        key_store = KeyStore(redis, keys)
        if settings.api_key:
            await key_store.add(settings.api_key, "bootstrap (MESH_API_KEY)", list(SCOPES))
        if settings.api_key_sha256:
            await key_store.add_hash(
                settings.api_key_sha256, "bootstrap (MESH_API_KEY_SHA256)", list(SCOPES)
            )
        if settings.metrics_api_key:
            await key_store.add(
                settings.metrics_api_key, "metrics (MESH_METRICS_API_KEY)", ["metrics"]
            )
        ref = tokenizer_ref(settings)
        prompts = (
            await asyncio.to_thread(PromptCounter.load, ref, settings.max_context) if ref else None
        )
        jobs = JobClient(
            Topology(settings.namespace, settings.model_family),
            client_id=f"gateway-{uuid.uuid4().hex[:12]}",
        )
        await jobs.start(settings.amqp_url)
        workers = WorkerDirectory(redis, keys, settings.model_family, settings.workers_cache_s)
        responses = None
        if settings.response_cache_ttl_s > 0:
            render = prompts.render if prompts is not None else None
            responses = ResponseCache(
                redis, settings.namespace, settings.response_cache_ttl_s, render
            )
        generation = Generation(settings, jobs, workers, metrics, prompts, responses)
        app.state.settings = settings
        app.state.redis = redis
        app.state.jobs = jobs
        app.state.workers = workers
        app.state.metrics = metrics
        app.state.key_store = key_store
        app.state.rate_limiter = RateLimiter(redis, keys, settings.rate_limit_per_minute)
        app.state.generation = generation
        app.state.context = ContextStore(redis, settings.namespace, settings.site)
        app.state.count_tokens = token_counter(prompts)
        app.state.chat = ChatService(
            settings,
            generation,
            ConversationStore(redis, keys),
            app.state.context,
            app.state.count_tokens,
        )
        log.info("gateway ready on %s:%d", settings.http_host, settings.http_port)
        try:
            yield
        finally:
            await jobs.close()
            await redis.aclose()

    app = FastAPI(
        title="Continuity mesh",
        version=routes.VERSION,
        description="Chat with the owner's continuity assistant across desktop, VPS and phone. "
        "Every route but /health and /ready needs `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(openai_routes.router)
    app.include_router(context_routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(web_routes.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
