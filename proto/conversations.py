"""Conversations as one service hands them to another: the gateway records them, the
trainer reads those the owner marked for training (`services.conversations` is the
one reader and writer of their Redis layout)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from proto.api import ConversationMessage


class TrainingConversation(BaseModel):
    """A conversation the owner marked for training (PUT /conversation/training)."""

    model_config = ConfigDict(extra="forbid")

    owner: str = Field(description="The id of the API key that held it.")
    conversation_id: str
    marked_at: str = Field(description="When it was marked (ISO 8601, UTC).")
    messages: list[ConversationMessage] = Field(description="Oldest first.")
