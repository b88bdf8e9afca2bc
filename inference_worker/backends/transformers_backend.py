"""transformers backend: CPU or CUDA, one model, generation off the event loop.

`model_ref` is a local folder or a hub id (on a machine that has the weights);
the tests and `make run` pass the demo model's folder, so nothing downloads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from inference_worker.backends.base import Finished, GenerationEvent, TextDelta
from inference_worker.backends.detokenizer import IncrementalDetokenizer
from inference_worker.backends.stops import StopMatcher
from proto.messages import ChatJob, SamplingParams
from services.errors import PermanentError

log = logging.getLogger(__name__)

_END = object()
SAMPLING_EPS = 1e-5


class _TokenCounter:
    """Tokens decoded by every generation thread, for metrics and tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.value += count


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


class _QueueStreamer:
    """transformers streamer that hands each new token id to the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], counter: _TokenCounter
    ) -> None:
        self._loop = loop
        self._queue = queue
        self._counter = counter
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self._counter.add(1)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, token_id)

    def end(self) -> None:
        return None


class TransformersBackend:
    """One causal LM served with `model.generate` on one generation thread.

    Jobs run one after another on that thread, in arrival order. Measured on the
    demo model (2 cores): eight threads each running its own `generate` gave 0.3x
    the throughput of one thread (the GIL, and one OpenMP team per calling thread
    fighting over the cores), so concurrency must come from batching jobs into one
    `generate`, not from more threads.
    """

    def __init__(
        self, model_ref: str, device: str = "auto", dtype: str = "auto", name: str = ""
    ) -> None:
        self.model_ref = model_ref
        self.device = resolve_device(device)
        self._dtype_name = dtype
        # The name clients use: never a local path.
        self.base_model = name or model_ref.rstrip("/").rsplit("/", 1)[-1]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_context = 0
        self.decoded = _TokenCounter()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = resolve_dtype(self._dtype_name, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref)
        if not self.tokenizer.chat_template:
            raise PermanentError(f"{self.model_ref}: the tokenizer has no chat template")
        model = AutoModelForCausalLM.from_pretrained(self.model_ref, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        log.info("loaded %s on %s (%s)", self.model_ref, self.device, dtype)

    def encode_prompt(self, job: ChatJob) -> list[int]:
        """The prompt's token ids: the tokenizer's own chat template, or a raw prompt."""
        if job.prompt is not None:
            ids = self.tokenizer.encode(job.prompt, add_special_tokens=True)
            bos = self.tokenizer.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        else:
            messages = [message.model_dump() for message in job.messages]
            try:
                ids = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True, return_dict=False
                )
            except Exception as exc:  # jinja's raise_exception: e.g. roles not alternating
                raise PermanentError(f"cannot build the prompt: {exc}", "invalid_messages") from exc
        if self.max_context and len(ids) + job.sampling.max_tokens > self.max_context:
            raise PermanentError(
                f"prompt of {len(ids)} tokens plus max_tokens {job.sampling.max_tokens} "
                f"exceeds the model's context of {self.max_context}",
                "context_length_exceeded",
            )
        return list(ids)

    def _generation_config(self, sampling: SamplingParams) -> Any:
        from transformers import GenerationConfig

        options: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "min_new_tokens": sampling.min_tokens,
            "repetition_penalty": sampling.repetition_penalty,
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        # Temperatures this close to 0 overflow the logits to inf/nan: they mean greedy.
        if sampling.temperature > SAMPLING_EPS:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            options.update(do_sample=False)
        return GenerationConfig(**options)

    def _run_generate(
        self, ids: list[int], sampling: SamplingParams, streamer: Any, stop: threading.Event
    ) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        if stop.is_set():  # cancelled while it waited for the generation thread
            return
        if sampling.seed is not None:
            # Safe: this is the only thread that generates.
            torch.manual_seed(sampling.seed)
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(sampling),
                stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
                streamer=streamer,
            )

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        ids = self.encode_prompt(job)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        future = loop.run_in_executor(
            self._executor,
            self._run_generate,
            ids,
            job.sampling,
            _QueueStreamer(loop, queue, self.decoded),
            stop,
        )
        # Runs on the loop after every token the thread queued: marks the end.
        future.add_done_callback(lambda _: queue.put_nowait(_END))
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(job.sampling.stop)
        generated = pending = 0
        last_token = None
        try:
            while (token_id := await queue.get()) is not _END:
                generated += 1
                pending += 1
                last_token = token_id
                text = stops.feed(detokenizer.add(token_id))
                if text or stops.stopped:
                    yield TextDelta(text, pending)
                    pending = 0
                if stops.stopped:
                    break
            else:
                future.result()  # re-raise what the generation thread raised
                tail = stops.feed(detokenizer.flush()) + stops.flush()
                if tail or pending:
                    yield TextDelta(tail, pending)
            if stops.stopped or last_token == self.tokenizer.eos_token_id:
                reason = "stop"
            else:
                reason = "length" if generated >= job.sampling.max_tokens else "stop"
            yield Finished(reason, len(ids), generated)
        finally:
            stop.set()  # the consumer went away (or we are done): stop decoding

    @property
    def tokens_generated(self) -> int:
        """Every token decoded since start, including ones nobody read."""
        return self.decoded.value

    async def health(self) -> dict[str, object]:
        return {"backend": "transformers", "model": self.model_ref, "device": self.device}

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
