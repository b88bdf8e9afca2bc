"""The OpenAI-compatible REST bodies (`/v1/...`): the subset the mesh serves.

Unknown request fields are ignored, as OpenAI-compatible servers do, so that any
OpenAI client library works; what the mesh cannot honour (n > 1) is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.api import Usage
from proto.context import ContextReport
from proto.messages import MAX_TOP_LOGPROBS, SEED_MAX, TOOL_NAME


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(OpenAIRequest):
    """One part of a message's content. Only `text` parts can be served (the mesh's
    models read text); any other type is refused with a 400 that names it."""

    type: str = Field(default="text", description="'text'; others (image_url, …) get a 400.")
    text: str = Field(default="", description="The text of a `text` part.")


class FunctionCall(OpenAIRequest):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments: a JSON object, as text.")


class MessageToolCall(OpenAIRequest):
    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(
        default=None, description="Text, or a list of text parts (none: an assistant's calls)."
    )
    name: str | None = Field(default=None, description="Accepted; not shown to the model.")
    tool_calls: list[MessageToolCall] | None = Field(
        default=None, description="An assistant message's tool calls."
    )
    tool_call_id: str | None = Field(
        default=None, min_length=1, max_length=64, description="A tool message: which call."
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def unsupported_parts(self) -> list[str]:
        """The types of the content's parts that are not text."""
        if self.content is None or isinstance(self.content, str):
            return []
        return [part.type for part in self.content if part.type != "text"]


class FunctionDefinition(OpenAIRequest):
    name: str = Field(pattern=TOOL_NAME, description="[A-Za-z0-9_-], at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema of the arguments (an object)."
    )
    strict: bool | None = Field(
        default=None, description="Accepted: calls are always decoded under the schema."
    )


class Tool(OpenAIRequest):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIRequest):
    name: str = Field(min_length=1)


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(OpenAIRequest):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The JSON Schema the answer must match."
    )
    strict: bool | None = Field(default=None, description="Accepted: the schema is enforced.")

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class SamplingFields(OpenAIRequest):
    model: str = Field(min_length=1, description="A model id from GET /v1/models.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0, description="Extension (as in vLLM).")
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Up to 4 stop strings."
    )
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    n: int | None = Field(default=None, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=2.0, description="Extension: the mesh's repetition penalty."
    )

    def stop_list(self) -> list[str]:
        if not self.stop:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="Default: auto when tools are given."
    )
    parallel_tool_calls: bool | None = Field(default=None, description="Default: true.")
    response_format: ResponseFormat | None = None
    logprobs: bool | None = Field(default=None, description="Send each token's log probability.")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives per token (logprobs)."
    )


class CompletionRequest(SamplingFields):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Send each token's log probability and this many alternatives.",
    )


FinishReason = Literal["stop", "length", "tool_calls"]


class CalledFunction(OpenAIResponse):
    name: str
    arguments: str = Field(description="A JSON object, as text.")


class ToolCallOut(OpenAIResponse):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprobOut(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(OpenAIResponse):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(OpenAIResponse):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(
        default=None, description="The base model and adapter version that answered."
    )
    choices: list[ChatChoice]
    usage: Usage
    context: ContextReport | None = Field(
        default=None, description="Extension: the context tiers added to the prompt."
    )


class FunctionDelta(OpenAIResponse):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(OpenAIResponse):
    """A piece of a streamed tool call: first its id, type and name, then its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(OpenAIResponse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(OpenAIResponse):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = Field(
        default=None, description="On the last chunks: the base model and adapter version."
    )
    choices: list[ChunkChoice]
    usage: Usage | None = None
    context: ContextReport | None = Field(
        default=None, description="Extension, on the first chunk: the context tiers added."
    )


class CompletionLogprobs(OpenAIResponse):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(OpenAIResponse):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "continuity-mesh"
    parent: str | None = Field(default=None, description="For an adapter: its base model.")


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[Model]
