"""OpenAI-compatible routes (`/v1/...`), so any OpenAI SDK or tool can use the mesh."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gateway.auth import ChatKey, ReadKey
from gateway.deps import Chat, EngineDep
from gateway.disconnect import unless_disconnected
from gateway.engine import (
    Logprobs,
    Outcome,
    Relay,
    collect_all,
    served_adapters,
    served_models,
)
from gateway.errors import stream_error
from gateway.routes import ERRORS, SSE_HEADERS, sse_items
from proto.api import Usage
from proto.messages import TokenLogprob, TopLogprob
from proto.openai import (
    AssistantMessage,
    CalledFunction,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    FinishReason,
    FunctionDelta,
    Model,
    ModelList,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprobOut,
)

router = APIRouter(prefix="/v1")
STARTED = int(time.time())


def _finish(reason: str) -> FinishReason:
    return reason if reason in ("length", "tool_calls") else "stop"  # type: ignore[return-value]


def _data(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def _top(entry: TopLogprob) -> TopLogprobOut:
    return TopLogprobOut(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()))


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """OpenAI's chat shape: per token its text, log probability, bytes and the top."""
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                **_top(token).model_dump(), top_logprobs=[_top(alt) for alt in token.top]
            )
            for token in tokens
        ]
    )


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists; `offset`: the text sent before."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{alt.token: alt.logprob for alt in t.top} for t in tokens],
        text_offset=offsets,
    )


def _tool_calls(outcome: Outcome) -> list[ToolCallOut] | None:
    calls = [
        ToolCallOut(id=c.id, function=CalledFunction(name=c.name, arguments=c.arguments))
        for c in outcome.tool_calls
    ]
    return calls or None


Piece = tuple[str, Sequence[TokenLogprob] | None]


async def _pieces(items: AsyncIterator[Any], paired: bool) -> AsyncIterator[Any]:
    """The stream's items with each text piece and the log probabilities that follow
    it joined into one (text, logprobs) Piece; other items as they are. `paired`
    False: no log probabilities are coming, so nothing waits for them."""
    held: str | None = None
    async for item in items:
        if isinstance(item, Logprobs):
            yield (held or "", item.tokens)
            held = None
            continue
        if held is not None:
            yield (held, None)
            held = None
        if isinstance(item, str) and paired:
            held = item
        elif isinstance(item, str):
            yield (item, None)
        else:
            yield item
    if held is not None:
        yield (held, None)


