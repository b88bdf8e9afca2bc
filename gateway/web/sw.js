// The offline shell: the app's own files and the on-device runtime are cached, so the
// page opens (with its settings, the conversation kept here and the model on the
// device) without a network. API calls always go to the network: answers are never
// served from a cache. The model itself lives in the origin private file system.
const SHELL = "continuity-shell-v3";
const FILES = [
  "/",
  "/app/app.js",
  "/app/device.js",
  "/app/app.css",
  "/app/icon.svg",
  "/manifest.webmanifest",
];
// The download worker and its sha256 are not here: downloading needs the network anyway.
// Large, and absent from a gateway without the runtime: cached when first fetched.
const RUNTIME = ["/app/wllama/index.js", "/app/wllama/wllama.wasm"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(SHELL).then((cache) => cache.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((names) => Promise.all(names.filter((n) => n !== SHELL).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  const cached = FILES.includes(url.pathname) || RUNTIME.includes(url.pathname);
  if (event.request.method !== "GET" || url.origin !== location.origin || !cached) {
    return; // the network, untouched
  }
  // Network first (a new gateway brings a new client), the cached copy when offline.
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          caches.open(SHELL).then((cache) => cache.put(event.request, copy));
        }
        return response;
      })
      .catch(() => caches.match(event.request, { ignoreSearch: true })),
  );
});
