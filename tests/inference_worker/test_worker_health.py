"""The worker's container probe: healthy only while its heartbeat keeps the file fresh."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from inference_worker.backends.echo import EchoBackend
from inference_worker.settings import WorkerSettings
from inference_worker.worker import Worker
from services import liveness
from services.launcher import MeshProcesses
from services.paths import REPO_ROOT
from services.redis_client import Keys, connect
from services.settings import MeshSettings
from tests.conftest import remove_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _probe(health_file: Path) -> int:
    env = {**os.environ, "MESH_HEALTH_FILE": str(health_file), "MESH_HEARTBEAT_S": "0.2"}
    return subprocess.run(
        [sys.executable, "-m", "inference_worker", "healthcheck"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
    ).returncode


def test_healthcheck_follows_the_heartbeat(mesh: MeshProcesses, tmp_path: Path) -> None:
    health = tmp_path / "healthy"
    assert _probe(health) == 1  # no file: not ready
    mesh.start_process(
        "probed-worker",
        "inference_worker",
        extra_env={"MESH_HEALTH_FILE": str(health), "MESH_BACKEND": "echo"},
    )
    try:
        deadline = time.monotonic() + 60
        while _probe(health) != 0:
            assert time.monotonic() < deadline, "the worker never became healthy"
            time.sleep(0.3)
    finally:
        mesh.stop_process("probed-worker")  # SIGTERM: it removes its liveness record
    old = time.time() - 60
    os.utime(health, (old, old))  # a stale heartbeat: a hung or dead worker
    assert _probe(health) == 1


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


class BreakableEcho(EchoBackend):
    """The echo backend, until the test says it can no longer serve."""

    def __init__(self) -> None:
        self.ok = True

    async def health(self) -> dict[str, object]:
        return {"backend": "echo", "ok": self.ok}


async def test_a_backend_that_can_no_longer_serve_takes_its_worker_out(
    namespace: str, tmp_path: Path
) -> None:
    health = tmp_path / "healthy"
    settings = WorkerSettings(
        namespace=f"{namespace}-broken", backend="echo", health_file=health, heartbeat_s=0.1
    )
    backend = BreakableEcho()
    worker = Worker(settings, backend)
    running = asyncio.create_task(worker.run())
    client = connect(settings.redis_url)
    keys = Keys(settings.namespace)
    try:

        async def ready() -> bool:
            return health.exists() and bool(await liveness.live_workers(client, keys))

        async def left_the_live_set() -> bool:
            return not await liveness.live_workers(client, keys)

        await eventually(ready)
        backend.ok = False
        await eventually(left_the_live_set)
        assert worker.broken
        touched = health.stat().st_mtime
        await asyncio.sleep(0.5)
        assert health.stat().st_mtime == touched  # its probe goes stale ...
        assert worker.bus._consumer_tag is None  # ... and it takes no more jobs
    finally:
        worker.stop()
        await running
        await client.aclose()
        await remove_namespace(MeshSettings(namespace=settings.namespace))
