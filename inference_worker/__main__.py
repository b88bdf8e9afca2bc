"""Run an inference worker.

    python -m inference_worker                              # demo model on CPU
    MESH_MODEL=/models/mistral-7b MESH_DEVICE=cuda MESH_PRIORITY=10 python -m inference_worker
    MESH_BACKEND=echo python -m inference_worker            # zero-work backend (benchmarks)
    MESH_HEALTH_FILE=/tmp/healthy python -m inference_worker healthcheck   # container probe

Settings are MESH_* environment variables (inference_worker/settings.py).
"""

from __future__ import annotations

import logging
import sys
import time

import uvloop
from pydantic import ValidationError

from inference_worker.settings import WorkerSettings
from inference_worker.worker import serve
from services.errors import MeshError
from services.logs import setup_logging


def healthcheck(settings: WorkerSettings) -> int:
    """Exit 0 when the worker touched its health file within three heartbeats
    (the model is loaded, the broker connected, Redis written)."""
    if settings.health_file is None:
        print("inference_worker healthcheck: MESH_HEALTH_FILE is not set", file=sys.stderr)
        return 2
    try:
        age = time.time() - settings.health_file.stat().st_mtime
    except FileNotFoundError:
        print("inference_worker healthcheck: not ready yet", file=sys.stderr)
        return 1
    limit = max(3 * settings.heartbeat_s, 10.0)
    if age > limit:
        print(f"inference_worker healthcheck: last heartbeat {age:.0f}s ago", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        print(
            f"inference_worker: setting MESH_{str(first['loc'][0]).upper()}: {first['msg']}",
            file=sys.stderr,
        )
        return 2
    if sys.argv[1:] == ["healthcheck"]:
        return healthcheck(settings)
    setup_logging(settings.log_level)
    try:
        uvloop.run(serve(settings))
    except MeshError as exc:
        logging.getLogger("inference_worker").error("%s", exc.message)
        print(f"inference_worker: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
