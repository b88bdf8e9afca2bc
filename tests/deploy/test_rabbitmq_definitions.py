"""The definitions a deployed broker boots with: imported into the real local
RabbitMQ, the mesh's user can connect with its password and no other."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aio_pika
import pytest

from services.paths import REPO_ROOT
from services.rabbitmq_definitions import definitions, password_hash

pytestmark = pytest.mark.integration


def test_the_hash_is_rabbitmqs_salted_sha256() -> None:
    # base64(salt + sha256(salt + password)), as in RabbitMQ's password hashing guide.
    salt = bytes.fromhex("908d c60a".replace(" ", ""))
    assert password_hash("test12", salt) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
def test_the_imported_user_connects_with_its_password(namespace: str) -> None:
    user, password = f"{namespace}-user", secrets.token_urlsafe(18)
    # rabbitmqctl reads the file as the broker's own user: a world-readable place.
    folder = Path(tempfile.mkdtemp(prefix="mesh-definitions-"))
    folder.chmod(0o755)
    path = folder / "definitions.json"
    path.write_text(json.dumps(definitions(user, password, namespace=namespace)))
    path.chmod(0o644)
    imported = subprocess.run(
        ["rabbitmqctl", "import_definitions", str(path)], capture_output=True, text=True
    )
    shutil.rmtree(folder)
    assert imported.returncode == 0, imported.stderr

    async def connect_and_clean_up() -> None:
        connection = await aio_pika.connect(f"amqp://{user}:{password}@127.0.0.1:5672/")
        async with connection:
            channel = await connection.channel()
            for name in ("jobs", "control", "adapters", "context"):
                # Declared by the import; a passive get fails if it is not there.
                await channel.get_exchange(f"{namespace}.{name}", ensure=True)
                await channel.exchange_delete(f"{namespace}.{name}")
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(f"amqp://{user}:wrong-{password}@127.0.0.1:5672/")

    try:
        asyncio.run(connect_and_clean_up())
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True)


def test_weak_or_guest_credentials_are_refused(tmp_path: Path) -> None:
    def render(user: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.rabbitmq_definitions", "--out", str(tmp_path / "d")],
            env={
                "MESH_RABBITMQ_USER": user,
                "MESH_RABBITMQ_PASSWORD": password,
                "PATH": "/usr/bin:/bin",
            },
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )

    assert render("guest", "a-long-enough-password").returncode == 1
    weak = render("mesh", "change-this-password")
    assert weak.returncode == 1 and "placeholder" in weak.stderr
    assert render("mesh", secrets.token_urlsafe(18)).returncode == 0
    assert not any(u["name"] == "guest" for u in json.loads((tmp_path / "d").read_text())["users"])
