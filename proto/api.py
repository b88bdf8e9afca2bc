"""Public REST bodies of the gateway.

Kept apart from the bus messages so that an old phone app keeps working when an
internal message changes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from proto.adapters import PhoneModel
from proto.context import ContextReport
from proto.messages import SEED_MAX

ConversationIdField = Field(
    default=None,
    min_length=1,
    max_length=64,
    pattern=r"^[A-Za-z0-9_-]+$",
    description="Continue this conversation; a new one is started when absent.",
)


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingOptions(ApiModel):
    """Decoding options; the server's defaults apply to what is absent."""

    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (server default when absent)."
    )
    min_tokens: int | None = Field(
        default=None, ge=0, description="Fewest tokens before the model may end its turn."
    )
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="0 for greedy decoding (default 0.7)."
    )
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling mass (default 0.9)."
    )
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=2.0, description="Repetition penalty (default 1.15)."
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, max_length=4, description="Stop before any of these strings."
    )
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX, description="Seed for reproducible sampling (int64)."
    )


class ChatRequest(SamplingOptions):
    """A chat turn from the user."""

    message: str = Field(min_length=1, description="The user's message.")
    context: str | None = Field(
        default=None, description="Extra context appended to the system prompt for this turn."
    )
    conversation_id: str | None = ConversationIdField
    model: str | None = Field(
        default=None, min_length=1, description="Base model or adapter name (default: base)."
    )
    project: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="Whose project tier goes into the prompt (default: the server's).",
    )


class GenerateRequest(SamplingOptions):
    """A raw prompt, used verbatim (e.g. `[INST] … [/INST]`)."""

    prompt: str = Field(min_length=1, description="The prompt, exactly as the model sees it.")
    model: str | None = Field(
        default=None, min_length=1, description="Base model or adapter name (default: base)."
    )


class PromptTokensDetails(ApiModel):
    """OpenAI's breakdown of the prompt tokens."""

    cached_tokens: int = Field(
        default=0,
        description="Prompt tokens the worker's prefix cache already held: it did not read "
        "them again (the shared start of prompts: system prompt and context tiers).",
    )


class Usage(ApiModel):
    prompt_tokens: int = Field(description="Tokens in the prompt after templating.")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="Sum of both.")
    prompt_tokens_details: PromptTokensDetails = Field(
        default_factory=PromptTokensDetails, description="What the prompt tokens were."
    )


class ChatResponse(ApiModel):
    """The assistant's answer."""

    response: str = Field(description="The assistant's reply.")
    conversation_id: str = Field(description="Pass it back to continue the conversation.")
    finish_reason: Literal["stop", "length", "cancelled"] = Field(
        description="stop: the model ended its turn; length: max_tokens reached."
    )
    usage: Usage
    context: ContextReport | None = Field(
        default=None, description="Which context tiers went into the prompt, and how much."
    )
    served_by: str | None = Field(
        default=None,
        description="The model that answered: base model, and adapter with its version "
        "('demo-model+continuity@v3'); OpenAI's system_fingerprint carries the same.",
    )


class GenerateResponse(ApiModel):
    """The model's continuation of the prompt."""

    text: str = Field(description="The generated text.")
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage


class ConversationMessage(ApiModel):
    role: Literal["user", "assistant"]
    content: str
    at: str = Field(description="When it was recorded (ISO 8601, UTC).")
    answered_on: str | None = Field(
        default=None,
        description="Set on an answer the phone made with no gateway reachable: the "
        "model on the device (e.g. demo-model+continuity@v3). Absent: the mesh answered.",
    )


TurnIdField = Field(
    min_length=8,
    max_length=64,
    pattern=r"^[A-Za-z0-9_-]+$",
    description="The device's id for the turn: uploading it again adds nothing.",
)


class DeviceTurn(ApiModel):
    """One turn answered on the phone while no gateway was reachable."""

    turn_id: str = TurnIdField
    user: str = Field(min_length=1, description="The user's message.")
    assistant: str = Field(description="The device's answer.")
    at: AwareDatetime = Field(description="When it was answered (ISO 8601 with a zone).")
    answered_on: str = Field(
        min_length=1, max_length=200, description="The model on the device that answered."
    )


