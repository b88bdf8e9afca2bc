"""Trainer job commands.

python -m trainer_job build-demo-model           # build the demo model into .cache/ if missing
python -m trainer_job build-demo-model --force   # rebuild it
python -m trainer_job build-demo-model --out DIR # build it somewhere else
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-demo-model", help="build the small demo model")
    build.add_argument("--out", type=Path, default=None, help="target folder (default: cache)")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    publish = commands.add_parser("publish", help="publish an adapter version to the workers")
    publish.add_argument("source", type=Path, help="a peft output folder (safetensors)")
    publish.add_argument("--name", required=True, help="adapter name")
    publish.add_argument("--base-model", required=True, help="the base model's served name")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.command == "build-demo-model":
        from services.paths import demo_model_dir
        from trainer_job.demo_model import ensure_demo_model, is_built

        target = args.out or demo_model_dir()
        if is_built(target) and not args.force:
            print(f"demo model: present at {target}")
            return 0
        path = ensure_demo_model(target, force=args.force)
        print(f"demo model: built at {path}")
        return 0
    if args.command == "publish":
        import asyncio

        from services.paths import adapter_registry
        from services.settings import MeshSettings
        from trainer_job.publish import announce, write_version

        try:
            manifest = write_version(args.source, adapter_registry(), args.name, args.base_model)
        except (FileNotFoundError, ValueError) as exc:
            print(f"trainer_job publish: {exc}", file=sys.stderr)
            return 1
        asyncio.run(announce(MeshSettings(), manifest))
        print(f"published {manifest.name} v{manifest.version}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
