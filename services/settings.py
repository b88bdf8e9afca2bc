"""Settings shared by every service: read from MESH_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MeshSettings(BaseSettings):
    """Connection settings every service needs. Subclass per service."""

    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore")

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ URL (MESH_AMQP_URL).",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="MESH_REDIS_URL.")
    namespace: str = Field(
        default="mesh",
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="Prefix of every exchange, queue and Redis key, so meshes can share a broker.",
    )
    model_family: str = Field(
        default="mistral",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="Job queue: workers of one family serve the same base model.",
    )
    log_level: str = Field(default="INFO", description="MESH_LOG_LEVEL.")
    context_history_keep: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Superseded versions of each context document kept (the current one and "
        "conflicting ones always are); the same on every site.",
    )
