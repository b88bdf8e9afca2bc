"""What answering on the phone costs: llama.cpp in WebAssembly (wllama, in headless
Chromium, one thread and two) against llama.cpp native (llama-cpp-python) on the same
GGUF file, the same prompt and the same number of tokens, on this machine.

    python bench/on_device.py        # table + bench/results/on_device.json

Two phone models, both Q4_K_M as `export-gguf --phone` writes them: the demo model
(4M parameters: per-token overheads dominate) and a random-weight Mistral of ~85M
parameters with the demo tokenizer (the matrix products dominate, as in a real phone
model, only smaller). Each rate is decoding only: tokens after the first over the
time from the first streamed token to the last, end of text banned so every run
writes the same count. The page is served with COOP/COEP (threads allowed); the
one-thread runs ask for one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.web_routes import ISOLATED, WLLAMA
from services.gguf import export_phone
from trainer_job.demo_model import DemoModelSpec, build_random_model, ensure_demo_model

RESULTS = Path(__file__).parent / "results"
CHROMIUM = "/usr/lib/chromium/chromium"
PROMPT = "[INST] Tell me about the four tiers of the continuity handoff. [/INST]"
PAGE = """<!doctype html><meta charset="utf-8"><script type="module">
import { Wllama } from '/wllama/index.js';
let wllama = null;
window.decode = async (threads, tokens, eos) => {
  if (wllama) await wllama.exit();
  wllama = new Wllama({ default: '/wllama/wllama.wasm' }, { suppressNativeLog: true });
  const blob = await (await fetch('/model.gguf')).blob();
  await wllama.loadModel([blob], { n_ctx: 1024, n_threads: threads, n_gpu_layers: 0 });
  const stamps = [];
  const stream = await wllama.createCompletion({
    prompt: PROMPT_TEXT, max_tokens: tokens, temperature: 0, stream: true,
    logit_bias: [[eos, false]],
  });
  for await (const chunk of stream) if (chunk.choices?.[0]?.text) stamps.push(performance.now());
  return { threads: wllama.getNumThreads(), multithread: wllama.isMultithread(),
           tokens: stamps.length, seconds: (stamps.at(-1) - stamps[0]) / 1000 };
};
window.ready = true;
</script>"""


# ~85M parameters of seeded random weights, with the demo model's tokenizer.
M85 = DemoModelSpec(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    seed=0,
)


class Files(SimpleHTTPRequestHandler):
    """The bench page, the runtime and the model, cross-origin isolated."""

    routes: ClassVar[dict[str, tuple[Path | bytes, str]]] = {}

    def do_GET(self) -> None:
        if self.path not in self.routes:
            self.send_error(404)
            return
        body, media_type = self.routes[self.path]
        data = body if isinstance(body, bytes) else body.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in ISOLATED.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def native(gguf: Path, threads: int, tokens: int, eos: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, verbose=False)
    stamps = []
    for chunk in llm.create_completion(
        PROMPT,
        max_tokens=tokens,
        temperature=0,
        top_k=1,
        repeat_penalty=1.0,
        logit_bias={eos: float("-inf")},
        stream=True,
    ):
        if chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    llm.close()
    return {"tokens": len(stamps), "seconds": stamps[-1] - stamps[0]}


def rate(run: dict[str, Any]) -> float:
    return (run["tokens"] - 1) / run["seconds"]


def bench_model(name: str, gguf: Path, tokens: int, eos: int, page: Any) -> dict[str, Any]:
    Files.routes["/model.gguf"] = (gguf, "application/octet-stream")
    runs: dict[str, Any] = {}
    for threads in (1, 2):
        runs[f"native_{threads}t"] = native(gguf, threads, tokens, eos)
        runs[f"wasm_{threads}t"] = page.evaluate(
            "([threads, tokens, eos]) => decode(threads, tokens, eos)", [threads, tokens, eos]
        )
    rates = {key: rate(run) for key, run in runs.items()}
    return {
        "model": name,
        "gguf_bytes": gguf.stat().st_size,
        "tokens": tokens,
        "runs": runs,
        "tokens_per_s": rates,
        "wasm_vs_native_1t": rates["wasm_1t"] / rates["native_1t"],
        "wasm_vs_native_2t": rates["wasm_2t"] / rates["native_2t"],
        "wasm_2t_vs_1t": rates["wasm_2t"] / rates["wasm_1t"],
        "wasm_2t_multithread": runs["wasm_2t"]["multithread"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    if not (WLLAMA / "index.js").is_file():
        print("bench/on_device.py: the runtime is not installed (make install)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright
    from transformers import AutoTokenizer

    demo = ensure_demo_model()
    eos = AutoTokenizer.from_pretrained(demo).eos_token_id
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {
            "demo-model (4M)": export_phone(demo, work / "r1", "demo", None, "q4_k_m"),
            "random mistral (85M)": export_phone(
                build_random_model(work / "m85", M85, demo), work / "r2", "m85", None, "q4_k_m"
            ),
        }
        Files.routes.update(
            {
                "/": (PAGE.replace("PROMPT_TEXT", json.dumps(PROMPT)).encode(), "text/html"),
                "/wllama/index.js": (WLLAMA / "index.js", "text/javascript"),
                "/wllama/wllama.wasm": (WLLAMA / "wasm" / "wllama.wasm", "application/wasm"),
            }
        )
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Files))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_function("window.ready && crossOriginIsolated")
            for name, model in models.items():
                gguf = work / ("r1" if "demo" in name else "r2") / "_base"
                gguf = gguf / ("demo" if "demo" in name else "m85") / model.file
                results.append(bench_model(name, gguf, args.tokens, eos, page))
            browser.close()
        server.shutdown()
    print(f"{'model':24} {'native 1t':>10} {'wasm 1t':>10} {'native 2t':>10} {'wasm 2t':>10}")
    for r in results:
        t = r["tokens_per_s"]
        print(
            f"{r['model']:24} {t['native_1t']:10.1f} {t['wasm_1t']:10.1f} "
            f"{t['native_2t']:10.1f} {t['wasm_2t']:10.1f}   tokens/s"
        )
        print(
            f"{'':24} wasm/native: {r['wasm_vs_native_1t']:.2f} (1 thread), "
            f"{r['wasm_vs_native_2t']:.2f} (2 threads); wasm 2t/1t {r['wasm_2t_vs_1t']:.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "on_device.json"
    out.write_text(
        json.dumps({"at": datetime.now(UTC).isoformat(), "results": results}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
