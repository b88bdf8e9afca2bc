"""Log probabilities of picked tokens, the same way in every backend that picks its
own tokens: from the model's raw logits at that step, before repetition penalty,
temperature, top-p and any grammar mask (what the model itself believed; vLLM's
default too)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proto.messages import TokenLogprob, TopLogprob


@dataclass(frozen=True, slots=True)
class Logprobs:
    """A picked token's log probability and the `top` most likely (id, log probability)."""

    logprob: float
    top: list[tuple[int, float]]


def from_numpy(logits: Any, token: int, top: int) -> Logprobs:
    """Logprobs of `token` from one row of raw logits (a numpy array)."""
    import numpy as np

    row = logits.astype(np.float64)
    shifted = row - row.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    best: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(-logprobs, top)[:top] if top < len(row) else np.arange(len(row))
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = [(int(i), float(logprobs[i])) for i in ids]
    return Logprobs(float(logprobs[token]), best)


def token_logprob(texts: Callable[[int], str], token: int, logprobs: Logprobs) -> TokenLogprob:
    """The bus form: each token with its own text (`texts`: id -> text, e.g. TokenTexts)."""
    top = [TopLogprob(token=texts(i), token_id=i, logprob=v) for i, v in logprobs.top]
    return TokenLogprob(token=texts(token), token_id=token, logprob=logprobs.logprob, top=top)
