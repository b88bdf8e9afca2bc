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
  requests of one adapter (the base counts as one). Requests for different adapters
  take turns of up to ADAPTER_TURN_STEPS steps: a switch makes llama.cpp plan its
  graph again. A sequence's cache was computed with its adapter, so it stays valid.
- Prefix reuse: each slot's sequence keeps the tokens it last read, with the adapter
  they were read with. A request takes the free slot sharing the longest start with
  its prompt and reads only the rest. When another sequence (running or not) holds a
  longer start, its cells are shared with the new one (`llama_memory_seq_cp`): the
  tiers every chat carries are read once for all the slots.
- Cancellation: a request whose stream is closed (or cut by a stop string) leaves the
  batch before the next step.
- Context: `n_ctx` tokens per sequence (MESH_LLAMACPP_CONTEXT; 0: the model's, at most
  8192) in one KV cache of n_ctx x slots cells. The cache is unified (any cell for any
  sequence), so llama.cpp reads the whole batch in one pass whatever sequences are in
  it; none can starve another, since each holds at most n_ctx tokens.
- Only the decoding thread touches the context (adapter loads too, between steps); the
  event loop only hands requests over under a short lock, and never waits for a decode.
  A request's room (one of `slots`) is given back by whoever lets it go last: the
  thread, or `generate` for a request the thread never took.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
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
from inference_worker.backends.constraints import ConstraintError
from inference_worker.backends.llamacpp_backend import (
    MIN_REUSE,
    SAMPLING_EPS,
    Picking,
    Vocabulary,
    adapter_gguf,
    base_model_name,
    chat_formatter,
    encode_prompt,
    prepared_model,
    relay,
    reused_prefix,
    set_adapter,
    slot_order,
)
from inference_worker.backends.tool_calls import ToolFamily
from proto.messages import ChatJob
from services.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)
DEFAULT_MAX_CONTEXT = 8192  # per sequence, when MESH_LLAMACPP_CONTEXT is 0
N_BATCH = 512  # most tokens in one llama_decode (prompt chunks fill what decoding leaves)
PENALTY_LAST_N = 64  # llama-cpp-python's default window for the repetition penalty
ADAPTER_TURN_STEPS = 8  # steps one adapter's requests run before another's get a turn
KV_CACHE_FULL = 1  # llama_decode: no room in the KV cache for this batch (nothing changed)


