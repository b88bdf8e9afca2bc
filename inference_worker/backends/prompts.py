"""A job's prompt as token ids, the same way for every backend."""

from __future__ import annotations

import json
from typing import Any

from inference_worker.backends.tool_calls import ToolFamily
from proto.messages import ChatJob
from services.errors import PermanentError


def template_inputs(job: ChatJob, tools: ToolFamily | None) -> dict[str, Any]:
    """The chat template's arguments for `job`: its messages (with tool calls and
    results in the shape the family's template reads) and the tools offered."""
    if tools is None:
        if job.tools is not None:
            raise PermanentError("this model has no tool-call format", "tools_unsupported")
        messages = [_plain(message.model_dump(exclude_none=True)) for message in job.messages]
        return {"conversation": messages}
    inputs: dict[str, Any] = {"conversation": tools.template_messages(job.messages)}
    if job.tools is not None:
        inputs["tools"] = tools.template_tools(job.tools)
    return inputs


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    for call in message.get("tool_calls", []):
        arguments = json.loads(call.pop("arguments"))
        call["function"] = {"name": call.pop("name"), "arguments": arguments}
        call["type"] = "function"
    return message


def render_prompt(tokenizer: Any, job: ChatJob, tools: ToolFamily | None) -> list[int]:
    """The tokenizer's own chat template over `job`'s messages, as token ids."""
    try:
        return list(
            tokenizer.apply_chat_template(
                **template_inputs(job, tools),
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        )
    except PermanentError:
        raise
    except Exception as exc:  # jinja's raise_exception: e.g. roles not alternating
        raise PermanentError(f"cannot build the prompt: {exc}", "invalid_messages") from exc


def encode_prompt(
    tokenizer: Any, job: ChatJob, max_context: int, tools: ToolFamily | None = None
) -> list[int]:
    """The tokenizer's own chat template for messages, or a raw prompt with its BOS."""
    if job.prompt is not None:
        ids = list(tokenizer.encode(job.prompt, add_special_tokens=True))
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
    else:
        ids = render_prompt(tokenizer, job, tools)
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
