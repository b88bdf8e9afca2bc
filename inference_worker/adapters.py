"""An adapter version's way onto a worker, through the states of
`services.adapters.AdapterState`: fetch (only without the shared registry) → verify →
load → serve, and retire when another version of the same name takes its place.

Verifying: nothing but safetensors, every file's sha256 as the manifest says, a valid
name, no path or symlink escaping the registry, and the base model this worker
serves. Nothing is unpickled, ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

from pydantic import ValidationError

from inference_worker.backends.base import Backend
from inference_worker.fetch import fetch
from proto.adapters import ADAPTER_NAME, GGUF_FILE, MANIFEST, AdapterManifest, adapter_files
from services.adapters import AdapterState, file_sha256
from services.errors import MeshError, PermanentError

log = logging.getLogger(__name__)


class AdapterRefused(PermanentError):
    code = "adapter_refused"


def verify(registry: Path, name: str, version: int, base_model: str) -> Path:
    """The version's folder, once every check passed; AdapterRefused otherwise."""
    if not re.fullmatch(ADAPTER_NAME, name):
        raise AdapterRefused(f"adapter name {name!r} does not match {ADAPTER_NAME}")
    root = registry.resolve()
    folder = registry / name / str(version)
    if folder.is_symlink() or (registry / name).is_symlink():
        raise AdapterRefused(f"{name} v{version}: the folder is a symbolic link")
    if not folder.resolve().is_relative_to(root) or not folder.is_dir():
        raise AdapterRefused(f"{name} v{version}: no such version in the registry")
    manifest_path = folder / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise AdapterRefused(f"{name} v{version}: {MANIFEST} is missing or a link")
    try:
        manifest = AdapterManifest.model_validate_json(manifest_path.read_text())
    except (ValidationError, ValueError) as exc:
        raise AdapterRefused(f"{name} v{version}: unreadable manifest: {exc}") from exc
    # The weights, and GGUF exports of them when the manifest lists some (llama.cpp).
    allowed = set(adapter_files(manifest.files))
    # A GGUF export being added right now (in place before the manifest lists it) is
    # ignored, never read: only listed files are loaded, and every one is hashed.
    present = {e.name for e in folder.iterdir() if not re.fullmatch(GGUF_FILE, e.name)}
    unexpected = present - {*allowed, MANIFEST}
    if unexpected:
        raise AdapterRefused(
            f"{name} v{version}: unexpected files {sorted(unexpected)} "
            "(only safetensors weights and listed GGUF exports are accepted)"
        )
    for file_name in allowed:
        path = folder / file_name
        if path.is_symlink() or not path.is_file():
            raise AdapterRefused(f"{name} v{version}: {file_name} is missing or a link")
    if (manifest.name, manifest.version) != (name, version):
        raise AdapterRefused(
            f"{name} v{version}: the manifest describes {manifest.name} v{manifest.version}"
        )
    if manifest.base_model != base_model:
        raise AdapterRefused(
            f"{name} v{version}: trained on {manifest.base_model!r}, "
            f"this worker serves {base_model!r}"
        )
    for file_name in sorted(allowed):
        if manifest.files.get(file_name) != file_sha256(folder / file_name):
            raise AdapterRefused(f"{name} v{version}: {file_name} does not match its sha256")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterRefused(f"{name} v{version}: not a LoRA adapter")
    return folder


class AdapterLoader:
    """Installs adapter versions into a backend, one at a time, and knows where each
    version it was asked for stands (`states`)."""

    def __init__(
        self,
        backend: Backend,
        registry: Path,
        source: str = "",
        api_key: str = "",
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.source = source  # a gateway to fetch from ("" : the registry is shared)
        self.api_key = api_key
        self.states: dict[tuple[str, int], AdapterState] = {}

    def _enter(self, name: str, version: int, state: AdapterState) -> None:
        self.states[(name, version)] = state

    async def install(self, name: str, version: int) -> bool:
        """Bring `name` v`version` to SERVING; False (and REFUSED, the version served
        before staying) when a check or the load failed."""
        started = time.perf_counter()
        previous = self.backend.adapters.get(name)
        try:
            if self.source:
                self._enter(name, version, AdapterState.FETCHING)
                await fetch(self.source, self.api_key, self.registry, name, version)
            self._enter(name, version, AdapterState.VERIFYING)
            folder = await asyncio.to_thread(
                verify, self.registry, name, version, self.backend.base_model
            )
            self._enter(name, version, AdapterState.LOADING)
            await self.backend.load_adapter(name, version, folder)
        except MeshError as exc:
            self._enter(name, version, AdapterState.REFUSED)
            log.error("adapter %s v%s refused: %s", name, version, exc.message)
            return False
        self._enter(name, version, AdapterState.SERVING)
        if previous is not None and previous != version:
            self._enter(name, previous, AdapterState.RETIRED)
        log.info(
            "adapter %s v%s serving (%.2f s%s)",
            name,
            version,
            time.perf_counter() - started,
            f"; v{previous} retired" if previous not in (None, version) else "",
        )
        return True