@dataclass
class _Slot:
    """One sequence of the context: what its part of the KV cache holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    adapter: Any = None  # the adapter handle its tokens were read with (None: the base)
    used: int = 0  # when it last took a request, for least-recently-used


@dataclass(eq=False)
class _Request:
    """A request in the batch; only the decoding thread touches it once taken."""

    ids: list[int]
    job: ChatJob
    adapter: Any
    emit: Callable[[object], None]
    cancel: threading.Event
    give_room_back: Callable[[], None]
    slot: _Slot | None = None
    pending: list[int] = field(default_factory=list)  # tokens still to read into the cache
    cached: int = 0
    generated: int = 0
    sampler: Any = None
    holds_eog: bool = False  # the chain's first sampler keeps end tokens out (min_tokens)
    picking: Picking | None = None  # its grammar and log probabilities
    decoder: Any = None
    released: bool = False


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
        self.vocabulary: Any = None  # a Vocabulary once loaded
        self.tool_family: ToolFamily | None = None
        self._eog: list[int] = []  # the vocabulary's end-of-generation tokens
        self._shares_cells: bool | None = None  # sequences can share cached cells
        self.max_context = 0
        self._room = asyncio.Semaphore(slots)  # requests taken at once = slots
        # Guards what the event loop and the thread hand each other (held briefly).
        self._queue = threading.Condition()
        self._incoming: list[_Request] = []
        self._loads: list[tuple[Path, concurrent.futures.Future[Any]]] = []
        self._adapters: dict[str, tuple[int, Any]] = {}  # name -> (version, handle)
        self._retired: list[Any] = []  # replaced handles, freed once no request uses them
        self._closed = False
        self._failure: BaseException | None = None
        # The decoding thread's own.
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._taken: set[_Request] = set()  # from intake until released
        self._waiting: list[_Request] = []  # taken, not yet in a slot
        self._running: list[_Request] = []
        self._applied: Any = None  # the adapter handle set on the context
        self._turn_steps = 0  # steps the applied adapter's requests ran in a row
        self._thread: threading.Thread | None = None
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
        model = self._model
        per_sequence = self._n_ctx or min(model.n_ctx_train(), DEFAULT_MAX_CONTEXT)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_sequence * self._slot_count
        params.n_seq_max = self._slot_count
        params.kv_unified = True
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_threads = params.n_threads_batch = self._threads
        self._ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=False)
        self.max_context = per_sequence  # each request is checked against it
        self._slots = [_Slot(seq_id) for seq_id in range(self._slot_count)]
        self._free = list(self._slots)
        # A recurrent model's state is not made of cells: no sharing of prefixes.
        self._shares_cells = not (
            llama_cpp.llama_model_is_recurrent(model.model)
            or llama_cpp.llama_model_is_hybrid(model.model)
        )
        self._eog = [
            t for t in range(model.n_vocab()) if llama_cpp.llama_vocab_is_eog(model.vocab, t)
        ]
        self.vocabulary = Vocabulary(model)
        self.tool_family = self.vocabulary.tools
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
            job,
            self._formatter,
            self.tokenize,
            self._model.token_bos(),
            self.max_context,
            self.tool_family,
        )

    # -- the async side ---------------------------------------------------------------------

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        adapter_name = None if job.model in (None, self.base_model) else job.model
        with self._queue:
            self._check_serving()  # a closed backend's model is gone: no tokenizing
        ids = self._encode(job)
        picking = self.vocabulary.picking(job)  # before any room is taken: it may refuse
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def give_room_back() -> None:
            loop.call_soon_threadsafe(self._room.release)

        await self._room.acquire()
        request: _Request | None = None
        try:
            with self._queue:
                self._check_serving()
                if adapter_name is not None and adapter_name not in self._adapters:
                    raise PermanentError(
                        f"model {job.model!r} is not served here", "model_not_found"
                    )
                handle = self._adapters[adapter_name][1] if adapter_name else None
                request = _Request(ids, job, handle, emit, cancel, give_room_back)
                request.picking = picking
                self._incoming.append(request)
                self._queue.notify()
            async for event in relay(events, job, len(ids), cancel, lambda: request.cached):
                yield event
        finally:
            cancel.set()  # a closed stream leaves the batch before the next step
            with self._queue:
                never_taken = request is None or request in self._incoming
                if request is not None and never_taken:
                    self._incoming.remove(request)
            if never_taken:  # else the thread gives the room back when it lets it go
                self._room.release()

    def _check_serving(self) -> None:
        """Under `_queue`: RetryableError when this backend takes no more work."""
        if self._closed:
            raise RetryableError("the llama.cpp backend is closing", "backend_closing")
        if self._failure is not None:
            raise RetryableError(f"the llama.cpp loop stopped: {self._failure!r}", "backend_error")

    # -- the decoding thread ----------------------------------------------------------------

    def _loop(self) -> None:
        arrived: list[_Request] = []
        loads: list[tuple[Path, concurrent.futures.Future[Any]]] = []
        try:
            while True:
                with self._queue:
                    while not (
                        self._closed
                        or self._incoming
                        or self._loads
                        or self._running
                        or self._waiting
                    ):
                        self._queue.wait()
                    closed = self._closed
                    arrived, self._incoming = self._incoming, []
                    loads, self._loads = self._loads, []
                self._taken.update(arrived)
                self._waiting.extend(arrived)
                arrived = []
                self._run_loads(loads)
                loads = []
                if closed:  # close() without a drain
                    for request in list(self._taken):
                        self._finish(request, "cancelled")
                    return
                self._admit()
                self._step()
        except BaseException as exc:  # the context is in an unknown state: fail everyone
            log.exception("the llama.cpp batch loop failed")
            with self._queue:
                self._failure = exc
                arrived += self._incoming
                loads += self._loads
                self._incoming, self._loads = [], []
            error = RetryableError(f"llama.cpp failed: {exc!r}", "backend_error")
            for request in [*self._taken, *arrived]:
                request.emit(error)
                self._release(request)
            for _, future in loads:
                future.set_exception(error)
            self._running.clear()
            self._waiting.clear()

    def _run_loads(self, loads: list[tuple[Path, concurrent.futures.Future[Any]]]) -> None:
        """Adapter files to load, between two steps (the model is not being read)."""
        import llama_cpp

        for path, future in loads:
            try:
                future.set_result(
                    llama_cpp.llama_adapter_lora_init(self._model.model, str(path).encode())
                )
            except Exception as exc:
                future.set_exception(exc)

    def _admit(self) -> None:
        """Give each new request the free slot holding the longest start of its prompt."""
        while self._waiting and self._free:
            request = self._waiting.pop(0)
            if request.cancel.is_set():
                self._finish(request, "cancelled")
                continue
            slot = max(self._free, key=functools.partial(self._preference, request=request))
            self._free.remove(slot)
            self._jobs_started += 1
            slot.used = self._jobs_started
            request.slot = slot  # from here on, _release frees it
            keep = self._reusable(slot, request.adapter, request.ids)
            if not self._ctx.kv_cache_seq_rm(slot.seq_id, keep, -1):
                # A cache that cannot drop a tail (recurrent models): read it all again.
                self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
                keep = 0
            slot.tokens = slot.tokens[:keep]
            slot.adapter = request.adapter
            keep = self._share_prefix(slot, request, keep)
            request.cached = keep
            request.pending = request.ids[keep:]
            request.sampler = self._sampler(request)
            request.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._running.append(request)

    def _share_prefix(self, slot: _Slot, request: _Request, keep: int) -> int:
        """When another sequence (running or free) holds a longer start of the prompt,
        read with the same adapter, its cells become this sequence's too: in the
        unified cache a cell can belong to several sequences, so the tiers every chat
        carries are read once for all the slots, not once per slot."""
        if self._shares_cells is False:
            return keep
        donor = max(
            (other for other in self._slots if other is not slot),
            key=lambda other: self._reusable(other, request.adapter, request.ids),
            default=None,
        )
        if donor is None:
            return keep
        shared = self._reusable(donor, request.adapter, request.ids)
        if shared <= keep or shared < MIN_REUSE:  # the template's first tokens: not worth it
            return keep
        self._ctx.kv_cache_seq_rm(slot.seq_id, -1, -1)
        self._ctx.kv_cache_seq_cp(donor.seq_id, slot.seq_id, 0, shared)
        slot.tokens = request.ids[:shared]
        return shared

    def _preference(self, slot: _Slot, request: _Request) -> tuple[int, int, int]:
        reuse = self._reusable(slot, request.adapter, request.ids)
        return slot_order(reuse, len(slot.tokens), slot.used)

    @staticmethod
    def _reusable(slot: _Slot, adapter: Any, ids: list[int]) -> int:
        return reused_prefix(slot.tokens, ids) if slot.adapter is adapter else 0

    def _sampler(self, request: _Request) -> Any:
        """The request's own chain, as llama-cpp-python's `generate` builds it."""
        import llama_cpp
        from llama_cpp import _internals as internals

        s = request.job.sampling
        chain = internals.LlamaSampler()
        if s.min_tokens and self._eog:
            biases = (llama_cpp.llama_logit_bias * len(self._eog))(
                *(llama_cpp.llama_logit_bias(token, float("-inf")) for token in self._eog)
            )
            llama_cpp.llama_sampler_chain_add(
                chain.sampler,
                llama_cpp.llama_sampler_init_logit_bias(
                    self._model.n_vocab(), len(self._eog), biases
                ),
            )
            request.holds_eog = True
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

    def _next_adapter(self) -> Any:
        """Whose requests the next step decodes: the applied adapter's for up to
        ADAPTER_TURN_STEPS steps in a row, then the next one's (in order of arrival)."""
        groups: list[Any] = []
        for request in self._running:
            if not any(request.adapter is group for group in groups):
                groups.append(request.adapter)
        current = next((i for i, g in enumerate(groups) if g is self._applied), None)
        if current is not None and (len(groups) == 1 or self._turn_steps < ADAPTER_TURN_STEPS):
            self._turn_steps += 1
            return groups[current]
        self._turn_steps = 1
        return groups[0 if current is None else (current + 1) % len(groups)]

    def _step(self) -> None:
        """One llama_decode for the requests of one adapter, then their next tokens."""
        import llama_cpp
        import numpy as np

        for request in [r for r in self._running if r.cancel.is_set()]:
            self._finish(request, "cancelled")
        self._free_retired()
        if not self._running:
            return
        adapter = self._next_adapter()
        self._apply_adapter(adapter)
        batch = self._batch.batch
        batch.n_tokens = 0
        read: list[tuple[_Request, int]] = []  # (request, tokens it put in the batch)
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
            read.append((request, len(chunk)))
            if len(chunk) == len(request.pending):  # its prompt (or last token) is read
                batch.logits[batch.n_tokens - 1] = True
                sampled.append((request, batch.n_tokens - 1))
        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if code == KV_CACHE_FULL:  # nothing was read: these requests fail, others go on
            for request, _ in read:
                assert request.slot is not None
                self._ctx.kv_cache_seq_rm(request.slot.seq_id, -1, -1)
                request.slot.tokens = []
                request.emit(RetryableError("llama.cpp's KV cache is full", "backend_busy"))
                self._running.remove(request)
                self._release(request)
            return
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        for request, count in read:
            assert request.slot is not None
            request.slot.tokens.extend(request.pending[:count])
            request.pending = request.pending[count:]
        n_vocab = self._model.n_vocab()
        for request, index in sampled:
            picking = request.picking
            assert picking is not None
            if picking.needed:
                logits = llama_cpp.llama_get_logits_ith(self._ctx.ctx, index)
                picking.before(np.ctypeslib.as_array(logits, shape=(n_vocab,)))  # in place
            token = llama_cpp.llama_sampler_sample(request.sampler.sampler, self._ctx.ctx, index)
            if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                self._finish(request, "stop")
                continue
            request.generated += 1
            self._tokens += 1
            try:
                logprobs = picking.after(token)
            except ConstraintError as exc:
                request.emit(exc)
                self._running.remove(request)
                self._release(request)
                continue
            request.emit(TextDelta(picking.piece(token, request.decoder), 1, logprobs))
            if picking.finished:
                self._finish(request, "stop")
                continue
            if request.holds_eog and request.generated >= request.job.sampling.min_tokens:
                removed = llama_cpp.llama_sampler_chain_remove(request.sampler.sampler, 0)
                llama_cpp.llama_sampler_free(removed)
                request.holds_eog = False
            if request.generated >= request.job.sampling.max_tokens:
                self._finish(request, "length")
            else:
                request.pending = [token]

    def _finish(self, request: _Request, reason: FinishReason) -> None:
        if request.cancel.is_set():
            reason = "cancelled"
        if request.decoder is not None:
            tail = request.decoder.decode(b"", final=True)
            if tail:
                request.emit(TextDelta(tail, 0))
        request.emit(Finished(reason, len(request.ids), request.generated, request.cached))
        if request in self._running:
            self._running.remove(request)
        if request in self._waiting:
            self._waiting.remove(request)
        self._release(request)

    def _release(self, request: _Request) -> None:
        """The thread lets the request go (once): its slot is free, its room too."""
        if request.released:
            return
        request.released = True
        if request.slot is not None:  # what it read stays in the slot, for reuse
            self._free.append(request.slot)
            request.slot = None
        if request.sampler is not None:
            request.sampler.close()
            request.sampler = None
        self._taken.discard(request)
        request.give_room_back()

    def _apply_adapter(self, handle: Any) -> None:
        if self._applied is handle:
            return
        set_adapter(self._ctx.ctx, handle)
        self._applied = handle

    def _free_retired(self) -> None:
        if not self._retired:  # every step asks: nothing to lock for the usual answer
            return
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
        loaded: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._queue:
            self._check_serving()
            self._loads.append((path, loaded))  # the thread loads it between two steps
            self._queue.notify()
        handle = await asyncio.wrap_future(loaded)
        if not handle:
            raise PermanentError(f"llama.cpp could not load {path} for {name}")
        with self._queue:
            previous = self._adapters.get(name)
            self._adapters[name] = (version, handle)
            if previous is not None:
                self._retired.append(previous[1])  # running requests finish with it

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
            self._closed = True
            self._queue.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

        def release() -> None:
            import llama_cpp

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
