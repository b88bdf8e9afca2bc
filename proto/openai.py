"""The OpenAI-compatible REST bodies (`/v1/...`): the subset the mesh serves.

Unknown request fields are ignored, as OpenAI-compatible servers do, so that any
OpenAI client library works; what the mesh cannot honour (n > 1) is refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.api import Usage
from proto.context import ContextReport
from proto.messages import SEED_MAX


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(OpenAIRequest):
    """One part of a message's content. Only `text` parts can be served (the mesh's
    models read text); any other type is refused with a 400 that names it."""

    type: str = Field(default="text", description="'text'; others (image_url, …) get a 400.")
    text: str = Field(default="", description="The text of a `text` part.")


class OpenAIMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(default=None, description="Accepted; not shown to the model.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def unsupported_parts(self) -> list[str]:
        """The types of the content's parts that are not text."""
        if isinstance(self.content, str):
            return []
        return [part.type for part in self.content if part.type != "text"]


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


class CompletionRequest(SamplingFields):
    prompt: str = Field(min_length=1)


class AssistantMessage(OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIResponse):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    context: ContextReport | None = Field(
        default=None, description="Extension: the context tiers added to the prompt."
    )


class Delta(OpenAIResponse):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(OpenAIResponse):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    context: ContextReport | None = Field(
        default=None, description="Extension, on the first chunk: the context tiers added."
    )


class CompletionChoice(OpenAIResponse):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None


class Completion(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
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
