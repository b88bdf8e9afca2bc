"""Run an inference worker.

    python -m inference_worker                              # demo model on CPU
    MESH_MODEL=/models/mistral-7b MESH_DEVICE=cuda MESH_PRIORITY=10 python -m inference_worker
    MESH_BACKEND=echo python -m inference_worker            # zero-work backend (benchmarks)

Settings are MESH_* environment variables (inference_worker/settings.py).
"""

from __future__ import annotations

import logging
import sys

import uvloop
from pydantic import ValidationError

from inference_worker.settings import WorkerSettings
from inference_worker.worker import serve
from services.errors import MeshError
from services.logs import setup_logging


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
