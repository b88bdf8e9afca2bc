"""Counting a prompt's tokens in the gateway, before any worker sees it, so that a
prompt longer than the model's context is a 400 at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from context_store.assembly import TokenCounter, cached
from inference_worker.backends.prompts import template_inputs
from inference_worker.backends.tool_calls import family_of
from proto.messages import ChatJob
from services.errors import InvalidRequest, MeshError


class PromptCounter:
    """Counts prompt tokens with the model's own tokenizer, before any worker sees them.

    Rendering the chat template and tokenizing cost ~1 ms of the gateway's CPU per
    request, most of its share. A token holds at least one byte of text, so a prompt
    whose bytes plus the template's own tokens fit the context is let through
    uncounted; only prompts near the limit are tokenized.
    """

    def __init__(self, tokenizer: Any, max_context: int) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.tools = family_of(tokenizer)  # the workers' template inputs, the same way
        # The template's own tokens: a fixed part and a part per message.
        one = self._template_tokens([{"role": "user", "content": ""}])
        three = self._template_tokens(
            [{"role": r, "content": ""} for r in ("user", "assistant", "user")]
        )
        self.per_message = max((three - one) // 2, 0) + 2
        self.fixed = one + 8

    def _template_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(
            self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=False
            )
        )

    def upper_bound(self, job: ChatJob) -> int:
        """At least as many tokens as the prompt has (without tools: `check` counts
        those)."""
        if job.prompt is not None:
            return len(job.prompt.encode()) + self.fixed
        text = sum(len(m.content.encode()) for m in job.messages)
        return text + self.fixed + self.per_message * len(job.messages)

    @classmethod
    def load(cls, ref: str, max_context: int) -> PromptCounter:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ref)
        if not max_context:
            config = Path(ref) / "config.json"
            if config.is_file():
                max_context = int(json.loads(config.read_text()).get("max_position_embeddings", 0))
        return cls(tokenizer, max_context or 32768)

    def render(self, job: ChatJob) -> str:
        """The prompt as the model sees it (the chat template applied)."""
        if job.prompt is not None:
            return job.prompt
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    **self._inputs(job), tokenize=False, add_generation_prompt=True
                )
            )
        except MeshError:
            raise
        except Exception as exc:  # the template's raise_exception
            raise InvalidRequest(str(exc), "invalid_messages") from exc

    def _inputs(self, job: ChatJob) -> dict[str, Any]:
        try:
            return template_inputs(job, self.tools)
        except MeshError as exc:  # tools for a model that has no tool-call format
            raise InvalidRequest(exc.message, exc.code) from exc

    def count(self, job: ChatJob) -> int:
        if job.prompt is not None:
            return len(self.tokenizer.encode(job.prompt, add_special_tokens=True))
        try:
            ids = self.tokenizer.apply_chat_template(
                **self._inputs(job), tokenize=True, add_generation_prompt=True, return_dict=False
            )
        except MeshError:
            raise
        except Exception as exc:  # the template's raise_exception
            raise InvalidRequest(str(exc), "invalid_messages") from exc
        return len(ids)

    def check(self, job: ChatJob) -> None:
        # Tools and calls render as JSON the bound does not foresee well: counted.
        tools = job.tools is not None or any(m.tool_calls or m.role == "tool" for m in job.messages)
        if not tools and self.upper_bound(job) + job.sampling.max_tokens <= self.max_context:
            return
        tokens = self.count(job)
        if tokens + job.sampling.max_tokens > self.max_context:
            raise InvalidRequest(
                f"the prompt has {tokens} tokens; with max_tokens {job.sampling.max_tokens} "
                f"that exceeds the model's context of {self.max_context}",
                "context_length_exceeded",
            )


def token_counter(prompts: PromptCounter | None) -> TokenCounter:
    """Tokens of a piece of text with the model's tokenizer (about 3 bytes each without)."""
    if prompts is None:
        return lambda text: len(text.encode()) // 3 + 1
    encode: Callable[..., list[int]] = prompts.tokenizer.encode
    return cached(lambda text: len(encode(text, add_special_tokens=False)))
