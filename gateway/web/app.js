// The continuity mesh's web client: chat with streaming answers, conversations,
// the four context tiers, the model/adapter picker, and an ordered list of gateways
// (LAN desktop first, VPS next) tried in turn, then the model on the phone itself
// (device.js) when none is reachable. No build step: plain modern JS.
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
  policy: store.get("policy", "auto"), // auto: gateways in order, then the device; server; device
  answering: null, // the AbortController of the answer being written
};
// How long a gateway may take to start answering before the next one is tried.
const ANSWER_WITHIN_MS = 8000;

/** No gateway could be reached at all (as opposed to one answering with an error). */
class Unreachable extends Error {}

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
    options.signal?.addEventListener("abort", () => controller.abort());
    let response;
    try {
      response = await fetch(base.replace(/\/$/, "") + path, {
        ...options,
        signal: controller.signal,
        headers: { Authorization: `Bearer ${state.apiKey}`, ...(options.headers ?? {}) },
      });
    } catch (error) {
      if (options.signal?.aborted) throw error; // stopped by the user
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
    response.gateway = base;
    return response;
  }
  throw new Unreachable(`no gateway answered: ${failures.join("; ")}`);
}

const getJson = async (path, options) => (await request(path, options)).json();
const jsonBody = (method, body, headers = {}) => ({
  method,
  headers: { "Content-Type": "application/json", ...headers },
  body: JSON.stringify(body),
});

// -- chat -----------------------------------------------------------------------------

