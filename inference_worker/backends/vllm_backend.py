"""vLLM backend for GPU hosts (and vLLM's CPU build): its async engine batches
jobs continuously (paged attention), applies a LoRA per request, and stops a
request when its stream is closed.

Constrained answers go through vLLM's structured outputs with its llguidance
backend ("guidance"): the same grammars as the other backends (constraints.py),
so a schema the gateway accepted is enforced the same way. One difference: a tool
call under tool_choice auto is not constrained (vLLM cannot switch a grammar on
mid-answer); the worker parses what the model wrote.

vllm is an optional extra (`pip install '.[gpu]'`): it is imported in start().
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from inference_worker.backends.base import Finished, FinishReason, GenerationEvent, TextDelta
from inference_worker.backends.prompts import encode_prompt
from inference_worker.backends.tool_calls import ToolFamily, banned_marker, family_of
from proto.messages import ChatJob, TokenLogprob, TopLogprob
from services.errors import PermanentError
from services.paths import served_name

log = logging.getLogger(__name__)
SAMPLING_EPS = 1e-5


class VllmBackend:
    def __init__(
        self,
        model_ref: str,
        name: str = "",
        dtype: str = "auto",
        max_loras: int = 4,
        max_lora_rank: int = 64,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
    ) -> None:
        self.model_ref = model_ref
        self.base_model = served_name(model_ref, name)
        self.device = "vllm"
        self._dtype = dtype
        self._max_loras = max_loras
        self._max_lora_rank = max_lora_rank
        self._max_model_len = max_model_len
        # A fixed KV-cache size instead of a fraction of the device's memory (on CPU
        # hosts the fraction is of RAM, and vLLM refuses to start if that much is
        # not free at that moment).
        self._kv_cache_memory_bytes = kv_cache_memory_bytes
        self.engine: Any = None
        self.tokenizer: Any = None
        self.tool_family: ToolFamily | None = None
        self.max_context = 0
        self._tokens = 0
        # public adapter name -> (version, LoRARequest); a new version gets a new id
        self._loras: dict[str, tuple[int, Any]] = {}
        self._next_lora_id = 1

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_ref,
            dtype=self._dtype,
            enable_lora=True,
            max_loras=self._max_loras,
            max_lora_rank=self._max_lora_rank,
            max_model_len=self._max_model_len,
            kv_cache_memory_bytes=self._kv_cache_memory_bytes,
            enforce_eager=True,
            # Every chat starts with the same system prompt and tiers: keep their KV
            # blocks (vLLM's default on GPUs; said here so that every build does it).
            enable_prefix_caching=True,
            # llguidance, as in the other backends (its Lark names special tokens).
            structured_outputs_config={"backend": "guidance"},
        )
        self.engine = AsyncLLM.from_engine_args(args)
        tokenizer = self.engine.get_tokenizer()  # a coroutine in some vLLM versions
        self.tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        self.tool_family = family_of(self.tokenizer)
        self.max_context = int(self.engine.model_config.max_model_len)
        self.device = str(self.engine.vllm_config.device_config.device)
        log.info("vLLM serving %s on %s", self.model_ref, self.device)

    def _sampling(self, job: ChatJob) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = job.sampling
        greedy = s.temperature <= SAMPLING_EPS
        return SamplingParams(
            max_tokens=s.max_tokens,
            min_tokens=s.min_tokens,
            temperature=0.0 if greedy else s.temperature,
            top_p=1.0 if greedy else s.top_p,
            repetition_penalty=s.repetition_penalty,
            stop=list(s.stop) or None,
            seed=s.seed,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=self._structured(job),
            logit_bias=self._bans(job),
            logprobs=job.logprobs,
            # The tool-call marker is a special token: it must reach the text.
            skip_special_tokens=job.tools is None,
        )

    def _bans(self, job: ChatJob) -> dict[int, float] | None:
        """A chat offered no tools may not write the tool-call marker (-100: vLLM's
        strongest bias)."""
        banned = banned_marker(job, self.tool_family)
        return {banned: -100.0} if banned is not None else None

    def _structured(self, job: ChatJob) -> Any:
        """vLLM's structured-output parameter for the job's constraint, or None."""
        from vllm.sampling_params import StructuredOutputsParams

        from services.grammars import JSON_STYLE

        answer = None
        if job.response_format is not None:
            answer = job.response_format.json_schema or {"type": "object"}
        use, tools = job.tools, self.tool_family
        if use is not None and use.choice != "auto":
            if tools is None:
                raise PermanentError("this model has no tool-call format", "tools_unsupported")
            return StructuredOutputsParams(grammar=tools.lark(tools.calls_schema(use)))
        if use is not None and answer is not None and tools is not None:
            calls = tools.calls_schema(use)
            return StructuredOutputsParams(grammar=tools.lark(calls, otherwise=answer))
        if answer is not None:
            return StructuredOutputsParams(json={**answer, "x-guidance": JSON_STYLE})
        return None

    @staticmethod
    def _logprobs(completion: Any, wanted: int | None) -> tuple[TokenLogprob, ...] | None:
        """vLLM's per-token {id: Logprob} (the picked token and the `wanted` most likely,
        ranked from 1) as the bus's TokenLogprobs."""
        if wanted is None or not completion.logprobs:
            return None
        out = []
        for token, alternatives in zip(completion.token_ids, completion.logprobs, strict=False):
            ranked = sorted(
                (item for item in alternatives.items() if 1 <= (item[1].rank or 0) <= wanted),
                key=lambda item: item[1].rank,
            )
            top = [
                TopLogprob(token=lp.decoded_token or "", token_id=i, logprob=lp.logprob)
                for i, lp in ranked
            ]
            picked = alternatives[token]
            out.append(
                TokenLogprob(
                    token=picked.decoded_token or "",
                    token_id=token,
                    logprob=picked.logprob,
                    top=top,
                )
            )
        return tuple(out)

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationEvent]:
        ids = encode_prompt(self.tokenizer, job, self.max_context, self.tool_family)
        try:
            sampling = self._sampling(job)
        except ValueError as exc:  # vLLM refused the grammar (the gateway checked it)
            raise PermanentError(f"cannot constrain the answer: {exc}", "invalid_schema") from exc
        lora = None
        if job.model not in (None, self.base_model):
            if job.model not in self._loras:
                raise PermanentError(f"model {job.model!r} is not served here", "model_not_found")
            lora = self._loras[job.model][1]
        request_id = f"{job.job_id}-{uuid.uuid4().hex[:6]}"
        generated = cached = 0
        finished = False
        try:
            async for output in self._outputs(ids, sampling, request_id, lora):
                completion = output.outputs[0]
                cached = max(cached, output.num_cached_tokens or 0)
                new = len(completion.token_ids)
                generated += new
                self._tokens += new
                if completion.text or new:
                    yield TextDelta(completion.text, new, self._logprobs(completion, job.logprobs))
                if output.finished:
                    finished = True
                    reason: FinishReason = (
                        "length" if completion.finish_reason == "length" else "stop"
                    )
                    yield Finished(reason, len(ids), generated, cached)
        finally:
            if not finished:  # the consumer went away: free the engine's slot
                await self.engine.abort(request_id)

    async def _outputs(
        self, ids: list[int], sampling: Any, request_id: str, lora: Any
    ) -> AsyncIterator[Any]:
        """The engine's outputs; its refusal of a request (a grammar it cannot compile,
        raised before any output) is the request's fault, not the worker's."""
        outputs = self.engine.generate(
            {"prompt_token_ids": ids}, sampling, request_id, lora_request=lora
        )
        try:
            first = await anext(outputs)
        except StopAsyncIteration:
            return
        except ValueError as exc:
            raise PermanentError(f"the request was refused: {exc}", "invalid_request") from exc
        yield first
        async for output in outputs:
            yield output

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    @property
    def adapters(self) -> dict[str, int]:
        return {name: version for name, (version, _) in self._loras.items()}

    # vLLM's automatic prefix caching keeps its own blocks and counters; what it
    # reused is in each job's usage (cached_tokens).
    prefix_cache = None

    async def load_adapter(self, name: str, version: int, folder: Path) -> None:
        """A new LoRARequest id per version: requests already running keep the old
        weights, new ones get the new; the old id is dropped from the engine."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(f"{name}@v{version}", self._next_lora_id, str(folder))
        self._next_lora_id += 1
        await self.engine.add_lora(request)
        previous = self._loras.get(name)
        self._loras[name] = (version, request)
        if previous is not None:
            await self.engine.remove_lora(previous[1].lora_int_id)

    async def health(self) -> dict[str, object]:
        return {"backend": "vllm", "model": self.model_ref, "device": self.device}

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
