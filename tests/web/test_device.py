"""The phone answering on its own, in Debian's Chromium at a phone viewport, against a
mesh of its own (gateway + worker processes, greedy by default) whose registry holds
the phone model: the demo model with an adapter merged in, Q4_K_M.

Download with progress (resumed after a reload), then with every request blocked an
answer streams from the device, and its text equals llama.cpp's own greedy output
(llama-cpp-python, native) for the same GGUF file and prompt; reconnecting uploads the
offline conversation once, also across a reload. A screenshot lands in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from proto.adapters import PhoneModel
from services.launcher import MeshProcesses
from services.settings import MeshSettings
from tests.conftest import NAMESPACE, remove_namespace, running_mesh
from tests.web.conftest import ARTIFACTS, PHONE

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
T = TypeVar("T")
BASE = "demo-model"
MAX_TOKENS = 24  # the phone mesh's default answer length: what the device uses too


def gentle_adapter(demo_model: Path, out: Path, seed: int = 7) -> Path:
    """A seeded LoRA small enough that the merged model still writes words."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(demo_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.mul_(0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def phone_model(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, PhoneModel]:
    from services.gguf import export_phone
    from trainer_job.publish import write_version

    registry = tmp_path_factory.mktemp("phone-registry")
    source = gentle_adapter(demo_model, tmp_path_factory.mktemp("phone-lora"))
    write_version(source, registry, "continuity", BASE)
    return registry, export_phone(demo_model, registry, BASE, ("continuity", 1), "q4_k_m")


@pytest.fixture(scope="module")
def phone_mesh(phone_model: tuple[Path, PhoneModel], tmp_path_factory) -> Iterator[MeshProcesses]:
    registry, _ = phone_model
    namespace = f"{NAMESPACE}p"
    logs = tmp_path_factory.mktemp("phone-logs")
    try:
        with running_mesh(
            namespace,
            logs,
            registry,
            MESH_TEMPERATURE="0",
            MESH_DEFAULT_MAX_TOKENS=str(MAX_TOKENS),
        ) as processes:
            yield processes
    finally:
        aside(remove_namespace(MeshSettings(namespace=namespace)))


def aside(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end from a test: Playwright's sync API holds this thread's
    event loop, so on a thread of its own."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


@pytest.fixture
def phone(browser, phone_mesh: MeshProcesses):
    context = browser.new_context(**PHONE)
    context.set_default_timeout(60_000)
    # Every value the download's progress bar shows, from the first one after a load.
    context.add_init_script(
        """window.__progress = [];
        document.addEventListener('DOMContentLoaded', () => new MutationObserver(() =>
            window.__progress.push(Number(document.querySelector('#device-progress').value))
        ).observe(document.querySelector('#device-progress'), {attributes: true}));"""
    )
    page = context.new_page()
    # What the page and its workers say shows in a failing test's captured output.
    page.on("console", lambda message: print(f"console {message.type}: {message.text}"))
    page.on("pageerror", lambda error: print(f"page error: {error}"))
    page.goto(phone_mesh.url + "/")
    page.fill("#api-key", phone_mesh.api_key)  # type: ignore[attr-defined]
    page.select_option("#policy", "auto")
    page.click("#save-settings")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    yield page
    context.close()


def headers(mesh: MeshProcesses) -> dict[str, str]:
    return {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]


def native_greedy(
    model: PhoneModel, gguf: Path, messages: list[dict[str, str]], demo_model: Path
) -> str:
    """llama.cpp's own greedy answer for the prompt the server's template makes, with
    the tokens the device never says banned as it bans them."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(demo_model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=2, verbose=False)
    out = llm.create_completion(
        prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        top_k=1,
        repeat_penalty=1.0,
        logit_bias=dict.fromkeys(model.unsaid_tokens, float("-inf")),
    )
    return out["choices"][0]["text"]


def download(page) -> dict:
    """Download the gateway's phone model from the settings; the model held after."""
    page.tap("#open-settings")
    page.click("#download-model")
    page.wait_for_function(
        """() => { const held = JSON.parse(localStorage.getItem('mesh.device.held') ?? 'null');
            const kit = JSON.parse(localStorage.getItem('mesh.device.kit'));
            return held?.verified && held.file === kit.model.file; }"""
    )
    page.wait_for_function(
        "document.querySelector('#device-progress-text').textContent === 'ready'"
    )
    page.click("#save-settings")
    return page.evaluate("JSON.parse(localStorage.getItem('mesh.device.held'))")


def files_on_device(page) -> list[str]:
    return sorted(
        page.evaluate(
            """async () => {
                const root = await navigator.storage.getDirectory();
                const folder = await root.getDirectoryHandle('models', {create: true});
                const names = [];
                for await (const name of folder.keys()) names.push(name);
                return names;
            }"""
        )
    )


def last_answer(page) -> dict:
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('#messages li.assistant')].pop();"
        " return a && !a.classList.contains('streaming'); }"
    )
    return page.evaluate(
        "() => { const a = [...document.querySelectorAll('#messages li.assistant')].pop();"
        " return {text: a.textContent, source: a.dataset.source ?? '',"
        " finish: a.dataset.finish ?? '', error: a.classList.contains('error')}; }"
    )


