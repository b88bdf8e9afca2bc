"""The gateway in-process against the real broker and Redis, with no worker running:
authentication, validation and fail-fast answers, all with the one error body."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.settings import GatewaySettings
from tests.conftest import remove_namespace
from tests.gateway.conftest import gateway_client

pytestmark = pytest.mark.integration
KEY = "gateway-test-key"


@pytest.fixture(scope="module")
async def client(namespace: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(
        namespace=f"{namespace}-gw", api_key=KEY, max_tokens_cap=64, default_max_tokens=32
    )
    async with gateway_client(settings) as http:
        yield http
    await remove_namespace(settings)


AUTH = {"Authorization": f"Bearer {KEY}"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "code"}
    assert body["error"]["code"] == code
    return body["error"]


async def test_health_is_open(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_not_ready_without_a_live_worker(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "broker": True, "redis": True, "live_workers": 0}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer wrong-key-123"}, "invalid_api_key"),
        ({"Authorization": f"Basic {KEY}"}, "missing_api_key"),
    ],
)
async def test_chat_needs_a_valid_key(
    client: httpx.AsyncClient, headers: dict[str, str], code: str
) -> None:
    for path in ("/chat", "/chat/stream"):
        response = await client.post(path, json={"message": "hi"}, headers=headers)
        assert_error(response, 401, code)
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_invalid_bodies_name_the_field(client: httpx.AsyncClient) -> None:
    error = assert_error(
        await client.post("/chat", json={"mesage": "hi"}, headers=AUTH), 422, "invalid_body"
    )
    assert "body.message" in error["message"]
    error = assert_error(
        await client.post("/chat", json={"message": "hi", "temperature": "hot"}, headers=AUTH),
        422,
        "invalid_body",
    )
    assert "temperature" in error["message"]
    assert_error(
        await client.post("/chat", json={"message": ""}, headers=AUTH), 422, "invalid_body"
    )
    assert_error(
        await client.post(
            "/chat", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
        ),
        422,
        "invalid_body",
    )
    error = assert_error(
        await client.post(
            "/chat", json={"message": "hi", "conversation_id": "../../x"}, headers=AUTH
        ),
        422,
        "invalid_body",
    )
    assert "conversation_id" in error["message"]


async def test_max_tokens_above_the_cap_is_refused(client: httpx.AsyncClient) -> None:
    error = assert_error(
        await client.post("/chat", json={"message": "hi", "max_tokens": 65}, headers=AUTH),
        400,
        "max_tokens_too_large",
    )
    assert "64" in error["message"]


async def test_no_live_worker_fails_fast_with_retry_after(client: httpx.AsyncClient) -> None:
    for path in ("/chat", "/chat/stream"):
        response = await client.post(path, json={"message": "hi"}, headers=AUTH)
        assert_error(response, 503, "no_live_workers")
        assert response.headers["Retry-After"] == "1"


async def test_unknown_routes_use_the_error_body(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.get("/chat", headers=AUTH), 405, "method_not_allowed")
