"""The adapter lifecycle, in one place, for the trainer, the gateway and the workers.

- **Where versions live** (`AdapterRegistry`): `<registry>/<name>/<version>/`
  holds `adapter_config.json`, `adapter_model.safetensors`, `manifest.json` (the
  sha256 of every file) and GGUF exports the manifest lists;
  `<registry>/_base/<base model>/` holds GGUF exports of base models. A version
  appears whole or not at all.
- **Which version is current** (`CurrentVersions`): a field of one Redis hash per
  name (state: a worker started later reads it), and every change is also announced
  on the adapters fanout exchange (event: running workers switch now).
- **What a worker does to serve one** (`AdapterState`, `AdapterLoader` in
  `inference_worker.adapters`): fetch → verify → load → serve → retire, as LoRAX's
  loader does.
- **Admin** (`Adapters`): list versions with the current one, roll back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

import redis.asyncio as redis
from pydantic import ValidationError

from proto.adapters import (
    ADAPTER_FILES,
    ADAPTER_NAME,
    GGUF_FILE,
    MANIFEST,
    PHONE_MANIFEST,
    AdapterInfo,
    AdapterManifest,
    AdapterPublished,
    AdapterVersionInfo,
    CurrentVersion,
    PhoneModels,
    Probe,
)
from services.bus import Topology, announce_adapter
from services.errors import NotFound, StateConflict
from services.redis_client import Keys
from services.redis_client import connect as connect_redis
from services.settings import MeshSettings

log = logging.getLogger(__name__)
BASE_FOLDER = "_base"  # <registry>/_base/<base model>/: GGUF exports; not a valid adapter name
BASE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SERVED_FILES = (*ADAPTER_FILES, MANIFEST)


class AdapterState(StrEnum):
    """Where one adapter version is on a worker."""

    FETCHING = "fetching"  # copying it from a gateway (a worker without the shared registry)
    VERIFYING = "verifying"  # names, paths and every file's sha256 against the manifest
    LOADING = "loading"  # into the backend, beside the versions it serves
    SERVING = "serving"  # jobs naming the adapter get this version
    RETIRED = "retired"  # another version took its place (it stays in the registry)
    REFUSED = "refused"  # a check or the load failed; the version served before stays


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (GGUF files can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AdapterRegistry:
    """The registry's files (see the module's docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if re.fullmatch(ADAPTER_NAME, p.name))

    def versions(self, name: str) -> list[int]:
        """Version numbers present for `name`, ascending (empty for an unknown name)."""
        if not re.fullmatch(ADAPTER_NAME, name):
            return []
        folder = self.root / name
        if not folder.is_dir() or folder.is_symlink():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def folder(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def manifest(self, name: str, version: int) -> AdapterManifest | None:
        try:
            return AdapterManifest.model_validate_json(
                (self.folder(name, version) / MANIFEST).read_text()
            )
        except (OSError, ValidationError, ValueError):
            return None

    def served_file(self, name: str, version: int, file_name: str) -> Path | None:
        """One file of a version, as the gateway serves it to workers on other sites:
        only the adapter's own files, its manifest and GGUF forms, never a link or a
        path outside the registry."""
        if file_name not in SERVED_FILES and not re.fullmatch(GGUF_FILE, file_name):
            return None
        path = self.folder(name, version) / file_name
        if (
            version not in self.versions(name)
            or path.is_symlink()
            or not path.is_file()
            or not path.resolve().is_relative_to(self.root.resolve())
        ):
            return None
        return path

    def base_folder(self, base_model: str) -> Path:
        return self.root / BASE_FOLDER / base_model

    def base_gguf(self, base_model: str, kind: str) -> Path:
        """Where the GGUF export of `base_model` in `kind` (f16, q8_0, …) lives."""
        return self.base_folder(base_model) / f"model-{kind}.gguf"

    def base_file(self, base_model: str, file_name: str) -> Path | None:
        """A file of a base model's GGUF exports, when its manifest lists it."""
        if not re.fullmatch(BASE_NAME, base_model):
            return None
        folder = self.base_folder(base_model)
        try:
            listed = json.loads((folder / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            listed = {}
        if file_name != MANIFEST and file_name not in listed:
            return None
        path = folder / file_name
        return None if path.is_symlink() or not path.is_file() else path

    def base_models(self) -> list[str]:
        """Base models with GGUF exports here."""
        folder = self.root / BASE_FOLDER
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink())

    def phone_models(self, base_model: str) -> PhoneModels:
        """`phone.json` of a base model (empty when none was exported)."""
        try:
            return PhoneModels.model_validate_json(
                (self.base_folder(base_model) / PHONE_MANIFEST).read_text()
            )
        except (OSError, ValidationError, ValueError):
            return PhoneModels()

    def phone_file(self, base_model: str, file_name: str) -> Path | None:
        """A phone model's file, when `phone.json` lists it (current or previous)."""
        if not re.fullmatch(BASE_NAME, base_model):
            return None
        listed = self.phone_models(base_model)
        if file_name not in {m.file for m in (listed.current, listed.previous) if m}:
            return None
        path = self.base_folder(base_model) / file_name
        return None if path.is_symlink() or not path.is_file() else path

    def write_version(
        self,
        source: Path,
        name: str,
        base_model: str,
        evaluation: dict[str, Any] | None = None,
    ) -> AdapterManifest:
        """Copy a peft output folder into the registry as the next version of `name`."""
        if not re.fullmatch(ADAPTER_NAME, name):
            raise ValueError(f"adapter names match {ADAPTER_NAME}")
        missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: missing {', '.join(missing)} (safetensors only)")
        evaluation = evaluation or {}
        folder = self.root / name
        if folder.is_symlink():
            raise ValueError(f"{folder} is a symbolic link; adapters live in the registry itself")
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=folder))
        try:
            for file_name in ADAPTER_FILES:
                shutil.copyfile(source / file_name, staging / file_name)
            files = {f: file_sha256(staging / f) for f in ADAPTER_FILES}
            for _attempt in range(100):
                version = max(self.versions(name), default=0) + 1
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


