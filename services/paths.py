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


def adapter_registry() -> Path:
    """`MESH_ADAPTER_REGISTRY`, or `.cache/adapters`: one folder per adapter version."""
    return Path(os.environ.get("MESH_ADAPTER_REGISTRY") or cache_dir() / "adapters")
