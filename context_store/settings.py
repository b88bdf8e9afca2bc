"""Context-store settings (MESH_* environment variables)."""

from __future__ import annotations

from pydantic import Field

from services.settings import MeshSettings


class ContextSettings(MeshSettings):
    site: str = Field(
        default="local", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="MESH_SITE"
    )
    catch_up_s: float = Field(default=30.0, gt=0, description="Catch-up request period.")
