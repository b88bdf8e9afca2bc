"""llama.cpp backend with a context per slot (MESH_LLAMACPP_BATCHED=false; the
default llamacpp backend is `llamacpp_batched.py`, which decodes every request in
one batch of one context and shares this module's prompt helpers). A GGUF model
decodes from memory bandwidth, several times faster than transformers on CPU.

Concurrency: one llama.cpp context decodes one sequence, so the backend keeps
`slots` contexts (each its own `Llama` over the same memory-mapped GGUF file, so the
weights are shared) and a job takes a free slot; jobs beyond the slots wait in the
queue (capacity = slots). LoRA adapters in GGUF form (`adapter-f16.gguf`, written
by `python -m trainer_job export-gguf`) are loaded once per slot and applied per
request; switching costs a KV-cache reset, not a reload.

Prefix reuse: a slot's context keeps the tokens it last read, and llama.cpp reads
again only what follows the part a new prompt shares with them. So a job takes the
free slot whose tokens share the longest start with its prompt (with the same
adapter applied): the second chat carrying the same tiers reads only its own tokens.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_worker.backends.base import Finished, FinishReason, GenerationEvent, TextDelta
from inference_worker.backends.constraints import Matchers, RowGrammar
from inference_worker.backends.logprobs import from_numpy, token_logprob
from inference_worker.backends.prompts import check_context, template_inputs
from inference_worker.backends.stops import StopMatcher
from inference_worker.backends.tool_calls import ToolFamily, banned_marker, family_from
from proto.adapters import ADAPTER_GGUF, MANIFEST
from proto.messages import ChatJob, TokenLogprob
from services.adapters import BASE_FOLDER
from services.errors import PermanentError

log = logging.getLogger(__name__)
SAMPLING_EPS = 1e-5
# A shared start shorter than this (the chat template's first tokens) is not worth
# overwriting a slot that holds another prompt: an empty or older slot is taken.
MIN_REUSE = 16


class Vocabulary:
    """What both llama.cpp backends know of a model's tokens: its tool-call format,
    its grammar matchers, and each token's text (`model`: llama-cpp-python's
    LlamaModel)."""

    def __init__(self, model: Any) -> None:
        import llama_cpp

        self.model = model
        self._control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        self.tools: ToolFamily | None = family_from(self.special_token)
        self.matchers = Matchers.for_llamacpp(model.vocab)
        self._texts: dict[int, str] = {}

    def special_token(self, text: str) -> int | None:
        import llama_cpp

        ids = self.model.tokenize(text.encode(), add_bos=False, special=True)
        if len(ids) != 1:
            return None
        attributes = llama_cpp.llama_vocab_get_attr(self.model.vocab, ids[0])
        return ids[0] if attributes & self._control else None

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            piece = self.model.detokenize([token], special=True)
            text = self._texts[token] = piece.decode("utf-8", errors="replace")
        return text

    def picking(self, job: ChatJob) -> Picking:
        return Picking(self, job, self.matchers.for_job(job, self.tools))


class Picking:
    """One request's grammar and log probabilities around llama.cpp's sampler: call
    `before` with the raw logits of its next token (masked in place for the grammar),
    then `after` with the token llama.cpp's sampler picked."""

    def __init__(self, vocabulary: Vocabulary, job: ChatJob, grammar: RowGrammar | None) -> None:
        self.vocabulary = vocabulary
        self.grammar = grammar
        self.top = job.logprobs
        tools = vocabulary.tools
        self.marker = tools.marker_id if job.tools is not None and tools is not None else None
        self.banned = banned_marker(job, tools)
        self._raw: Any = None

    @property
    def needed(self) -> bool:
        """Whether `before` has anything to do for this request."""
        return self.grammar is not None or self.top is not None or self.banned is not None

    def before(self, logits: Any) -> Any:
        if self.top is not None:
            self._raw = logits.copy()
        if self.banned is not None:
            logits[self.banned] = -float("inf")
        if self.grammar is not None:
            self.grammar.mask_numpy(logits)
        return logits

    def after(self, token: int) -> tuple[TokenLogprob, ...] | None:
        """Advance the grammar; the token's log probabilities when the job asked."""
        if self.grammar is not None:
            self.grammar.advance(token)
        if self.top is None or self._raw is None:
            return None
        return (token_logprob(self.vocabulary.text, token, from_numpy(self._raw, token, self.top)),)

    def piece(self, token: int, decoder: Any) -> str:
        """The token's text: the tool-call marker as written, else its bytes decoded."""
        if token == self.marker:
            return decoder.decode(b"", final=True) + self.vocabulary.text(token)
        return str(decoder.decode(self.vocabulary.model.detokenize([token])))

    @property
    def finished(self) -> bool:
        return self.grammar is not None and self.grammar.finished


