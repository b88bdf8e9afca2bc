"""Gateway settings (MESH_* environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from services.settings import MeshSettings

DEFAULT_SYSTEM_PROMPT = (
    "You are the owner's continuity assistant. You know the four-tier handoff system: "
    "portfolio, project, session briefing and session log."
)


class GatewaySettings(MeshSettings):
    http_host: str = Field(default="127.0.0.1", description="MESH_HTTP_HOST")
    http_port: int = Field(default=8000, ge=1, le=65535, description="MESH_HTTP_PORT")
    api_key: str = Field(
        default="",
        description="MESH_API_KEY: a bootstrap key with every scope, stored (hashed) at start.",
    )
    api_key_sha256: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="MESH_API_KEY_SHA256: the sha256 (hex) of a bootstrap key with every "
        "scope, for deployments that keep only hashes in their secrets.",
    )
    metrics_api_key: str = Field(
        default="",
        description="MESH_METRICS_API_KEY: a key that may only read /metrics (Prometheus).",
    )
    system_prompt: str = Field(default=DEFAULT_SYSTEM_PROMPT, description="MESH_SYSTEM_PROMPT")
    # The original service's sampling defaults.
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    repetition_penalty: float = Field(default=1.15, ge=0.01, le=2)
    default_max_tokens: int = Field(default=256, ge=1)
    max_tokens_cap: int = Field(default=2048, ge=1, description="Larger max_tokens get a 400.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="Then 504.")
    broker_outage_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="How long requests in flight wait for a lost RabbitMQ connection to come "
        "back (then 503); they are published again when it does.",
    )
    history_messages: int = Field(
        default=20, ge=0, description="Most earlier messages of a conversation sent to the model."
    )
    workers_cache_s: float = Field(default=1.0, ge=0, description="Live-worker lookup cache.")
    max_queue_depth: int = Field(
        default=256, ge=0, description="More jobs waiting than this: 503 at once (0: no bound)."
    )
    queue_depth_cache_s: float = Field(default=0.25, ge=0, description="Queue depth read cache.")
    response_cache_ttl_s: float = Field(
        default=0.0,
        ge=0,
        description="MESH_RESPONSE_CACHE_TTL_S: keep whole answers of greedy or seeded "
        "requests this long, per API key, and answer the same request again without a "
        "worker (X-Cache: hit); 0: off.",
    )
    rate_limit_per_minute: int = Field(
        default=120, ge=0, description="Generation requests per key per minute (0: no limit)."
    )
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Larger bodies: 413.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description='MESH_CORS_ORIGINS: JSON list of allowed origins, e.g. ["https://phone.lan"].',
    )
    tokenizer: str = Field(
        default="",
        description="MESH_TOKENIZER: folder or hub id to count prompt tokens with; empty: "
        "MESH_MODEL, else the demo model; 'none' turns the gateway-side check off.",
    )
    model: str = Field(default="", description="MESH_MODEL, as the workers read it.")
    adapter_registry: Path | None = Field(
        default=None, description="MESH_ADAPTER_REGISTRY: adapter versions (default .cache)."
    )
    site: str = Field(
        default="local", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="MESH_SITE"
    )
    context_budget: int = Field(
        default=1024, ge=0, description="Tokens of the tiers in each chat's prompt (0: none)."
    )
    default_project: str = Field(
        default="", description="Project tier used when a chat names none (empty: none)."
    )
    max_context: int = Field(
        default=0, ge=0, description="Context length in tokens; 0: the model's config."
    )

    @field_validator("api_key", "metrics_api_key")
    @classmethod
    def _refuse_weak_keys(cls, value: str) -> str:
        if value and (len(value) < 8 or "change" in value.lower() or value.lower() == "secret"):
            raise ValueError("MESH_API_KEY must be at least 8 characters and not a placeholder")
        return value

    @model_validator(mode="after")
    def _default_within_cap(self) -> GatewaySettings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("MESH_DEFAULT_MAX_TOKENS must not exceed MESH_MAX_TOKENS_CAP")
        return self
