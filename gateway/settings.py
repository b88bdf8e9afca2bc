"""Gateway settings (MESH_* environment variables)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from services.settings import MeshSettings

DEFAULT_SYSTEM_PROMPT = (
    "You are the owner's continuity assistant. You know the four-tier handoff system: "
    "portfolio, project, session briefing and session log."
)


class GatewaySettings(MeshSettings):
    http_host: str = Field(default="127.0.0.1", description="MESH_HTTP_HOST")
    http_port: int = Field(default=8000, ge=1, le=65535, description="MESH_HTTP_PORT")
    api_key: str = Field(default="", description="MESH_API_KEY: the bearer key clients send.")
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, description="MESH_SYSTEM_PROMPT")
    # The original service's sampling defaults.
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.15, gt=0, le=2)
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_cap: int = Field(default=2048, ge=1, description="Larger max_tokens get a 400.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Then 504.")
    history_messages: int = Field(
        default=20, ge=0, description="Most earlier messages of a conversation sent to the model."
    )
    workers_cache_s: float = Field(default=1.0, ge=0, description="Live-worker lookup cache.")

    @field_validator("api_key")
    @classmethod
    def _refuse_weak_keys(cls, value: str) -> str:
        if value and (len(value) < 8 or value.lower() in {"changeme", "change-me", "secret"}):
            raise ValueError("MESH_API_KEY must be at least 8 characters and not a placeholder")
        return value

    @model_validator(mode="after")
    def _default_within_cap(self) -> GatewaySettings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("MESH_DEFAULT_MAX_TOKENS must not exceed MESH_MAX_TOKENS_CAP")
        return self
