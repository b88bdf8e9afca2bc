"""Adapters over HTTP: the admin view of versions and rollback (scope `admin`), and
the registry's files for workers on another site (scope `worker`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from gateway.auth import AdminKey, WorkerKey
from gateway.errors import ApiError
from gateway.routes import ERRORS
from proto.adapters import (
    ADAPTER_FILES,
    ADAPTER_NAME,
    BASE_FOLDER,
    GGUF_FILE,
    MANIFEST,
    AdapterInfo,
    AdapterList,
    AdapterRollback,
    AdapterVersionInfo,
)
from services import adapters as registry_ops
from services.paths import adapter_registry

router = APIRouter(tags=["adapters"])
Name = Annotated[str, PathParam(pattern=ADAPTER_NAME, description="Adapter name.")]
BaseName = Annotated[
    str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Base model name.")
]
Version = Annotated[int, PathParam(ge=1, le=1_000_000, description="Version number.")]
SERVED_FILES = (*ADAPTER_FILES, MANIFEST)


def _registry(request: Request) -> Path:
    return request.app.state.settings.adapter_registry or adapter_registry()


async def _info(request: Request, name: str, current: dict[str, dict]) -> AdapterInfo:
    registry = _registry(request)
    served = current.get(name, {}).get("version")
    found = []
    for number in registry_ops.versions(registry, name):
        manifest = registry_ops.read_manifest(registry, name, number)
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


@router.get(
    "/admin/adapters", operation_id="list_adapters", response_model=AdapterList, responses=ERRORS
)
async def list_adapters(key: AdminKey, request: Request) -> AdapterList:
    """Every adapter in the registry: its versions, their evaluation, the current one."""
    current = await registry_ops.current_versions(
        request.app.state.settings, request.app.state.redis
    )
    names = sorted(set(registry_ops.names(_registry(request))) | set(current))
    return AdapterList(adapters=[await _info(request, name, current) for name in names])


@router.post(
    "/admin/adapters/{name}/rollback",
    operation_id="rollback_adapter",
    response_model=AdapterInfo,
    responses=ERRORS,
)
async def rollback_adapter(
    key: AdminKey, request: Request, name: Name, body: AdapterRollback | None = None
) -> AdapterInfo:
    """Serve an earlier version of `name` (the one before the current by default).
    Workers switch in place, through the same event as a publish."""
    settings = request.app.state.settings
    registry = _registry(request)
    current = await registry_ops.current_versions(settings, request.app.state.redis)
    available = registry_ops.versions(registry, name)
    if not available:
        raise ApiError(404, "invalid_request_error", f"no adapter named {name!r}", "not_found")
    wanted = body.version if body and body.version else None
    if wanted is None:
        served = current.get(name, {}).get("version")
        older = [v for v in available if served is not None and v < served]
        if not older:
            raise ApiError(
                409,
                "invalid_request_error",
                f"{name} has no version before v{served}",
                "no_earlier_version",
            )
        wanted = older[-1]
    manifest = registry_ops.read_manifest(registry, name, wanted)
    if manifest is None:
        raise ApiError(
            404, "invalid_request_error", f"{name} has no readable v{wanted}", "not_found"
        )
    await registry_ops.make_current(settings, manifest, request.app.state.redis)
    return await _info(
        request, name, await registry_ops.current_versions(settings, request.app.state.redis)
    )


@router.get(
    "/adapters/{name}/{version}/{file_name}",
    operation_id="adapter_file",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    response_class=FileResponse,
)
async def adapter_file(
    key: WorkerKey, request: Request, name: Name, version: Version, file_name: str
) -> FileResponse:
    """One file of an adapter version, for a worker that has no shared registry.
    The worker checks every file against the manifest's sha256 before loading."""
    if file_name not in SERVED_FILES and not re.fullmatch(GGUF_FILE, file_name):
        raise ApiError(
            404,
            "invalid_request_error",
            f"adapters have only {', '.join(SERVED_FILES)}",
            "not_found",
        )
    registry = _registry(request)
    folder = registry / name / str(version)
    path = folder / file_name
    if (
        version not in registry_ops.versions(registry, name)
        or path.is_symlink()
        or not path.is_file()
        or not path.resolve().is_relative_to(registry.resolve())
    ):
        raise ApiError(404, "invalid_request_error", f"no {name} v{version}", "not_found")
    return FileResponse(path, media_type="application/octet-stream")


@router.get(
    "/gguf/{base_model}/{file_name}",
    operation_id="base_model_gguf",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    response_class=FileResponse,
)
async def base_model_gguf(
    key: WorkerKey, request: Request, base_model: BaseName, file_name: str
) -> FileResponse:
    """A GGUF export of a base model (`python -m trainer_job export-gguf`), for CPU
    workers running llama.cpp and for the phone; its sha256 is in `manifest.json`."""
    folder = _registry(request) / BASE_FOLDER / base_model
    listed = folder / MANIFEST
    try:
        files = json.loads(listed.read_text())["files"] if listed.is_file() else {}
    except (OSError, ValueError, KeyError):
        files = {}
    if file_name != MANIFEST and file_name not in files:
        raise ApiError(
            404, "invalid_request_error", f"no {file_name} for {base_model}", "not_found"
        )
    path = folder / file_name
    if path.is_symlink() or not path.is_file():
        raise ApiError(
            404, "invalid_request_error", f"no {file_name} for {base_model}", "not_found"
        )
    return FileResponse(path, media_type="application/octet-stream")