def _stream(
    relay: Relay,
    include_usage: bool,
    paired: bool,
    frame: Callable[[list[Any], Usage | None, str | None], BaseModel],
    choice: Callable[[Piece | None, Outcome | None], list[Any]],
) -> StreamingResponse:
    """`data:` events as OpenAI streams them, ending with `data: [DONE]`.

    `choice(piece, outcome)` makes the choices of one chunk (for a piece of text, or
    for the end); `frame(choices, usage, fingerprint)` the chunk around them (chat and
    text completions differ only in these two).
    """

    def chunk(choices: list[Any], fingerprint: str | None = None) -> bytes:
        return _data(frame(choices, None, fingerprint).model_dump_json(exclude_none=True))

    async def events() -> AsyncIterator[bytes]:
        async with aclosing(sse_items(relay)) as items:
            async for item in _pieces(items, paired):
                if isinstance(item, BaseException):
                    yield _data(stream_error(item).model_dump_json())
                elif isinstance(item, Outcome):
                    for choices in choice(None, item):
                        yield chunk(choices, item.served_by)
                    if include_usage:
                        usage = frame([], item.usage, item.served_by)
                        yield _data(usage.model_dump_json(exclude_none=True))
                elif isinstance(item, tuple):
                    for choices in choice(item, None):
                        yield chunk(choices)
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
    """OpenAI chat completions, streaming (`stream: true`) or not, with tools,
    structured outputs (`response_format`) and log probabilities."""
    answer = await service.chat_completion(key.key_id, body)
    relay, report = answer.relay, answer.context
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        first = True  # the first chunk names the role and carries the context report

        def choice(piece: Piece | None, outcome: Outcome | None) -> list[Any]:
            """A text piece's chunk; at the end, each tool call as OpenAI streams one
            (its id and name, then its arguments; here the arguments come in one
            piece, once the call is complete), then the finish."""
            role: Any = "assistant" if first else None
            if piece is not None:
                text, tokens = piece
                logprobs = chat_logprobs(tokens) if tokens is not None else None
                return [[ChunkChoice(delta=Delta(role=role, content=text), logprobs=logprobs)]]
            assert outcome is not None
            out: list[Any] = []
            for index, call in enumerate(_tool_calls(outcome) or []):
                name = FunctionDelta(name=call.function.name, arguments="")
                opening = ToolCallDelta(index=index, id=call.id, type="function", function=name)
                arguments = FunctionDelta(arguments=call.function.arguments)
                rest = ToolCallDelta(index=index, function=arguments)
                out.append([ChunkChoice(delta=Delta(role=role, tool_calls=[opening]))])
                out.append([ChunkChoice(delta=Delta(tool_calls=[rest]))])
                role = None
            finish = _finish(outcome.finish_reason)
            out.append([ChunkChoice(delta=Delta(role=role), finish_reason=finish)])
            return out

        def frame(choices: list[Any], usage: Usage | None, fingerprint: str | None) -> BaseModel:
            nonlocal first
            out = ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=body.model,
                system_fingerprint=fingerprint,
                choices=choices,
                usage=usage,
                context=report if first else None,
            )
            first = False
            return out

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(relay, include, bool(body.logprobs), frame, choice)

    response.headers.update(relay.headers)
    whole = await unless_disconnected(request, collect_all(relay))
    outcome = whole.outcome
    calls = _tool_calls(outcome)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        system_fingerprint=outcome.served_by,
        usage=outcome.usage,
        context=report,
        choices=[
            ChatChoice(
                message=AssistantMessage(
                    content=whole.text or (None if calls else ""), tool_calls=calls
                ),
                finish_reason=_finish(outcome.finish_reason),
                logprobs=chat_logprobs(whole.logprobs) if body.logprobs else None,
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
        sent = 0  # characters sent so far: the log probabilities' text offsets

        def choice(piece: Piece | None, outcome: Outcome | None) -> list[Any]:
            nonlocal sent
            if piece is None:
                assert outcome is not None
                finish: Literal["stop", "length"] = (
                    "length" if outcome.finish_reason == "length" else "stop"
                )
                return [[CompletionChoice(text="", finish_reason=finish)]]
            text, tokens = piece
            logprobs = completion_logprobs(tokens, sent) if tokens is not None else None
            # the tokens' texts (a stop string's start may be held back from `text`)
            sent += sum(len(t.token) for t in tokens) if tokens is not None else len(text)
            return [[CompletionChoice(text=text, logprobs=logprobs)]]

        def frame(choices: list[Any], usage: Usage | None, fingerprint: str | None) -> BaseModel:
            return Completion(
                id=completion_id,
                created=created,
                model=body.model,
                system_fingerprint=fingerprint,
                choices=choices,
                usage=usage,
            )

        include = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(relay, include, body.logprobs is not None, frame, choice)

    response.headers.update(relay.headers)
    whole = await unless_disconnected(request, collect_all(relay))
    outcome = whole.outcome
    logprobs = completion_logprobs(whole.logprobs) if body.logprobs is not None else None
    return Completion(
        id=completion_id,
        created=created,
        model=body.model,
        system_fingerprint=outcome.served_by,
        usage=outcome.usage,
        choices=[
            CompletionChoice(
                text=whole.text,
                finish_reason="length" if outcome.finish_reason == "length" else "stop",
                logprobs=logprobs,
            )
        ],
    )


@router.get("/models", operation_id="list_models", response_model=ModelList, responses=ERRORS)
async def list_models(key: ReadKey, engine: EngineDep) -> ModelList:
    """The base models live workers serve, and each adapter with its parent."""
    live = await engine.workers()
    models = [Model(id=name, created=STARTED) for name in served_models(live)]
    adapters = served_adapters(live)
    models += [Model(id=name, created=STARTED, parent=adapters[name]) for name in sorted(adapters)]
    return ModelList(data=models)
