"""Make sure the local RabbitMQ and Redis are up, starting them when installed but down.

    python -m services.local_infra ensure    # start what is down; exit 1 with a hint if missing

Only servers on this machine (localhost URLs) are ever started; a remote broker
or Redis is only checked.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from services.settings import MeshSettings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


@dataclass(frozen=True)
class Server:
    name: str  # what we call it in messages
    service: str  # Debian's package, binary and init script
    setting: str  # the environment variable that points elsewhere
    url: str
    default_port: int

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or self.default_port

    @property
    def is_local(self) -> bool:
        return self.host in LOCAL_HOSTS

    def reachable(self, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def installed(self) -> bool:
        # /usr/sbin is not on an ordinary user's PATH on Debian.
        return bool(shutil.which(self.service) or shutil.which(self.service, path="/usr/sbin"))


class InfraError(Exception):
    pass


def servers(settings: MeshSettings) -> list[Server]:
    return [
        Server("RabbitMQ", "rabbitmq-server", "MESH_AMQP_URL", settings.amqp_url, 5672),
        Server("Redis", "redis-server", "MESH_REDIS_URL", settings.redis_url, 6379),
    ]


def _run(command: list[str], timeout: float) -> None:
    subprocess.run(
        command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def start(server: Server) -> None:
    """Start an installed local server through its init script and wait for it."""
    try:
        if shutil.which("service"):
            _run(["service", server.service, "start"], timeout=120)
        elif server.service == "redis-server":
            _run(["redis-server", "--daemonize", "yes", "--port", str(server.port)], timeout=30)
        else:
            _run(["rabbitmq-server", "-detached"], timeout=60)
        if server.service == "rabbitmq-server" and shutil.which("rabbitmqctl"):
            _run(["rabbitmqctl", "await_startup", "--timeout", "120"], timeout=150)
    except (subprocess.SubprocessError, OSError) as exc:
        raise InfraError(
            f"could not start {server.name} ({exc}); start it by hand: "
            f"sudo service {server.service} start"
        ) from exc
    deadline = time.monotonic() + 60
    while not server.reachable():
        if time.monotonic() > deadline:
            raise InfraError(f"{server.name} started but does not answer on port {server.port}")
        time.sleep(0.5)


def stop(server: Server) -> None:
    if shutil.which("service"):
        subprocess.run(
            ["service", server.service, "stop"],
            timeout=120,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )


def ensure(settings: MeshSettings, log: Callable[[str], None] = print) -> list[Server]:
    """Start every local server that is installed but down; returns those started."""
    started = []
    for server in servers(settings):
        if server.reachable():
            continue
        if not server.is_local:
            raise InfraError(f"{server.name} at {server.host}:{server.port} does not answer")
        if not server.installed():
            raise InfraError(
                f"{server.name} is not installed: run `sudo apt-get install -y "
                f"{server.service}`, or point {server.setting} at a running one"
            )
        log(f"starting {server.name} …")
        start(server)
        started.append(server)
    return started


def main(argv: list[str]) -> int:
    if argv != ["ensure"]:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        started = ensure(MeshSettings())
    except InfraError as exc:
        print(f"local_infra: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(s.name for s in started) or "nothing (both already up)"
    print(f"RabbitMQ and Redis are up; started {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def start_redis_server(
    folder: Path, port: int, appendonly: bool = False, fsync: str = "everysec"
) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server (a second site in tests, a benchmark) and its URL."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if binary is None:
        raise InfraError("redis-server is not installed: sudo apt-get install -y redis-server")
    aof = ["--appendonly", "yes", "--appendfsync", fsync] if appendonly else ["--appendonly", "no"]
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            *aof,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    local = Server("Redis", "redis-server", "MESH_REDIS_URL", f"redis://127.0.0.1:{port}/0", port)
    deadline = time.monotonic() + 10
    while not local.reachable(timeout=0.2):
        if server.poll() is not None or time.monotonic() > deadline:
            raise InfraError(f"redis-server on port {port} did not start")
        time.sleep(0.05)
    return server, local.url
