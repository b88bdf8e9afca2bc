"""Redis run as the context store needs it (AOF, fsync always): every write it
acknowledged survives the server being killed."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from context_store.store import ContextStore
from services.local_infra import start_redis_server
from services.redis_client import connect
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start(folder: Path, port: int) -> subprocess.Popen[bytes]:
    return start_redis_server(folder, port, appendonly=True, fsync="always")[0]


async def test_acknowledged_writes_survive_a_killed_server(tmp_path: Path) -> None:
    port = free_port()
    server = start(tmp_path, port)
    client = connect(f"redis://127.0.0.1:{port}/0")
    store = ContextStore(client, "durable", "desktop")
    try:
        version = 0
        for n in range(100):
            version = (await store.write("briefing", f"briefing {n}", version)).version
            await store.append_log(f"entry {n}")
        server.send_signal(signal.SIGKILL)  # no shutdown, no final save
        server.wait()
        await client.aclose()

        server = start(tmp_path, port)
        client = connect(f"redis://127.0.0.1:{port}/0")
        store = ContextStore(client, "durable", "desktop")
        current = await store.get("briefing")
        assert current is not None and current.content == "briefing 99"
        assert len(await store.history("briefing")) == 100
        assert await store.log_size() == 100
    finally:
        await client.aclose()
        server.terminate()
        server.wait()