class CurrentVersions:
    """Which version of each adapter every worker must serve."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.key = Keys(settings.namespace).adapters()

    async def all(self) -> dict[str, CurrentVersion]:
        raw = cast("dict[str, str]", await self.client.hgetall(self.key))
        found = {name: _current(name, value) for name, value in raw.items()}
        return {name: record for name, record in found.items() if record is not None}

    async def get(self, name: str) -> CurrentVersion | None:
        raw = cast("str | None", await self.client.hget(self.key, name))
        return _current(name, raw) if raw else None

    async def set(self, manifest: AdapterManifest) -> None:
        """Point `manifest.name` at its version: state in Redis first, then the event,
        so a worker that misses the event still finds the version when it (re)starts."""
        record = CurrentVersion(version=manifest.version, base_model=manifest.base_model)
        await self.client.hset(self.key, manifest.name, record.model_dump_json())
        event = AdapterPublished(
            name=manifest.name, version=manifest.version, base_model=manifest.base_model
        )
        topology = Topology(self.settings.namespace, self.settings.model_family)
        await announce_adapter(self.settings.amqp_url, topology, event)


def _current(name: str, raw: str) -> CurrentVersion | None:
    """One record of the hash; an unreadable one (another release's, or damaged) is
    skipped with a warning rather than failing every adapter."""
    try:
        return CurrentVersion.model_validate_json(raw)
    except ValidationError:
        log.warning("adapter %s: ignoring an unreadable current-version record %r", name, raw)
        return None


@dataclass
class Adapters:
    """The admin's view: versions with the current one, and rollback."""

    registry: AdapterRegistry
    current: CurrentVersions

    async def list(self) -> list[AdapterInfo]:
        current = await self.current.all()
        names = sorted(set(self.registry.names()) | set(current))
        return [self._info(name, current.get(name)) for name in names]

    async def info(self, name: str) -> AdapterInfo:
        return self._info(name, await self.current.get(name))

    def _info(self, name: str, current: CurrentVersion | None) -> AdapterInfo:
        served = current.version if current else None
        found = []
        for number in self.registry.versions(name):
            manifest = self.registry.manifest(name, number)
            if manifest is None:
                continue
            found.append(
                AdapterVersionInfo(
                    version=number,
                    created_at=manifest.created_at,
                    base_model=manifest.base_model,
                    eval=manifest.eval,
                    current=number == served,
                )
            )
        return AdapterInfo(name=name, current_version=served, versions=found)

    async def rollback(self, name: str, version: int | None = None) -> AdapterInfo:
        """Serve `version` of `name` (the one before the current when None); workers
        switch in place, through the same event as a publish."""
        available = self.registry.versions(name)
        if not available:
            raise NotFound(f"no adapter named {name!r}")
        wanted = version
        if wanted is None:
            current = await self.current.get(name)
            served = current.version if current else None
            older = [v for v in available if served is not None and v < served]
            if not older:
                raise StateConflict(f"{name} has no version before v{served}", "no_earlier_version")
            wanted = older[-1]
        manifest = self.registry.manifest(name, wanted)
        if manifest is None:
            raise NotFound(f"{name} has no readable v{wanted}")
        await self.current.set(manifest)
        return await self.info(name)


async def current_versions(
    settings: MeshSettings, client: redis.Redis | None = None
) -> dict[str, CurrentVersion]:
    """Adapter name -> the version every worker must serve (for a process without a
    Redis client of its own, e.g. the trainer's command line)."""
    own = client or connect_redis(settings.redis_url)
    try:
        return await CurrentVersions(settings, own).all()
    finally:
        if client is None:
            await own.aclose()


async def make_current(
    settings: MeshSettings, manifest: AdapterManifest, client: redis.Redis | None = None
) -> None:
    """`CurrentVersions.set` for a process without a Redis client of its own."""
    own = client or connect_redis(settings.redis_url)
    try:
        await CurrentVersions(settings, own).set(manifest)
    finally:
        if client is None:
            await own.aclose()
