// The phone answering on its own: the model it keeps (downloaded from the gateway into
// the origin private file system, resumable, sha256-checked), and answers from
// llama.cpp compiled to WebAssembly (wllama, which runs it in a Web Worker; threads
// when the page is cross-origin isolated, one otherwise), with the chat template in
// the GGUF (the server's own) and the system prompt last synced from a gateway.
"use strict";

const Device = (() => {
  const WLLAMA = "/app/wllama/index.js";
  const WASM = "/app/wllama/wllama.wasm";
  const MAX_CONTEXT = 4096; // tokens: the KV cache a phone can afford beside the weights
  const CHARS_PER_TOKEN = 3; // a cautious estimate for trimming the history to fit
  const keep = {
    get: (name, fallback) => JSON.parse(localStorage.getItem(`mesh.device.${name}`) ?? "null") ?? fallback,
    set: (name, value) => localStorage.setItem(`mesh.device.${name}`, JSON.stringify(value)),
  };
  let runtime = null; // {wllama, sha256, context}: the loaded model
  let loading = null;
  let downloader = null; // {worker, finish}: the download worker, while one runs

  // -- what the gateway says (GET /device), kept for when none is reachable --------------

  /** The last kit synced: {model, model_url, model_label, system_prompt, history_messages, max_tokens, temperature, as_of}. */
  const kit = () => keep.get("kit", null);
  const saveKit = (value) => keep.set("kit", value);
  /** The model on this device: the kit's model fields, `verified` once its sha256 matched. */
  const held = () => keep.get("held", null);
  /** Files are named by their content: a re-export under the same name is another file. */
  const localName = (model) => `${model.sha256}.gguf`;

  /** JSPI and memory64 (the runtime's build) and the origin private file system. */
  const supported = () =>
    typeof WebAssembly.Suspending === "function" && typeof navigator.storage?.getDirectory === "function";

  async function modelsFolder() {
    const root = await navigator.storage.getDirectory();
    return root.getDirectoryHandle("models", { create: true });
  }

  async function bytesOnDisk(model) {
    try {
      return (await (await (await modelsFolder()).getFileHandle(localName(model))).getFile()).size;
    } catch {
      return 0;
    }
  }

  const ready = () => Boolean(held()?.verified);
  /** A newer model than the one held: the kit lists another file. */
  const newer = () => {
    const listed = kit()?.model;
    return listed && held()?.verified && listed.sha256 !== held().sha256 ? listed : null;
  };

  // -- download ------------------------------------------------------------------------

  /** Download (or resume) the kit's model from `base`; `onProgress(have, size, phase)`. */
  async function download(base, apiKey, onProgress) {
    const { model, model_url: url, model_label: label } = kit() ?? {};
    if (!model) throw new Error("the gateway has no phone model yet (export-gguf --phone)");
    if (!supported()) throw new Error("this browser cannot run a model (Chrome 137 or newer can)");
    const unfinished = keep.get("downloading", null);
    if (unfinished && unfinished.sha256 !== model.sha256) await removeFile(unfinished); // superseded
    keep.set("downloading", model); // a reload resumes this one
    navigator.storage.persist?.().catch(() => false); // keep it when storage runs low
    await new Promise((resolve, reject) => {
      const worker = new Worker("/app/download-worker.js");
      const finish = (error) => {
        worker.terminate();
        downloader = null;
        error ? reject(error) : resolve();
      };
      downloader = { worker, finish };
      worker.onerror = (event) => finish(new Error(`download: ${event.message ?? "the worker failed"}`));
      worker.onmessage = ({ data }) => {
        if (data.type === "progress") onProgress(data.have, data.size, "download");
        else if (data.type === "verifying") onProgress(data.have, data.size, "verify");
        else finish(data.type === "error" ? new Error(data.message) : null);
      };
      const target = { ...model, file: localName(model) };
      worker.postMessage({ type: "download", url: base.replace(/\/$/, "") + url, apiKey, model: target });
    });
    const previous = held();
    keep.set("held", { ...model, label, verified: true }); // the label as the gateway writes it
    keep.set("downloading", null);
    if (previous && previous.sha256 !== model.sha256) await removeFile(previous);
    await warmRuntimeFiles();
    return held();
  }

  /** The download a reload interrupted, with the bytes already on disk. */
  async function interrupted() {
    const model = keep.get("downloading", null);
    return model ? { model, have: await bytesOnDisk(model) } : null;
  }

  async function removeFile(model) {
    try {
      await (await modelsFolder()).removeEntry(localName(model));
    } catch {
      /* already gone */
    }
  }

  async function remove() {
    downloader?.finish(new Error("deleted")); // it holds the file open: stop it first
    await unload();
    for (const model of [held(), keep.get("downloading", null)]) if (model) await removeFile(model);
    keep.set("held", null);
    keep.set("downloading", null);
  }

  /** The runtime's own files, fetched once so the service worker keeps them offline
   * (again after an app update emptied its cache). */
  async function warmRuntimeFiles() {
    for (const path of [WLLAMA, WASM]) {
      if (!(await caches.match(path).catch(() => null))) await fetch(path).catch(() => null);
    }
  }

  // -- answers -------------------------------------------------------------------------

  async function load() {
    const model = held();
    if (!model?.verified) throw new Error("no model on this device: download it in Settings");
    if (runtime?.sha256 === model.sha256) return runtime;
    loading ??= (async () => {
      await unload(); // a model replaced by a newer one
      const { Wllama } = await import(WLLAMA);
      const wllama = new Wllama({ default: WASM }, { suppressNativeLog: true });
      const file = await (await (await modelsFolder()).getFileHandle(localName(model))).getFile();
      await wllama.loadModel([file], { n_ctx: MAX_CONTEXT, n_gpu_layers: 0 });
      const context = Math.min(MAX_CONTEXT, wllama.getModelMetadata()?.hparams?.nCtxTrain || MAX_CONTEXT);
      runtime = { wllama, sha256: model.sha256, context };
      return runtime;
    })().finally(() => (loading = null));
    return loading;
  }

  async function unload() {
    const loaded = runtime;
    runtime = null;
    await loaded?.wllama.exit().catch(() => null);
  }

  /** Messages as the gateway builds them: system prompt, the recent history, the
   * message; the oldest turns dropped while the whole would not fit `context` tokens. */
  function messagesFor(history, text, context = MAX_CONTEXT, maxTokens = 256) {
    const synced = kit();
    const system = synced?.system_prompt ? [{ role: "system", content: synced.system_prompt }] : [];
    const window = synced?.history_messages ?? 20;
    const recent = window > 0 ? history.slice(-window).map(({ role, content }) => ({ role, content })) : [];
    const user = { role: "user", content: text };
    const size = (messages) => messages.reduce((n, m) => n + m.content.length + 16, 0) / CHARS_PER_TOKEN;
    while (recent.length && size([...system, ...recent, user]) + maxTokens > context) recent.splice(0, 2);
    while (recent.length && recent[0].role !== "user") recent.shift(); // never start with an answer
    return [...system, ...recent, user];
  }

  /** Stream an answer on the device: `onText(piece)`; `signal` stops it. Resolves with
   * {text, finishReason, label}. */
  async function answer(history, text, { onText, signal, temperature, maxTokens }) {
    const { wllama, context } = await load();
    const synced = kit();
    const unsaid = held()?.unsaid_tokens ?? []; // llama-server's form: [[token, false]] is never picked
    const length = maxTokens ?? synced?.max_tokens ?? 256;
    let full = "";
    let finishReason = "stop";
    const stream = await wllama.createChatCompletion({
      messages: messagesFor(history, text, context, length),
      stream: true,
      temperature: temperature ?? synced?.temperature ?? 0.7,
      max_tokens: length,
      logit_bias: unsaid.map((token) => [token, false]),
      abortSignal: signal,
    });
    try {
      for await (const chunk of stream) {
        const choice = chunk.choices?.[0];
        const piece = choice?.delta?.content ?? "";
        if (piece) {
          full += piece;
          onText(piece);
        }
        if (choice?.finish_reason) finishReason = choice.finish_reason;
      }
    } catch (error) {
      if (!signal?.aborted) throw error;
    }
    if (signal?.aborted) finishReason = "cancelled";
    return { text: full, finishReason, label: held().label };
  }


  const threads = () => (runtime ? runtime.wllama.getNumThreads() : null);
  const downloading = () => downloader !== null;

  return {
    kit,
    saveKit,
    held,
    ready,
    newer,
    supported,
    download,
    downloading,
    interrupted,
    remove,
    answer,
    load,
    localName,
    threads,
    messagesFor,
    warmRuntimeFiles,
  };
})();
