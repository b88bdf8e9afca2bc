"""The original service's routes, kept compatible: chat, stream, conversation,
generate, health, ready, info; plus metrics."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.auth import ChatKey, MetricsKey, ReadKey
from gateway.deps import Chat, Conversations, EngineDep, MetricsDep, Redis, Settings
from gateway.disconnect import unless_disconnected
from gateway.engine import Item, Outcome, Restart, collect, served_adapters, served_models
from gateway.errors import stream_error
from proto.api import (
    ChatRequest,
    ChatResponse,
    Conversation,
    ConversationDeleted,
    ConversationList,
    ConversationTraining,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    PrefixCacheInfo,
    Readiness,
    StreamChunk,
    StreamDone,
    WorkerInfo,
)
from proto.messages import PrefixCacheStats
from services.conversations import ConversationStore
from services.errors import NotFound, WorkerLost

router = APIRouter()
VERSION = "0.1.0"

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Bad request (e.g. prompt too long, max_tokens above the cap)",
        401: "Missing or invalid API key",
        403: "The key lacks the scope",
        404: "Unknown model",
        413: "Body too large",
        422: "Invalid body",
        429: "Rate limit reached (see Retry-After)",
        502: "A worker failed",
        503: "No worker, a full queue or no broker (see Retry-After)",
        504: "No answer before the deadline",
    }.items()
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A streamed answer whose worker died midway: the part already sent is not resent
# from another worker's fresh start (that could mix two different texts).
WORKER_LOST = "the worker generating this answer stopped after part of it was sent; ask again"


@router.get("/health", operation_id="health", response_model=Health)
async def health() -> Health:
    """The process is alive."""
    return Health()


@router.get(
    "/ready",
    operation_id="ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
async def ready(engine: EngineDep, redis: Redis) -> JSONResponse:
    """Broker and Redis connected, and at least one live worker."""

    async def redis_answers() -> bool:
        try:
            return bool(await redis.ping())
        except Exception:
            return False

    # At the same time: a hung Redis costs one command timeout, not two.
    redis_ok, health = await asyncio.gather(redis_answers(), engine.health())
    body = Readiness(
        ready=health.broker and redis_ok and health.live_workers > 0,
        broker=health.broker,
        redis=redis_ok,
        live_workers=health.live_workers,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.post("/chat", operation_id="chat", response_model=ChatResponse, responses=ERRORS)
async def chat(
    body: ChatRequest, key: ChatKey, service: Chat, request: Request, response: Response
) -> ChatResponse:
    """Send a message and get the whole answer."""
    conversation_id = body.conversation_id or uuid.uuid4().hex
    answer = await service.chat(key.key_id, body, conversation_id, stream=False)
    response.headers.update(answer.relay.headers)
    text, outcome = await unless_disconnected(request, collect(answer.relay))
    return ChatResponse(
        response=text,
        conversation_id=conversation_id,
        finish_reason=outcome.finish_reason,  # type: ignore[arg-type]
        usage=outcome.usage,
        context=answer.context,
        served_by=outcome.served_by,
    )


def sse_event(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


async def sse_items(items: AsyncIterator[Item]) -> AsyncGenerator[Item | BaseException, None]:
    """The items of a reply being streamed, then the error that ended it, if one did
    (a worker lost midway counts as one): the response has started, so an error can
    only be a last event. The items are closed either way (the job is aborted when
    the client left early)."""
    try:
        async for item in items:
            if isinstance(item, Restart):
                # The part already sent is not resent from another worker's fresh
                # start (that could mix two different texts).
                raise WorkerLost(WORKER_LOST)
            yield item
    except Exception as exc:
        yield exc
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


@router.post(
    "/chat/stream",
    operation_id="chat_stream",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "SSE: `chunk` events ({text}), then `done` ({conversation_id, "
            "finish_reason, usage}) or `error` ({error}).",
        },
        **ERRORS,
    },
)
async def chat_stream(body: ChatRequest, key: ChatKey, service: Chat) -> StreamingResponse:
    """Send a message and receive the answer as server-sent events."""
    conversation_id = body.conversation_id or uuid.uuid4().hex
    # Started before the response: no worker or no broker is still a plain HTTP error.
    answer = await service.chat(key.key_id, body, conversation_id, stream=True)

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(sse_items(answer.relay)) as items:
            async for item in items:
                if isinstance(item, BaseException):
                    yield sse_event("error", stream_error(item).model_dump_json())
                elif isinstance(item, Outcome):
                    done = StreamDone(
                        conversation_id=conversation_id,
                        finish_reason=item.finish_reason,  # type: ignore[arg-type]
                        usage=item.usage,
                        context=answer.context,
                        served_by=item.served_by,
                    )
                    yield sse_event("done", done.model_dump_json())
                elif isinstance(item, str):
                    yield sse_event("chunk", StreamChunk(text=item).model_dump_json())

    return StreamingResponse(
        events(), media_type="text/event-stream", headers=SSE_HEADERS | answer.relay.headers
    )


ConversationQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Which conversation; absent: this key's most recent one.",
    ),
]


async def _pick_conversation(
    conversations: ConversationStore, owner: str, wanted: str | None
) -> str:
    conversation_id = wanted or await conversations.latest(owner)
    if conversation_id is None:
        raise NotFound("no conversation yet")
    return conversation_id


@router.get(
    "/conversation",
    operation_id="get_conversation",
    response_model=Conversation,
    responses=ERRORS,
)
async def get_conversation(
    key: ReadKey, conversations: Conversations, conversation_id: ConversationQuery = None
) -> Conversation:
    """A conversation's history (this key's most recent one without `conversation_id`)."""
    chosen = await _pick_conversation(conversations, key.key_id, conversation_id)
    messages = await conversations.messages(key.key_id, chosen)
    if not messages and conversation_id:
        raise NotFound("no such conversation")
    return Conversation(conversation_id=chosen, messages=messages)


@router.get(
    "/conversations",
    operation_id="list_conversations",
    response_model=ConversationList,
    responses=ERRORS,
)
async def list_conversations(
    key: ReadKey, conversations: Conversations, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> ConversationList:
    """This key's conversations, the most recently active first."""
    return ConversationList(conversations=await conversations.list(key.key_id, limit))


