"""Messages on the bus: what the gateway, the workers and the trainer say to each other.

Frozen pydantic models, JSON on the wire. Every message has a `type` literal and a
`schema_version`; the AMQP headers carry the same two values so a consumer can
dispatch before parsing. Within one schema_version, changes are additive and
optional only.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

SCHEMA_VERSION = 1

JobId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Producer-assigned id of the job; replies and logs carry it.",
    ),
]


MAX_TOP_LOGPROBS = 20  # OpenAI's bound
SEED_MAX = 2**63 - 1  # OpenAI's range (int64); every backend takes it (llama.cpp: mod 2**32)


class BusMessage(BaseModel):
    """Base of every bus message: immutable, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ToolCall(BusMessage):
    """One call of a tool the model asked for (or made, earlier in a conversation)."""

    id: str = Field(min_length=1, max_length=64, description="The call's id; results name it.")
    name: str = Field(min_length=1, description="The function called.")
    arguments: str = Field(description="Its arguments: a JSON object, as text.")


class ChatMessage(BusMessage):
    """One turn of a conversation, as the chat template sees it."""

    role: Literal["system", "user", "assistant", "tool"] = Field(description="Who said it.")
    content: str = Field(description="What was said, as plain text.")
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="An assistant turn's tool calls."
    )
    tool_call_id: str | None = Field(
        default=None, description="A tool turn: the call whose result `content` is."
    )


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ToolSpec(BusMessage):
    """A function the model may call."""

    name: str = Field(pattern=TOOL_NAME, description="Its name (OpenAI's rule: [A-Za-z0-9_-]).")
    description: str = Field(default="", description="What it does, for the model.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON Schema of its arguments (an object).",
    )


class ToolUse(BusMessage):
    """The tools offered, and how the model must use them."""

    tools: list[ToolSpec] = Field(min_length=1, description="Shown to the model by its template.")
    choice: Literal["auto", "required", "function"] = Field(
        description="auto: the model decides; required: it must call one; function: it must "
        "call `function`. Under required and function its output is constrained to calls."
    )
    function: str | None = Field(default=None, description="The function that must be called.")
    parallel: bool = Field(default=True, description="Whether it may call several at once.")

    @model_validator(mode="after")
    def _function_named(self) -> ToolUse:
        names = {tool.name for tool in self.tools}
        if (self.choice == "function") != (self.function is not None):
            raise ValueError("`function` is set exactly when choice is 'function'")
        if self.function is not None and self.function not in names:
            raise ValueError(f"function {self.function!r} is not among the tools")
        return self


