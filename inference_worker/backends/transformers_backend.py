"""transformers backend: CPU or CUDA, one model, generation off the event loop.

`model_ref` is a local folder or a hub id (on a machine that has the weights);
the tests and `make run` pass the demo model's folder, so nothing downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_worker.backends.base import Finished, FinishReason, GenerationEvent, TextDelta
from inference_worker.backends.batching import BatchScheduler, Row
from inference_worker.backends.constraints import Matchers
from inference_worker.backends.detokenizer import IncrementalDetokenizer, TokenTexts
from inference_worker.backends.logprobs import Logprobs, token_logprob
from inference_worker.backends.prefix_cache import (
    DEFAULT_BLOCK_TOKENS,
    PrefixCache,
    default_capacity,
)
from inference_worker.backends.prompts import encode_prompt
from inference_worker.backends.stops import StopMatcher
from inference_worker.backends.tool_calls import ToolFamily, banned_marker, family_of
from proto.messages import ChatJob, PrefixCacheStats, TokenLogprob
from services.errors import PermanentError
from services.paths import served_name

log = logging.getLogger(__name__)


def nf4_config(compute_dtype: Any) -> Any:
    """QLoRA-style 4-bit weights: NF4 with double quantisation; compute in fp16 on
    CUDA (the RTX 2080 has no bf16) and fp32 on CPU."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


@dataclass(frozen=True)
class _Done:
    """The end of a row's tokens, with the generation thread's error if it failed."""

    error: BaseException | None


