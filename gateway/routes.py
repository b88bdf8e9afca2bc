"""The public HTTP routes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.auth import Owner
from gateway.chat import ChatService, Outcome
from gateway.errors import from_mesh_error
from proto.api import (
    ChatRequest,
    ChatResponse,
    ErrorBody,
    Health,
    Readiness,
    StreamChunk,
    StreamDone,
)
from services.errors import MeshError

router = APIRouter()

ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Bad request",
        401: "Missing or invalid API key",
        422: "Invalid body",
        502: "A worker failed",
        503: "No worker or broker available",
        504: "Timed out",
    }.items()
}


async def chat_service(request: Request) -> ChatService:
    return request.app.state.chat


Chat = Annotated[ChatService, Depends(chat_service)]


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
async def ready(request: Request) -> JSONResponse:
    """Broker and Redis connected, and at least one live worker."""
    state = request.app.state
    broker = state.jobs.connected
    try:
        redis_ok = bool(await state.redis.ping())
        workers = await state.workers.live_count()
    except Exception:
        redis_ok, workers = False, 0
    body = Readiness(
        ready=broker and redis_ok and workers > 0,
        broker=broker,
        redis=redis_ok,
        live_workers=workers,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.post("/chat", operation_id="chat", response_model=ChatResponse, responses=ERRORS)
async def chat(body: ChatRequest, owner: Owner, service: Chat) -> ChatResponse:
    """Send a message and get the whole answer."""
    conversation_id = body.conversation_id or uuid.uuid4().hex
    pieces: list[str] = []
    outcome: Outcome | None = None
    async for item in await service.stream(owner, body, conversation_id):
        if isinstance(item, Outcome):
            outcome = item
        else:
            pieces.append(item)
    assert outcome is not None  # the relay ends with an Outcome or raises
    return ChatResponse(
        response="".join(pieces),
        conversation_id=conversation_id,
        finish_reason=outcome.finish_reason,
        usage=outcome.usage,
    )  # type: ignore[arg-type]


def sse_event(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


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
async def chat_stream(body: ChatRequest, owner: Owner, service: Chat) -> StreamingResponse:
    """Send a message and receive the answer as server-sent events."""
    conversation_id = body.conversation_id or uuid.uuid4().hex
    # Started before the response: no worker or no broker is still a plain HTTP error.
    items = await service.stream(owner, body, conversation_id)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                if isinstance(item, Outcome):
                    done = StreamDone(
                        conversation_id=conversation_id,
                        finish_reason=item.finish_reason,  # type: ignore[arg-type]
                        usage=item.usage,
                    )
                    yield sse_event("done", done.model_dump_json())
                else:
                    yield sse_event("chunk", StreamChunk(text=item).model_dump_json())
        except MeshError as exc:
            yield sse_event("error", json.dumps(from_mesh_error(exc).body().model_dump()))

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
