"""The context tiers over HTTP, in-process against the real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.settings import GatewaySettings
from tests.conftest import remove_namespace
from tests.gateway.conftest import gateway_client

pytestmark = pytest.mark.integration
KEY = "context-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
async def client(namespace: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(
        namespace=f"{namespace}-cx",
        api_key=KEY,
        default_max_tokens=32,
        context_budget=400,
        default_project="mesh",
    )
    async with gateway_client(settings) as http:
        yield http
    await remove_namespace(settings)


async def test_writes_need_if_match_and_stale_versions_get_412(client: httpx.AsyncClient) -> None:
    url = "/context/briefing"
    missing = await client.put(url, json={"content": "x"}, headers=AUTH)
    assert missing.status_code == 428 and missing.json()["error"]["code"] == "if_match_required"
    created = await client.put(url, json={"content": "first"}, headers={**AUTH, "If-Match": '"v0"'})
    first = created.json()
    # The ETag names the version on every site: '"<hlc>-<site>"'; the number is local.
    assert created.status_code == 200 and created.headers["ETag"] == f'"{first["hlc"]}-local"'
    assert created.headers["X-Context-Version"] == "1"
    read = await client.get(url, headers=AUTH)
    assert read.json()["content"] == "first" and read.headers["ETag"] == created.headers["ETag"]
    updated = await client.put(
        url, json={"content": "second"}, headers={**AUTH, "If-Match": read.headers["ETag"]}
    )
    assert updated.json()["version"] == 2
    # Stale, by ETag or by the old "vN" (still accepted this release): 412 with the
    # current one's ETag and number.
    for tag in (read.headers["ETag"], '"v1"'):
        stale = await client.put(url, json={"content": "lost"}, headers={**AUTH, "If-Match": tag})
        assert stale.status_code == 412 and stale.headers["ETag"] == updated.headers["ETag"]
        assert stale.headers["X-Context-Version"] == "2"
    bad = await client.put(url, json={"content": "x"}, headers={**AUTH, "If-Match": '"nope"'})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_if_match"
    history = (await client.get(f"{url}/history", headers=AUTH)).json()
    assert [f'"{v["id"]}"' for v in history["versions"]] == [
        created.headers["ETag"],
        updated.headers["ETag"],
    ]
    assert [v["state"] for v in history["versions"]] == ["superseded", "current"]
    first_id = history["versions"][0]["id"]
    for ref in (first_id, "1"):  # by id, or by this site's number (this release)
        old = await client.get(f"{url}/versions/{ref}", headers=AUTH)
        assert old.json()["content"] == "first" and old.json()["id"] == first_id
    missing = await client.get(f"{url}/versions/12-nowhere", headers=AUTH)
    assert missing.status_code == 404
    unreadable = await client.get(f"{url}/versions/latest", headers=AUTH)
    assert unreadable.status_code == 400 and unreadable.json()["error"]["code"] == "bad_version"


async def test_project_tier_needs_a_project(client: httpx.AsyncClient) -> None:
    response = await client.get("/context/project", headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["code"] == "project_required"
    put = await client.put(
        "/context/project?project=mesh",
        json={"content": "architecture"},
        headers={**AUTH, "If-Match": "v0"},
    )
    assert put.json()["doc"] == "project/mesh"


async def test_log_entries_append_and_page(client: httpx.AsyncClient) -> None:
    for n in range(5):
        created = await client.post("/context/log", json={"text": f"entry {n}"}, headers=AUTH)
        assert created.status_code == 201
    page = (await client.get("/context/log?limit=3", headers=AUTH)).json()
    assert [e["text"] for e in page["entries"]] == ["entry 4", "entry 3", "entry 2"]
    rest = (
        await client.get(
            "/context/log", params={"limit": 3, "before": page["next_before"]}, headers=AUTH
        )
    ).json()
    assert [e["text"] for e in rest["entries"]] == ["entry 1", "entry 0"]
    assert rest["next_before"] is None


async def test_preview_reports_every_tier_including_the_log(client: httpx.AsyncClient) -> None:
    preview = (await client.get("/context/preview", headers=AUTH)).json()
    tiers = {s["tier"]: s for s in preview["report"]["sections"]}
    assert tiers["briefing"]["included"] and tiers["log"]["included"]
    assert tiers["project"]["doc"] == "project/mesh"
    assert "entry 4" in preview["text"] and "second" in preview["text"]
    assert preview["report"]["tokens"] <= 400


async def test_the_chat_scope_cannot_touch_the_context(client: httpx.AsyncClient) -> None:
    store = client.app.services.keys  # type: ignore[attr-defined]
    chat_key, _ = await store.create("chat-only", ["chat"])
    response = await client.get(
        "/context/briefing", headers={"Authorization": f"Bearer {chat_key}"}
    )
    assert response.status_code == 403
