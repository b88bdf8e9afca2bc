"""The gateway's FastAPI application; clients are built in the lifespan, not at import."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import errors
from gateway.chat import ChatService, WorkerDirectory
from gateway.conversations import ConversationStore
from gateway.routes import router
from gateway.settings import GatewaySettings
from services.bus import JobClient, Topology
from services.redis_client import Keys, connect

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = Keys(settings.namespace)
        redis = connect(settings.redis_url)
        jobs = JobClient(
            Topology(settings.namespace, settings.model_family),
            client_id=f"gateway-{uuid.uuid4().hex[:12]}",
        )
        await jobs.start(settings.amqp_url)
        workers = WorkerDirectory(redis, keys, settings.model_family, settings.workers_cache_s)
        app.state.settings = settings
        app.state.redis = redis
        app.state.jobs = jobs
        app.state.workers = workers
        app.state.chat = ChatService(settings, jobs, ConversationStore(redis, keys), workers)
        log.info("gateway ready on %s:%d", settings.http_host, settings.http_port)
        try:
            yield
        finally:
            await jobs.close()
            await redis.aclose()

    app = FastAPI(
        title="Continuity mesh",
        version="0.1.0",
        description="Chat with the owner's continuity assistant across desktop, VPS and phone.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(router)
    return app
