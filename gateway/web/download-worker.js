// Downloads the phone model into the origin private file system and checks its sha256,
// off the page's thread. A download resumes where the file on disk ends (an HTTP range
// request), so a reload or a lost network costs only the part in flight: what was
// written is flushed every few megabytes.
//
// In:  {type: "download", url, apiKey, model: {file, size, sha256, …}}
// Out: {type: "progress", have, size} … then {type: "verifying"} then
//      {type: "done", sha256} | {type: "error", message, partial: bytes kept}
"use strict";
importScripts("/app/sha256.js");

const FLUSH_EVERY = 8 << 20;
const HASH_CHUNK = 4 << 20;

async function openModel(file) {
  const root = await navigator.storage.getDirectory();
  const models = await root.getDirectoryHandle("models", { create: true });
  const handle = await models.getFileHandle(file, { create: true });
  return handle.createSyncAccessHandle();
}

async function fetchFrom(url, apiKey, offset) {
  const headers = { Authorization: `Bearer ${apiKey}` };
  if (offset > 0) headers.Range = `bytes=${offset}-`;
  const response = await fetch(url, { headers, cache: "no-store" });
  if (response.status === 416) return { response: null, offset: 0 }; // ours is longer: start over
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new Error(body?.error?.message ?? `HTTP ${response.status}`);
  }
  // 206 from where we asked; anything else (200: the server ignored the range) is the
  // whole file from its start.
  const resumed = response.status === 206 && response.headers.get("Content-Range")?.startsWith(`bytes ${offset}-`);
  return { response, offset: resumed ? offset : 0 };
}

function sha256Of(access, size) {
  const hash = new Sha256();
  const buffer = new Uint8Array(HASH_CHUNK);
  for (let at = 0; at < size; at += HASH_CHUNK) {
    const read = access.read(buffer, { at });
    hash.update(buffer.subarray(0, read));
    if (at % (64 << 20) === 0) postMessage({ type: "verifying", have: at, size });
  }
  return hash.hex();
}

async function download({ url, apiKey, model: { file, size, sha256 } }) {
  const access = await openModel(file);
  try {
    let have = Math.min(access.getSize(), size);
    access.truncate(have); // a longer file is not this version's
    postMessage({ type: "progress", have, size });
    for (let attempt = 0; have < size; attempt++) {
      const { response, offset } = await fetchFrom(url, apiKey, have);
      have = offset;
      access.truncate(have);
      if (!response) {
        if (attempt > 0) throw new Error("the gateway refuses every range of the file");
        continue;
      }
      const reader = response.body.getReader();
      let unflushed = 0;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        access.write(value, { at: have });
        have += value.length;
        unflushed += value.length;
        if (unflushed >= FLUSH_EVERY) {
          access.flush(); // kept across a reload from here on
          unflushed = 0;
        }
        postMessage({ type: "progress", have, size });
      }
      access.flush();
      if (have > size) throw new Error(`got ${have} bytes, expected ${size}`);
    }
    if (access.getSize() !== size) throw new Error(`got ${access.getSize()} bytes, expected ${size}`);
    postMessage({ type: "verifying", have: 0, size });
    const got = sha256Of(access, size);
    if (got !== sha256) {
      access.truncate(0); // a corrupt file is not kept, nor resumed
      throw new Error(`sha256 mismatch (got ${got.slice(0, 12)}…, expected ${sha256.slice(0, 12)}…)`);
    }
    postMessage({ type: "done", sha256: got });
  } catch (error) {
    postMessage({ type: "error", message: error.message, partial: access.getSize() });
  } finally {
    access.close();
  }
}

self.onmessage = (event) => {
  if (event.data.type !== "download") return;
  download(event.data).catch((error) => postMessage({ type: "error", message: error.message, partial: 0 }));
};
