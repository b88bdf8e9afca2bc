"""What the mesh sees on this host, one line each: the original guide's "verify
installation" step, made useful.

    python -m services doctor                    # everything; exit 1 if something essential fails
    python -m services doctor --check broker,redis   # only these (container healthchecks)
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from services.paths import adapter_registry, cache_dir, demo_model_dir
from services.settings import MeshSettings


@dataclass
class Line:
    name: str
    ok: bool
    text: str
    essential: bool = True
    warning: bool = False

    def render(self) -> str:
        mark = "BAD" if not self.ok else "!! " if self.warning else "ok "
        return f"{mark} {self.name:<13} {self.text}"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else host
    netloc = f"{netloc}:{parts.port}" if parts.port else netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def python_line() -> Line:
    return Line(
        "python", sys.version_info >= (3, 11), f"{platform.python_version()} ({sys.executable})"
    )


def torch_line() -> Line:
    try:
        import torch
    except ImportError as exc:
        return Line("torch", False, f"not importable: {exc}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (
            f"CUDA {torch.version.cuda}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (fp16 compute)'}"
        )
    else:
        gpu = "CUDA not usable: CPU only"
    return Line("torch", True, f"{torch.__version__}; {gpu}")


def packages_line() -> Line:
    found = []
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "vllm", "llama-cpp-python"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name in ("transformers", "peft"):
                return Line("packages", False, f"{name} is not installed")
    return Line("packages", True, ", ".join(found))


async def broker_line(settings: MeshSettings) -> Line:
    import aiormq

    url = settings.amqp_url
    try:
        connection = await asyncio.wait_for(aiormq.connect(url), 5)
    except Exception as exc:
        return Line(
            "broker", False, f"{_redacted(url)} unreachable: {exc.__class__.__name__}: {exc}"
        )
    version = str(connection.server_properties.get("version", "?"))
    product = str(connection.server_properties.get("product", "broker"))
    await connection.close()
    return Line("broker", True, f"{_redacted(url)}: {product} {version}")


async def redis_line(settings: MeshSettings) -> Line:
    from services.redis_client import connect

    client = connect(settings.redis_url)
    try:
        server = await asyncio.wait_for(client.info("server"), 5)
        persistence = await client.info("persistence")
    except Exception as exc:
        return Line("redis", False, f"{_redacted(settings.redis_url)} unreachable: {exc}")
    finally:
        await client.aclose()
    aof = bool(persistence.get("aof_enabled"))
    text = f"{_redacted(settings.redis_url)}: Redis {server['redis_version']}, " + (
        "AOF on" if aof else "AOF OFF: a crash can lose context edits (appendonly yes)"
    )
    return Line("redis", True, text, warning=not aof)


async def sync_line(settings: MeshSettings) -> Line:
    """The context sync processes that reported in the last 30 s, with their state."""
    import json

    from services.redis_client import Keys, connect

    client = connect(settings.redis_url)
    try:
        keys = Keys(settings.namespace)
        names = [name async for name in client.scan_iter(match=keys.context_sync("*"))]
        records = [json.loads(raw) for raw in await client.mget(names) if raw] if names else []
    except Exception as exc:
        return Line("sync", False, f"cannot tell (Redis: {exc})", essential=False)
    finally:
        await client.aclose()
    if not records:
        return Line("sync", True, "no context sync process has reported", essential=False)
    parts = []
    for record in sorted(records, key=lambda r: r["site"]):
        published = record.get("last_published_at")
        ago = "never" if published is None else f"{max(record['at'] - published, 0):.0f} s ago"
        parts.append(
            f"{record['site']}: {record['state']}, {record['unpublished']} change(s) not yet "
            f"published (last published {ago})"
        )
    healthy = all(r["state"] == "running" for r in records)
    return Line("sync", True, "; ".join(parts), essential=False, warning=not healthy)


def model_line() -> Line:
    model = os.environ.get("MESH_MODEL", "")
    if model:
        if os.path.isdir(model):
            ok = os.path.isfile(os.path.join(model, "config.json"))
            return Line("model", ok, f"{model} ({'has config.json' if ok else 'no config.json'})")
        return Line("model", True, f"{model} (a hub id: loaded from the hub cache)")
    path = demo_model_dir()
    if (path / "config.json").is_file():
        return Line("model", True, f"demo model at {path}")
    return Line(
        "model", False, "none: set MESH_MODEL or run `python -m trainer_job build-demo-model`"
    )


def memory_line() -> Line:
    """Whether the worker's model fits this host with its backend and precision
    (MESH_BACKEND, MESH_MODEL, MESH_LLAMACPP_QUANT, MESH_CAPACITY, … as the worker
    reads them), and what to use instead."""
    from services.memory_fit import check

    try:
        result = check()
    except (OSError, ValueError) as exc:
        return Line("memory", True, f"cannot tell: {exc}", essential=False, warning=True)
    if result is None:
        return Line(
            "memory", True, "cannot tell: the model is not on this host yet", essential=False
        )
    fits, text = result
    return Line("memory", True, text, essential=False, warning=not fits)


def adapters_line() -> Line:
    from services.adapters import AdapterRegistry

    registry = adapter_registry()
    versions = AdapterRegistry(registry)
    found = {name: versions.versions(name) for name in versions.names()}
    text = ", ".join(f"{n} v{max(v)} ({len(v)} versions)" for n, v in found.items() if v)
    return Line("adapters", True, f"{text or 'none yet'} in {registry}", essential=False)


def disk_line() -> Line:
    folder = cache_dir()
    probe = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(probe).free / 2**30
    return Line("disk", free > 2, f"{free:.1f} GiB free at {probe}", essential=free < 0.5)


CHECKS: dict[str, Callable[[MeshSettings], Line | Awaitable[Line]]] = {
    "python": lambda s: python_line(),
    "torch": lambda s: torch_line(),
    "packages": lambda s: packages_line(),
    "broker": broker_line,
    "redis": redis_line,
    "sync": sync_line,
    "model": lambda s: model_line(),
    "memory": lambda s: memory_line(),
    "adapters": lambda s: adapters_line(),
    "disk": lambda s: disk_line(),
}


async def run(names: list[str], settings: MeshSettings) -> list[Line]:
    lines: list[Line] = []
    for name in names:
        result = CHECKS[name](settings)
        lines.append(result if isinstance(result, Line) else await result)
    return lines


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services doctor")
    parser.add_argument("--check", default=",".join(CHECKS), help=f"some of {','.join(CHECKS)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.check.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        print(f"doctor: unknown checks {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # the line says it already
    lines = asyncio.run(run(names, MeshSettings()))
    for line in lines:
        print(line.render())
    return 1 if any(not line.ok and line.essential for line in lines) else 0