@dataclass
class Slot:
    index: int
    llm: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: Any = None  # the adapter handle applied to this context (None: the base)
    used: int = 0  # when it last took a job (a counter), for least-recently-used


class LlamaCppBackend:
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
        """`prepare` and `adapter_base`: as for LlamaCppBatchedBackend."""
        self.model_path = model_path
        self._prepare = prepare
        self._adapter_base = adapter_base
        path = Path(model_path)
        # <registry>/_base/<name>/model-<type>.gguf names its model; any other file
        # is named by its stem unless MESH_MODEL_NAME says otherwise.
        self.base_model = name or base_model_name(path)
        self.device = "cpu (llama.cpp)"
        self._slot_count = slots
        self._threads = threads or max(1, (os.cpu_count() or 1) // slots)
        self._n_ctx = n_ctx
        self._slots: list[Slot] = []
        self._free: list[Slot] = []
        self._free_count = asyncio.Semaphore(0)  # how many are in _free
        self._jobs_started = 0
        self._adapters: dict[str, tuple[int, list[Any]]] = {}  # name -> (version, per slot)
        self._tokens = 0
        self._formatter: Any = None
        self.max_context = 0
        self.vocabulary: Vocabulary | None = None
        self.tool_family: ToolFamily | None = None

    # -- loading ------------------------------------------------------------------------

    def _load(self) -> Any:
        from llama_cpp import Llama

        return Llama(
            model_path=self.model_path,
            n_ctx=self._n_ctx,
            n_threads=self._threads,
            n_batch=512,
            verbose=False,
        )

    async def start(self) -> None:
        self.model_path = await prepared_model(self.model_path, self._prepare)
        for index in range(self._slot_count):
            llm = await asyncio.to_thread(self._load)
            self._slots.append(Slot(index, llm))
            self._release(self._slots[-1])
        first = self._slots[0].llm
        self.vocabulary = await asyncio.to_thread(Vocabulary, first._model)
        self.tool_family = self.vocabulary.tools
        self.max_context = first.n_ctx()
        self._formatter = chat_formatter(
            first.metadata.get("tokenizer.chat_template"),
            first._model.token_get_text(first.token_bos()),
            first._model.token_get_text(first.token_eos()),
        )
        log.info(
            "llama.cpp serving %s: %d slot(s) x %d thread(s), context %d",
            self.model_path,
            self._slot_count,
            self._threads,
            self.max_context,
        )

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self._slots[0].llm.tokenize(text.encode(), add_bos=False, special=special))

    def _encode(self, job: ChatJob) -> list[int]:
        llm = self._slots[0].llm
        return encode_prompt(
            job, self._formatter, self.tokenize, llm.token_bos(), self.max_context, self.tool_family
        )

    # -- generation ---------------------------------------------------------------------

    def _apply_adapter(self, slot: Slot, handle: Any) -> None:
        """Make `handle` (None: the base) the only adapter of this context."""
        if slot.active is handle:
            return
        set_adapter(slot.llm.ctx, handle)
        slot.llm.reset()  # the cached prefix was computed with the other weights
        slot.active = handle

    def _decode(
        self,
        slot: Slot,
        ids: list[int],
        job: ChatJob,
        adapter: str | None,
        emit: Callable[[object], None],
        cancel: threading.Event,
        reused: list[int],
    ) -> None:
        """Runs in a thread, holding the slot: emits TextDeltas, then one Finished.
        `reused[0]` is set to the prompt tokens the slot's context already held."""
        import numpy as np

        s = job.sampling
        llm = slot.llm
        eos = llm.token_eos()
        generated = 0
        assert self.vocabulary is not None
        picking = self.vocabulary.picking(job)

        def hold_eos(_ids: Any, logits: Any) -> Any:  # min_tokens
            if generated < s.min_tokens:
                logits[eos] = -np.inf
            return logits

        def pick(_ids: Any, logits: Any) -> Any:
            return picking.before(logits)

        processors = [pick] if picking.needed else []
        if s.min_tokens:
            processors.append(hold_eos)

        import llama_cpp
        from llama_cpp import LogitsProcessorList, StoppingCriteriaList

        vocab = llm._model.vocab

        with slot.lock:
            handle = self._adapters[adapter][1][slot.index] if adapter else None
            self._apply_adapter(slot, handle)
            cached = reused[0] = reused_prefix(llm.input_ids[: llm.n_tokens].tolist(), ids)
            # llama.cpp's seed is 32 bits: the job's (up to 63) folded into them.
            llm.set_seed(s.seed & 0xFFFFFFFF if s.seed is not None else random.getrandbits(31))
            greedy = s.temperature <= SAMPLING_EPS
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            reason: FinishReason = "length"
            tokens = llm.generate(
                ids,
                temp=0.0 if greedy else s.temperature,
                top_p=1.0 if greedy else s.top_p,
                top_k=0,
                min_p=0.0,
                repeat_penalty=s.repetition_penalty,
                logits_processor=LogitsProcessorList(processors) if processors else None,
                stopping_criteria=StoppingCriteriaList([lambda *_: cancel.is_set()]),
            )
            for token in tokens:
                if cancel.is_set():
                    reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                generated += 1
                self._tokens += 1
                logprobs = picking.after(token)
                emit(TextDelta(picking.piece(token, decoder), 1, logprobs))
                if picking.finished:
                    reason = "stop"
                    break
                if generated >= s.max_tokens:
                    break
            if cancel.is_set():
                reason = "cancelled"
            tail = decoder.decode(b"", final=True)
            if tail:
                emit(TextDelta(tail, 0))
            emit(Finished(reason, len(ids), generated, cached))

    def _release(self, slot: Slot) -> None:
        self._free.append(slot)
        self._free_count.release()

    async def _take_slot(self, ids: list[int], adapter: str | None) -> Slot:
        """The free slot that has the longest start of `ids` in its context already."""
        await self._free_count.acquire()

        def preference(slot: Slot) -> tuple[int, int, int]:
            return slot_order(self._reusable(slot, ids, adapter), slot.llm.n_tokens, slot.used)

        slot = max(self._free, key=preference)
        self._free.remove(slot)
        self._jobs_started += 1
        slot.used = self._jobs_started
        return slot

    def _reusable(self, slot: Slot, ids: list[int], adapter: str | None) -> int:
        """Tokens of `ids` llama.cpp will not read again on `slot` (a free slot: no
        thread touches its context)."""
        handle = self._adapters[adapter][1][slot.index] if adapter else None
        if slot.active is not handle:
            return 0  # applying the other adapter resets the context
        return reused_prefix(slot.llm.input_ids[: slot.llm.n_tokens].tolist(), ids)

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        adapter = None if job.model in (None, self.base_model) else job.model
        if adapter is not None and adapter not in self._adapters:
            raise PermanentError(f"model {job.model!r} is not served here", "model_not_found")
        ids = self._encode(job)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        slot = await self._take_slot(ids, adapter)
        reused = [0]  # set by the decoding thread before its first token
        worker = asyncio.create_task(
            asyncio.to_thread(self._decode, slot, ids, job, adapter, emit, cancel, reused)
        )

        def finished(task: asyncio.Task[None]) -> None:
            # The slot is free only once its thread is done with the context.
            self._release(slot)
            if not task.cancelled() and task.exception() is not None:
                events.put_nowait(task.exception())

        worker.add_done_callback(finished)
        try:
            async for event in relay(events, job, len(ids), cancel, lambda: reused[0]):
                yield event
        finally:
            cancel.set()  # a closed stream stops decoding at the next token

    # -- adapters -----------------------------------------------------------------------

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    # Each slot's own context is its cache: no store of blocks, no byte bound of its
    # own; what it reused is in each job's usage (cached_tokens).
    prefix_cache = None

    @property
    def adapters(self) -> dict[str, int]:
        return {name: version for name, (version, _) in self._adapters.items()}

    async def load_adapter(self, name: str, version: int, folder: Path) -> None:
        path = await asyncio.to_thread(adapter_gguf, self._adapter_base, name, version, folder)
        handles = await asyncio.to_thread(self._load_everywhere, name, path)
        previous = self._adapters.get(name)
        self._adapters[name] = (version, handles)
        if previous is not None:
            await asyncio.to_thread(self._free_everywhere, previous[1])

    def _load_everywhere(self, name: str, path: Path) -> list[Any]:
        import llama_cpp

        handles = []
        for slot in self._slots:
            with slot.lock:  # a running job on this slot finishes first
                handle = llama_cpp.llama_adapter_lora_init(slot.llm.model, str(path).encode())
            if not handle:
                raise PermanentError(f"llama.cpp could not load {path} for {name}")
            handles.append(handle)
        return handles

    def _free_everywhere(self, handles: list[Any]) -> None:
        import llama_cpp

        for slot, handle in zip(self._slots, handles, strict=True):
            with slot.lock:
                if slot.active is handle:
                    self._apply_adapter(slot, None)
                llama_cpp.llama_adapter_lora_free(handle)

    async def health(self) -> dict[str, object]:
        return {"backend": "llamacpp", "model": self.model_path, "slots": self._slot_count}

    async def close(self) -> None:
        def release() -> None:
            for slot in self._slots:
                with slot.lock:  # a decode still running finishes first
                    slot.llm.close()

        await asyncio.to_thread(release)


