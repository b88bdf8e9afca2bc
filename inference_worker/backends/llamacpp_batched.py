"""llama.cpp backend that decodes every running request in one batch (the default
llamacpp backend): one llama.cpp context holds a sequence per slot, and each step
reads the weights once for all of them. On a CPU, decoding is bound by memory
bandwidth, so one step for four requests costs little more than a step for one:
several requests share one weight read instead of splitting the bandwidth as the
context-per-slot backend (`llamacpp_backend.py`, `MESH_LLAMACPP_BATCHED=false`) does.

One thread owns the context and runs the loop: take in new requests, build one
`llama_batch` (a token for each request that is generating, then chunks of the
prompts still being read, up to `n_batch` tokens), `llama_decode`, sample each
request's next token with its own sampler chain (its temperature, top-p, seed,
repetition penalty and min_tokens), and hand text to the request's event loop.

- LoRA: llama.cpp applies adapters to a whole context, so one step decodes the
  requests of one adapter (the base counts as one); requests for different adapters
  take turns, step by step. A sequence's cache was computed with its adapter, so a
  switch costs nothing but the turn.
- Prefix reuse: each slot's sequence keeps the tokens it last read, with the adapter
  they were read with. A request takes the free slot sharing the longest start with
  its prompt and reads only the rest (the tiers, read once per slot).
- Cancellation: a request whose stream is closed (or cut by a stop string) leaves the
  batch before the next step.
- Context: `n_ctx` tokens per sequence (MESH_LLAMACPP_CONTEXT; 0: the model's, at most
  8192), each sequence with its own part of the KV cache.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_worker.backends.base import Finished, FinishReason, GenerationEvent, TextDelta
from inference_worker.backends.llamacpp_backend import (
    MIN_REUSE,
    SAMPLING_EPS,
    adapter_gguf,
    base_model_name,
    chat_formatter,
    encode_prompt,
    prepared_model,
    relay,
    reused_prefix,
    set_adapter,
)
from proto.messages import ChatJob
from services.errors import PermanentError

log = logging.getLogger(__name__)
DEFAULT_MAX_CONTEXT = 8192  # per sequence, when MESH_LLAMACPP_CONTEXT is 0
N_BATCH = 512  # most tokens in one llama_decode (prompt chunks fill what decoding leaves)
PENALTY_LAST_N = 64  # llama-cpp-python's default window for the repetition penalty
_RELEASED = object()  # the decoding thread's last event for a request: its room is free


@dataclass
class _Slot:
    """One sequence of the context: what its part of the KV cache holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    adapter: Any = None  # the adapter handle its tokens were read with (None: the base)
    used: int = 0  # when it last took a request, for least-recently-used


@dataclass
class _Request:
    """A request in the batch; only the decoding thread touches it once admitted."""

    ids: list[int]
    job: ChatJob
    adapter: Any
    emit: Callable[[object], None]
    cancel: threading.Event
    slot: _Slot | None = None
    pending: list[int] = field(default_factory=list)  # tokens still to read into the cache
    cached: int = 0
    generated: int = 0
    sampler: Any = None
    holds_eos: bool = False  # the chain's first sampler keeps EOS out (min_tokens)
    decoder: Any = None


