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

import uuid
from datetime import UTC, datetime, timedelta

from context_store.assembly import Assembly
from gateway.settings import GatewaySettings
from proto.api import ChatRequest, GenerateRequest, SamplingOptions
from proto.messages import ChatJob, ChatMessage, SamplingParams
from proto.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from services.errors import InvalidRequest

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
        for index, message in enumerate(request.messages):
            if unsupported := message.unsupported_parts():
                raise InvalidRequest(
                    f"messages[{index}].content: {', '.join(sorted(set(unsupported)))} parts "
                    "are not supported (the mesh's models read text)",
                    "unsupported_content",
                )
        own = [m.text() for m in request.messages if m.role in ("system", "developer")]
        turns: list[ChatMessage] = []
        for m in request.messages:
            if m.role in ("system", "developer"):
                continue
            if turns and turns[-1].role == m.role:  # two user turns in a row: one turn
                merged = f"{turns[-1].content}\n\n{m.text()}"
                turns[-1] = ChatMessage(role=m.role, content=merged)
            else:
                turns.append(ChatMessage(role=m.role, content=m.text()))  # type: ignore[arg-type]
        if not turns:
            raise InvalidRequest("messages hold no user or assistant turn", "invalid_messages")
        system = system_prompt("\n\n".join(own), tiers)
        messages = [ChatMessage(role="system", content=system)] if system else []
        return self.job(sampling, messages=messages + turns, stream=request.stream)

    def generate(self, request: GenerateRequest) -> ChatJob:
        """`/generate`: the raw prompt, verbatim."""
        return self.job(self.sampling(request), prompt=request.prompt, stream=False)

    def completion(self, request: CompletionRequest) -> ChatJob:
        """`/v1/completions`: the raw prompt, verbatim."""
        return self.job(
            self.sampling(self.openai_options(request, request.max_tokens)),
            prompt=request.prompt,
            stream=request.stream,
        )

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
