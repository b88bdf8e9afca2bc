"""The context store: sync between sites, and markdown import/export.

    python -m context_store sync               # this site's sync process (MESH_SITE)
    python -m context_store import DIR          # idempotent: same content, no new version
    python -m context_store export DIR
    python -m context_store seed                # starter documents, only into an empty store

Settings are MESH_* environment variables (context_store/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import uvloop

from context_store.markdown import export_dir, import_dir
from context_store.settings import ContextSettings
from context_store.store import ContextStore
from context_store.sync import SyncDaemon
from services.logs import setup_logging
from services.redis_client import connect

STARTER = Path(__file__).parent / "starter"


async def _run(args: argparse.Namespace, settings: ContextSettings) -> int:
    client = connect(settings.redis_url)
    store = ContextStore(
        client, settings.namespace, settings.site, history_keep=settings.context_history_keep
    )
    try:
        if args.command == "sync":
            daemon = SyncDaemon(store, settings.namespace, settings.catch_up_s)
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, task.cancel)  # type: ignore[union-attr]
            try:
                await daemon.run(settings.amqp_url)
            except asyncio.CancelledError:
                pass
        elif args.command == "import":
            counts = await import_dir(store, args.folder)
            print(
                f"imported {counts['documents']} new document version(s) and "
                f"{counts['log_entries']} new log entr(ies) from {args.folder}"
            )
        elif args.command == "export":
            for path in await export_dir(store, args.folder):
                print(f"wrote {path}")
        elif args.command == "seed":
            if await store.docs() or await store.log_size():
                print("context store: not empty; nothing seeded")
            else:
                await import_dir(store, STARTER)
                print("context store: seeded with starter documents")
    finally:
        await client.aclose()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m context_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sync", help="run this site's sync process")
    for name in ("import", "export"):
        sub = commands.add_parser(name, help=f"{name} the markdown folder")
        sub.add_argument("folder", type=Path)
    commands.add_parser("seed", help="starter documents into an empty store")
    args = parser.parse_args(argv)
    settings = ContextSettings()
    setup_logging(settings.log_level)
    try:
        return uvloop.run(_run(args, settings))
    except (FileNotFoundError, ValueError) as exc:
        print(f"context_store: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
