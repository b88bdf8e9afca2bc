"""A job's prompt as token ids, the same way for every backend."""

from __future__ import annotations

from typing import Any

from proto.messages import ChatJob
from services.errors import PermanentError


def encode_prompt(tokenizer: Any, job: ChatJob, max_context: int) -> list[int]:
    """The tokenizer's own chat template for messages, or a raw prompt with its BOS."""
    if job.prompt is not None:
        ids = list(tokenizer.encode(job.prompt, add_special_tokens=True))
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
    else:
        messages = [message.model_dump() for message in job.messages]
        try:
            ids = list(
                tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=True, return_dict=False
                )
            )
        except Exception as exc:  # jinja's raise_exception: e.g. roles not alternating
            raise PermanentError(f"cannot build the prompt: {exc}", "invalid_messages") from exc
    check_context(ids, job, max_context)
    return ids


def check_context(ids: list[int], job: ChatJob, max_context: int) -> None:
    """Refuse a prompt that leaves no room for max_tokens (0: no limit known)."""
    if max_context and len(ids) + job.sampling.max_tokens > max_context:
        raise PermanentError(
            f"prompt of {len(ids)} tokens plus max_tokens {job.sampling.max_tokens} "
            f"exceeds the model's context of {max_context}",
            "context_length_exceeded",
        )