class _Handoff:
    """A row's tokens from the generation thread to the event loop, a few at a time.

    Waking the loop and resuming the job's coroutines for every token costs the
    worker's main thread more than decoding a token costs at a batch of 8 on a small
    model, and that thread competes with decoding for the cores and the GIL. So
    tokens go over in groups: the first at once (time to first token), then whatever
    has accumulated once `every_s` has passed since the last hand-off.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, every_s: float) -> None:
        self.loop = loop
        self.every_s = every_s
        self.queue: asyncio.Queue[list[tuple[int, Logprobs | None]] | _Done] = asyncio.Queue()
        self._pending: list[tuple[int, Logprobs | None]] = []
        self._sent_at = float("-inf")

    def emit(self, token_id: int, logprobs: Logprobs | None) -> None:  # generation thread
        self._pending.append((token_id, logprobs))
        now = time.monotonic()
        if now - self._sent_at >= self.every_s:
            self._sent_at = now
            self._send(self._pending)
            self._pending = []

    def finish(self, error: BaseException | None) -> None:  # on the generation thread
        if self._pending:
            self._send(self._pending)
            self._pending = []
        self._send(_Done(error))

    def _send(self, item: list[tuple[int, Logprobs | None]] | _Done) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        # fp16 on GPUs: the RTX 2080 (Turing) has no bf16.
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class TransformersBackend:
    """One causal LM; concurrent jobs are decoded together (see batching.py).

    All decoding happens on one generation thread: measured on the demo model
    (2 cores), eight threads each running its own `generate` gave 0.3x the
    throughput of one thread (the GIL, and one OpenMP team per calling thread
    fighting over the cores). Concurrency comes from batching instead.
    """

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        dtype: str = "auto",
        name: str = "",
        max_batch: int = 8,
        quantization: str = "none",
        handoff_ms: float = 10.0,
        unstreamed_handoff_ms: float = 250.0,
        prefill_chunk_tokens: int = 512,
        prefix_cache_bytes: int | None = None,
        prefix_cache_block_tokens: int = DEFAULT_BLOCK_TOKENS,
    ) -> None:
        self.model_ref = model_ref
        self.device = resolve_device(device)
        self._dtype_name = dtype
        # The name clients use: never a local path.
        self.base_model = served_name(model_ref, name)
        self.max_batch = max_batch
        self.quantization = quantization
        self.handoff_s = handoff_ms / 1000
        self.unstreamed_handoff_s = unstreamed_handoff_ms / 1000
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # None: sized from the memory free once the model is loaded; 0: off.
        self.prefix_cache_bytes = prefix_cache_bytes
        self.prefix_cache_block_tokens = prefix_cache_block_tokens
        self.scheduler: BatchScheduler | None = None
        # public adapter name -> (version, the name it is loaded under in peft)
        self.loaded: dict[str, tuple[int, str]] = {}
        self._loads = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_context = 0
        self.tool_family: ToolFamily | None = None
        self.matchers: Matchers | None = None
        self._texts: TokenTexts | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = resolve_dtype(self._dtype_name, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref)
        if not self.tokenizer.chat_template:
            raise PermanentError(f"{self.model_ref}: the tokenizer has no chat template")
        if self.quantization == "4bit":
            model = AutoModelForCausalLM.from_pretrained(
                self.model_ref, quantization_config=nf4_config(dtype), device_map=self.device
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_ref, dtype=dtype)
            model = model.to(self.device)
        self.model = model.eval()
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.tool_family = family_of(self.tokenizer)
        self.matchers = Matchers.for_tokenizer(self.tokenizer, int(model.config.vocab_size))
        self._texts = TokenTexts(self.tokenizer)
        capacity = self.prefix_cache_bytes
        if capacity is None:
            capacity = default_capacity(self.device)
        self.scheduler = BatchScheduler(
            self.model,
            self.tokenizer,
            self.device,
            self.max_batch,
            adapter_of=lambda name: self.loaded[name][1],
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            prefix_cache=PrefixCache(capacity, self.prefix_cache_block_tokens),
        )
        log.info(
            "loaded %s on %s (%s, quantization %s, %.1f MB; prefix cache %.0f MiB)",
            self.model_ref,
            self.device,
            dtype,
            self.quantization,
            model.get_memory_footprint() / 1e6,
            capacity / 2**20,
        )

    def encode_prompt(self, job: ChatJob) -> list[int]:
        return encode_prompt(self.tokenizer, job, self.max_context, self.tool_family)

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        assert self.scheduler is not None and self.matchers is not None, "start() first"
        ids = self.encode_prompt(job)
        # Nobody reads an unstreamed answer before its end (which the generation
        # thread hands over at once): its tokens can wait longer, unless stop strings
        # must be matched as they come.
        quick = job.stream or bool(job.sampling.stop)
        every_s = self.handoff_s if quick else self.unstreamed_handoff_s
        handoff = _Handoff(asyncio.get_running_loop(), every_s)
        adapter = None if job.model in (None, self.base_model) else job.model
        if adapter is not None and adapter not in self.loaded:
            raise PermanentError(f"model {job.model!r} is not served here", "model_not_found")
        row = Row(
            ids,
            job.sampling,
            handoff.emit,
            handoff.finish,
            adapter=adapter,
            grammar=self.matchers.for_job(job, self.tool_family),
            logprobs=job.logprobs,
            banned=banned_marker(job, self.tool_family),
        )
        self.scheduler.submit(row)
        shown = {}
        if job.tools is not None and self.tool_family is not None:
            shown[self.tool_family.marker_id] = self.tool_family.MARKER
        detokenizer = IncrementalDetokenizer(self.tokenizer, shown)
        stops = StopMatcher(job.sampling.stop)
        generated = pending = 0
        last_token = None
        logprobs: list[TokenLogprob] | None = [] if job.logprobs is not None else None
        try:
            while not isinstance(group := await handoff.queue.get(), _Done):
                pieces = []
                for token_id, token_logprobs in group:
                    generated += 1
                    pending += 1
                    last_token = token_id
                    piece = detokenizer.add(token_id)
                    eos = token_id == self.tokenizer.eos_token_id  # not part of the text
                    if logprobs is not None and token_logprobs is not None and not eos:
                        assert self._texts is not None
                        entry = token_logprob(self._texts, token_id, token_logprobs)
                        logprobs.append(entry.model_copy(update={"token": piece}))
                    pieces.append(stops.feed(piece))
                    if stops.stopped:
                        break
                text = "".join(pieces)
                if text or stops.stopped or logprobs:
                    yield TextDelta(text, pending, tuple(logprobs) if logprobs else None)
                    pending = 0
                    logprobs = [] if logprobs is not None else None
                if stops.stopped:
                    break
            else:
                if group.error is not None:
                    raise group.error
                tail = stops.feed(detokenizer.flush()) + stops.flush()
                if tail or pending:
                    yield TextDelta(tail, pending, tuple(logprobs) if logprobs else None)
            if stops.stopped or last_token == self.tokenizer.eos_token_id:
                reason: FinishReason = "stop"
            else:
                reason = "length" if generated >= job.sampling.max_tokens else "stop"
            yield Finished(reason, len(ids), generated, row.cached)
        finally:
            row.stop.set()  # the consumer went away (or we are done): stop decoding

    @property
    def adapters(self) -> dict[str, int]:
        return {name: version for name, (version, _) in self.loaded.items()}

    async def load_adapter(self, name: str, version: int, folder: Path) -> None:
        """Load a verified adapter version and serve `name` from it, in place.

        Runs on the generation thread between two decoding steps, so no step sees a
        half-loaded adapter. Jobs admitted from then on use the new version; jobs
        already running finish with the version they started with, which is dropped
        once the last of them ends.
        """
        assert self.scheduler is not None, "start() first"
        # A fresh internal name for every load: a rollback to a version that running
        # jobs still use must not reuse (and later retire) their copy.
        self._loads += 1
        internal = f"{name.replace('.', '_')}__v{version}__{self._loads}"

        def load() -> None:
            from peft import PeftModel

            if hasattr(self.model, "peft_config"):
                self.model.load_adapter(str(folder), adapter_name=internal, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(folder), adapter_name=internal, is_trainable=False
                ).eval()
                self.scheduler.model = self.model  # type: ignore[union-attr]
            previous = self.loaded.get(name)
            self.loaded[name] = (version, internal)
            if previous is not None:
                # Rows still answering with the previous version finish with it.
                self.scheduler.retire(previous[1])  # type: ignore[union-attr]

        await asyncio.wrap_future(self.scheduler.call(load))
        log.info("adapter %s v%d loaded", name, version)

    @property
    def prefix_cache(self) -> PrefixCacheStats | None:
        return self.scheduler.prefix_cache.stats() if self.scheduler is not None else None

    @property
    def tokens_generated(self) -> int:
        """Every token decoded since start, including ones nobody read."""
        return self.scheduler.decoded if self.scheduler is not None else 0

    async def health(self) -> dict[str, object]:
        return {
            "backend": "transformers",
            "model": self.model_ref,
            "device": self.device,
            "ok": self.scheduler is not None and self.scheduler.alive,
        }

    async def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
