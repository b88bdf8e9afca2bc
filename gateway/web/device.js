// The phone answering on its own: the model it keeps (downloaded from the gateway into
// the origin private file system, resumable, sha256-checked), and answers from
// llama.cpp compiled to WebAssembly (wllama, which runs it in a Web Worker; threads
// when the page is cross-origin isolated, one otherwise), with the chat template in
// the GGUF (the server's own) and the system prompt last synced from a gateway.
"use strict";

const Device = (() => {
  const WLLAMA = "/app/wllama/index.js";
  const WASM = "/app/wllama/wllama.wasm";
  const keep = {
    get: (name, fallback) => JSON.parse(localStorage.getItem(`mesh.device.${name}`) ?? "null") ?? fallback,
    set: (name, value) => localStorage.setItem(`mesh.device.${name}`, JSON.stringify(value)),
  };
  let runtime = null; // {wllama, file}: the loaded model
  let loading = null;

  // -- what the gateway says (GET /device), kept for when none is reachable --------------

  /** The last kit synced: {model, model_url, model_label, system_prompt, history_messages, max_tokens, temperature, as_of}. */
  const kit = () => keep.get("kit", null);
  const saveKit = (value) => keep.set("kit", value);
  /** The model on this device: the kit's model fields, `verified` once its sha256 matched. */
  const held = () => keep.get("held", null);

  async function modelsFolder() {
    const root = await navigator.storage.getDirectory();
    return root.getDirectoryHandle("models", { create: true });
  }

  async function bytesOnDisk(file) {
    try {
      return (await (await (await modelsFolder()).getFileHandle(file)).getFile()).size;
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
  function download(base, apiKey, onProgress) {
    const { model, model_url: url } = kit() ?? {};
    if (!model) return Promise.reject(new Error("the gateway has no phone model yet (export-gguf --phone)"));
    const previous = held();
    keep.set("downloading", model); // a reload resumes this one
    return new Promise((resolve, reject) => {
      navigator.storage.persist?.().catch(() => false); // keep it when storage runs low
      const worker = new Worker("/app/download-worker.js");
      worker.onerror = (event) => {
        worker.terminate();
        reject(new Error(`download: ${event.message ?? "the worker failed"}`));
      };
      worker.onmessage = async ({ data }) => {
        if (data.type === "progress") onProgress(data.have, data.size, "download");
        else if (data.type === "verifying") onProgress(data.have, data.size, "verify");
        else {
          worker.terminate();
          if (data.type === "error") return reject(new Error(data.message));
          keep.set("held", { ...model, verified: true });
          keep.set("downloading", null);
          if (previous && previous.file !== model.file) await removeFile(previous.file);
          await unload();
          await warmRuntimeFiles();
          resolve(held());
        }
      };
      worker.postMessage({ type: "download", url: base.replace(/\/$/, "") + url, apiKey, model });
    });
  }

  /** The download a reload interrupted, with the bytes already on disk. */
  async function interrupted() {
    const model = keep.get("downloading", null);
    return model ? { model, have: await bytesOnDisk(model.file) } : null;
  }

  async function removeFile(file) {
    try {
      await (await modelsFolder()).removeEntry(file);
    } catch {
      /* already gone */
    }
  }

  async function remove() {
    await unload();
    for (const model of [held(), keep.get("downloading", null)]) if (model) await removeFile(model.file);
    keep.set("held", null);
    keep.set("downloading", null);
  }

  /** The runtime's own files, fetched once so the service worker keeps them offline. */
  async function warmRuntimeFiles() {
    await Promise.all([fetch(WLLAMA), fetch(WASM)]).catch(() => null);
  }

  // -- answers -------------------------------------------------------------------------

  async function load() {
    const model = held();
    if (!model?.verified) throw new Error("no model on this device: download it in Settings");
    if (runtime?.file === model.file) return runtime;
    loading ??= (async () => {
      const { Wllama } = await import(WLLAMA);
      const wllama = new Wllama({ default: WASM }, { suppressNativeLog: true });
      const file = await (await (await modelsFolder()).getFileHandle(model.file)).getFile();
      await wllama.loadModel([file], { n_ctx: 2048, n_gpu_layers: 0 });
      runtime = { wllama, file: model.file };
      return runtime;
    })().finally(() => (loading = null));
    return loading;
  }

  async function unload() {
    const loaded = runtime;
    runtime = null;
    await loaded?.wllama.exit().catch(() => null);
  }

  /** Messages as the gateway would build them: system prompt, the recent history, the message. */
  function messagesFor(history, text) {
    const synced = kit();
    const system = synced?.system_prompt ? [{ role: "system", content: synced.system_prompt }] : [];
    const window = synced?.history_messages ?? 20;
    const recent = window > 0 ? history.slice(-window) : [];
    while (recent.length && recent[0].role !== "user") recent.shift(); // never start with an answer
    return [...system, ...recent.map(({ role, content }) => ({ role, content })), { role: "user", content: text }];
  }

  /** Stream an answer on the device: `onText(piece)`; `signal` stops it. Resolves with
   * {text, finishReason, label}. */
  async function answer(history, text, { onText, signal, temperature, maxTokens }) {
    const { wllama } = await load();
    const synced = kit();
    const unsaid = held()?.unsaid_tokens ?? []; // llama-server's form: [[token, false]] is never picked
    let full = "";
    let finishReason = "stop";
    const stream = await wllama.createChatCompletion({
      messages: messagesFor(history, text),
      stream: true,
      temperature: temperature ?? synced?.temperature ?? 0.7,
      max_tokens: maxTokens ?? synced?.max_tokens ?? 256,
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
    return { text: full, finishReason, label: labelOf(held()) };
  }

  const labelOf = (model) =>
    model ? `${model.base_model}${model.adapter ? `+${model.adapter}@v${model.adapter_version}` : ""}` : "";

  const threads = () => (runtime ? runtime.wllama.getNumThreads() : null);

  return { kit, saveKit, held, ready, newer, download, interrupted, remove, answer, load, labelOf, threads, messagesFor };
})();
