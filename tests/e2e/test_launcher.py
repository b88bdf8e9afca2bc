"""`make run`'s launcher as a user runs it: two lines out, a working mesh, and Ctrl-C
stops every process it started."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from services.paths import REPO_ROOT
from services.settings import MeshSettings
from tests.conftest import free_port, mesh_env, remove_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def read_line(process: subprocess.Popen[str], deadline: float) -> str:
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            return line.rstrip("\n")
        if process.poll() is not None:
            raise AssertionError(f"launcher exited with {process.returncode}")
    raise AssertionError("launcher printed nothing in time")


def test_launcher_prints_url_and_key_serves_and_stops_cleanly(
    namespace: str, demo_model: Path
) -> None:
    port = free_port()
    env = mesh_env(f"{namespace}-run", port, "launcher-test-key")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "services.launcher"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        lines = []
        while not any(line.startswith("api key: ") for line in lines):
            lines.append(read_line(launcher, deadline))
        assert "api key: launcher-test-key" in lines
        url_lines = [line for line in lines if line.startswith("gateway: ")]
        assert url_lines == [f"gateway: http://127.0.0.1:{port}"]
        assert re.fullmatch(r"gateway: http://[^\s:]+:\d+", url_lines[0])

        children = psutil.Process(launcher.pid).children(recursive=True)
        assert len(children) == 3  # the gateway, the worker and the context sync
        response = httpx.post(
            f"http://127.0.0.1:{port}/chat",
            json={"message": "What does the phone do?", "max_tokens": 24},
            headers={"Authorization": "Bearer launcher-test-key"},
            timeout=60,
        )
        assert response.status_code == 200 and response.json()["response"]

        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        if launcher.poll() is None:
            launcher.kill()
        asyncio.run(remove_namespace(MeshSettings(namespace=f"{namespace}-run")))
