"""A RabbitMQ node and a redis-server of one's own, to break on purpose.

The fault tests and `bench/faults.py` stop, restart, pause and kill these. The
broker and Redis every other test (and `make run`) uses never see the outage.
Both come from the same Debian packages as the shared ones; nothing is faked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's: runs as the calling user


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str | None:
    local = RABBITMQ_BIN / name
    return str(local) if local.exists() else shutil.which(name)


class PrivateRabbit:
    """A RabbitMQ node on its own ports, with its own data folder and Erlang cookie."""

    @staticmethod
    def available() -> bool:
        return _tool("rabbitmq-server") is not None and _tool("rabbitmqctl") is not None

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.node = f"mesh-faults-{uuid.uuid4().hex[:8]}@localhost"
        root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOME": str(root),  # the Erlang cookie the node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(root / "rabbit.pid"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),  # none: the defaults
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout_s: float = 120) -> None:
        subprocess.run(
            [_tool("rabbitmqctl") or "rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            cwd=self.root,  # where Erlang drops a crash dump, if it does
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )

    def start(self) -> None:
        """Boot the node (~5 s) and wait until it serves."""
        subprocess.run(
            [_tool("rabbitmq-server") or "rabbitmq-server", "-detached"],
            env=self.env,
            cwd=self.root,
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._await_startup()

    def _await_startup(self, timeout_s: float = 120) -> None:
        # Just after `-detached` the node may not be reachable at all yet (rabbitmqctl
        # then exits at once): ask again until it answers that it has booted.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.ctl("await_startup", "--timeout", "30")
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop_app(self) -> None:
        """The broker application stops (connections closed); the node stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self._await_startup()

    def stop(self) -> None:
        """The whole node stops, cleanly (as for a host reboot); returns once it is gone."""
        self.ctl("stop", str(self.root / "rabbit.pid"))  # with the pid file: waits for it

    def restart(self, down_s: float = 0.0) -> None:
        """The whole node stops, stays down `down_s`, boots."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def kill(self) -> None:
        """The node dies at once (SIGKILL: a crash, an OOM kill, a host losing power)."""
        pid = int((self.root / "rabbit.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):  # gone, and its port free for the next boot
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def shutdown(self) -> None:
        try:
            self.ctl("shutdown", timeout_s=60)
        except (subprocess.SubprocessError, OSError):
            pid_file = self.root / "rabbit.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
                except (ValueError, OSError):
                    pass


class PrivateRedis:
    """A redis-server on its own port, with an append-only file (fsync always), as the
    README asks of a real deployment: a restart keeps what was acknowledged."""

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._log = open(self.root / "redis.log", "ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.root),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self.root / 'redis.log'}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """Hung: connections are accepted by the kernel, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Down (connections refused), after writing what it holds."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