class TurnUpload(ApiModel):
    """Turns held on the phone, uploaded in order once a gateway is reachable."""

    conversation_id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The conversation they belong to (the device names a new one).",
    )
    turns: list[DeviceTurn] = Field(min_length=1, max_length=500, description="Oldest first.")


class TurnUploadResult(ApiModel):
    conversation_id: str
    recorded: int = Field(description="Turns added now.")
    already_recorded: int = Field(description="Turns an earlier upload had added.")


class Conversation(ApiModel):
    """One conversation's history, oldest first."""

    conversation_id: str
    messages: list[ConversationMessage]


class ConversationSummary(ApiModel):
    conversation_id: str
    title: str = Field(description="The start of its first message.")
    messages: int = Field(description="Messages recorded.")
    updated_at: str = Field(description="Time of its last turn (ISO 8601, UTC).")


class ConversationList(ApiModel):
    conversations: list[ConversationSummary] = Field(description="Most recently active first.")


class ConversationDeleted(ApiModel):
    conversation_id: str
    deleted: bool = Field(description="True: it existed and is gone now.")


class ConversationTraining(ApiModel):
    conversation_id: str
    marked: bool = Field(description="True: the next training run includes it.")


class PrefixCacheInfo(ApiModel):
    """A worker's prefix cache: the keys and values of prompt starts it has read."""

    capacity_bytes: int = Field(description="Most bytes it may hold (MESH_PREFIX_CACHE_BYTES).")
    bytes: int = Field(description="Bytes it holds now.")
    hit_rate: float | None = Field(
        description="Share of the prompt tokens looked up that were found, since the worker "
        "started; None before its first lookup."
    )


class WorkerInfo(ApiModel):
    worker_id: str
    base_model: str
    capacity: int
    in_flight: int
    adapters: dict[str, int] = Field(
        default_factory=dict, description="Adapters loaded: name -> version."
    )
    prefix_cache: PrefixCacheInfo | None = Field(
        default=None, description="Its prefix cache; absent when its backend has none."
    )


class Info(ApiModel):
    """What the mesh serves and who serves it."""

    version: str
    model_family: str
    models: list[str] = Field(description="Base models served by live workers.")
    adapters: dict[str, str] = Field(description="Adapters served: name -> base model.")
    workers: dict[str, dict[str, list[WorkerInfo]]] = Field(
        description="Live workers by site, then by device."
    )
    queue_depth: int | None = Field(description="Jobs waiting for a worker (None: unknown).")


class StreamChunk(ApiModel):
    """Data of an SSE `chunk` event."""

    text: str = Field(description="New text to append.")


class StreamDone(ApiModel):
    """Data of the final SSE `done` event."""

    conversation_id: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    context: ContextReport | None = None
    served_by: str | None = Field(
        default=None,
        description="The model that answered: base model, and adapter with its version "
        "('demo-model+continuity@v3'); OpenAI's system_fingerprint carries the same.",
    )


class ErrorDetail(ApiModel):
    type: str = Field(description="Error class, e.g. 'invalid_request_error'.")
    message: str = Field(description="What went wrong, for a person.")
    code: str = Field(description="Machine-readable code, e.g. 'invalid_api_key'.")


class ErrorBody(ApiModel):
    """The one error body of the whole API (OpenAI's shape)."""

    error: ErrorDetail


class Health(ApiModel):
    status: Literal["ok"] = "ok"


class Readiness(ApiModel):
    ready: bool = Field(description="Broker and Redis connected and at least one live worker.")
    broker: bool
    redis: bool
    live_workers: int


class DeviceKit(ApiModel):
    """What the phone needs to answer on its own as the mesh would: the model to
    download, and the system prompt (own prompt + context tiers) as of now."""

    model: PhoneModel | None = Field(description="The phone model; null: none exported yet.")
    model_url: str | None = Field(description="Where to download it (range requests resume).")
    model_label: str | None = Field(description="e.g. demo-model+continuity@v3.")
    system_prompt: str = Field(description="The system prompt a chat gets now, tiers included.")
    history_messages: int = Field(description="How many earlier messages a chat re-reads.")
    max_tokens: int = Field(description="The default answer length.")
    temperature: float = Field(description="The default temperature.")
    as_of: str = Field(description="When this was assembled (ISO 8601, UTC).")
