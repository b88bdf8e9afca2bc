"""Keys, scopes, limits and admission, in-process against the real broker and Redis.

No real worker runs here: a liveness record makes the gateway believe one is live,
so jobs wait in the real queue and the deadline, queue-depth and cancel paths run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import httpx
import pytest
import redis.asyncio as redis

from gateway.keys import KeyStore
from gateway.settings import GatewaySettings
from proto.messages import CancelJob, ChatJob, WorkerStatus
from services import liveness
from services.bus import Topology
from services.redis_client import Keys
from tests.conftest import remove_namespace
from tests.gateway.conftest import gateway_client

pytestmark = pytest.mark.integration
BOOTSTRAP = "limits-test-key"


@pytest.fixture(scope="module")
async def app_settings(namespace: str) -> AsyncIterator[GatewaySettings]:
    settings = GatewaySettings(
        namespace=f"{namespace}-lim",
        api_key=BOOTSTRAP,
        request_timeout_s=1.5,
        max_queue_depth=1,
        queue_depth_cache_s=0,
        workers_cache_s=0,
        rate_limit_per_minute=5,
        max_body_bytes=8192,
        max_context=400,
        default_max_tokens=64,
        cors_origins=["https://phone.example"],
    )
    yield settings
    await remove_namespace(settings)


@pytest.fixture(scope="module")
async def client(app_settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(app_settings) as http:
        yield http


@pytest.fixture
async def store(app_settings: GatewaySettings) -> AsyncIterator[KeyStore]:
    client = redis.Redis.from_url(app_settings.redis_url, decode_responses=True)
    yield KeyStore(client, Keys(app_settings.namespace))
    await client.aclose()


async def new_key(store: KeyStore, *scopes: str) -> dict[str, str]:
    api_key, _ = await store.create(f"test-{uuid.uuid4().hex[:6]}", list(scopes))
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture
async def fake_worker(app_settings: GatewaySettings) -> AsyncIterator[None]:
    """A live-looking worker that never consumes: jobs stay in the queue."""
    client = redis.Redis.from_url(app_settings.redis_url, decode_responses=True)
    now = datetime.now(UTC)
    status = WorkerStatus(
        worker_id="ghost",
        site="test",
        device="cpu",
        model_family=app_settings.model_family,
        base_model="demo-model",
        capacity=1,
        in_flight=0,
        started_at=now,
        updated_at=now,
    )
    keys = Keys(app_settings.namespace)
    await liveness.publish_status(client, keys, status, ttl_s=60)
    yield
    await liveness.remove_status(client, keys, "ghost")
    await client.aclose()


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


async def test_keys_are_stored_hashed_and_revocation_is_immediate(
    client: httpx.AsyncClient, store: KeyStore, app_settings: GatewaySettings
) -> None:
    api_key, record = await store.create("phone", ["chat"])
    raw = await store.client.hgetall(Keys(app_settings.namespace).api_keys())
    assert api_key not in json.dumps(raw)  # neither as a field nor inside a record
    headers = {"Authorization": f"Bearer {api_key}"}
    assert (await client.get("/v1/models", headers=headers)).status_code == 200
    assert [r.key_id for r in await store.revoke(record.key_id)] == [record.key_id]
    response = await client.get("/v1/models", headers=headers)
    assert response.status_code == 401 and error_code(response) == "invalid_api_key"


async def test_a_key_without_the_scope_gets_403(client: httpx.AsyncClient, store: KeyStore) -> None:
    context_only = await new_key(store, "context")
    response = await client.post("/chat", json={"message": "hi"}, headers=context_only)
    assert response.status_code == 403 and error_code(response) == "missing_scope"
    chat_only = await new_key(store, "chat")
    response = await client.get("/metrics", headers=chat_only)
    assert response.status_code == 403
    admin = await new_key(store, "admin")
    metrics = await client.get("/metrics", headers=admin)
    assert metrics.status_code == 200
    assert 'mesh_http_requests_total{route="/metrics",status="403"}' in metrics.text


async def test_rate_limit_answers_429_with_retry_after(
    client: httpx.AsyncClient, store: KeyStore
) -> None:
    headers = await new_key(store, "chat")
    statuses = []
    for _ in range(7):
        # No worker is live: admitted requests get 503, the limit is counted first.
        response = await client.post("/chat", json={"message": "hi"}, headers=headers)
        statuses.append(response.status_code)
    assert statuses[:5] == [503] * 5 and statuses[5:] == [429, 429]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert error_code(response) == "rate_limit_exceeded"
    other = await new_key(store, "chat")  # a limit per key, not per gateway
    assert (await client.post("/chat", json={"message": "hi"}, headers=other)).status_code == 503


async def test_bodies_over_the_limit_get_413(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {BOOTSTRAP}"}
    response = await client.post("/chat", json={"message": "x" * 9000}, headers=headers)
    assert response.status_code == 413 and error_code(response) == "body_too_large"


async def test_prompts_longer_than_the_context_get_400_before_any_worker(
    client: httpx.AsyncClient, store: KeyStore
) -> None:
    headers = await new_key(store, "chat")
    response = await client.post(
        "/generate", json={"prompt": "handoff " * 600, "max_tokens": 8}, headers=headers
    )
    assert response.status_code == 400 and error_code(response) == "context_length_exceeded"
    response = await client.post(
        "/chat", json={"message": "hi", "max_tokens": 4, "min_tokens": 9}, headers=headers
    )
    assert response.status_code == 400 and error_code(response) == "invalid_min_tokens"


async def test_openai_n_other_than_one_is_refused(
    client: httpx.AsyncClient, store: KeyStore
) -> None:
    headers = await new_key(store, "chat")
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400 and error_code(response) == "unsupported_n"


async def test_cors_allows_only_the_configured_origins(client: httpx.AsyncClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = await client.options(
        "/chat", headers={"Origin": "https://phone.example", **preflight}
    )
    assert allowed.headers["access-control-allow-origin"] == "https://phone.example"
    denied = await client.options("/chat", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in denied.headers


async def test_no_conversation_yet_is_404(client: httpx.AsyncClient, store: KeyStore) -> None:
    headers = await new_key(store, "chat")
    response = await client.get("/conversation", headers=headers)
    assert response.status_code == 404 and error_code(response) == "not_found"
    response = await client.delete("/conversation?conversation_id=nope", headers=headers)
    assert response.status_code == 200 and response.json()["deleted"] is False


async def test_deadline_gives_504_cancels_the_job_and_a_full_queue_gives_503(
    client: httpx.AsyncClient, store: KeyStore, app_settings: GatewaySettings, fake_worker: None
) -> None:
    headers = await new_key(store, "chat")
    topology = Topology(app_settings.namespace, app_settings.model_family)
    connection = await aio_pika.connect(app_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        control = await channel.declare_queue(exclusive=True)
        await control.bind(topology.control_exchange)

        waiting = asyncio.create_task(
            client.post("/chat", json={"message": "hello"}, headers=headers)
        )
        await asyncio.sleep(0.5)  # the first job now waits in the queue
        full = await client.post("/chat", json={"message": "second"}, headers=headers)
        assert full.status_code == 503 and error_code(full) == "queue_full"
        assert full.headers["Retry-After"] == "1"

        timed_out = await waiting
        assert timed_out.status_code == 504 and error_code(timed_out) == "timeout"
        message = None
        for _ in range(50):  # the cancel is sent in the background, right after the 504
            if message := await control.get(fail=False):
                break
            await asyncio.sleep(0.1)
        assert message is not None, "no CancelJob was published"
        assert CancelJob.model_validate_json(message.body).reason == "abandoned"
        await message.ack()
        # The job expires in the queue at its deadline (per-message TTL): not left behind.
        await asyncio.sleep(0.5)
        depth = await channel.declare_queue(topology.job_queue, passive=True)
        assert depth.declaration_result.message_count == 0


async def test_openapi_json_is_committed_and_current(client: httpx.AsyncClient) -> None:
    from services.paths import REPO_ROOT

    committed = json.loads((REPO_ROOT / "openapi.json").read_text())
    assert committed == client.app.openapi(), "run `make proto` and commit openapi.json"  # type: ignore[attr-defined]
    operation_ids = [
        op["operationId"] for path in committed["paths"].values() for op in path.values()
    ]
    assert all(op.replace("_", "").isalnum() and op.islower() for op in operation_ids)
    assert len(operation_ids) == len(set(operation_ids))


@pytest.mark.parametrize(
    "messages",
    [
        [("user", "hi")],
        [("system", "Be brief."), ("user", "héllo 🚀 " * 20)],
        [("user", "a"), ("assistant", "b" * 50), ("user", "naïve " * 30)],
    ],
)
def test_the_prompt_bound_never_undercounts(
    demo_model: object, messages: list[tuple[str, str]]
) -> None:
    from gateway.prompts import PromptCounter
    from proto.messages import ChatJob, ChatMessage, SamplingParams

    counter = PromptCounter.load(str(demo_model), 0)
    job = ChatJob(
        job_id="j",
        created_at=datetime.now(UTC),
        messages=[ChatMessage(role=r, content=c) for r, c in messages],  # type: ignore[arg-type]
        sampling=SamplingParams(max_tokens=1, temperature=0, top_p=1, repetition_penalty=1),
    )
    raw = job.model_copy(update={"messages": [], "prompt": messages[-1][1]})
    assert counter.upper_bound(job) >= counter.count(job)
    assert counter.upper_bound(raw) >= counter.count(raw)


async def test_bootstrap_by_hash_and_a_metrics_only_key(namespace: str) -> None:
    """MESH_API_KEY_SHA256 admits the key whose hash it is (the clear key never reaches
    the server); MESH_METRICS_API_KEY reads /metrics and nothing else."""
    from gateway.keys import key_hash

    clear, metrics_key = "mesh_hash-only-bootstrap-key", "metrics-only-key-123"
    settings = GatewaySettings(
        namespace=f"{namespace}-hash",
        api_key_sha256=key_hash(clear),
        metrics_api_key=metrics_key,
        rate_limit_per_minute=0,
    )
    try:
        async with gateway_client(settings) as http:
            admin = {"Authorization": f"Bearer {clear}"}
            assert (await http.get("/admin/adapters", headers=admin)).status_code == 200
            scraper = {"Authorization": f"Bearer {metrics_key}"}
            assert (await http.get("/metrics", headers=scraper)).status_code == 200
            denied = await http.get("/info", headers=scraper)
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "missing_scope"
    finally:
        await remove_namespace(settings)
    with pytest.raises(ValueError):
        GatewaySettings(api_key_sha256="not-a-hash")


async def test_jobs_say_whether_their_client_streams(
    client: httpx.AsyncClient, store: KeyStore, app_settings: GatewaySettings, fake_worker: None
) -> None:
    """The worker groups an unstreamed answer into fewer messages: the gateway must
    mark each job with how its client reads the answer."""
    topology = Topology(app_settings.namespace, app_settings.model_family)
    hello = [{"role": "user", "content": "hi"}]
    requests = [
        ("/chat", {"message": "hi"}, False),
        ("/chat/stream", {"message": "hi"}, True),
        ("/generate", {"prompt": "[INST] hi [/INST]"}, False),
        ("/v1/chat/completions", {"model": "demo-model", "messages": hello}, False),
        ("/v1/chat/completions", {"model": "demo-model", "messages": hello, "stream": True}, True),
    ]
    connection = await aio_pika.connect(app_settings.amqp_url)
    pending = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.job_queue, passive=True)
        for path, body, streams in requests:
            headers = await new_key(store, "chat")
            pending.append(asyncio.create_task(client.post(path, json=body, headers=headers)))
            message = None
            for _ in range(50):
                if message := await queue.get(fail=False):
                    break
                await asyncio.sleep(0.05)
            assert message is not None, f"{path}: no job was queued"
            await message.ack()  # taken, never answered: the request times out
            job = ChatJob.model_validate_json(message.body)
            assert job.stream is streams, path
        await asyncio.gather(*pending)
