"""Adapters over HTTP: the admin view of versions and rollback (scope `admin`), and
the registry's files for workers on another site (scope `worker`)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from gateway.auth import AdminKey, WorkerKey
from gateway.deps import Adapters
from gateway.routes import ERRORS
from proto.adapters import ADAPTER_NAME, GGUF_FILE, AdapterInfo, AdapterList, AdapterRollback
from services.adapters import BASE_NAME, SERVED_FILES
from services.errors import NotFound

router = APIRouter(tags=["adapters"])
Name = Annotated[str, PathParam(pattern=ADAPTER_NAME, description="Adapter name.")]
BaseName = Annotated[str, PathParam(pattern=BASE_NAME, description="Base model name.")]
Version = Annotated[int, PathParam(ge=1, le=1_000_000, description="Version number.")]


@router.get(
    "/admin/adapters", operation_id="list_adapters", response_model=AdapterList, responses=ERRORS
)
async def list_adapters(key: AdminKey, adapters: Adapters) -> AdapterList:
    """Every adapter in the registry: its versions, their evaluation, the current one."""
    return AdapterList(adapters=await adapters.list())


@router.post(
    "/admin/adapters/{name}/rollback",
    operation_id="rollback_adapter",
    response_model=AdapterInfo,
    responses=ERRORS,
)
async def rollback_adapter(
    key: AdminKey, adapters: Adapters, name: Name, body: AdapterRollback | None = None
) -> AdapterInfo:
    """Serve an earlier version of `name` (the one before the current by default).
    Workers switch in place, through the same event as a publish."""
    return await adapters.rollback(name, body.version if body else None)


@router.get(
    "/adapters/{name}/{version}/{file_name}",
    operation_id="adapter_file",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    response_class=FileResponse,
)
async def adapter_file(
    key: WorkerKey, adapters: Adapters, name: Name, version: Version, file_name: str
) -> FileResponse:
    """One file of an adapter version, for a worker that has no shared registry.
    The worker checks every file against the manifest's sha256 before loading."""
    path = adapters.registry.served_file(name, version, file_name)
    if path is None:
        if file_name not in SERVED_FILES and not re.fullmatch(GGUF_FILE, file_name):
            raise NotFound(f"adapters have only {', '.join(SERVED_FILES)}")
        raise NotFound(f"no {name} v{version}")
    return FileResponse(path, media_type="application/octet-stream")


@router.get(
    "/gguf/{base_model}/{file_name}",
    operation_id="base_model_gguf",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    response_class=FileResponse,
)
async def base_model_gguf(
    key: WorkerKey, adapters: Adapters, base_model: BaseName, file_name: str
) -> FileResponse:
    """A GGUF export of a base model (`python -m trainer_job export-gguf`), for CPU
    workers running llama.cpp and for the phone; its sha256 is in `manifest.json`."""
    path = adapters.registry.base_file(base_model, file_name)
    if path is None:
        raise NotFound(f"no {file_name} for {base_model}")
    return FileResponse(path, media_type="application/octet-stream")
