"""`python -m gateway keys …` as an operator runs it, against the real Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import redis.asyncio as redis

from gateway.keys import KeyStore
from services.paths import REPO_ROOT
from services.redis_client import Keys
from services.settings import MeshSettings
from tests.conftest import remove_namespace

pytestmark = pytest.mark.integration


def keys_cli(namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_NAMESPACE": namespace}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_create_list_revoke(namespace: str) -> None:
    ns = f"{namespace}-cli"
    try:
        created = keys_cli(ns, "create", "phone", "--scopes", "chat,context")
        assert created.returncode == 0, created.stderr
        fields = dict(line.split(": ", 1) for line in created.stdout.splitlines())
        api_key = fields["api key"]
        assert api_key.startswith("mesh_") and fields["scopes"] == "chat,context"

        async def lookup() -> object:
            client = redis.Redis.from_url(MeshSettings().redis_url, decode_responses=True)
            try:
                return await KeyStore(client, Keys(ns)).lookup(api_key)
            finally:
                await client.aclose()

        assert asyncio.run(lookup()) is not None
        listed = keys_cli(ns, "list")
        assert fields["key id"] in listed.stdout and "phone" in listed.stdout
        assert api_key not in listed.stdout  # never shown again

        assert keys_cli(ns, "revoke", "phone").returncode == 0
        assert asyncio.run(lookup()) is None
        missing = keys_cli(ns, "revoke", "phone")
        assert missing.returncode == 1 and "no key" in missing.stderr
        bad = keys_cli(ns, "create", "x", "--scopes", "root")
        assert bad.returncode == 2 and "scopes must be among" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1  # one readable line, no traceback
    finally:
        asyncio.run(remove_namespace(MeshSettings(namespace=ns)))
