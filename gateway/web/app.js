// The continuity mesh's web client: chat with streaming answers, conversations,
// the four context tiers, the model/adapter picker, and an ordered list of gateways
// (LAN desktop first, VPS next) tried in turn. No build step: plain modern JS.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get: (name, fallback) => JSON.parse(localStorage.getItem(`mesh.${name}`) ?? "null") ?? fallback,
  set: (name, value) => localStorage.setItem(`mesh.${name}`, JSON.stringify(value)),
};
const state = {
  apiKey: store.get("apiKey", ""),
  gateways: store.get("gateways", [location.origin]),
  conversationId: store.get("conversationId", null),
  model: store.get("model", ""),
  tierVersion: 0,
  tierEtag: "", // the loaded version's ETag ('"<hlc>-<site>"'); empty for a new document
  sending: false,
};
// How long a gateway may take to start answering before the next one is tried.
const ANSWER_WITHIN_MS = 8000;

class ApiError extends Error {
  constructor(status, body, headers) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code ?? "";
    this.headers = headers;
  }
}

function status(text, isError = false) {
  const footer = $("status");
  footer.textContent = text;
  footer.classList.toggle("error", isError);
}

// -- transport: the first gateway that answers --------------------------------------

async function request(path, options = {}) {
  const failures = [];
  for (const base of state.gateways) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), ANSWER_WITHIN_MS);
    let response;
    try {
      response = await fetch(base.replace(/\/$/, "") + path, {
        ...options,
        signal: controller.signal,
        headers: { Authorization: `Bearer ${state.apiKey}`, ...(options.headers ?? {}) },
      });
    } catch (error) {
      failures.push(`${base}: ${error.name === "AbortError" ? "no answer" : "unreachable"}`);
      continue;
    } finally {
      clearTimeout(timer); // headers arrived: a stream may now take its time
    }
    if ((response.status === 502 || response.status === 503) && base !== state.gateways.at(-1)) {
      failures.push(`${base}: HTTP ${response.status}`);
      continue;
    }
    status(`via ${base}${failures.length ? ` (after ${failures.join("; ")})` : ""}`);
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new ApiError(response.status, body, response.headers);
    }
    return response;
  }
  throw new Error(`no gateway answered: ${failures.join("; ")}`);
}

const getJson = async (path, options) => (await request(path, options)).json();
const jsonBody = (method, body, headers = {}) => ({
  method,
  headers: { "Content-Type": "application/json", ...headers },
  body: JSON.stringify(body),
});

// -- chat -----------------------------------------------------------------------------