def send(page, text: str) -> dict:
    page.fill("#message", text)
    page.tap("#send")
    return last_answer(page)


def test_the_kit_and_the_model_file_are_served_to_a_chat_key(
    phone_mesh: MeshProcesses, phone_model: tuple[Path, PhoneModel]
) -> None:
    _, model = phone_model
    kit = httpx.get(f"{phone_mesh.url}/device", headers=headers(phone_mesh)).json()
    assert kit["model"] == model.model_dump(mode="json")
    assert kit["model_label"] == "demo-model+continuity@v1"
    assert "You are the owner's continuity assistant." in kit["system_prompt"]
    url = phone_mesh.url + kit["model_url"]
    whole = httpx.get(url, headers=headers(phone_mesh))
    assert whole.status_code == 200 and len(whole.content) == model.size
    assert whole.headers["accept-ranges"] == "bytes"
    rest = httpx.get(url, headers={**headers(phone_mesh), "Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.content == whole.content[1000:]
    assert rest.headers["content-range"] == f"bytes 1000-{model.size - 1}/{model.size}"
    assert httpx.get(url).status_code == 401
    other = httpx.get(
        f"{phone_mesh.url}/device/model/{BASE}/phone-other-v9-q8_0.gguf",
        headers=headers(phone_mesh),
    )
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"


def test_the_page_is_cross_origin_isolated(phone) -> None:
    """COOP/COEP from the gateway: the runtime may use threads."""
    assert phone.evaluate("crossOriginIsolated") is True


def test_offline_the_device_answers_as_llama_cpp_and_the_turns_upload_once(
    phone, phone_mesh: MeshProcesses, phone_model: tuple[Path, PhoneModel], demo_model: Path
) -> None:
    registry, model = phone_model
    page = phone
    # Begin the download by hand (the first 40 % of the file), as if a reload had cut
    # it short: the page resumes it with a range request and checks the sha256.
    cut = int(model.size * 0.4)
    page.evaluate(
        """async ([url, key, model, cut]) => {
            const response = await fetch(url, {headers: {Authorization: `Bearer ${key}`,
                                                         Range: `bytes=0-${cut - 1}`}});
            const part = new Uint8Array(await response.arrayBuffer());
            const root = await navigator.storage.getDirectory();
            const folder = await root.getDirectoryHandle('models', {create: true});
            const file = await folder.getFileHandle(`${model.sha256}.gguf`, {create: true});
            const writable = await file.createWritable();
            await writable.write(part);
            await writable.close();
            localStorage.setItem('mesh.device.downloading', JSON.stringify(model));
        }""",
        [
            f"{phone_mesh.url}/device/model/{BASE}/{model.file}",
            phone_mesh.api_key,  # type: ignore[attr-defined]
            model.model_dump(mode="json"),
            cut,
        ],
    )
    page.reload()
    page.wait_for_function(
        "JSON.parse(localStorage.getItem('mesh.device.held') ?? 'null')?.verified"
    )
    progress = page.evaluate("window.__progress")
    assert progress and min(p for p in progress if p > 0) >= cut, progress  # resumed, not restarted
    page.tap("#open-settings")
    assert "demo-model+continuity@v1 (q4_k_m" in page.locator("#device-model").inner_text()
    assert page.locator("#delete-model").is_visible()
    page.click("#save-settings")
    assert page.evaluate("navigator.serviceWorker.ready.then(r => !!r.active)")

    # One answer from the gateway first: the conversation the device continues.
    online = send(page, "What does the phone do?")
    assert online["source"] == f"via {phone_mesh.url.split('//')[1]}" and not online["error"]
    conversation_id = page.evaluate("JSON.parse(localStorage.getItem('mesh.conversationId'))")

    # The network cut: every request fails, the gateways are unreachable.
    page.context.set_offline(True)
    page.context.route("**/*", lambda route: route.abort())
    question = "Where do my notes live?"
    offline = send(page, question)
    assert offline["source"] == "on this device · demo-model+continuity@v1", offline
    assert not offline["error"] and offline["text"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "device-answer.png"), full_page=True)

    kit = page.evaluate("JSON.parse(localStorage.getItem('mesh.device.kit'))")
    messages = [
        {"role": "system", "content": kit["system_prompt"]},
        {"role": "user", "content": "What does the phone do?"},
        {"role": "assistant", "content": online["text"]},
        {"role": "user", "content": question},
    ]
    gguf = registry / "_base" / BASE / model.file
    assert model.unsaid_tokens  # the demo model's tool-call marker
    assert offline["text"] == native_greedy(model, gguf, messages, demo_model)

    # Still offline, the page reloads: the conversation and its held turn are kept.
    page.reload()
    page.wait_for_selector("#messages li.assistant[data-source^='on this device']")
    assert len(page.evaluate("JSON.parse(localStorage.getItem('mesh.outbox'))")) == 1

    held = page.evaluate("JSON.parse(localStorage.getItem('mesh.outbox'))")

    # Back online: the held turn goes up once, however often it is uploaded.
    page.context.unroute("**/*")
    page.context.set_offline(False)
    page.reload()
    page.wait_for_function("JSON.parse(localStorage.getItem('mesh.outbox') ?? '[]').length === 0")
    again = httpx.post(  # as if the first upload's reply had been lost
        f"{phone_mesh.url}/conversation/turns",
        json={
            "conversation_id": conversation_id,
            "turns": [{k: v for k, v in t.items() if k != "conversation_id"} for t in held],
        },
        headers=headers(phone_mesh),
    ).json()
    assert (again["recorded"], again["already_recorded"]) == (0, 1)
    history = httpx.get(
        f"{phone_mesh.url}/conversation",
        params={"conversation_id": conversation_id},
        headers=headers(phone_mesh),
    ).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        (m["role"], m["content"]) for m in messages[1:]
    ] + [("assistant", offline["text"])]
    assert history[-1]["answered_on"] == "demo-model+continuity@v1"
    assert history[1]["answered_on"] is None  # the gateway answered that one


