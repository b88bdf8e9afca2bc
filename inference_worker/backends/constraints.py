"""Grammar-constrained decoding: which tokens a row may pick next.

A job with a `response_format`, or with tools it must call, decodes under a grammar:
before each token is picked, every token that cannot continue a valid answer is
masked out of the row's logits; after, the grammar advances by the token picked.
The grammars are llguidance's (JSON schemas, and Lark with special tokens for tool
calls); bench/grammar_libraries.py measured it against xgrammar and outlines-core on
this CPU: it compiles a schema fastest (about 1 ms, and every request brings its own
schema) and computes a mask in about 60 us at Mistral's vocabulary size.

Every backend that picks its own tokens (transformers, llama.cpp) uses this module;
vLLM is given the same grammar through its structured-output parameter. The gateway
checks a schema with `services.grammars.schema_problem` before a job is published,
so that what a worker is asked to enforce, it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from proto.messages import ChatJob
from services.errors import PermanentError
from services.grammars import json_grammar

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Plan:
    """The grammar a job decodes under. With `trigger`, the grammar applies only from
    the moment that token is picked (a tool call under tool_choice auto); before it,
    the model writes freely."""

    grammar: str
    trigger: int | None = None


def plan_for(job: ChatJob, tools: Any) -> Plan | None:
    """The grammar of `job`, or None when it decodes freely. `tools`: the model
    family's tool-call format (inference_worker.backends.tool_calls), None when the
    model has none."""
    answer = None
    if job.response_format is not None:
        answer = job.response_format.json_schema or ANY_OBJECT
    use = job.tools
    if use is None:
        return Plan(json_grammar(answer)) if answer is not None else None
    if tools is None:
        raise ValueError("this model has no tool-call format")
    calls = tools.calls_schema(use)
    if use.choice != "auto":
        return Plan(tools.grammar(calls))
    if answer is not None:  # either a call or the answer the format asks for
        return Plan(tools.grammar(calls, otherwise=answer))
    return Plan(json_grammar(calls), trigger=tools.marker_id)


class Matchers:
    """The llguidance view of one model's vocabulary, for building row matchers."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> Matchers:
        """A transformers tokenizer; `vocab_size`: the model's logits (may be padded)."""
        import llguidance.hf

        return cls(llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size))

    @classmethod
    def for_llamacpp(cls, vocab: Any) -> Matchers:
        """A llama.cpp model's vocabulary (about a second for 32k tokens)."""
        import warnings

        import llguidance.llamacpp

        with warnings.catch_warnings():  # it asks each token's kind the deprecated way
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls(llguidance.llamacpp.lltokenizer_from_vocab(vocab))

    def matcher(self, plan: Plan) -> RowGrammar:
        return RowGrammar(llguidance.LLMatcher(self.tokenizer, plan.grammar), plan.trigger)

    def for_job(self, job: ChatJob, tools: Any) -> RowGrammar | None:
        """The grammar state `job`'s answer decodes under, None when it is free;
        PermanentError when it cannot be built (the gateway checked the schema, so
        this is rare)."""
        try:
            plan = plan_for(job, tools)
            return self.matcher(plan) if plan is not None else None
        except ValueError as exc:
            raise PermanentError(f"cannot constrain the answer: {exc}", "invalid_schema") from exc


class ConstraintError(ValueError):
    """The grammar refused a token, or left no token to pick."""


class RowGrammar:
    """One row's grammar state."""

    def __init__(self, matcher: llguidance.LLMatcher, trigger: int | None) -> None:
        if matcher.is_error():
            raise ConstraintError(matcher.get_error())
        self.matcher = matcher
        self.trigger = trigger
        self.active = trigger is None
        self._np_mask: Any = None

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the tokens allowed next into row `index` of `bitmask` (packed int32)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, index)

    def advance(self, token: int) -> None:
        if not self.active:
            self.active = token == self.trigger
            return
        if not self.matcher.consume_token(token):
            raise ConstraintError(self.matcher.get_error() or f"token {token} not allowed")

    def mask_numpy(self, logits: Any) -> None:
        """Mask one row of logits (a numpy array) in place, when the grammar applies."""
        if not self.active:
            return
        import llguidance.numpy

        if self._np_mask is None:
            self._np_mask = llguidance.numpy.allocate_token_bitmask(1, len(logits))
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._np_mask, 0)
        llguidance.numpy.apply_token_bitmask_inplace(logits[None, :], self._np_mask)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the row should end)."""
        return self.active and self.matcher.is_stopped()


def mask_rows(
    scores: torch.Tensor, grammars: list[tuple[int, RowGrammar]], bitmask: torch.Tensor
) -> None:
    """Mask, in place, the logits of the rows in `grammars` (row index, grammar) that
    are under their grammar now; the other rows are left alone.

    The bits are unpacked with plain tensor operations on the logits' device, not
    llguidance's helper: that one is a torch.compile kernel, which needs a compiler
    at run time and stalls the first call for seconds."""
    active = [(index, grammar) for index, grammar in grammars if grammar.active]
    if not active:
        return
    rows = [index for index, _ in active]
    for place, (_, grammar) in enumerate(active):
        grammar.fill(bitmask, place)
    words = bitmask[: len(rows)].to(scores.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, : scores.shape[-1]]
    index = torch.tensor(rows, device=scores.device)
    scores[index] = scores[index].masked_fill(~allowed, -float("inf"))


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    import llguidance.torch

    return llguidance.torch.allocate_token_bitmask(rows, vocab_size)
