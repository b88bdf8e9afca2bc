"""Run the gateway, manage its API keys, or print its OpenAPI document.

    MESH_API_KEY=… python -m gateway                 # serve on http://127.0.0.1:8000
    MESH_HTTP_HOST=0.0.0.0 MESH_HTTP_PORT=5000 python -m gateway
    python -m gateway keys create phone --scopes chat,context   # prints the key once
    python -m gateway keys list
    python -m gateway keys revoke phone               # by name or key id; at once
    python -m gateway openapi > openapi.json          # (make proto)

Settings are MESH_* environment variables (gateway/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pydantic import ValidationError

from gateway.settings import GatewaySettings
from services.logs import setup_logging


def _settings() -> GatewaySettings:
    try:
        return GatewaySettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        location = str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise SystemExit(f"gateway: setting MESH_{location}: {first['msg']}") from None


def serve() -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _settings()
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


async def _keys(args: argparse.Namespace) -> int:
    from gateway.keys import KeyStore
    from services.redis_client import Keys, connect

    settings = _settings()
    client = connect(settings.redis_url)
    store = KeyStore(client, Keys(settings.namespace))
    try:
        if args.action == "create":
            try:
                api_key, record = await store.create(args.name, args.scopes.split(","))
            except ValueError as exc:
                print(f"gateway keys: {exc}", file=sys.stderr)
                return 2
            print(f"key id: {record.key_id}\nscopes: {','.join(record.scopes)}\napi key: {api_key}")
            print("(the key is shown only now; it is stored hashed)", file=sys.stderr)
        elif args.action == "list":
            for record in await store.list():
                scopes = ",".join(record.scopes)
                print(f"{record.key_id}  {record.name:<28} {scopes:<20} {record.created_at}")
        else:
            removed = await store.revoke(args.name)
            if not removed:
                print(f"gateway keys: no key named or with id {args.name!r}", file=sys.stderr)
                return 1
            for record in removed:
                print(f"revoked {record.key_id} ({record.name})")
    finally:
        await client.aclose()
    return 0


def openapi() -> int:
    from gateway.app import create_app

    print(json.dumps(create_app(GatewaySettings()).openapi(), indent=2, sort_keys=True))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API (the default)")
    keys = commands.add_parser("keys", help="manage API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument(
        "--scopes", default="chat", help="comma-separated: chat,context,admin,worker"
    )
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke keys by name or key id")
    revoke.add_argument("name")
    commands.add_parser("openapi", help="print the OpenAPI document")
    args = parser.parse_args(argv)
    if args.command == "keys":
        return asyncio.run(_keys(args))
    if args.command == "openapi":
        return openapi()
    return serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
