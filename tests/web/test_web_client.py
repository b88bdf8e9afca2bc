"""The phone's web client in a real headless Chromium (Debian's package, driven by
Playwright) at a phone-sized viewport against the running mesh: streamed answers,
conversations after a reload, the context editor's conflict, the gateway fallback,
the installable offline shell. A screenshot lands in test-artifacts/."""

from __future__ import annotations

import socket

import httpx
import pytest

from services.launcher import MeshProcesses
from tests.web.conftest import ARTIFACTS, PHONE

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def dead_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def page(browser, mesh: MeshProcesses):
    context = browser.new_context(**PHONE)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(mesh.url + "/")
    page.fill("#api-key", mesh.api_key)  # type: ignore[attr-defined]
    page.click("#save-settings")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    yield page
    context.close()


def send(page, text: str):
    """Type and send; returns the answer bubble once it is complete, and how many
    times its text changed while it was being written."""
    page.evaluate(
        """() => {
            window.__updates = 0;
            new MutationObserver((changes) => {
                for (const change of changes)
                    for (const node of change.addedNodes)
                        if (node.classList?.contains('assistant'))
                            new MutationObserver(() => window.__updates++).observe(
                                node, {childList: true, characterData: true, subtree: true});
            }).observe(document.querySelector('#messages'), {childList: true});
        }"""
    )
    page.fill("#message", text)
    page.tap("#send")
    answer = page.locator("#messages li.assistant").last
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('#messages li.assistant')].pop();"
        " return a && !a.classList.contains('streaming'); }"
    )
    return answer, page.evaluate("window.__updates")


def test_chat_streams_and_the_conversation_survives_a_reload(page, mesh: MeshProcesses) -> None:
    assert page.evaluate("[innerWidth, innerHeight]") == [412, 915]
    assert page.evaluate("document.documentElement.scrollWidth") <= 412  # nothing overflows
    answer, updates = send(page, "What does the phone do?")
    text = answer.inner_text()
    assert text and "⚠" not in text
    assert updates >= 2, "the answer arrived in one piece, not streamed"
    assert "demo-model" in page.locator("#model").inner_text()

    page.reload()
    page.wait_for_selector("#messages li.assistant")
    assert page.locator("#messages li.user").first.inner_text() == "What does the phone do?"
    page.tap("#open-conversations")
    first = page.locator("#conversation-list li").first
    first.wait_for()
    assert first.inner_text().startswith("What does the phone do?")
    ARTIFACTS.mkdir(exist_ok=True)
    page.tap("[data-close=conversations]")
    page.screenshot(path=str(ARTIFACTS / "web-client.png"), full_page=True)
    assert (ARTIFACTS / "web-client.png").stat().st_size > 10_000


def test_a_dead_first_gateway_falls_back_to_the_second(page, mesh: MeshProcesses) -> None:
    page.tap("#open-settings")
    page.fill("#gateways", f"{dead_url()}\n{mesh.url}")
    page.click("#save-settings")
    answer, _ = send(page, "Hello from the bus")
    assert answer.inner_text() and "⚠" not in answer.inner_text()
    assert (
        page.locator("#status").inner_text().startswith(f"via {mesh.url} (after http://127.0.0.1:")
    )


def test_the_context_editor_shows_a_stale_save_as_a_conflict(page, mesh: MeshProcesses) -> None:
    headers = {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]
    project = "web-client-test"
    url = f"{mesh.url}/context/project?project={project}"
    version = httpx.get(url, headers=headers).json().get("version", 0)
    httpx.put(url, json={"content": "# Plan\n"}, headers={**headers, "If-Match": f'"v{version}"'})
    page.tap("#open-context")
    page.select_option("#tier", "project")
    page.fill("#project", project)
    page.tap("#load-tier")
    page.wait_for_function("document.querySelector('#tier-text').value === '# Plan\\n'")
    mine = page.locator("#tier-status").inner_text()
    loaded = int(mine.split()[0].lstrip("v").rstrip(","))
    # Someone else saves from another device meanwhile.
    httpx.put(
        url, json={"content": "# Their plan\n"}, headers={**headers, "If-Match": f'"v{loaded}"'}
    )
    page.fill("#tier-text", "# My plan\n")
    page.tap("#save-tier")
    status = page.locator("#tier-status.conflict")
    status.wait_for()
    assert f"v{loaded + 1} was saved meanwhile" in status.inner_text()
    assert page.locator("#tier-text").input_value() == "# My plan\n"  # nothing lost
    page.tap("#save-tier")  # on purpose, over theirs
    page.wait_for_function(
        "document.querySelector('#tier-status').textContent.startsWith('saved as')"
    )
    assert httpx.get(url, headers=headers).json()["content"] == "# My plan\n"


def test_installable_with_an_offline_shell(page, mesh: MeshProcesses) -> None:
    manifest = httpx.get(f"{mesh.url}/manifest.webmanifest").json()
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
    assert page.evaluate("navigator.serviceWorker.ready.then(r => !!r.active)")
    page.reload()  # now controlled by the service worker
    page.wait_for_function("!!navigator.serviceWorker.controller")
    page.context.set_offline(True)
    page.reload()
    assert page.locator("h1").inner_text() == "Continuity"
    assert page.evaluate("localStorage.getItem('mesh.apiKey')")  # entered once, kept
    page.context.set_offline(False)


def test_an_answer_begun_while_the_history_reloads_stays_in_view(page) -> None:
    """Saving Settings reloads the conversation; an answer sent meanwhile is kept."""
    first, _ = send(page, "What does the phone do?")
    assert first.inner_text()
    # The history takes a while to arrive (a slow gateway): the next answer starts first.
    page.evaluate(
        """() => { const original = window.fetch;
            window.fetch = (url, options) => String(url).includes('/conversation?')
                ? new Promise((done) => setTimeout(done, 1500)).then(() => original(url, options))
                : original(url, options); }"""
    )
    page.tap("#open-settings")
    page.click("#save-settings")
    page.fill("#message", "And the desktop?")
    page.tap("#send")
    page.wait_for_timeout(2500)  # past the history's arrival
    page.wait_for_function("() => !document.querySelector('#messages li.assistant.streaming')")
    texts = page.locator("#messages li").all_inner_texts()
    assert len(texts) == 4 and texts[2] == "And the desktop?", texts
    assert texts[3] and "⚠" not in texts[3]
