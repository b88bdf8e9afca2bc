"""The worker's container probe: healthy only while its heartbeat keeps the file fresh."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.launcher import MeshProcesses
from services.paths import REPO_ROOT

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
