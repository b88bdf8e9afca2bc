"""OpenAI-compatible routes (`/v1/...`), so any OpenAI SDK or tool can use the mesh."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gateway.auth import ChatKey, ReadKey
from gateway.deps import Chat, EngineDep
from gateway.disconnect import unless_disconnected
from gateway.engine import Outcome, Relay, collect, served_adapters, served_models
from gateway.errors import stream_error
from gateway.routes import ERRORS, SSE_HEADERS, sse_items
from proto.api import Usage
from proto.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Model,
    ModelList,
)

router = APIRouter(prefix="/v1")
STARTED = int(time.time())


def _finish(reason: str) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def _data(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def _stream(
    relay: Relay,
    include_usage: bool,
    frame: Callable[[list[Any], Usage | None], BaseModel],
    choice: Callable[[str | None, str | None], Any],
) -> StreamingResponse:
    """`data:` events as OpenAI streams them, ending with `data: [DONE]`.

    `choice(text, finish_reason)` makes one choice; `frame(choices, usage)` the
    chunk around it (chat and text completions differ only in these two).
    """

    def chunk(text: str | None, finish: str | None) -> bytes:
        return _data(frame([choice(text, finish)], None).model_dump_json(exclude_none=True))

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(sse_items(relay)) as items:
            async for item in items:
                if isinstance(item, BaseException):
                    yield _data(stream_error(item).model_dump_json())
                elif isinstance(item, Outcome):
                    yield chunk(None, _finish(item.finish_reason))
                    if include_usage:
                        usage = frame([], item.usage)
                        yield _data(usage.model_dump_json(exclude_none=True))
                elif isinstance(item, str):
                    yield chunk(item, None)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers=SSE_HEADERS | relay.headers
    )


@router.post(
    "/chat/completions",
    operation_id="create_chat_completion",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def chat_completions(
    body: ChatCompletionRequest, key: ChatKey, service: Chat, request: Request, response: Response
) -> ChatCompletion | StreamingResponse:
    """OpenAI chat completions, streaming (`stream: true`) or not."""
    answer = await service.chat_completion(key.key_id, body)
    relay, report = answer.relay, answer.context
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        first = True  # the first chunk names the role and carries the context report

        def choice(text: str | None, finish: str | None) -> ChunkChoice:
            delta = Delta(role="assistant" if first else None, content=text)
            return ChunkChoice(delta=delta, finish_reason=finish)  # type: ignore[arg-type]

        def frame(choices: list[Any], usage: Usage | None) -> ChatCompletionChunk:
            nonlocal first
            out = ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=body.model,
                choices=choices,
                usage=usage,
                context=report if first else None,
            )
            first = False
            return out

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(relay, include, frame, choice)

    response.headers.update(relay.headers)
    text, outcome = await unless_disconnected(request, collect(relay))
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        usage=outcome.usage,
        context=report,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=text), finish_reason=_finish(outcome.finish_reason)
            )
        ],
    )


@router.post(
    "/completions",
    operation_id="create_completion",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def completions(
    body: CompletionRequest, key: ChatKey, service: Chat, request: Request, response: Response
) -> Completion | StreamingResponse:
    """OpenAI (legacy) completions: the prompt is taken verbatim."""
    relay = await service.completion(key.key_id, body)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:

        def choice(text: str | None, finish: str | None) -> CompletionChoice:
            return CompletionChoice(text=text or "", finish_reason=finish)  # type: ignore[arg-type]

        def frame(choices: list[Any], usage: Usage | None) -> Completion:
            return Completion(
                id=completion_id, created=created, model=body.model, choices=choices, usage=usage
            )

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(relay, include, frame, choice)

    response.headers.update(relay.headers)
    text, outcome = await unless_disconnected(request, collect(relay))
    return Completion(
        id=completion_id,
        created=created,
        model=body.model,
        usage=outcome.usage,
        choices=[CompletionChoice(text=text, finish_reason=_finish(outcome.finish_reason))],
    )


@router.get("/models", operation_id="list_models", response_model=ModelList, responses=ERRORS)
async def list_models(key: ReadKey, engine: EngineDep) -> ModelList:
    """The base models live workers serve, and each adapter with its parent."""
    live = await engine.workers()
    models = [Model(id=name, created=STARTED) for name in served_models(live)]
    adapters = served_adapters(live)
    models += [Model(id=name, created=STARTED, parent=adapters[name]) for name in sorted(adapters)]
    return ModelList(data=models)
