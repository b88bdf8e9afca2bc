"""Trainer settings (MESH_* environment variables), shared with the workers' names."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services import paths
from services.paths import adapter_registry, cache_dir
from services.settings import MeshSettings


class TrainerSettings(MeshSettings):
    model: str = Field(
        default="",
        description="MESH_MODEL: local folder or hub id of the base model; empty: the demo model.",
    )
    model_name: str = Field(
        default="",
        description="MESH_MODEL_NAME: the base model's served name; empty: the folder's name.",
    )
    adapter_registry: Path | None = Field(
        default=None, description="MESH_ADAPTER_REGISTRY: where versions are published."
    )
    work_dir: Path | None = Field(
        default=None, description="MESH_TRAIN_WORK_DIR: datasets and runs (default .cache/train)."
    )
    export_gguf: bool = Field(
        default=True,
        description="MESH_EXPORT_GGUF: write each published version's GGUF form (for llama.cpp "
        "workers and the phone) before it is made current; when the converter cannot run, "
        "the version is published without it and llama.cpp workers export it themselves.",
    )

    def model_ref(self) -> str:
        return paths.model_ref(self.model)

    def served_name(self) -> str:
        """The name workers serve the base model under (the same rule as theirs)."""
        return paths.served_name(self.model_ref(), self.model_name)

    def registry(self) -> Path:
        return self.adapter_registry or adapter_registry()

    def work(self) -> Path:
        return self.work_dir or cache_dir() / "train"
