"""Run the gateway.

    MESH_API_KEY=… python -m gateway                 # http://127.0.0.1:8000
    MESH_HTTP_HOST=0.0.0.0 MESH_HTTP_PORT=5000 MESH_API_KEY=… python -m gateway

Settings are MESH_* environment variables (gateway/settings.py).
"""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.logs import setup_logging


def main() -> int:
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        print(
            f"gateway: setting MESH_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr
        )
        return 2
    if not settings.api_key:
        print("gateway: MESH_API_KEY is not set; refusing to serve without a key", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
