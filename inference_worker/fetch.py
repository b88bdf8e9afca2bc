"""Fetching an adapter version from a gateway, for a worker on a site that does not
share the registry volume (MESH_ADAPTER_SOURCE=https://gateway, MESH_ADAPTER_KEY=a key
with the `worker` scope). Files land in the worker's own registry folder, whole or
not at all; `verify` then checks them against the manifest like any local version."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx

from proto.adapters import ADAPTER_NAME, MANIFEST, adapter_files
from services.errors import MeshError

MAX_FILE_BYTES = 2 << 30


class AdapterFetchFailed(MeshError):
    code = "adapter_fetch_failed"


async def fetch(source: str, api_key: str, registry: Path, name: str, version: int) -> Path:
    """Bring `name` v`version` into `registry` as the gateway has it now. A copy whose
    manifest still matches the gateway's is kept; otherwise (a GGUF export was added
    since, or an earlier copy was damaged) the version is fetched again."""
    if not re.fullmatch(ADAPTER_NAME, name):
        raise AdapterFetchFailed(f"adapter name {name!r} does not match {ADAPTER_NAME}")
    target = registry / name / str(version)
    (registry / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=registry / name))
    try:
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=source, headers=headers, timeout=60) as client:
            await _download(client, name, version, MANIFEST, staging)
            manifest = (staging / MANIFEST).read_bytes()
            if target.is_dir() and _same(target / MANIFEST, manifest):
                return target
            try:
                listed = json.loads(manifest)["files"]
                names = adapter_files(listed)
            except (ValueError, KeyError, TypeError) as exc:
                raise AdapterFetchFailed(f"{name} v{version}: unreadable manifest") from exc
            for file_name in names:
                await _download(client, name, version, file_name, staging)
        if target.exists():  # an outdated copy: set it aside, then swap
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=registry / name))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent fetch of the same version
                raise
    except httpx.HTTPError as exc:
        raise AdapterFetchFailed(f"{name} v{version}: {source} unreachable: {exc}") from exc
    except OSError as exc:
        raise AdapterFetchFailed(f"{name} v{version}: cannot write the copy: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _same(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except OSError:
        return False


async def _download(
    client: httpx.AsyncClient, name: str, version: int, file_name: str, folder: Path
) -> None:
    url = f"/adapters/{name}/{version}/{file_name}"
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise AdapterFetchFailed(
                f"{name} v{version}: GET {url} answered {response.status_code}"
            )
        written = 0
        with (folder / file_name).open("wb") as handle:
            async for block in response.aiter_bytes(1 << 20):
                written += len(block)
                if written > MAX_FILE_BYTES:
                    raise AdapterFetchFailed(f"{name} v{version}: {file_name} too big")
                handle.write(block)