async def prepared_model(model_path: str, prepare: Callable[[], Path] | None) -> str:
    """The GGUF file to serve, made by `prepare` when given (a model folder converted
    once); PermanentError when llama-cpp-python or the file is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise PermanentError(
            "the llamacpp backend needs llama-cpp-python: pip install '.[llamacpp]'"
        ) from exc
    if prepare is not None:
        model_path = str(await asyncio.to_thread(prepare))
    if not await asyncio.to_thread(os.path.isfile, model_path):
        raise PermanentError(
            f"no GGUF model at {model_path}: set MESH_MODEL to a Hugging Face folder "
            "(converted at start) or run `python -m trainer_job export-gguf`"
        )
    return model_path


def set_adapter(ctx: Any, handle: Any) -> None:
    """Make `handle` (None: the base) the only adapter of a llama.cpp context."""
    import ctypes

    import llama_cpp

    if handle is None:
        llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        scales = (ctypes.c_float * 1)(1.0)
        llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales)


async def relay(
    events: asyncio.Queue[object],
    job: ChatJob,
    prompt_tokens: int,
    cancel: threading.Event,
    cached: Callable[[], int],
) -> AsyncIterator[GenerationEvent]:
    """A decoding thread's events as the job's answer: text cut at its stop strings,
    then one Finished; an exception from the thread is raised. A stop string sets
    `cancel`, so the thread stops at its next token."""
    stops = StopMatcher(list(job.sampling.stop))
    generated = 0
    while True:
        event = await events.get()
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, TextDelta):
            generated += event.tokens
            text = stops.feed(event.text)
            if text or event.tokens:
                yield TextDelta(text, event.tokens, event.logprobs)
            if stops.stopped:
                cancel.set()
                yield Finished("stop", prompt_tokens, generated, cached())
                return
            continue
        assert isinstance(event, Finished)
        held = stops.flush()
        if held:
            yield TextDelta(held, 0)
        yield event
        return


def adapter_gguf(base: Callable[[], Path] | None, name: str, version: int, folder: Path) -> Path:
    """A verified version's GGUF form. A version published without one (the converter
    was missing where it was published, or an old one rolled back to) has it exported
    here, once; `base` gives the base model's folder for that."""
    from services.gguf import ExportError, ensure_adapter_gguf

    manifest = json.loads((folder / MANIFEST).read_text())
    if ADAPTER_GGUF in manifest.get("files", {}):  # listed = hashed by verify()
        return folder / ADAPTER_GGUF

    if base is None:
        raise PermanentError(
            f"{name} v{version} has no GGUF form ({ADAPTER_GGUF}) and this worker serves a "
            "GGUF file, not the base model's folder, so it cannot export one: run "
            "`python -m trainer_job export-gguf` to serve it with llama.cpp"
        )
    try:
        return ensure_adapter_gguf(folder.parent.parent, name, version, base())
    except (ExportError, OSError) as exc:
        raise PermanentError(f"{name} v{version}: cannot export its GGUF form: {exc}") from exc


