"""Every public request becomes a `ChatJob` here, and only here.

One system-prompt rule for every route: the request's own system prompt, then the
context tiers, then the turn's extra context, each only when present, separated by a
blank line. What "its own" means is the API's: `/chat` has the server's configured
prompt (MESH_SYSTEM_PROMPT); an OpenAI request has what its `system` and
`developer` messages say, joined in order (nothing when it sends none, so a client
gets exactly the prompt it sent, plus the tiers); consecutive messages of one role
are one turn, as chat templates that insist on alternating roles need. Raw prompts (`/generate`,
`/v1/completions`) are taken verbatim: no system prompt, no tiers.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from context_store.assembly import Assembly
from gateway.settings import GatewaySettings
from inference_worker.backends.tool_calls import MistralTools
from proto.api import ChatRequest, GenerateRequest, SamplingOptions
from proto.messages import (
    ChatJob,
    ChatMessage,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolSpec,
    ToolUse,
)
from proto.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    MessageToolCall,
    OpenAIMessage,
    SamplingFields,
)
from services.errors import InvalidRequest
from services.grammars import schema_problem

MAX_STOPS = 4


def system_prompt(own: str, tiers: Assembly | None, extra: str | None = None) -> str:
    """The one rule (see the module's docstring)."""
    parts = [own, tiers.text if tiers else "", extra or ""]
    return "\n\n".join(part for part in parts if part)


class JobBuilder:
    """Request bodies → jobs, with the server's defaults and limits (InvalidRequest
    when outside them). Jobs are for the base model: the chat service names the
    adapter after checking that some live worker serves it."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings

    # -- the four public requests -------------------------------------------------------

    def chat(
        self,
        request: ChatRequest,
        *,
        tiers: Assembly | None,
        history: list[ChatMessage],
        conversation_id: str,
        stream: bool,
    ) -> ChatJob:
        """`/chat` and `/chat/stream`: system prompt, the conversation so far, the message."""
        system = system_prompt(self.settings.system_prompt, tiers, request.context)
        messages = [ChatMessage(role="system", content=system)] if system else []
        messages += [*history, ChatMessage(role="user", content=request.message)]
        return self.job(
            self.sampling(request),
            messages=messages,
            conversation_id=conversation_id,
            stream=stream,
        )

    def chat_completion_sampling(self, request: ChatCompletionRequest) -> SamplingParams:
        """The options of a `/v1/chat/completions` request, checked before anything is read."""
        max_tokens = request.max_completion_tokens or request.max_tokens
        return self.sampling(self.openai_options(request, max_tokens))

    def chat_completion(
        self, request: ChatCompletionRequest, *, tiers: Assembly | None, sampling: SamplingParams
    ) -> ChatJob:
        """`/v1/chat/completions`: the client's messages under the one rule."""
        own = [m.text() for m in request.messages if m.role in ("system", "developer")]
        turns = chat_turns(request.messages)
        system = system_prompt("\n\n".join(own), tiers)
        messages = [ChatMessage(role="system", content=system)] if system else []
        job = self.job(sampling, messages=messages + turns, stream=request.stream)
        return job.model_copy(
            update={
                "tools": tool_use(request),
                "response_format": response_format(request),
                "logprobs": chat_logprobs(request),
            }
        )

    def generate(self, request: GenerateRequest) -> ChatJob:
        """`/generate`: the raw prompt, verbatim."""
        return self.job(self.sampling(request), prompt=request.prompt, stream=False)

    def completion(self, request: CompletionRequest) -> ChatJob:
        """`/v1/completions`: the raw prompt, verbatim."""
        job = self.job(
            self.sampling(self.openai_options(request, request.max_tokens)),
            prompt=request.prompt,
            stream=request.stream,
        )
        return job.model_copy(update={"logprobs": request.logprobs})

    # -- the parts ----------------------------------------------------------------------

    @staticmethod
    def openai_options(body: SamplingFields, max_tokens: int | None) -> SamplingOptions:
        if body.n not in (None, 1):
            raise InvalidRequest("only n=1 is supported", "unsupported_n")
        stops = body.stop_list()
        if len(stops) > MAX_STOPS:
            raise InvalidRequest(f"at most {MAX_STOPS} stop strings", "too_many_stops")
        return SamplingOptions(
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop=stops or None,
            seed=body.seed,
        )

    def sampling(self, options: SamplingOptions) -> SamplingParams:
        s = self.settings
        max_tokens = options.max_tokens or s.default_max_tokens
        if max_tokens > s.max_tokens_cap:
            raise InvalidRequest(
                f"max_tokens {max_tokens} is above the cap of {s.max_tokens_cap}",
                "max_tokens_too_large",
            )
        if (options.min_tokens or 0) > max_tokens:
            raise InvalidRequest("min_tokens is above max_tokens", "invalid_min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=options.min_tokens or 0,
            temperature=s.temperature if options.temperature is None else options.temperature,
            top_p=options.top_p or s.top_p,
            repetition_penalty=options.repetition_penalty or s.repetition_penalty,
            stop=options.stop or [],
            seed=options.seed,
        )

    def job(
        self,
        sampling: SamplingParams,
        *,
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
        model: str | None = None,
        conversation_id: str | None = None,
        stream: bool = True,
    ) -> ChatJob:
        now = datetime.now(UTC)
        return ChatJob(
            job_id=uuid.uuid4().hex,
            model=model,
            messages=messages or [],
            prompt=prompt,
            sampling=sampling,
            conversation_id=conversation_id,
            created_at=now,
            deadline=now + timedelta(seconds=self.settings.request_timeout_s),
            stream=stream,
        )


# -- OpenAI chat requests -----------------------------------------------------------------


def chat_turns(messages: list[OpenAIMessage]) -> list[ChatMessage]:
    """The conversation's turns (system and developer messages are the system prompt):
    consecutive user, or assistant, texts are one turn; an assistant's tool calls and
    each tool's result are turns of their own; a conversation that starts with the
    assistant gets an empty user turn before it (templates want the user first)."""
    turns: list[ChatMessage] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if unsupported := message.unsupported_parts():
            raise InvalidRequest(
                f"{where}.content: {', '.join(sorted(set(unsupported)))} parts "
                "are not supported (the mesh's models read text)",
                "unsupported_content",
            )
        if message.role in ("system", "developer"):
            continue
        if message.role == "tool":
            if message.tool_call_id is None:
                raise InvalidRequest(
                    f"{where}: a tool message needs tool_call_id", "invalid_messages"
                )
            turns.append(
                ChatMessage(role="tool", content=message.text(), tool_call_id=message.tool_call_id)
            )
            continue
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(
                f"{where}: only assistant messages have tool_calls", "invalid_messages"
            )
        calls = [
            _call(call, f"{where}.tool_calls[{n}]")
            for n, call in enumerate(message.tool_calls or [])
        ]
        last = turns[-1] if turns else None
        if calls and last is not None and last.role == "assistant" and not last.tool_calls:
            # what the assistant said, then its calls: one turn (templates count calls
            # as no turn, so two assistant turns would follow each other)
            text = "\n\n".join(part for part in (last.content, message.text()) if part)
            turns[-1] = ChatMessage(role="assistant", content=text, tool_calls=calls)
        elif calls:
            turns.append(ChatMessage(role="assistant", content=message.text(), tool_calls=calls))
        elif last is not None and last.role == message.role and not last.tool_calls:
            merged = "\n\n".join(part for part in (last.content, message.text()) if part)
            turns[-1] = ChatMessage(role=message.role, content=merged)
        else:
            turns.append(ChatMessage(role=message.role, content=message.text()))  # type: ignore[arg-type]
    if not any(turn.role in ("user", "assistant") for turn in turns):
        raise InvalidRequest("messages hold no user or assistant turn", "invalid_messages")
    if turns[0].role != "user":
        turns.insert(0, ChatMessage(role="user", content=""))
    return _answered(turns)


def _answered(turns: list[ChatMessage]) -> list[ChatMessage]:
    """Every tool call followed by its results (as OpenAI requires), and a user turn
    after tool results preceded by an (empty) assistant answer: templates that insist
    on alternating user and assistant turns count calls and results as neither."""
    out: list[ChatMessage] = []
    for index, turn in enumerate(turns):
        previous = out[-1] if out else None
        if previous is not None and previous.tool_calls and turn.role != "tool":
            raise InvalidRequest(
                f"an assistant message with tool_calls must be followed by tool messages "
                f"(turn {index})",
                "invalid_messages",
            )
        if turn.role == "tool" and not (
            previous is not None and (previous.tool_calls or previous.role == "tool")
        ):
            raise InvalidRequest(
                "a tool message must follow the assistant's tool_calls", "invalid_messages"
            )
        if previous is not None and previous.role == "tool" and turn.role == "user":
            out.append(ChatMessage(role="assistant", content=""))
        out.append(turn)
    return out


def _call(call: MessageToolCall, where: str) -> ToolCall:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError as exc:
        raise InvalidRequest(
            f"{where}.function.arguments is not JSON: {exc}", "invalid_messages"
        ) from exc
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments is not a JSON object", "invalid_messages")
    return ToolCall(id=call.id, name=call.function.name, arguments=json.dumps(arguments))


def closed(schema: Any) -> Any:
    """`schema` with every object that does not say otherwise closed to properties it
    does not list: what OpenAI's `strict: true` means (and what keeps a sampled answer
    from wandering off into made-up keys)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) if key in _SUBSCHEMAS else value for key, value in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = {"items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties"}


def _enforceable(schema: dict[str, Any], where: str) -> None:
    if problem := schema_problem(schema):
        raise InvalidRequest(f"{where}: cannot be enforced: {problem}", "unsupported_schema")


def tool_use(request: ChatCompletionRequest) -> ToolUse | None:
    """The tools offered and how they must be used; None when none may be called."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", "invalid_tool_choice")
        return None
    if choice == "none":
        return None
    specs = []
    for index, tool in enumerate(request.tools):
        function = tool.function
        parameters = function.parameters or {"type": "object", "properties": {}}
        if parameters.get("type", "object") != "object":
            raise InvalidRequest(
                f"tools[{index}].function.parameters: must describe an object", "unsupported_schema"
            )
        if function.strict:
            parameters = closed(parameters)
        _enforceable(parameters, f"tools[{index}].function.parameters")
        specs.append(
            ToolSpec(
                name=function.name, description=function.description or "", parameters=parameters
            )
        )
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: two tools have the same name", "invalid_tools")
    named = None if choice is None or isinstance(choice, str) else choice.function.name
    if named is not None and named not in names:
        raise InvalidRequest(
            f"tool_choice names {named!r}, which is not among the tools", "invalid_tool_choice"
        )
    use = ToolUse(
        tools=specs,
        choice="function" if named else ("required" if choice == "required" else "auto"),
        function=named,
        parallel=request.parallel_tool_calls is not False,
    )
    # ... and together, as the workers compile them (each one's references rebased)
    _enforceable(MistralTools.calls_schema(use), "tools")
    return use


def response_format(request: ChatCompletionRequest) -> ResponseFormat | None:
    wanted = request.response_format
    if wanted is None or wanted.type == "text":
        return None
    if wanted.type == "json_object":
        return ResponseFormat(type="json_object")
    schema = wanted.json_schema.schema_ if wanted.json_schema else None
    if schema is not None and wanted.json_schema and wanted.json_schema.strict:
        schema = closed(schema)
    if schema is None:
        raise InvalidRequest(
            "response_format json_schema needs json_schema.schema", "invalid_response_format"
        )
    _enforceable(schema, "response_format.json_schema.schema")
    return ResponseFormat(type="json_schema", json_schema=schema)


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    if not request.logprobs:
        if request.top_logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "invalid_logprobs")
        return None
    return request.top_logprobs or 0