@router.delete(
    "/conversation",
    operation_id="delete_conversation",
    response_model=ConversationDeleted,
    responses=ERRORS,
)
async def delete_conversation(
    key: ReadKey, conversations: Conversations, conversation_id: ConversationQuery = None
) -> ConversationDeleted:
    """Forget a conversation (this key's most recent one without `conversation_id`)."""
    chosen = await _pick_conversation(conversations, key.key_id, conversation_id)
    deleted = await conversations.delete(key.key_id, chosen)
    return ConversationDeleted(conversation_id=chosen, deleted=deleted)


@router.put(
    "/conversation/training",
    operation_id="mark_conversation_for_training",
    response_model=ConversationTraining,
    responses=ERRORS,
)
async def mark_for_training(
    key: ReadKey, conversations: Conversations, conversation_id: ConversationQuery = None
) -> ConversationTraining:
    """Include a conversation in the next training run's dataset (this key's most
    recent one without `conversation_id`)."""
    return await _mark_for_training(key.key_id, conversations, conversation_id, True)


@router.delete(
    "/conversation/training",
    operation_id="unmark_conversation_for_training",
    response_model=ConversationTraining,
    responses=ERRORS,
)
async def unmark_for_training(
    key: ReadKey, conversations: Conversations, conversation_id: ConversationQuery = None
) -> ConversationTraining:
    """Leave a conversation out of training again."""
    return await _mark_for_training(key.key_id, conversations, conversation_id, False)


async def _mark_for_training(
    owner: str, conversations: ConversationStore, conversation_id: str | None, marked: bool
) -> ConversationTraining:
    chosen = await _pick_conversation(conversations, owner, conversation_id)
    if marked and not await conversations.messages(owner, chosen):
        raise NotFound("no such conversation")
    await conversations.mark_for_training(owner, chosen, marked)
    return ConversationTraining(conversation_id=chosen, marked=marked)


@router.post(
    "/generate", operation_id="generate", response_model=GenerateResponse, responses=ERRORS
)
async def generate(
    body: GenerateRequest, key: ChatKey, service: Chat, request: Request, response: Response
) -> GenerateResponse:
    """Continue a raw prompt, taken verbatim (e.g. `[INST] … [/INST]`)."""
    relay = await service.generate(key.key_id, body)
    response.headers.update(relay.headers)
    text, outcome = await unless_disconnected(request, collect(relay))
    return GenerateResponse(
        text=text,
        finish_reason=outcome.finish_reason,  # type: ignore[arg-type]
        usage=outcome.usage,
    )


def _prefix_cache_info(stats: PrefixCacheStats | None) -> PrefixCacheInfo | None:
    if stats is None:
        return None
    rate = stats.hit_tokens / stats.lookup_tokens if stats.lookup_tokens else None
    return PrefixCacheInfo(capacity_bytes=stats.capacity_bytes, bytes=stats.bytes, hit_rate=rate)


@router.get("/info", operation_id="info", response_model=Info, responses=ERRORS)
async def info(key: ReadKey, engine: EngineDep, settings: Settings) -> Info:
    """Served models, live workers by site and device, and the queue's depth."""
    live = await engine.workers()
    workers: dict[str, dict[str, list[WorkerInfo]]] = {}
    for w in sorted(live, key=lambda w: w.worker_id):
        workers.setdefault(w.site, {}).setdefault(w.device, []).append(
            WorkerInfo(
                worker_id=w.worker_id,
                base_model=w.base_model,
                capacity=w.capacity,
                in_flight=w.in_flight,
                adapters=w.adapters,
                prefix_cache=_prefix_cache_info(w.prefix_cache),
            )
        )
    return Info(
        adapters=served_adapters(live),
        version=VERSION,
        model_family=settings.model_family,
        models=served_models(live),
        workers=workers,
        queue_depth=await engine.queue_depth(),
    )


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **ERRORS,
    },
)
async def metrics(key: MetricsKey, engine: EngineDep, metrics: MetricsDep) -> Response:
    """Prometheus metrics of this gateway process and of the live workers it sees
    (needs the `metrics` or `admin` scope)."""
    metrics.observe_fleet(await engine.workers(), await engine.queue_depth())
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