def base_model_name(path: Path) -> str:
    """<registry>/_base/<name>/model-<type>.gguf names its model; any other file is
    named by its stem (unless MESH_MODEL_NAME says otherwise)."""
    return path.parent.name if path.parent.parent.name == BASE_FOLDER else path.stem


def chat_formatter(template: str | None, bos_text: str, eos_text: str) -> Any:
    """The chat template the GGUF carries (the converter copies the tokenizer's)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if not template:
        return None
    return Jinja2ChatFormatter(
        template=template, eos_token=eos_text, bos_token=bos_text, add_generation_prompt=True
    )


def encode_prompt(
    job: ChatJob,
    formatter: Any,
    tokenize: Callable[[str], list[int]],
    bos: int,
    max_context: int,
    tools: ToolFamily | None = None,
) -> list[int]:
    """The job's prompt tokens: its messages (and tools) through the chat template, or
    its raw prompt; PermanentError when the template refuses them or they do not fit."""
    if job.prompt is not None:
        text = job.prompt
    elif formatter is None:
        raise PermanentError("this GGUF has no chat template", "invalid_messages")
    else:
        inputs = template_inputs(job, tools)
        try:
            text = formatter(messages=inputs["conversation"], tools=inputs.get("tools")).prompt
        except Exception as exc:  # jinja's raise_exception: roles not alternating
            raise PermanentError(f"cannot build the prompt: {exc}", "invalid_messages") from exc
    # The template writes the BOS text itself; a raw prompt gets one if it lacks it.
    ids = list(tokenize(text))
    if not ids or ids[0] != bos:
        ids = [bos, *ids]
    check_context(ids, job, max_context)
    return ids


def slot_order(reuse: int, held: int, used: int) -> tuple[int, int, int]:
    """Which free slot a job takes (the largest wins): the longest shared start of its
    prompt (one shorter than MIN_REUSE counts as none); else an empty slot (fewest
    tokens `held`); else the least recently `used`."""
    return (reuse if reuse >= MIN_REUSE else 0, -held, -used)


def reused_prefix(cached: list[int], ids: list[int]) -> int:
    """How many tokens of `ids` llama-cpp-python's `generate` keeps of a context that
    holds `cached`: their common start, less one when that is the whole prompt (its
    last token is read again for fresh logits)."""
    common = 0
    for a, b in zip(cached, ids, strict=False):
        if a != b:
            break
        common += 1
    return common - 1 if common == len(ids) and common > 0 else common