def test_the_same_turn_uploaded_twice_is_recorded_once(phone_mesh: MeshProcesses) -> None:
    body = {
        "conversation_id": "device-upload-test",
        "turns": [
            {
                "turn_id": f"turn-{n}-{secrets.token_hex(4)}",
                "user": f"question {n}",
                "assistant": f"answer {n}",
                "at": f"2026-11-30T10:0{n}:00+00:00",
                "answered_on": "demo-model",
            }
            for n in range(3)
        ],
    }
    url = f"{phone_mesh.url}/conversation/turns"
    first = httpx.post(url, json=body, headers=headers(phone_mesh)).json()
    again = httpx.post(url, json=body, headers=headers(phone_mesh)).json()
    assert (first["recorded"], first["already_recorded"]) == (3, 0)
    assert (again["recorded"], again["already_recorded"]) == (0, 3)
    history = httpx.get(
        f"{phone_mesh.url}/conversation",
        params={"conversation_id": "device-upload-test"},
        headers=headers(phone_mesh),
    ).json()["messages"]
    assert [m["content"] for m in history] == [
        text for n in range(3) for text in (f"question {n}", f"answer {n}")
    ]
    # A phone whose clock runs ahead: recorded as now, not as the key's latest forever.
    ahead = {
        "conversation_id": "device-clock-ahead",
        "turns": [
            {
                **body["turns"][0],
                "turn_id": f"ahead-{secrets.token_hex(4)}",
                "at": "2999-01-01T00:00:00+00:00",
            }
        ],
    }
    before = datetime.now(UTC)
    assert httpx.post(url, json=ahead, headers=headers(phone_mesh)).json()["recorded"] == 1
    [asked, _] = httpx.get(
        f"{phone_mesh.url}/conversation",
        params={"conversation_id": "device-clock-ahead"},
        headers=headers(phone_mesh),
    ).json()["messages"]
    assert before <= datetime.fromisoformat(asked["at"]) <= datetime.now(UTC)
    bad = httpx.post(url, json={**body, "turns": []}, headers=headers(phone_mesh))
    assert bad.status_code == 422 and json.loads(bad.text)["error"]["code"] == "invalid_body"


