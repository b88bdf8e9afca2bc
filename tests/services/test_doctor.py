"""`python -m services doctor` against the real broker and Redis, and a dead one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.paths import REPO_ROOT
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services", "doctor", *args],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_line_per_check_and_exit_0_when_all_is_well() -> None:
    result = doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[1] for line in result.stdout.splitlines()]
    assert names == [
        "python",
        "torch",
        "packages",
        "broker",
        "redis",
        "sync",
        "model",
        "memory",
        "adapters",
        "disk",
    ]
    assert "RabbitMQ" in result.stdout and "Redis " in result.stdout
    # The demo model with the worker's defaults (transformers fp32 on the CPU) fits.
    [memory] = [line for line in result.stdout.splitlines() if line.split()[1] == "memory"]
    assert "transformers float32: needs" in memory and memory.endswith(": fits")
    assert "transformers 5.20.2" in result.stdout


def test_a_dead_broker_fails_the_check_without_leaking_the_password() -> None:
    url = f"amqp://mesh:hunter2-secret@127.0.0.1:{free_port()}/"
    result = doctor("--check", "broker,redis", MESH_AMQP_URL=url)
    assert result.returncode == 1
    [broker, redis] = result.stdout.splitlines()
    assert broker.startswith("BAD broker") and "unreachable" in broker
    assert redis.startswith(("ok  redis", "!!  redis"))
    assert "hunter2" not in result.stdout + result.stderr
    assert doctor("--check", "nonsense").returncode == 2