function bubble(role, text = "") {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function send(text) {
  state.sending = true;
  $("send").disabled = true;
  bubble("user", text);
  const answer = bubble("assistant streaming");
  try {
    const body = { message: text, conversation_id: state.conversationId ?? undefined };
    if (state.model) body.model = state.model;
    const response = await request("/chat/stream", jsonBody("POST", body));
    for await (const { event, data } of serverSentEvents(response)) {
      if (event === "chunk") {
        answer.textContent += data.text;
        answer.scrollIntoView({ block: "end" });
      } else if (event === "done") {
        state.conversationId = data.conversation_id;
        store.set("conversationId", state.conversationId);
        answer.dataset.finish = data.finish_reason;
      } else if (event === "error") {
        throw new ApiError(200, data);
      }
    }
  } catch (error) {
    answer.classList.add("error");
    answer.textContent += `${answer.textContent ? "\n" : ""}⚠ ${error.message}`;
    status(error.message, true);
  } finally {
    answer.classList.remove("streaming");
    state.sending = false;
    $("send").disabled = false;
  }
}

// -- conversations ----------------------------------------------------------------------

async function showConversation(conversationId) {
  $("messages").replaceChildren();
  if (!conversationId) return;
  try {
    const conversation = await getJson(`/conversation?conversation_id=${encodeURIComponent(conversationId)}`);
    for (const message of conversation.messages) bubble(message.role, message.content);
  } catch (error) {
    if (error.status === 404) {
      state.conversationId = null;
      store.set("conversationId", null);
    } else status(error.message, true);
  }
}

async function listConversations() {
  const list = $("conversation-list");
  list.replaceChildren();
  try {
    const { conversations } = await getJson("/conversations?limit=50");
    for (const c of conversations) {
      const item = document.createElement("li");
      item.dataset.id = c.conversation_id;
      item.textContent = c.title;
      const when = document.createElement("small");
      when.textContent = `${new Date(c.updated_at).toLocaleString()} · ${c.messages} messages`;
      item.append(when);
      item.addEventListener("click", async () => {
        state.conversationId = c.conversation_id;
        store.set("conversationId", state.conversationId);
        $("conversations").hidden = true;
        await showConversation(state.conversationId);
      });
      list.append(item);
    }
  } catch (error) {
    status(error.message, true);
  }
}

// -- context tiers ----------------------------------------------------------------------

function tierPath() {
  const tier = $("tier").value;
  const project = $("project").value.trim();
  return tier === "project" ? `/context/project?project=${encodeURIComponent(project)}` : `/context/${tier}`;
}

function tierStatus(text, conflict = false) {
  $("tier-status").textContent = text;
  $("tier-status").classList.toggle("conflict", conflict);
}

async function loadTier() {
  const tier = $("tier").value;
  $("project").hidden = tier !== "project";
  try {
    if (tier === "log") {
      const page = await getJson("/context/log?limit=20");
      $("tier-text").value = page.entries.map((e) => `## ${e.written_at} (${e.site})\n${e.text}`).join("\n\n");
      $("save-tier").textContent = "Append";
      tierStatus(`${page.entries.length} recent entries; write a new one and Append`);
      state.tierVersion = 0;
      state.tierEtag = "";
      return;
    }
    $("save-tier").textContent = "Save";
    const document_ = await getJson(tierPath());
    $("tier-text").value = document_.content;
    state.tierVersion = document_.version;
    state.tierEtag = versionTag(document_);
    tierStatus(`v${document_.version}, saved by ${document_.site}`);
  } catch (error) {
    if (error.status === 404) {
      $("tier-text").value = "";
      state.tierVersion = 0;
      state.tierEtag = "";
      tierStatus("new document");
    } else tierStatus(error.message, true);
  }
}

function versionTag(document_) {
  return `"${document_.hlc}-${document_.site}"`;
}

async function saveTier() {
  const text = $("tier-text").value;
  try {
    if ($("tier").value === "log") {
      await request("/context/log", jsonBody("POST", { text }));
      return loadTier();
    }
    // The ETag names the version on every gateway (LAN or VPS), once they have synced.
    const ifMatch = state.tierEtag || `"v${state.tierVersion}"`;
    const saved = await getJson(tierPath(), jsonBody("PUT", { content: text }, { "If-Match": ifMatch }));
    state.tierVersion = saved.version;
    state.tierEtag = versionTag(saved);
    tierStatus(`saved as v${saved.version}`);
  } catch (error) {
    if (error.status === 412) {
      // Keep the owner's text; saving again writes over the newer version on purpose.
      state.tierEtag = error.headers?.get("ETag") ?? state.tierEtag;
      const number = error.headers?.get("X-Context-Version");
      state.tierVersion = Number(number) || state.tierVersion;
      const current = number ? `v${number}` : "a newer version";
      tierStatus(`Conflict: ${current} was saved meanwhile. Your text is kept: Load to see theirs, or Save again to replace it.`, true);
    } else tierStatus(error.message, true);
  }
}

// -- models and settings ----------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const { data } = await getJson("/v1/models");
    select.replaceChildren(...data.map((m) => new Option(m.parent ? `${m.id} (adapter)` : m.id, m.id)));
    if (state.model && data.some((m) => m.id === state.model)) select.value = state.model;
    else state.model = select.value;
  } catch (error) {
    status(error.message, true);
  }
}

function openSettings() {
  $("api-key").value = state.apiKey;
  $("gateways").value = state.gateways.join("\n");
  $("settings").showModal();
}

function saveSettings() {
  state.apiKey = $("api-key").value.trim();
  const urls = $("gateways").value.split(/\s+/).map((u) => u.trim()).filter(Boolean);
  state.gateways = urls.length ? urls : [location.origin];
  store.set("apiKey", state.apiKey);
  store.set("gateways", state.gateways);
  return refresh();
}

async function refresh() {
  await loadModels();
  await showConversation(state.conversationId);
}

// -- wiring -----------------------------------------------------------------------------

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || state.sending) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("model").addEventListener("change", () => {
    state.model = $("model").value;
    store.set("model", state.model);
  });
  $("open-conversations").addEventListener("click", () => {
    $("conversations").hidden = false;
    listConversations();
  });
  $("new-conversation").addEventListener("click", () => {
    state.conversationId = null;
    store.set("conversationId", null);
    $("messages").replaceChildren();
    $("conversations").hidden = true;
  });
  $("open-context").addEventListener("click", () => {
    $("context").hidden = false;
    loadTier();
  });
  $("tier").addEventListener("change", loadTier);
  $("load-tier").addEventListener("click", loadTier);
  $("save-tier").addEventListener("click", saveTier);
  $("open-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettings);
  for (const button of document.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => ($(button.dataset.close).hidden = true));
  }
}

window.addEventListener("DOMContentLoaded", () => {
  wire();
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("/sw.js").catch((error) => status(`offline shell: ${error.message}`));
  }
  if (!state.apiKey) openSettings(); // asked once, then kept on the device
  else refresh();
});