class ResponseFormat(BusMessage):
    """The answer must be JSON: any object, or one valid against `schema`."""

    type: Literal["json_object", "json_schema"] = Field(description="Which constraint.")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="json_schema: the JSON Schema it must match."
    )

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class SamplingParams(BusMessage):
    """How to decode. temperature 0 means greedy decoding."""

    max_tokens: int = Field(ge=1, description="Most tokens to generate.")
    min_tokens: int = Field(
        default=0, ge=0, description="Fewest tokens to generate before the model may stop."
    )
    temperature: float = Field(ge=0.0, le=2.0, description="0 for greedy decoding.")
    top_p: float = Field(gt=0.0, le=1.0, description="Nucleus sampling mass.")
    repetition_penalty: float = Field(
        ge=0.01, le=2.0, description="Penalty on tokens already present (1.0 is none)."
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=4,
        description="Generation ends before the first of these strings; it is not returned.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="Seed for sampling, for reproducible answers (within int64, as OpenAI's).",
    )


class ChatJob(BusMessage):
    """Command: generate the assistant's next turn for `messages`."""

    type: Literal["chat_job"] = Field(default="chat_job", description="Message type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    job_id: JobId
    model: str | None = Field(
        default=None,
        min_length=1,
        description="Base model or adapter name to serve it with; absent: the base model.",
    )
    messages: list[ChatMessage] = Field(
        default_factory=list,
        description="The conversation, system prompt first when present; empty with `prompt`.",
    )
    prompt: str | None = Field(
        default=None,
        description="A raw prompt used verbatim instead of the chat template (`/generate`).",
    )
    sampling: SamplingParams = Field(description="Decoding options.")
    conversation_id: str | None = Field(
        default=None, description="Conversation the job belongs to, for logs."
    )
    created_at: datetime = Field(description="When the gateway accepted the request (UTC).")
    deadline: datetime | None = Field(
        default=None, description="After this instant (UTC) nobody waits for the answer."
    )
    stream: bool = Field(
        default=True,
        description="Whether the client reads the answer while it is generated; when false "
        "the worker sends it in fewer, larger messages.",
    )
    tools: ToolUse | None = Field(
        default=None, description="Tools the model may call (chat jobs only)."
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="Constrain the answer to JSON (grammar-constrained decoding)."
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Send each token's log probability and this many most likely "
        "alternatives (0: none); absent: no log probabilities.",
    )

    @model_validator(mode="after")
    def _tools_in_chats(self) -> ChatJob:
        if self.prompt is not None and (self.tools or self.response_format):
            raise ValueError("tools and response_format need messages, not a raw prompt")
        return self

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> ChatJob:
        if bool(self.messages) == (self.prompt is not None):
            raise ValueError("a job carries either messages or a prompt, not both or neither")
        return self


LOGPROB_FLOOR = -9999.0  # what stands for a probability of 0 (JSON has no -inf)


class TopLogprob(BusMessage):
    """A token and its log probability."""

    token: str = Field(description="The token's text.")
    token_id: int = Field(ge=0, description="Its id in the model's vocabulary.")
    logprob: float = Field(
        ge=LOGPROB_FLOOR, le=0.0, description="Its natural log probability at this position."
    )

    @field_validator("logprob", mode="before")
    @classmethod
    def _finite(cls, value: float | None) -> float:
        """-inf, NaN or null (a probability of 0, or not a number) and any rounding
        above 0 kept within what JSON can carry."""
        number = LOGPROB_FLOOR if value is None else float(value)
        return LOGPROB_FLOOR if math.isnan(number) else min(max(number, LOGPROB_FLOOR), 0.0)


class TokenLogprob(TopLogprob):
    """A generated token, its log probability and the most likely alternatives."""

    top: list[TopLogprob] = Field(
        default_factory=list, description="The most likely tokens at this position, best first."
    )


class TokenChunk(BusMessage):
    """Event: the next piece of a job's answer (several tokens coalesced)."""

    type: Literal["token_chunk"] = Field(default="token_chunk", description="Message type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    job_id: JobId
    seq: int = Field(ge=0, description="Position of this message in the job's reply stream.")
    text: str = Field(description="The new text, to be appended to what came before.")
    token_count: int = Field(ge=0, description="How many generated tokens this text holds.")
    logprobs: list[TokenLogprob] | None = Field(
        default=None,
        description="When the job asked: each generated token of this chunk, in order "
        "(a tool call's tokens come in chunks of their own, with no text: the call is "
        "in the result).",
    )


class Usage(BusMessage):
    """Token counts of one job."""

    prompt_tokens: int = Field(ge=0, description="Tokens in the prompt after templating.")
    completion_tokens: int = Field(ge=0, description="Tokens generated.")
    cached_tokens: int = Field(
        default=0,
        ge=0,
        description="Of the prompt tokens, how many the worker's prefix cache already held "
        "(it did not read them again).",
    )


class JobResult(BusMessage):
    """Event: the job finished; the last message of its reply stream."""

    type: Literal["job_result"] = Field(default="job_result", description="Message type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    job_id: JobId
    seq: int = Field(ge=0, description="Position of this message in the job's reply stream.")
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"] = Field(
        description="stop: the model ended its turn; length: max_tokens reached; "
        "tool_calls: it ended its turn by calling tools."
    )
    usage: Usage = Field(description="Token counts.")
    worker_id: str = Field(description="The worker that served the job.")
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="The tools the model called (their text is not in the chunks)."
    )
    served_by: str | None = Field(
        default=None,
        description="The model that answered: base model, and adapter with its version "
        "('demo-model+continuity@v3').",
    )
    queued_ms: float | None = Field(
        default=None, ge=0, description="From the job's creation until a worker started it."
    )


class JobError(BusMessage):
    """Event: the job failed; the last message of its reply stream."""

    type: Literal["job_error"] = Field(default="job_error", description="Message type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    job_id: JobId
    seq: int = Field(ge=0, description="Position of this message in the job's reply stream.")
    code: str = Field(description="Machine-readable reason, e.g. 'invalid_job', 'backend_error'.")
    message: str = Field(description="Human-readable reason.")
    retryable: bool = Field(description="Whether sending the same request again may succeed.")


class CancelJob(BusMessage):
    """Command: stop working on a job; nobody waits for its answer any more."""

    type: Literal["cancel_job"] = Field(default="cancel_job", description="Message type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    job_id: JobId
    reason: str = Field(description="Why, for logs: 'client_disconnected', 'deadline'.")


ReplyMessage = Annotated[TokenChunk | JobResult | JobError, Field(discriminator="type")]
REPLY_ADAPTER: TypeAdapter[TokenChunk | JobResult | JobError] = TypeAdapter(ReplyMessage)


class PrefixCacheStats(BusMessage):
    """A worker's prefix cache: its size and counters since the worker started."""

    capacity_bytes: int = Field(ge=0, description="Most bytes of keys and values it may hold.")
    bytes: int = Field(ge=0, description="Bytes of keys and values it holds now.")
    blocks: int = Field(ge=0, description="Blocks it holds now.")
    block_tokens: int = Field(ge=1, description="Tokens per block.")
    lookups: int = Field(ge=0, description="Prompts looked up.")
    lookup_tokens: int = Field(ge=0, description="Tokens of the prompts looked up.")
    hit_tokens: int = Field(ge=0, description="Of those, tokens found in the cache.")
    evictions: int = Field(ge=0, description="Blocks dropped to make room.")


class WorkerStatus(BusMessage):
    """A worker's liveness record, refreshed in Redis with a TTL."""

    type: Literal["worker_status"] = Field(default="worker_status", description="Record type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    worker_id: str = Field(description="Unique id of the worker process.")
    site: str = Field(description="Where it runs, e.g. 'desktop' or 'vps'.")
    device: str = Field(description="'cpu' or 'cuda' (with the GPU's name when known).")
    model_family: str = Field(description="The job queue it consumes.")
    base_model: str = Field(description="Name of the base model it serves.")
    adapters: dict[str, int] = Field(
        default_factory=dict, description="Adapter name -> version it serves."
    )
    capacity: int = Field(ge=1, description="Jobs it runs at once.")
    in_flight: int = Field(ge=0, description="Jobs it is running now.")
    jobs_completed: int = Field(default=0, ge=0, description="Jobs answered since start.")
    jobs_cancelled: int = Field(default=0, ge=0, description="Jobs cancelled since start.")
    tokens_generated: int = Field(
        default=0, ge=0, description="Tokens decoded since start, including unread ones."
    )
    gpu_memory_bytes: int | None = Field(
        default=None, ge=0, description="GPU memory its process holds (CUDA workers only)."
    )
    prefix_cache: PrefixCacheStats | None = Field(
        default=None, description="Its prefix cache; absent when the backend has none."
    )
    started_at: datetime = Field(description="When the worker started (UTC).")
    updated_at: datetime = Field(description="When this record was written (UTC).")


BUS_MESSAGES: tuple[type[BusMessage], ...] = (
    ChatJob,
    CancelJob,
    TokenChunk,
    JobResult,
    JobError,
    WorkerStatus,
)
