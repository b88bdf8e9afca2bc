"""Where the mesh keeps files it builds on the machine (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """`MESH_CACHE_DIR`, or `.cache/` at the repository root."""
    return Path(os.environ.get("MESH_CACHE_DIR") or REPO_ROOT / ".cache")


def demo_model_dir() -> Path:
    """Where the demo model is built and served from."""
    return cache_dir() / "demo-model"


def model_ref(model: str) -> str:
    """MESH_MODEL (a local folder or hub id), or the demo model's folder when empty;
    FileNotFoundError when that is not built."""
    if model:
        return model
    path = demo_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model configured and the demo model is not built at {path}: "
            "run `python -m trainer_job build-demo-model` or set MESH_MODEL"
        )
    return str(path)


def served_name(model_ref: str, name: str = "") -> str:
    """The name clients and adapter manifests use for a base model: MESH_MODEL_NAME,
    or the last part of its folder or hub id."""
    return name or model_ref.rstrip("/").rsplit("/", 1)[-1]


def adapter_registry() -> Path:
    """`MESH_ADAPTER_REGISTRY`, or `.cache/adapters`: one folder per adapter version."""
    return Path(os.environ.get("MESH_ADAPTER_REGISTRY") or cache_dir() / "adapters")