def test_stop_ends_a_device_answer_and_it_is_not_recorded(phone, demo_model: Path) -> None:
    from transformers import AutoTokenizer

    page = phone
    download(page)
    page.tap("#open-settings")
    page.select_option("#policy", "device")
    page.click("#save-settings")
    assert page.locator("#policy-badge").inner_text() == "device only"
    # An answer that cannot end by itself (end of text banned, 1,500 tokens), so only
    # Stop ends it.
    eos = AutoTokenizer.from_pretrained(demo_model).eos_token_id
    # The kit is changed below: no refresh may bring the gateway's back meanwhile (the
    # ones Settings started are waited out; later ones cannot reach /device).
    page.route("**/device", lambda route: route.abort())
    page.evaluate("refresh()")
    page.evaluate(
        """async (eos) => { await refresh();
            const kit = JSON.parse(localStorage.getItem('mesh.device.kit'));
            kit.max_tokens = 1500;
            localStorage.setItem('mesh.device.kit', JSON.stringify(kit));
            const held = JSON.parse(localStorage.getItem('mesh.device.held'));
            held.unsaid_tokens.push(eos);
            localStorage.setItem('mesh.device.held', JSON.stringify(held)); }""",
        eos,
    )
    page.fill("#message", "Tell me everything about the mesh.")
    page.tap("#send")
    page.wait_for_function(
        "document.querySelector('#messages li.assistant.streaming')?.textContent.length > 20"
    )
    assert page.locator("#send").inner_text() == "Stop"  # the page answers meanwhile
    page.tap("#send")
    stopped = last_answer(page)
    assert stopped["finish"] == "cancelled" and not stopped["error"]
    assert page.locator("#send").inner_text() == "Send"
    assert page.evaluate("JSON.parse(localStorage.getItem('mesh.outbox') ?? '[]')") == []
    # The runtime is free again: the next answer comes.
    page.evaluate(
        """() => { const kit = JSON.parse(localStorage.getItem('mesh.device.kit'));
            kit.max_tokens = 8;
            localStorage.setItem('mesh.device.kit', JSON.stringify(kit)); }"""
    )
    after = send(page, "And the phone?")
    assert after["text"] and after["source"].startswith("on this device")


def test_without_cross_origin_isolation_the_device_answers_on_one_thread(
    browser, phone_mesh: MeshProcesses, phone_model: tuple[Path, PhoneModel], demo_model: Path
) -> None:
    """A proxy that drops COOP/COEP: no threads, the same answer."""
    registry, model = phone_model
    context = browser.new_context(**PHONE)
    context.set_default_timeout(60_000)

    def without_isolation(route) -> None:
        response = route.fetch()
        dropped = {"cross-origin-opener-policy", "cross-origin-embedder-policy"}
        kept = {k: v for k, v in response.headers.items() if k.lower() not in dropped}
        route.fulfill(response=response, headers=kept)

    context.route("**/*", without_isolation)
    page = context.new_page()
    page.on("console", lambda message: print(f"console {message.type}: {message.text}"))
    page.on("pageerror", lambda error: print(f"page error: {error}"))
    try:
        page.goto(phone_mesh.url + "/")
        assert page.evaluate("crossOriginIsolated") is False
        page.fill("#api-key", phone_mesh.api_key)  # type: ignore[attr-defined]
        page.select_option("#policy", "device")
        page.click("#save-settings")
        download(page)
        answer = send(page, "What does the phone do?")
        assert not answer["error"], answer
        assert page.evaluate("Device.threads()") == 1
        kit = page.evaluate("JSON.parse(localStorage.getItem('mesh.device.kit'))")
        messages = [
            {"role": "system", "content": kit["system_prompt"]},
            {"role": "user", "content": "What does the phone do?"},
        ]
        gguf = registry / "_base" / BASE / model.file
        assert answer["text"] == native_greedy(model, gguf, messages, demo_model)
    finally:
        context.close()


