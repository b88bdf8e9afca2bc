"""What the routes ask for: an answer to each public request, through the engine.

On the way: the model named is resolved against what live workers serve, the tiers
and the conversation's history are added (`gateway.translate` makes the job), the
prompt's length is checked, the response cache may answer, and a chat turn is
recorded once its answer is complete.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from context_store.assembly import Assembly
from gateway.engine import Engine, Item, Outcome, Relay, Restart, served_adapters, served_models
from gateway.metrics import Metrics
from gateway.prompts import PromptCounter
from gateway.response_cache import ResponseCache
from gateway.settings import GatewaySettings
from gateway.tiers import TierCache
from gateway.translate import JobBuilder
from gateway.turns import TurnOutbox
from proto.api import ChatRequest, GenerateRequest
from proto.context import ContextReport
from proto.messages import ChatJob
from proto.openai import ChatCompletionRequest, CompletionRequest
from services.conversations import ConversationStore
from services.errors import NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """A reply under way, and what the context tiers contributed to its prompt."""

    relay: Relay
    context: ContextReport | None = None


class ChatService:
    def __init__(
        self,
        settings: GatewaySettings,
        engine: Engine,
        conversations: ConversationStore,
        tiers: TierCache,
        metrics: Metrics,
        prompts: PromptCounter | None = None,
        responses: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.conversations = conversations
        self.tiers = tiers
        self.metrics = metrics
        self.prompts = prompts  # None: the gateway-side length check is off
        self.responses = responses  # whole answers of determined requests (off: None)
        self.jobs = JobBuilder(settings)
        self.turns = TurnOutbox(conversations)  # turns Redis could not take yet

    # -- the public requests ------------------------------------------------------------

    async def chat(
        self, owner: str, request: ChatRequest, conversation_id: str, stream: bool
    ) -> Answer:
        """A chat turn; it is recorded in the conversation once its answer is complete.
        `stream`: whether the caller forwards the pieces as they come (else they arrive
        in larger groups)."""
        tiers = await self.tiers.get(request.project)
        history = []
        if request.conversation_id:  # a new conversation has no history: skip the round trip
            await self.turns.flush(owner, conversation_id)  # its held turns come first
            history = await self.conversations.history(
                owner, conversation_id, self.settings.history_messages
            )
        job = self.jobs.chat(
            request, tiers=tiers, history=history, conversation_id=conversation_id, stream=stream
        )
        relay = await self.run(await self.for_model(job, request.model), scope=owner)
        recorded = self._record(owner, request.message, conversation_id, relay)
        return Answer(relay.wrap(recorded), _report(tiers))

    async def chat_completion(self, owner: str, request: ChatCompletionRequest) -> Answer:
        sampling = self.jobs.chat_completion_sampling(request)  # bad options: 400 first
        tiers = await self.tiers.get(None)
        job = self.jobs.chat_completion(request, tiers=tiers, sampling=sampling)
        relay = await self.run(await self.for_model(job, request.model), scope=owner)
        return Answer(relay, _report(tiers))

    async def generate(self, owner: str, request: GenerateRequest) -> Relay:
        job = await self.for_model(self.jobs.generate(request), request.model)
        return await self.run(job, scope=owner)

    async def completion(self, owner: str, request: CompletionRequest) -> Relay:
        job = await self.for_model(self.jobs.completion(request), request.model)
        return await self.run(job, scope=owner)

    # -- the parts ----------------------------------------------------------------------

    async def for_model(self, job: ChatJob, requested: str | None) -> ChatJob:
        """`job` for the model the request named (base or adapter)."""
        adapter = await self.resolve_model(requested)
        return job if adapter is None else job.model_copy(update={"model": adapter})

    async def resolve_model(self, requested: str | None) -> str | None:
        """None for the base model, the name for an adapter; NotFound when nobody serves it."""
        if requested is None:
            return None
        workers = await self.engine.workers()
        if requested in served_models(workers):
            return None
        if requested in served_adapters(workers):
            return requested
        raise NotFound(f"model {requested!r} is not served; see GET /v1/models", "model_not_found")

    async def run(self, job: ChatJob, scope: str | None = None) -> Relay:
        """Check and submit `job`; its relay (text pieces, then one Outcome).

        Raises before anything is sent, so a route can still answer with an HTTP
        error. Closing the relay early cancels the job on its worker. `scope` (the API
        key's id) lets the response cache serve the key's own earlier answer.
        """
        if self.prompts is not None:
            self.prompts.check(job)
        key = None
        if self.responses is not None:
            key = self.responses.key_for(job, scope, await self.engine.workers())
        if key is None:
            return await self.engine.generate(job)
        assert self.responses is not None
        hit = await self.responses.get(key)
        self.metrics.response_cache.labels("hit" if hit else "miss").inc()
        if hit is not None:
            log.info("job %s: answered from the response cache", job.job_id)
            return Relay(self.responses.replay(hit), cache="hit")
        relay = await self.engine.generate(job)
        return relay.wrap(self.responses.keep(key, relay), cache="miss")

    async def _record(
        self, owner: str, message: str, conversation_id: str, relay: Relay
    ) -> AsyncIterator[Item]:
        pieces: list[str] = []
        try:
            async for item in relay:
                if isinstance(item, Outcome):
                    await self.turns.record(owner, conversation_id, message, "".join(pieces))
                elif isinstance(item, Restart):
                    pieces.clear()
                elif isinstance(item, str):
                    pieces.append(item)
                yield item
        finally:
            await relay.aclose()


def _report(tiers: Assembly | None) -> ContextReport | None:
    return tiers.report if tiers else None
