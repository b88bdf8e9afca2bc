"""Publish an adapter version: copy it into the registry with a manifest (sha256 of
every file, base model, evaluation numbers, probes), make it current in Redis and
announce it, so every worker loads it in place.

    python -m trainer_job publish RUN_DIR --name continuity [--force]

RUN_DIR is a `train` output folder (adapter/ + evaluation.json) or a bare peft
folder. Publishing is refused when the held-out loss did not improve on the base
model, or is worse than the version served now on the same dataset, unless forced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from proto.adapters import ADAPTER_FILES, ADAPTER_NAME, MANIFEST, AdapterManifest, Probe
from services.adapters import file_sha256, make_current, read_manifest, versions
from services.settings import MeshSettings


class PublishRefused(ValueError):
    """The evaluation gate said no; the message says why."""


def read_run(source: Path) -> tuple[Path, dict]:
    """(folder holding the adapter files, evaluation record or {})."""
    folder = source / "adapter" if (source / "adapter").is_dir() else source
    evaluation_file = source / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else {}
    return folder, evaluation


def gate(evaluation: dict, current: AdapterManifest | None) -> str | None:
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
    evaluation: dict | None = None,
) -> AdapterManifest:
    """Copy a peft output folder into the registry as the next version of `name`."""
    if not re.fullmatch(ADAPTER_NAME, name):
        raise ValueError(f"adapter names match {ADAPTER_NAME}")
    missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (safetensors only)")
    evaluation = evaluation or {}
    folder = registry / name
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link; adapters live in the registry itself")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=folder))
    try:
        for file_name in ADAPTER_FILES:
            shutil.copyfile(source / file_name, staging / file_name)
        files = {f: file_sha256(staging / f) for f in ADAPTER_FILES}
        for _attempt in range(100):
            version = max(versions(registry, name), default=0) + 1
            manifest = AdapterManifest(
                name=name,
                version=version,
                base_model=base_model,
                files=files,
                eval=evaluation.get("eval", {}),
                probes=[Probe(**p) for p in evaluation.get("probes", [])],
                dataset_sha256=evaluation.get("dataset_sha256", ""),
                created_at=datetime.now(UTC).isoformat(),
            )
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            try:
                # A version appears whole or not at all; rename fails if another
                # publisher took this number first, and we take the next one.
                os.rename(staging, folder / str(version))
                return manifest
            except OSError:
                if not (folder / str(version)).exists():
                    raise
        raise RuntimeError(f"{name}: could not take a version number after 100 tries")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


async def publish(
    settings: MeshSettings,
    source: Path,
    registry: Path,
    name: str,
    base_model: str,
    force: bool = False,
) -> AdapterManifest:
    """Gate, write, make current and announce; PublishRefused when the gate says no."""
    from services.adapters import current_versions

    folder, evaluation = read_run(source)
    current = (await current_versions(settings)).get(name)
    served = read_manifest(registry, name, int(current["version"])) if current else None
    reason = gate(evaluation, served)
    if reason and not force:
        raise PublishRefused(f"not published: {reason}")
    manifest = write_version(folder, registry, name, base_model, evaluation)
    await make_current(settings, manifest)
    return manifest
