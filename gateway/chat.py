"""The original chat API's logic: system prompt, conversation history, recording turns."""

from __future__ import annotations

from collections.abc import AsyncIterator

from context_store.assembly import Assembly, TokenCounter, assemble
from context_store.store import ContextStore
from gateway.conversations import ConversationStore
from gateway.generation import Generation, Outcome, Relay, Restart
from gateway.settings import GatewaySettings
from proto.api import ChatRequest
from proto.context import ContextReport
from proto.messages import ChatJob, ChatMessage


class ChatService:
    def __init__(
        self,
        settings: GatewaySettings,
        generation: Generation,
        conversations: ConversationStore,
        context: ContextStore,
        count_tokens: TokenCounter,
    ) -> None:
        self.settings = settings
        self.generation = generation
        self.conversations = conversations
        self.context = context
        self.count_tokens = count_tokens

    async def tiers(self, project: str | None) -> Assembly | None:
        """The context tiers for a prompt, or None when there is nothing to add."""
        if self.settings.context_budget <= 0:
            return None
        project = project or self.settings.default_project or None
        assembly = await assemble(
            self.context, self.count_tokens, self.settings.context_budget, project
        )
        return assembly if assembly.text else None

    @staticmethod
    def with_tiers(messages: list[ChatMessage], assembly: Assembly | None) -> list[ChatMessage]:
        """`messages` with the tiers added to the system prompt (one is made if absent)."""
        if assembly is None:
            return messages
        if messages and messages[0].role == "system":
            system = f"{messages[0].content}\n\n{assembly.text}"
            return [ChatMessage(role="system", content=system), *messages[1:]]
        return [ChatMessage(role="system", content=assembly.text), *messages]

    async def build_job(
        self, owner: str, request: ChatRequest, conversation_id: str, stream: bool
    ) -> tuple[ChatJob, ContextReport | None]:
        assembly = await self.tiers(request.project)
        system = self.settings.system_prompt
        if assembly is not None:
            system = f"{system}\n\n{assembly.text}" if system else assembly.text
        if request.context:
            system = f"{system}\n\n{request.context}" if system else request.context
        messages = [ChatMessage(role="system", content=system)] if system else []
        if request.conversation_id:  # a new conversation has no history: skip the round trip
            messages += await self.conversations.history(
                owner, conversation_id, self.settings.history_messages
            )
        messages.append(ChatMessage(role="user", content=request.message))
        job = self.generation.new_job(
            self.generation.sampling(request),
            messages=messages,
            model=await self.generation.resolve_model(request.model),
            conversation_id=conversation_id,
            stream=stream,
        )
        return job, assembly.report if assembly else None

    async def start(
        self, owner: str, request: ChatRequest, conversation_id: str, stream: bool
    ) -> tuple[Relay, ContextReport | None]:
        """Text pieces, then one Outcome; the turn is recorded once it is complete.
        Also what the context tiers contributed to the prompt. `stream`: whether the
        caller forwards the pieces as they come (else they arrive in larger groups)."""
        job, report = await self.build_job(owner, request, conversation_id, stream)
        relay = await self.generation.start(job, scope=owner)
        return relay.wrap(self._record(owner, request, conversation_id, relay)), report

    async def _record(
        self,
        owner: str,
        request: ChatRequest,
        conversation_id: str,
        relay: AsyncIterator[str | Outcome | Restart],
    ) -> AsyncIterator[str | Outcome | Restart]:
        pieces: list[str] = []
        async for item in relay:
            if isinstance(item, Outcome):
                await self.conversations.append_turn(
                    owner, conversation_id, request.message, "".join(pieces)
                )
            elif isinstance(item, Restart):
                pieces.clear()
            else:
                pieces.append(item)
            yield item
