"""Publish an adapter version: copy it into the registry with a manifest (sha256 of
every file, base model, evaluation numbers, probes), make it current in Redis and
announce it, so every worker loads it in place.

    python -m trainer_job publish RUN_DIR --name continuity [--force]

RUN_DIR is a `train` output folder (adapter/ + evaluation.json) or a bare peft
folder. Publishing is refused when the held-out loss did not improve on the base
model, or is worse than the version served now on the same dataset, unless forced.
The version's GGUF form (for llama.cpp workers) is exported before it is made
current, unless MESH_EXPORT_GGUF=false.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from proto.adapters import AdapterManifest
from services.adapters import AdapterRegistry, current_versions, make_current
from services.settings import MeshSettings

log = logging.getLogger(__name__)


class PublishRefused(ValueError):
    """The evaluation gate said no; the message says why."""


def read_run(source: Path) -> tuple[Path, dict[str, Any]]:
    """(folder holding the adapter files, evaluation record or {})."""
    folder = source / "adapter" if (source / "adapter").is_dir() else source
    evaluation_file = source / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else {}
    return folder, evaluation


def gate(evaluation: dict[str, Any], current: AdapterManifest | None) -> str | None:
    """Why this run must not be published, or None when it may be."""
    numbers = evaluation.get("eval", {})
    before, after = numbers.get("eval_loss_before"), numbers.get("eval_loss_after")
    if before is None or after is None:
        return "no evaluation numbers (publish a `train` output folder, or --force)"
    if not after < before:
        return f"held-out loss did not improve: {before:.4f} before, {after:.4f} after"
    if (
        current is not None
        and current.dataset_sha256
        and current.dataset_sha256 == evaluation.get("dataset_sha256")
        and "eval_loss_after" in current.eval
        and not after < current.eval["eval_loss_after"]
    ):
        return (
            f"held-out loss {after:.4f} is not better than v{current.version}'s "
            f"{current.eval['eval_loss_after']:.4f} on the same dataset"
        )
    return None


def write_version(
    source: Path,
    registry: Path,
    name: str,
    base_model: str,
    evaluation: dict[str, Any] | None = None,
) -> AdapterManifest:
    """Copy a peft output folder into `registry` as the next version of `name`."""
    return AdapterRegistry(registry).write_version(source, name, base_model, evaluation)


async def publish(
    settings: MeshSettings,
    source: Path,
    registry: Path,
    name: str,
    base_model: str,
    force: bool = False,
    gguf_base: Path | None = None,
) -> AdapterManifest:
    """Gate, write, export its GGUF form (when `gguf_base`, the base model's folder, is
    given), make current and announce; PublishRefused when the gate says no."""
    folder, evaluation = read_run(source)
    current = (await current_versions(settings)).get(name)
    served = AdapterRegistry(registry).manifest(name, current.version) if current else None
    reason = gate(evaluation, served)
    if reason and not force:
        raise PublishRefused(f"not published: {reason}")
    manifest = write_version(folder, registry, name, base_model, evaluation)
    if gguf_base is not None:
        manifest = await asyncio.to_thread(export_gguf, registry, manifest, gguf_base)
    await make_current(settings, manifest)
    return manifest


def export_gguf(registry: Path, manifest: AdapterManifest, base: Path) -> AdapterManifest:
    """The version's GGUF form beside its weights, so llama.cpp workers serve it as soon
    as it is current; a converter that cannot run leaves that to them (with a warning)."""
    from services.gguf import ExportError, export_adapter

    try:
        return export_adapter(registry, manifest.name, manifest.version, base)
    except (ExportError, OSError) as exc:
        log.warning(
            "%s v%d published without its GGUF form (llama.cpp workers will export it): %s",
            manifest.name,
            manifest.version,
            exc,
        )
        return manifest
