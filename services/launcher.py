"""Run the whole mesh on this machine: what `make run` does.

    python -m services.launcher
    MESH_HTTP_PORT=5000 MESH_API_KEY=my-long-key python -m services.launcher

It starts RabbitMQ and Redis when they are installed but down, seeds an empty
context store with starter documents, builds the demo model when MESH_MODEL is not
set and the model is missing, starts a gateway, a worker and the context-store sync
process as separate processes, waits until the gateway is ready and prints

    gateway: http://HOST:PORT
    api key: KEY

Ctrl-C (or SIGTERM) stops every process it started, and nothing else.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from services import local_infra
from services.paths import REPO_ROOT, cache_dir
from services.settings import MeshSettings


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, so nothing is left orphaned."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def until_ready(url: str, timeout_s: float = 60) -> None:
    """Wait until the gateway at `url` answers /ready with 200 (RuntimeError if not)."""
    async with httpx.AsyncClient(timeout=5) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} was not ready after {timeout_s:.0f} s")


class MeshProcesses:
    """A gateway and a worker as child processes. Also used by the tests and bench/."""

    def __init__(
        self,
        env: dict[str, str],
        host: str,
        port: int,
        output: Callable[[str, IO[bytes]], None] | Path | None = None,
    ) -> None:
        self.env = env
        self.host = host
        self.port = port
        self.output = output
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._log_files: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start_process(
        self,
        name: str,
        module: str,
        extra_env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        env = {**self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        stdout: int | IO[bytes] = subprocess.PIPE
        if isinstance(self.output, Path):
            self.output.mkdir(parents=True, exist_ok=True)
            stdout = open(self.output / f"{name}.log", "ab")
            self._log_files.append(stdout)
        elif self.output is None:
            stdout = subprocess.DEVNULL
        child = subprocess.Popen(
            [sys.executable, "-m", module, *(args or [])],
            env=env,
            cwd=REPO_ROOT,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            process_group=0,
        )
        self.children[name] = child
        if callable(self.output) and child.stdout is not None:
            threading.Thread(target=self.output, args=(name, child.stdout), daemon=True).start()

    def start(self, context_sync: bool = False) -> None:
        self.start_process("worker", "inference_worker")
        self.start_process("gateway", "gateway")
        if context_sync:
            self.start_process("context", "context_store", args=["sync"])

    def stop_process(self, name: str, timeout_s: float = 15) -> None:
        child = self.children.pop(name)
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def wait_ready(
        self, timeout_s: float = 120, interrupted: Callable[[], bool] = lambda: False
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if interrupted():
                raise RuntimeError("interrupted before the mesh was ready")
            for name, child in self.children.items():
                if child.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {child.returncode} before the "
                        f"mesh was ready{self._log_hint(name)}"
                    )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the mesh was not ready after {timeout_s:.0f}s")

    def _log_hint(self, name: str) -> str:
        if isinstance(self.output, Path):
            tail = (self.output / f"{name}.log").read_text(errors="replace")[-2000:]
            return f"; its log ends:\n{tail}"
        return ""

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM every child (workers drain), then SIGKILL what is left."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children.values():
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for handle in self._log_files:
            handle.close()


def _relay(name: str, stream: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        sys.stderr.write(f"[{name}] {line.decode(errors='replace')}")


def _warn_without_aof(settings: MeshSettings) -> None:
    """The context tiers are the owner's memory: say so when Redis could lose edits."""
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        appendonly = client.config_get("appendonly").get("appendonly")
        client.close()
    except redis.RedisError:
        return
    if appendonly != "yes":
        print(
            "warning: Redis runs without AOF (appendonly no): context edits since its last "
            "snapshot would be lost in a crash; see README, 'Durability'",
            file=sys.stderr,
        )


def _api_key() -> str:
    """MESH_API_KEY, or a generated key kept in the cache so it survives restarts."""
    if os.environ.get("MESH_API_KEY"):
        return os.environ["MESH_API_KEY"]
    path = cache_dir() / "api-key"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def main() -> int:
    settings = MeshSettings()
    try:
        started = local_infra.ensure(settings, log=lambda text: print(text, flush=True))
    except local_infra.InfraError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    _warn_without_aof(settings)
    seed = subprocess.run(
        [sys.executable, "-m", "context_store", "seed"], cwd=REPO_ROOT, check=False
    )
    if seed.returncode != 0:
        print("make run: seeding the context store failed", file=sys.stderr)
        return 1
    if not os.environ.get("MESH_MODEL"):
        build = subprocess.run(
            [sys.executable, "-m", "trainer_job", "build-demo-model"], cwd=REPO_ROOT, check=False
        )
        if build.returncode != 0:
            print("make run: building the demo model failed", file=sys.stderr)
            return 1
    host = os.environ.get("MESH_HTTP_HOST", "127.0.0.1")
    port = int(os.environ.get("MESH_HTTP_PORT", "8000"))
    key = _api_key()
    env = {**os.environ, "MESH_API_KEY": key, "MESH_HTTP_HOST": host, "MESH_HTTP_PORT": str(port)}
    mesh = MeshProcesses(env, host, port, output=_relay)

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        mesh.start(context_sync=True)
        mesh.wait_ready(interrupted=stopping.is_set)
        print(f"gateway: {mesh.url}\napi key: {key}", flush=True)
        sync_restarts, sync_started = 0, time.monotonic()
        while not stopping.is_set():
            exited = [name for name, child in mesh.children.items() if child.poll() is not None]
            if exited == ["context"]:
                # The sync process waits out Redis and broker outages itself; if it still
                # exits, the gateway and worker keep serving while it is started again
                # (sooner again once it has run a while).
                if time.monotonic() - sync_started > 300:
                    sync_restarts = 0
                sync_restarts += 1
                delay = min(2**sync_restarts, 60)
                print(
                    f"make run: the context sync process exited; starting it again in {delay} s",
                    file=sys.stderr,
                )
                mesh.children.pop("context")
                if stopping.wait(delay):
                    break
                mesh.start_process("context", "context_store", args=["sync"])
                sync_started = time.monotonic()
            elif exited:
                print(f"make run: {', '.join(exited)} exited; stopping the others", file=sys.stderr)
                code = 1
                break
            stopping.wait(0.5)
    except RuntimeError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        code = 1
    finally:
        mesh.stop()
        for server in started:
            print(f"stopping {server.name} (started by make run)", flush=True)
            local_infra.stop(server)
    return code


if __name__ == "__main__":
    sys.exit(main())