def test_a_chat_only_key_uploads_turns_but_gets_neither_the_tiers_nor_the_model(
    phone_mesh: MeshProcesses, phone_model: tuple[Path, PhoneModel]
) -> None:
    """The kit carries the tiers and the model the owner's adapter: scope `context`."""
    import redis.asyncio as redis

    from gateway.keys import KeyStore
    from services.redis_client import Keys

    namespace = phone_mesh.namespace  # type: ignore[attr-defined]

    async def create() -> str:
        client = redis.Redis.from_url(MeshSettings(namespace=namespace).redis_url)
        try:
            return (await KeyStore(client, Keys(namespace)).create("chat-only", ["chat"]))[0]
        finally:
            await client.aclose()

    chat_only = {"Authorization": f"Bearer {aside(create())}"}
    _, model = phone_model
    for path in ("/device", f"/device/model/{BASE}/{model.file}"):
        refused = httpx.get(phone_mesh.url + path, headers=chat_only)
        assert refused.status_code == 403, path
        assert refused.json()["error"]["code"] == "missing_scope"
    turn = {
        "turn_id": f"chat-only-{secrets.token_hex(4)}",
        "user": "question",
        "assistant": "answer",
        "at": datetime.now(UTC).isoformat(),
        "answered_on": "demo-model",
    }
    uploaded = httpx.post(
        f"{phone_mesh.url}/conversation/turns",
        json={"conversation_id": "chat-only", "turns": [turn]},
        headers=chat_only,
    )
    assert uploaded.status_code == 200 and uploaded.json()["recorded"] == 1


def test_a_newer_model_is_noticed_and_replaces_the_old_one(
    phone, phone_model: tuple[Path, PhoneModel], demo_model: Path, tmp_path_factory
) -> None:
    """Last in this module: it publishes a second version into the phone mesh's registry."""
    from services.gguf import export_phone
    from trainer_job.publish import write_version

    registry, first = phone_model
    page = phone
    assert download(page)["file"] == first.file
    assert files_on_device(page) == [f"{first.sha256}.gguf"]
    page.tap("#open-settings")
    assert page.locator("#device-newer").is_hidden()
    page.click("#save-settings")

    source = gentle_adapter(demo_model, tmp_path_factory.mktemp("phone-lora-2"), seed=8)
    write_version(source, registry, "continuity", BASE)
    second = export_phone(demo_model, registry, BASE, ("continuity", 2), "q8_0")
    page.reload()
    page.wait_for_function(
        "JSON.parse(localStorage.getItem('mesh.device.kit')).model.type === 'q8_0'"
    )
    page.tap("#open-settings")
    page.locator("#device-newer").wait_for()
    assert "demo-model+continuity@v2" in page.locator("#device-model").inner_text()
    assert page.locator("#download-model").inner_text() == "Download the new one"
    page.click("#save-settings")
    assert download(page)["file"] == second.file
    assert files_on_device(page) == [f"{second.sha256}.gguf"]  # the old file is gone
    page.tap("#open-settings")
    assert page.locator("#device-newer").is_hidden()
    page.click("#delete-model")
    page.wait_for_function(
        "!localStorage.getItem('mesh.device.held') || "
        "localStorage.getItem('mesh.device.held') === 'null'"
    )
    assert files_on_device(page) == []
    assert "No model on this device." in page.locator("#device-model").inner_text()
