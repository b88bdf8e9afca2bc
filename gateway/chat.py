"""The original chat API's logic: system prompt, conversation history, recording turns."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.conversations import ConversationStore
from gateway.generation import Generation, Outcome
from gateway.settings import GatewaySettings
from proto.api import ChatRequest
from proto.messages import ChatJob, ChatMessage


class ChatService:
    def __init__(
        self, settings: GatewaySettings, generation: Generation, conversations: ConversationStore
    ) -> None:
        self.settings = settings
        self.generation = generation
        self.conversations = conversations

    async def build_job(self, owner: str, request: ChatRequest, conversation_id: str) -> ChatJob:
        system = self.settings.system_prompt
        if request.context:
            system = f"{system}\n\n{request.context}" if system else request.context
        messages = [ChatMessage(role="system", content=system)] if system else []
        if request.conversation_id:  # a new conversation has no history: skip the round trip
            messages += await self.conversations.history(
                owner, conversation_id, self.settings.history_messages
            )
        messages.append(ChatMessage(role="user", content=request.message))
        return self.generation.new_job(
            self.generation.sampling(request),
            messages=messages,
            model=await self.generation.resolve_model(request.model),
            conversation_id=conversation_id,
        )

    async def start(
        self, owner: str, request: ChatRequest, conversation_id: str
    ) -> AsyncIterator[str | Outcome]:
        """Text pieces, then one Outcome; the turn is recorded once it is complete."""
        job = await self.build_job(owner, request, conversation_id)
        relay = await self.generation.start(job)
        return self._record(owner, request, conversation_id, relay)

    async def _record(
        self,
        owner: str,
        request: ChatRequest,
        conversation_id: str,
        relay: AsyncIterator[str | Outcome],
    ) -> AsyncIterator[str | Outcome]:
        pieces: list[str] = []
        async for item in relay:
            if isinstance(item, Outcome):
                await self.conversations.append_turn(
                    owner, conversation_id, request.message, "".join(pieces)
                )
            else:
                pieces.append(item)
            yield item
