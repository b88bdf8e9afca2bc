"""The synchronous client."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from mesh_client import _core
from mesh_client.errors import GatewayUnreachable
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


class ChatStream:
    """Iterate for the answer's text pieces as they arrive; afterwards `text` is the
    whole answer and `done` the final event (conversation_id, finish_reason, usage)."""

    def __init__(self, lines: Iterator[str], url: str, on_close) -> None:
        self._lines, self._url, self._on_close = lines, url, on_close
        self.pieces: list[str] = []
        self.done: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def __iter__(self) -> Iterator[str]:
        parser = _core.SSEParser()
        try:
            for line in self._lines:
                event = parser.feed(line)
                if event is None:
                    continue
                kind, value = _core.stream_item(*event, self._url)
                if kind == "text":
                    self.pieces.append(value)
                    yield value
                elif kind == "done":
                    self.done = value
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading; the gateway then cancels the job."""
        self._on_close()


class MeshClient:
    """A client for one or more gateways, tried in order (LAN desktop first, VPS next).

    `base_urls`: a URL, a list, or None for MESH_GATEWAY_URLS / http://127.0.0.1:8000.
    `api_key`: None for MESH_API_KEY.
    """

    def __init__(
        self,
        base_urls: str | Sequence[str] | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 3.0,
    ) -> None:
        self.base_urls = _core.base_urls(base_urls)
        self.active_url: str | None = None
        self.conversation_id: str | None = None
        self.history: list[dict[str, str]] = []
        self._http = httpx.Client(
            headers=_core.headers(api_key), timeout=_core.timeout(timeout, connect_timeout)
        )

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ----------------------------------------------------------------------

    def _send(self, method: str, path: str, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """The first gateway's answer that is not a connection failure or a 502/503."""
        failures = []
        for index, base in enumerate(self.base_urls):
            request = self._http.build_request(method, base + path, **kwargs)
            try:
                response = self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{base}: {exc.__class__.__name__}")
                continue
            last = index == len(self.base_urls) - 1
            if response.status_code in _core.FAIL_OVER_STATUSES and not last:
                failures.append(f"{base}: HTTP {response.status_code}")
                response.close()
                continue
            self.active_url = base
            if not response.is_success and stream:
                response.read()
                response.close()
            _core.raise_for(response)
            return response
        raise GatewayUnreachable("no gateway answered: " + "; ".join(failures))

    def _call(self, call: _core.Call) -> Any:
        return call.parse(self._send(call.method, call.path, **call.options).json())

    # -- chat ---------------------------------------------------------------------------

    def chat(self, message: str, **options: Any) -> ChatResponse:
        """One answer. Options: context, conversation_id, model, project, max_tokens,
        temperature, top_p, repetition_penalty, stop, seed."""
        return self._call(_core.chat(message, **options))

    def stream(self, message: str, **options: Any) -> ChatStream:
        """The answer as it is generated (same options as `chat`)."""
        body = _core.chat_body(message, **options)
        response = self._send("POST", "/chat/stream", stream=True, json=body)
        return ChatStream(response.iter_lines(), str(response.url), response.close)

    def generate(self, prompt: str, **options: Any) -> GenerateResponse:
        """Continue a raw prompt, as the model sees it."""
        return self._call(_core.generate(prompt, **options))

    # -- conversations ------------------------------------------------------------------

    def conversations(self, limit: int = 50) -> ConversationList:
        """This key's conversations, the most recently active first."""
        return self._call(_core.conversations(limit))

    def conversation(self, conversation_id: str | None = None) -> Conversation:
        return self._call(_core.conversation(conversation_id))

    def delete_conversation(self, conversation_id: str | None = None) -> ConversationDeleted:
        return self._call(_core.delete_conversation(conversation_id))

    def mark_for_training(
        self, conversation_id: str | None = None, marked: bool = True
    ) -> ConversationTraining:
        return self._call(_core.mark_for_training(conversation_id, marked))

    # -- context tiers ------------------------------------------------------------------

    def get_tier(self, tier: str, project: str | None = None) -> Document:
        return self._call(_core.get_tier(tier, project))

    def put_tier(
        self, tier: str, content: str, version: int | str | Document, project: str | None = None
    ) -> Document:
        """Save if the stored version is still `version`: the Document read before (valid
        on every gateway once synced), its ETag, or this gateway's version number (0: a
        new document); ConflictError (with `current_version`, `current_etag`) otherwise."""
        return self._call(_core.put_tier(tier, content, version, project))

    def log(self, limit: int = 50, before: str | None = None) -> LogPage:
        return self._call(_core.log(limit, before))

    def append_log(self, text: str) -> LogEntry:
        return self._call(_core.append_log(text))

    # -- service ------------------------------------------------------------------------

    def health(self) -> Health:
        return self._call(_core.health())

    def info(self) -> Info:
        return self._call(_core.info())

    def models(self) -> list[str]:
        return self._call(_core.models())

    def adapters(self) -> AdapterList:
        return self._call(_core.adapters())

    def rollback(self, name: str, version: int | None = None) -> AdapterInfo:
        return self._call(_core.rollback(name, version))

    # -- the original SDK's conveniences ------------------------------------------------

    def generate_response(
        self, message: str, system_context: str | None = None, **options: Any
    ) -> str:
        """The answer's text, continuing this client's conversation."""
        reply = self.chat(
            message, context=system_context, conversation_id=self.conversation_id, **options
        )
        self.conversation_id = reply.conversation_id
        self.history += _core.turn(message, reply)
        return reply.response

    def load_session_context(self, path: str | Path, project: str | None = None) -> str:
        """A context file's text; for a tier's file name that is not here
        (SESSION_BRIEFING.md, PROJECT_CONTEXT.md, PORTFOLIO_CONTEXT.md), the tier as
        the gateway has it."""
        found = _core.read_context_file(path)  # (text, None) or (None, tier)
        return found[0] if found[0] is not None else self.get_tier(found[1], project).content

    def save_conversation(self, path: str | Path) -> Path:
        """Write this client's conversation as JSON (the gateway's record of it when
        there is one)."""
        messages = self.history
        if self.conversation_id:
            messages = _core.recorded_messages(self.conversation(self.conversation_id))
        path = Path(path)
        path.write_text(_core.conversation_record(self.conversation_id, messages))
        return path


MistralOrchestrator = MeshClient  # the original SDK's name
