"""OpenAI-compatible routes (`/v1/...`), so any OpenAI SDK or tool can use the mesh."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gateway.auth import ChatKey, ReadKey
from gateway.chat import ChatService
from gateway.disconnect import unless_disconnected
from gateway.errors import ApiError, from_mesh_error
from gateway.generation import Generation, Outcome, Relay, Restart, collect
from gateway.routes import ERRORS, SSE_HEADERS, WORKER_LOST, generation
from proto.api import SamplingOptions, Usage
from proto.messages import ChatMessage
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
    SamplingFields,
)
from services.errors import MeshError

router = APIRouter(prefix="/v1")
Gen = Annotated[Generation, Depends(generation)]
STARTED = int(time.time())


def _options(body: SamplingFields, max_tokens: int | None) -> SamplingOptions:
    if body.n not in (None, 1):
        raise ApiError(400, "invalid_request_error", "only n=1 is supported", "unsupported_n")
    stops = body.stop_list()
    if len(stops) > 4:
        raise ApiError(400, "invalid_request_error", "at most 4 stop strings", "too_many_stops")
    return SamplingOptions(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        stop=stops or None,
        seed=body.seed,
    )


def _finish(reason: str) -> str:
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
        try:
            async for item in relay:
                if isinstance(item, Restart):
                    raise WORKER_LOST
                if isinstance(item, Outcome):
                    yield chunk(None, _finish(item.finish_reason))
                    if include_usage:
                        usage = frame([], item.usage)
                        yield _data(usage.model_dump_json(exclude_none=True))
                else:
                    yield chunk(item, None)
        except MeshError as exc:
            yield _data(json.dumps(from_mesh_error(exc).body().model_dump()))
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
    body: ChatCompletionRequest, key: ChatKey, gen: Gen, request: Request, response: Response
) -> ChatCompletion | StreamingResponse:
    """OpenAI chat completions, streaming (`stream: true`) or not."""
    options = _options(body, body.max_completion_tokens or body.max_tokens)
    messages = [
        ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
        for m in body.messages
    ]
    assembly = await request.app.state.chat.tiers(None)
    messages = ChatService.with_tiers(messages, assembly)
    report = assembly.report if assembly else None
    job = gen.new_job(
        gen.sampling(options),
        messages=messages,
        model=await gen.resolve_model(body.model),
        stream=bool(body.stream),
    )
    relay = await gen.start(job, scope=key.key_id)
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
        ],  # type: ignore[arg-type]
    )


@router.post(
    "/completions",
    operation_id="create_completion",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def completions(
    body: CompletionRequest, key: ChatKey, gen: Gen, request: Request, response: Response
) -> Completion | StreamingResponse:
    """OpenAI (legacy) completions: the prompt is taken verbatim."""
    options = _options(body, body.max_tokens)
    job = gen.new_job(
        gen.sampling(options),
        prompt=body.prompt,
        model=await gen.resolve_model(body.model),
        stream=bool(body.stream),
    )
    relay = await gen.start(job, scope=key.key_id)
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
        choices=[CompletionChoice(text=text, finish_reason=_finish(outcome.finish_reason))],  # type: ignore[arg-type]
    )


@router.get("/models", operation_id="list_models", response_model=ModelList, responses=ERRORS)
async def list_models(key: ReadKey, gen: Gen) -> ModelList:
    """The base models live workers serve, and each adapter with its parent."""
    models = [Model(id=name, created=STARTED) for name in await gen.models()]
    adapters = await gen.adapters()
    models += [Model(id=name, created=STARTED, parent=adapters[name]) for name in sorted(adapters)]
    return ModelList(data=models)