function bubble(role, text = "", source = "") {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  if (source) item.dataset.source = source;
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

const hostOf = (base) => new URL(base, location.href).host;
const deviceSource = (label) => `on this device${label ? ` · ${label}` : ""}`;

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

function answering(on) {
  $("send").textContent = on ? "Stop" : "Send";
  $("send").classList.toggle("stop", on);
  state.answering = on ? new AbortController() : null;
}

async function send(text) {
  answering(true);
  const { signal } = state.answering;
  const history = local.messages(state.conversationId);
  bubble("user", text);
  const answer = bubble("assistant streaming");
  try {
    if (state.policy === "device") return await answerOnDevice(answer, history, text, signal);
    try {
      // What the device answered goes into the history before the gateway reads it.
      if (outbox.turns().length) await uploadHeldTurns();
      await answerFromGateway(answer, text, signal);
    } catch (error) {
      if (!(error instanceof Unreachable) || state.policy !== "auto" || !Device.ready()) throw error;
      status(`${error.message}; answering on this device`);
      await answerOnDevice(answer, history, text, signal);
    }
  } catch (error) {
    if (signal.aborted) answer.dataset.finish = "cancelled";
    else {
      answer.classList.add("error");
      answer.textContent += `${answer.textContent ? "\n" : ""}⚠ ${error.message}`;
      status(error.message, true);
    }
  } finally {
    answer.classList.remove("streaming");
    answering(false);
  }
}

async function answerFromGateway(answer, text, signal) {
  const body = { message: text, conversation_id: state.conversationId ?? undefined };
  if (state.model) body.model = state.model;
  const response = await request("/chat/stream", { ...jsonBody("POST", body), signal });
  answer.dataset.source = `via ${hostOf(response.gateway)}`;
  for await (const { event, data } of serverSentEvents(response)) {
    if (event === "chunk") {
      answer.textContent += data.text;
      answer.scrollIntoView({ block: "end" });
    } else if (event === "done") {
      state.conversationId = data.conversation_id;
      store.set("conversationId", state.conversationId);
      answer.dataset.finish = data.finish_reason;
      local.add(state.conversationId, text, answer.textContent);
    } else if (event === "error") {
      throw new ApiError(200, data);
    }
  }
}

async function answerOnDevice(answer, history, text, signal) {
  answer.dataset.source = deviceSource(Device.held()?.label);
  const done = await Device.answer(history, text, {
    signal,
    onText: (piece) => {
      answer.textContent += piece;
      answer.scrollIntoView({ block: "end" });
    },
  });
  answer.dataset.finish = done.finishReason;
  if (signal.aborted) return; // as on a gateway: a stopped answer is not recorded
  // A conversation begun on the device gets its id here; the gateway takes it as given.
  state.conversationId ??= crypto.randomUUID().replaceAll("-", "");
  store.set("conversationId", state.conversationId);
  local.add(state.conversationId, text, done.text, done.label);
  outbox.hold(state.conversationId, text, done.text, done.label);
  status(`answered on this device (${Device.threads()} thread${Device.threads() === 1 ? "" : "s"})`);
}

// -- what the device keeps: the current conversation, and turns not uploaded yet ------

const local = {
  // {conversation_id, messages: [{role, content, answered_on?}]}: shown when offline
  messages(conversationId) {
    const kept = store.get("conversation", null);
    return kept && kept.conversation_id === conversationId ? kept.messages : [];
  },
  replace(conversationId, messages) {
    store.set("conversation", { conversation_id: conversationId, messages });
  },
  add(conversationId, user, assistant, answeredOn) {
    const messages = [...this.messages(conversationId), { role: "user", content: user }];
    messages.push({ role: "assistant", content: assistant, ...(answeredOn ? { answered_on: answeredOn } : {}) });
    this.replace(conversationId, messages);
  },
};

const outbox = {
  // [{conversation_id, turn_id, user, assistant, at, answered_on}], oldest first
  turns: () => store.get("outbox", []),
  hold(conversationId, user, assistant, answeredOn) {
    const turn = {
      conversation_id: conversationId,
      turn_id: crypto.randomUUID().replaceAll("-", ""),
      user,
      assistant,
      at: new Date().toISOString(),
      answered_on: answeredOn || "device",
    };
    store.set("outbox", [...this.turns(), turn]);
  },
  forget(turnIds) {
    store.set("outbox", this.turns().filter((t) => !turnIds.has(t.turn_id)));
  },
};

let uploading = null;
const UPLOAD_TURNS = 50; // per request: well within the gateway's body and list limits

/** Upload the turns answered on the device, conversation by conversation, in order.
 * The gateway adds each turn once (by its id), so a retry after a lost reply is safe.
 * Resolves when done, or when no gateway is reachable (the turns stay held). */
function uploadHeldTurns() {
  uploading ??= (async () => {
    const byConversation = new Map();
    for (const turn of outbox.turns()) {
      if (!byConversation.has(turn.conversation_id)) byConversation.set(turn.conversation_id, []);
      byConversation.get(turn.conversation_id).push(turn);
    }
    for (const [conversationId, turns] of byConversation) {
      for (let at = 0; at < turns.length; at += UPLOAD_TURNS) {
        const part = turns.slice(at, at + UPLOAD_TURNS);
        const body = {
          conversation_id: conversationId,
          turns: part.map(({ conversation_id, ...turn }) => turn),
        };
        try {
          await request("/conversation/turns", jsonBody("POST", body));
        } catch (error) {
          if (error instanceof Unreachable) return; // later
          status(`offline turns not uploaded yet: ${error.message}`, true);
          break; // this conversation's later turns wait behind these (its order)
        }
        outbox.forget(new Set(part.map((t) => t.turn_id)));
      }
    }
  })().finally(() => (uploading = null));
  return uploading;
}

// -- conversations ----------------------------------------------------------------------

async function showConversation(conversationId) {
  if (state.answering) return; // an answer is being written into the view: keep it
  if (!conversationId) return $("messages").replaceChildren();
  let messages;
  let fromGateway = false;
  try {
    const conversation = await getJson(`/conversation?conversation_id=${encodeURIComponent(conversationId)}`);
    messages = conversation.messages.map(({ at, ...message }) => message);
    fromGateway = true;
  } catch (error) {
    if (error.status === 404 && !outbox.turns().some((t) => t.conversation_id === conversationId)) {
      state.conversationId = null;
      store.set("conversationId", null);
      if (!state.answering) $("messages").replaceChildren();
      return;
    }
    messages = local.messages(conversationId); // offline: the copy kept here
    if (!(error instanceof Unreachable)) status(error.message, true);
  }
  // Turns answered here that no gateway has yet (an upload that failed) stay in view.
  const held = outbox.turns().filter((t) => t.conversation_id === conversationId);
  const recorded = new Set(messages.map((m) => `${m.role}\n${m.content}`));
  for (const turn of held) {
    if (recorded.has(`assistant\n${turn.assistant}`)) continue;
    messages.push({ role: "user", content: turn.user }, { role: "assistant", content: turn.assistant, answered_on: turn.answered_on });
  }
  if (fromGateway) local.replace(conversationId, messages); // what the device answers from next
  // An answer begun while the history was being read (a refresh after Settings) stays.
  if (state.answering || conversationId !== state.conversationId) return;
  $("messages").replaceChildren();
  for (const message of messages) {
    const source = message.role !== "assistant" ? "" : message.answered_on ? deviceSource(message.answered_on) : "via the mesh";
    bubble(message.role, message.content, source);
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
  $("policy").value = state.policy;
  renderDevice();
  $("settings").showModal();
}

function saveSettings() {
  state.apiKey = $("api-key").value.trim();
  const urls = $("gateways").value.split(/\s+/).map((u) => u.trim()).filter(Boolean);
  state.gateways = urls.length ? urls : [location.origin];
  state.policy = $("policy").value;
  store.set("apiKey", state.apiKey);
  store.set("gateways", state.gateways);
  store.set("policy", state.policy);
  renderPolicy();
  return refresh();
}

async function refresh() {
  await loadModels();
  await syncDevice(); // uploads the turns held here first: the history shown has them
  await showConversation(state.conversationId);
}

// -- the model on the device -------------------------------------------------------------

const megabytes = (bytes) => `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;

/** The kit from the first gateway that answers: the model listed, the system prompt now. */
async function syncDevice() {
  try {
    const response = await request("/device");
    const kit = await response.json();
    if (kit.model_url) kit.gateway = response.gateway;
    Device.saveKit(kit);
    await uploadHeldTurns();
    if (Device.ready()) Device.warmRuntimeFiles(); // an app update may have emptied the cache
  } catch (error) {
    if (!(error instanceof Unreachable)) status(`device: ${error.message}`, true);
  }
  await renderDevice();
  resumeDownload();
}

/** A download a reload or a lost network cut short goes on. */
async function resumeDownload() {
  if (!downloading && Device.kit()?.model && (await Device.interrupted())) downloadModel();
}

function renderPolicy() {
  const names = { auto: "auto", server: "server only", device: "device only" };
  $("policy-badge").textContent = names[state.policy];
}

async function renderDevice() {
  const kit = Device.kit();
  const held = Device.held();
  const listed = kit?.model;
  const parts = [];
  if (held?.verified) {
    parts.push(`On this device: ${held.label} (${held.type}, ${megabytes(held.size)})`);
  } else parts.push("No model on this device.");
  const newer = Device.newer();
  if (newer) parts.push(`A newer model is on the gateway: ${kit.model_label}, ${megabytes(newer.size)}.`);
  else if (!held?.verified && listed) parts.push(`The gateway offers ${kit.model_label}, ${megabytes(listed.size)}.`);
  else if (!listed) parts.push("The gateway offers no phone model yet.");
  if (kit?.as_of) parts.push(`Context as of ${new Date(kit.as_of).toLocaleString()}.`);
  if (!Device.supported()) parts.push("This browser cannot run a model on the device (Chrome 137 or newer can).");
  $("device-model").textContent = parts.join(" ");
  $("device-newer").hidden = !newer;
  $("download-model").hidden = !listed || (held?.verified && !newer) || Boolean(downloading) || !Device.supported();
  $("download-model").textContent = newer ? "Download the new one" : "Download";
  const interrupted = await Device.interrupted();
  $("delete-model").hidden = !held?.verified && !interrupted;
  if (interrupted && !downloading) showProgress(interrupted.have, interrupted.model.size, "download");
}

function showProgress(have, size, phase) {
  const bar = $("device-progress");
  bar.hidden = false;
  bar.max = size;
  bar.value = have;
  $("device-progress-text").textContent =
    phase === "verify" ? "checking sha256…" : `${megabytes(have)} of ${megabytes(size)}`;
}

let downloading = null;
function downloadModel() {
  const kit = Device.kit();
  const base = kit?.gateway ?? state.gateways[0];
  downloading ??= Device.download(base, state.apiKey, showProgress)
    .then(() => {
      $("device-progress-text").textContent = "ready";
      $("device-progress").hidden = true;
    })
    .catch((error) => ($("device-progress-text").textContent = `⚠ ${error.message}`))
    .finally(() => {
      downloading = null;
      renderDevice();
    });
  renderDevice(); // the Download button hides while it runs
  return downloading;
}

async function deleteModel() {
  await Device.remove();
  $("device-progress").hidden = true;
  $("device-progress-text").textContent = "";
  renderDevice();
}

// -- wiring -----------------------------------------------------------------------------

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.answering) return;
    const text = $("message").value.trim();
    if (!text) return;
    $("message").value = "";
    send(text);
  });
  $("send").addEventListener("click", (event) => {
    if (!state.answering) return;
    event.preventDefault(); // the Send button is Stop while an answer is written
    state.answering.abort();
  });
  $("download-model").addEventListener("click", downloadModel);
  $("delete-model").addEventListener("click", deleteModel);
  window.addEventListener("online", () => {
    uploadHeldTurns();
    resumeDownload();
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
  renderPolicy();
  if (!state.apiKey) openSettings(); // asked once, then kept on the device
  else refresh();
});