class LlamaCppBatchedBackend:
    def __init__(
        self,
        model_path: str,
        name: str = "",
        slots: int = 1,
        threads: int = 0,
        n_ctx: int = 0,
        prepare: Callable[[], Path] | None = None,
        adapter_base: Callable[[], Path] | None = None,
    ) -> None:
        """`prepare` (run once at start, off the loop) makes the GGUF file and returns
        its path: the conversion of a Hugging Face folder. `adapter_base` gives the base
        model's folder, to export a version's GGUF form when it has none."""
        self.model_path = model_path
        self.base_model = name or base_model_name(Path(model_path))
        self.device = "cpu (llama.cpp)"
        self._slot_count = slots
        self._threads = threads or (os.cpu_count() or 1)
        self._n_ctx = n_ctx
        self._prepare = prepare
        self._adapter_base = adapter_base
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._formatter: Any = None
        self.max_context = 0
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._room = asyncio.Semaphore(slots)  # requests admitted at once = slots
        # Two locks, so the event loop never waits for a decode: `_queue` (held briefly,
        # by anyone) guards the hand-over of requests and adapters; `_context` (the
        # decoding thread, adapter loads, close) guards the llama.cpp context.
        self._queue = threading.Condition()
        self._context = threading.Lock()
        self._incoming: list[_Request] = []
        self._waiting: list[_Request] = []  # taken by the thread, not yet in a slot
        self._running: list[_Request] = []
        self._applied: Any = None  # the adapter handle set on the context
        self._turn = 0  # which adapter group the next step decodes
        self._adapters: dict[str, tuple[int, Any]] = {}  # name -> (version, handle)
        self._retired: list[Any] = []  # replaced handles, freed once no request uses them
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._tokens = 0
        self._jobs_started = 0

    # -- loading ------------------------------------------------------------------------

    async def start(self) -> None:
        self.model_path = await prepared_model(self.model_path, self._prepare)
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._loop, name="llama.cpp-batch", daemon=True)
        self._thread.start()
        log.info(
            "llama.cpp serving %s: %d sequence(s) of %d tokens in one batch, %d thread(s)",
            self.model_path,
            self._slot_count,
            self.max_context,
            self._threads,
        )

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's own load and graph logs: errors only
        model_params = llama_cpp.llama_model_default_params()
        self._model = internals.LlamaModel(
            path_model=self.model_path, params=model_params, verbose=False
        )
        per_sequence = self._n_ctx or min(self._model.n_ctx_train(), DEFAULT_MAX_CONTEXT)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_sequence * self._slot_count
        params.n_seq_max = self._slot_count
        params.kv_unified = False  # each sequence its own n_ctx cells: none can starve another
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_threads = params.n_threads_batch = self._threads
        self._ctx = internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        self.max_context = llama_cpp.llama_n_ctx_seq(self._ctx.ctx)
        self._slots = [_Slot(seq_id) for seq_id in range(self._slot_count)]
        self._free = list(self._slots)
        model = self._model
        self._formatter = chat_formatter(
            model.metadata().get("tokenizer.chat_template"),
            model.token_get_text(model.token_bos()),
            model.token_get_text(model.token_eos()),
        )

    # -- prompts ------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode(), add_bos=False, special=special))

    def _encode(self, job: ChatJob) -> list[int]:
        return encode_prompt(
            job, self._formatter, self.tokenize, self._model.token_bos(), self.max_context
        )

    # -- the async side ---------------------------------------------------------------------

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        adapter_name = None if job.model in (None, self.base_model) else job.model
        ids = self._encode(job)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        async with self._room:
            with self._queue:
                if self._failure is not None:
                    raise PermanentError(f"the llama.cpp loop stopped: {self._failure!r}")
                if adapter_name is not None and adapter_name not in self._adapters:
                    raise PermanentError(
                        f"model {job.model!r} is not served here", "model_not_found"
                    )
                handle = self._adapters[adapter_name][1] if adapter_name else None
                request = _Request(ids, job, handle, emit, cancel)
                self._incoming.append(request)
                self._queue.notify()
            try:
                async for event in relay(events, job, len(ids), cancel, lambda: request.cached):
                    yield event
            finally:
                cancel.set()  # a closed stream leaves the batch before the next step
                with self._queue:
                    taken = request not in self._incoming
                    if not taken:
                        self._incoming.remove(request)
                # Its room is taken until the decoding thread has let the request go.
                while taken and (await events.get()) is not _RELEASED:
                    pass

    # -- the decoding thread ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._queue:
                    while not self._stopping and not self._incoming and not self._running:
                        self._queue.wait()
                    stopping = self._stopping
                    arrived, self._incoming = self._incoming, []
                with self._context:
                    self._waiting.extend(arrived)
                    if stopping:  # close() without a drain
                        for request in list(self._running):
                            self._finish(request, "cancelled")
                        for request in self._waiting:
                            request.emit(Finished("cancelled", len(request.ids), 0, 0))
                            self._release(request)
                        return
                    self._admit()
                    self._step()
        except BaseException as exc:  # the context is in an unknown state: fail everyone
            log.exception("the llama.cpp batch loop failed")
            with self._queue:
                self._failure = exc
                arrived, self._incoming = self._incoming, []
            for request in self._running + self._waiting + arrived:
                request.emit(PermanentError(f"llama.cpp failed: {exc!r}"))
                self._release(request)
            self._running.clear()
            self._waiting.clear()

    def _admit(self) -> None:
        """Give each new request the free slot holding the longest start of its prompt."""
        while self._waiting and self._free:
            request = self._waiting.pop(0)
            if request.cancel.is_set():
                request.emit(Finished("cancelled", len(request.ids), 0, 0))
                self._release(request)
                continue

            slot = max(self._free, key=functools.partial(self._preference, request=request))
            self._free.remove(slot)
            self._jobs_started += 1
            slot.used = self._jobs_started
            keep = self._reusable(slot, request.adapter, request.ids)
            self._ctx.kv_cache_seq_rm(slot.seq_id, keep, -1)
            slot.tokens = slot.tokens[:keep]
            slot.adapter = request.adapter
            request.slot = slot
            request.cached = keep
            request.pending = request.ids[keep:]
            request.sampler = self._sampler(request)
            request.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._running.append(request)

    def _preference(self, slot: _Slot, request: _Request) -> tuple[int, int, int]:
        """The longest shared start; else an empty slot, else the least recent one."""
        reuse = self._reusable(slot, request.adapter, request.ids)
        return (reuse if reuse >= MIN_REUSE else 0, -len(slot.tokens), -slot.used)

    @staticmethod
    def _reusable(slot: _Slot, adapter: Any, ids: list[int]) -> int:
        return reused_prefix(slot.tokens, ids) if slot.adapter is adapter else 0

    def _sampler(self, request: _Request) -> Any:
        """The request's own chain, as llama-cpp-python's `generate` builds it."""
        import llama_cpp
        from llama_cpp import _internals as internals

        s = request.job.sampling
        chain = internals.LlamaSampler()
        if s.min_tokens:
            bias = (llama_cpp.llama_logit_bias * 1)(
                llama_cpp.llama_logit_bias(self._model.token_eos(), float("-inf"))
            )
            llama_cpp.llama_sampler_chain_add(
                chain.sampler,
                llama_cpp.llama_sampler_init_logit_bias(self._model.n_vocab(), 1, bias),
            )
            request.holds_eos = True
        chain.add_penalties(
            n_vocab=self._model.n_vocab(),
            penalty_last_n=PENALTY_LAST_N,
            penalty_repeat=s.repetition_penalty,
            penalty_freq=0.0,
            penalty_present=0.0,
        )
        if s.temperature <= SAMPLING_EPS:
            chain.add_greedy()
        else:
            # llama.cpp's seed is 32 bits: the job's (up to 63) folded into them.
            seed = s.seed & 0xFFFFFFFF if s.seed is not None else random.getrandbits(31)
            chain.add_top_k(0)
            chain.add_typical(1.0, 1)
            chain.add_top_p(s.top_p, 1)
            chain.add_min_p(0.0, 1)
            chain.add_temp(s.temperature)
            chain.add_dist(seed)
        return chain

    def _step(self) -> None:
        """One llama_decode for the requests of one adapter, then their next tokens."""
        for request in [r for r in self._running if r.cancel.is_set()]:
            self._finish(request, "cancelled")
        self._free_retired()
        if not self._running:
            return
        groups: list[Any] = []
        for request in self._running:
            if not any(request.adapter is g for g in groups):
                groups.append(request.adapter)
        self._turn = (self._turn + 1) % len(groups)
        adapter = groups[self._turn]
        self._apply_adapter(adapter)
        batch = self._batch.batch
        batch.n_tokens = 0
        sampled: list[tuple[_Request, int]] = []  # (request, batch index of its logits)
        group = [r for r in self._running if r.adapter is adapter]
        # Generating requests first (one token each), then prompt chunks in the rest.
        group.sort(key=lambda r: len(r.pending) > 1)
        for request in group:
            room = N_BATCH - batch.n_tokens
            if room <= 0:
                break
            chunk = request.pending[:room]
            assert request.slot is not None
            position = len(request.slot.tokens)
            for offset, token in enumerate(chunk):
                index = batch.n_tokens
                batch.token[index] = token
                batch.pos[index] = position + offset
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = request.slot.seq_id
                batch.logits[index] = False
                batch.n_tokens += 1
            request.slot.tokens.extend(chunk)
            request.pending = request.pending[len(chunk) :]
            if not request.pending:  # its whole prompt (or last token) is read: sample
                batch.logits[batch.n_tokens - 1] = True
                sampled.append((request, batch.n_tokens - 1))
        import llama_cpp

        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        for request, index in sampled:
            token = llama_cpp.llama_sampler_sample(request.sampler.sampler, self._ctx.ctx, index)
            if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                self._finish(request, "stop")
                continue
            request.generated += 1
            self._tokens += 1
            piece = request.decoder.decode(self._model.detokenize([token]))
            request.emit(TextDelta(piece, 1))
            if request.holds_eos and request.generated >= request.job.sampling.min_tokens:
                removed = llama_cpp.llama_sampler_chain_remove(request.sampler.sampler, 0)
                llama_cpp.llama_sampler_free(removed)
                request.holds_eos = False
            if request.generated >= request.job.sampling.max_tokens:
                self._finish(request, "length")
            else:
                request.pending = [token]

    def _finish(self, request: _Request, reason: FinishReason) -> None:
        if request.cancel.is_set():
            reason = "cancelled"
        tail = request.decoder.decode(b"", final=True)
        if tail:
            request.emit(TextDelta(tail, 0))
        request.emit(Finished(reason, len(request.ids), request.generated, request.cached))
        self._running.remove(request)
        self._release(request)

    def _release(self, request: _Request) -> None:
        """The thread lets the request go (once): its slot is free, its room too."""
        if request.slot is not None:  # what it read stays in the slot, for reuse
            self._free.append(request.slot)
            request.slot = None
        if request.sampler is not None:
            request.sampler.close()
            request.sampler = None
        request.emit(_RELEASED)

    def _apply_adapter(self, handle: Any) -> None:
        if self._applied is handle:
            return
        set_adapter(self._ctx.ctx, handle)
        self._applied = handle

    def _free_retired(self) -> None:
        import llama_cpp

        with self._queue:
            retired = list(self._retired)
            waiting = self._waiting + self._incoming
        for handle in retired:
            if any(r.adapter is handle for r in self._running + waiting):
                continue
            if self._applied is handle:
                self._apply_adapter(None)
            for slot in self._slots:
                if slot.adapter is handle:  # its cache was read with weights now gone
                    self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
                    slot.tokens, slot.adapter = [], None
            llama_cpp.llama_adapter_lora_free(handle)
            with self._queue:
                self._retired.remove(handle)

    # -- adapters -----------------------------------------------------------------------

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    # The slots' sequences are the cache: no store of blocks, no byte bound of its own;
    # what each job reused is in its usage (cached_tokens).
    prefix_cache = None

    @property
    def adapters(self) -> dict[str, int]:
        return {name: version for name, (version, _) in self._adapters.items()}

    async def load_adapter(self, name: str, version: int, folder: Path) -> None:
        path = await asyncio.to_thread(adapter_gguf, self._adapter_base, name, version, folder)
        handle = await asyncio.to_thread(self._init_adapter, path)
        if not handle:
            raise PermanentError(f"llama.cpp could not load {path} for {name}")
        with self._queue:
            previous = self._adapters.get(name)
            self._adapters[name] = (version, handle)
            if previous is not None:
                self._retired.append(previous[1])  # running requests finish with it

    def _init_adapter(self, path: Path) -> Any:
        import llama_cpp

        with self._context:  # between two steps: the model is not being read
            return llama_cpp.llama_adapter_lora_init(self._model.model, str(path).encode())

    async def health(self) -> dict[str, object]:
        return {
            "backend": "llamacpp",
            "batched": True,
            "model": self.model_path,
            "slots": self._slot_count,
            "ok": self._failure is None,
        }

    async def close(self) -> None:
        with self._queue:
            self._stopping = True
            self._queue.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

        def release() -> None:
            import llama_cpp

            with self._context:
                for _, handle in self._adapters.values():
                    llama_cpp.llama_adapter_lora_free(handle)
                for handle in self._retired:
                    llama_cpp.llama_adapter_lora_free(handle)
                self._adapters.clear()
                self._retired.clear()
                for part in (self._batch, self._ctx, self._model):
                    if part is not None:
                        part.close()

        await asyncio.to_thread(release)
