"""What the sync and async clients share: URLs, request bodies, error mapping, SSE."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mesh_client.errors import (
    BY_STATUS,
    ConflictError,
    RateLimitError,
    ServerError,
    StreamError,
)
from proto.adapters import AdapterInfo, AdapterList
from proto.api import (
    ChatResponse,
    Conversation,
    ConversationDeleted,
    ConversationList,
    ConversationTraining,
    GenerateResponse,
    Health,
    Info,
)
from proto.context import Document, LogEntry, LogPage

DEFAULT_URL = "http://127.0.0.1:8000"
TIER_FILES = {
    "PORTFOLIO_CONTEXT.md": "portfolio",
    "PROJECT_CONTEXT.md": "project",
    "SESSION_BRIEFING.md": "briefing",
}
# A gateway that answers with these has not taken the request: the next one may.
FAIL_OVER_STATUSES = {502, 503}


def base_urls(urls: str | Sequence[str] | None) -> list[str]:
    """The ordered gateway list: the argument, else MESH_GATEWAY_URLS (comma-separated),
    else the local gateway."""
    if urls is None:
        urls = os.environ.get("MESH_GATEWAY_URLS") or DEFAULT_URL
    if isinstance(urls, str):
        urls = urls.split(",")
    cleaned = [u.strip().rstrip("/") for u in urls if u.strip()]
    if not cleaned:
        raise ValueError("at least one gateway URL is needed")
    return cleaned


def headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("MESH_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def timeout(total: float, connect: float) -> httpx.Timeout:
    # A dead LAN address must fail fast so the next gateway gets its turn.
    return httpx.Timeout(total, connect=connect)


def raise_for(response: httpx.Response) -> None:
    """Typed error for a non-2xx answer, with the gateway's message and code."""
    if response.is_success:
        return
    try:
        detail = response.json()["error"]
        message, code, type_ = detail["message"], detail["code"], detail["type"]
    except (ValueError, KeyError, TypeError):
        message, code, type_ = response.text[:200] or response.reason_phrase, "", ""
    cls = BY_STATUS.get(response.status_code, ServerError)
    error = cls(message, response.status_code, code, type_, str(response.request.url))
    if isinstance(error, RateLimitError) and "Retry-After" in response.headers:
        error.retry_after = float(response.headers["Retry-After"])
    if isinstance(error, ConflictError):
        error.current_etag = response.headers.get("ETag") or None
        number = response.headers.get("X-Context-Version", "")
        error.current_version = int(number) if number.isdigit() else None
    raise error


def chat_body(message: str, **options: Any) -> dict[str, Any]:
    body = {"message": message}
    body.update({k: v for k, v in options.items() if v is not None})
    return body


@dataclass
class SSEParser:
    """Server-sent events from text lines: yields (event, data) per blank line."""

    event: str = "message"
    data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self.data:
                return None
            out = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def stream_item(event: str, data: str, url: str) -> tuple[str, Any]:
    """("text", str) or ("done", dict); StreamError for an error event."""
    payload = json.loads(data)
    if event == "chunk":
        return "text", payload["text"]
    if event == "done":
        return "done", payload
    if event == "error":
        detail = payload.get("error", {})
        raise StreamError(
            detail.get("message", "stream failed"),
            200,
            detail.get("code", ""),
            detail.get("type", ""),
            url,
        )
    return "other", payload


def tier_path(tier: str, project: str | None) -> tuple[str, dict[str, str]]:
    return f"/context/{tier}", ({"project": project} if project else {})


def read_context_file(path: str | Path) -> tuple[str, None] | tuple[None, str]:
    """(text, None) when the file exists; (None, tier) for a tier file name that is
    not here (the client then reads the tier from the gateway)."""
    path = Path(path)
    if path.is_file():
        return path.read_text(encoding="utf-8"), None
    tier = TIER_FILES.get(path.name)
    if tier is None:
        raise FileNotFoundError(f"{path}: no such file, and not a context tier's file name")
    return None, tier


def conversation_record(conversation_id: str | None, messages: Iterable[dict]) -> str:
    return (
        json.dumps({"conversation_id": conversation_id, "messages": list(messages)}, indent=2)
        + "\n"
    )


# -- the operations: one description each, sent by either client ------------------------


@dataclass(frozen=True)
class Call:
    """One JSON request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any], Any]
    options: dict[str, Any] = field(default_factory=dict)  # json / params / headers


def _query(conversation_id: str | None) -> dict[str, Any]:
    return {"params": {"conversation_id": conversation_id} if conversation_id else {}}


def chat(message: str, **options: Any) -> Call:
    return Call(
        "POST", "/chat", ChatResponse.model_validate, {"json": chat_body(message, **options)}
    )


def generate(prompt: str, **options: Any) -> Call:
    body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
    return Call("POST", "/generate", GenerateResponse.model_validate, {"json": body})


def conversations(limit: int) -> Call:
    return Call(
        "GET", "/conversations", ConversationList.model_validate, {"params": {"limit": limit}}
    )


def conversation(conversation_id: str | None) -> Call:
    return Call("GET", "/conversation", Conversation.model_validate, _query(conversation_id))


def delete_conversation(conversation_id: str | None) -> Call:
    return Call(
        "DELETE", "/conversation", ConversationDeleted.model_validate, _query(conversation_id)
    )


def mark_for_training(conversation_id: str | None, marked: bool) -> Call:
    method = "PUT" if marked else "DELETE"
    return Call(
        method,
        "/conversation/training",
        ConversationTraining.model_validate,
        _query(conversation_id),
    )


def get_tier(tier: str, project: str | None) -> Call:
    path, params = tier_path(tier, project)
    return Call("GET", path, Document.model_validate, {"params": params})


def if_match(version: int | str | Document) -> str:
    """The If-Match of a save: a Document read before (its global ETag, valid on every
    gateway once the sites have synced), an ETag as the gateway sent it, or this
    gateway's version number (0: a new document)."""
    if isinstance(version, Document):
        return f'"{version.hlc}-{version.site}"'
    if isinstance(version, int):
        return f'"v{version}"'
    return version if version.startswith('"') else f'"{version}"'


def put_tier(tier: str, content: str, version: int | str | Document, project: str | None) -> Call:
    path, params = tier_path(tier, project)
    options = {
        "params": params,
        "json": {"content": content},
        "headers": {"If-Match": if_match(version)},
    }
    return Call("PUT", path, Document.model_validate, options)


def log(limit: int, before: str | None) -> Call:
    params: dict[str, Any] = {"limit": limit, **({"before": before} if before else {})}
    return Call("GET", "/context/log", LogPage.model_validate, {"params": params})


def append_log(text: str) -> Call:
    return Call("POST", "/context/log", LogEntry.model_validate, {"json": {"text": text}})


def health() -> Call:
    return Call("GET", "/health", Health.model_validate)


def info() -> Call:
    return Call("GET", "/info", Info.model_validate)


def models() -> Call:
    return Call("GET", "/v1/models", lambda data: [m["id"] for m in data["data"]])


def adapters() -> Call:
    return Call("GET", "/admin/adapters", AdapterList.model_validate)


def rollback(name: str, version: int | None) -> Call:
    body = {"version": version} if version else {}
    return Call(
        "POST", f"/admin/adapters/{name}/rollback", AdapterInfo.model_validate, {"json": body}
    )


def turn(message: str, reply: ChatResponse) -> list[dict[str, str]]:
    """The two messages `generate_response` keeps in the client's history."""
    return [{"role": "user", "content": message}, {"role": "assistant", "content": reply.response}]


def recorded_messages(conversation: Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in conversation.messages]
