"""The asynchronous client: the same methods as MeshClient, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
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


class AsyncChatStream:
    """`async for` the answer's text pieces; afterwards `text` and `done` as in ChatStream."""

    def __init__(self, lines: AsyncIterator[str], url: str, on_close) -> None:
        self._lines, self._url, self._on_close = lines, url, on_close
        self.pieces: list[str] = []
        self.done: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    async def __aiter__(self) -> AsyncIterator[str]:
        parser = _core.SSEParser()
        try:
            async for line in self._lines:
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
            await self.close()

    async def close(self) -> None:
        """Stop reading; the gateway then cancels the job."""
        await self._on_close()


class AsyncMeshClient:
    """MeshClient for asyncio code: the same constructor and methods, awaited."""

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
        self._http = httpx.AsyncClient(
            headers=_core.headers(api_key), timeout=_core.timeout(timeout, connect_timeout)
        )

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # -- transport ----------------------------------------------------------------------

    async def _send(
        self, method: str, path: str, stream: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """The first gateway's answer that is not a connection failure or a 502/503."""
        failures = []
        for index, base in enumerate(self.base_urls):
            request = self._http.build_request(method, base + path, **kwargs)
            try:
                response = await self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failures.append(f"{base}: {exc.__class__.__name__}")
                continue
            last = index == len(self.base_urls) - 1
            if response.status_code in _core.FAIL_OVER_STATUSES and not last:
                failures.append(f"{base}: HTTP {response.status_code}")
                await response.aclose()
                continue
            self.active_url = base
            if not response.is_success and stream:
                await response.aread()
                await response.aclose()
            _core.raise_for(response)
            return response
        raise GatewayUnreachable("no gateway answered: " + "; ".join(failures))

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    # -- chat ---------------------------------------------------------------------------

    async def chat(self, message: str, **options: Any) -> ChatResponse:
        """One answer. Options: context, conversation_id, model, project, max_tokens,
        temperature, top_p, repetition_penalty, stop, seed."""
        body = _core.chat_body(message, **options)
        return ChatResponse.model_validate(await self._json("POST", "/chat", json=body))

    async def stream(self, message: str, **options: Any) -> AsyncChatStream:
        """The answer as it is generated (same options as `chat`)."""
        body = _core.chat_body(message, **options)
        response = await self._send("POST", "/chat/stream", stream=True, json=body)
        return AsyncChatStream(response.aiter_lines(), str(response.url), response.aclose)

    async def generate(self, prompt: str, **options: Any) -> GenerateResponse:
        """Continue a raw prompt, as the model sees it."""
        body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
        return GenerateResponse.model_validate(await self._json("POST", "/generate", json=body))

    # -- conversations ------------------------------------------------------------------

    async def conversations(self, limit: int = 50) -> ConversationList:
        """This key's conversations, the most recently active first."""
        data = await self._json("GET", "/conversations", params={"limit": limit})
        return ConversationList.model_validate(data)

    async def conversation(self, conversation_id: str | None = None) -> Conversation:
        params = {"conversation_id": conversation_id} if conversation_id else {}
        return Conversation.model_validate(await self._json("GET", "/conversation", params=params))

    async def delete_conversation(self, conversation_id: str | None = None) -> ConversationDeleted:
        params = {"conversation_id": conversation_id} if conversation_id else {}
        data = await self._json("DELETE", "/conversation", params=params)
        return ConversationDeleted.model_validate(data)

    async def mark_for_training(
        self, conversation_id: str | None = None, marked: bool = True
    ) -> ConversationTraining:
        params = {"conversation_id": conversation_id} if conversation_id else {}
        method = "PUT" if marked else "DELETE"
        data = await self._json(method, "/conversation/training", params=params)
        return ConversationTraining.model_validate(data)

    # -- context tiers ------------------------------------------------------------------

    async def get_tier(self, tier: str, project: str | None = None) -> Document:
        path, params = _core.tier_path(tier, project)
        return Document.model_validate(await self._json("GET", path, params=params))

    async def put_tier(
        self, tier: str, content: str, version: int, project: str | None = None
    ) -> Document:
        """Save if the stored version is still `version` (0: a new document);
        ConflictError (with `current_version`) otherwise."""
        path, params = _core.tier_path(tier, project)
        data = await self._json(
            "PUT",
            path,
            params=params,
            json={"content": content},
            headers={"If-Match": f'"v{version}"'},
        )
        return Document.model_validate(data)

    async def log(self, limit: int = 50, before: str | None = None) -> LogPage:
        params: dict[str, Any] = {"limit": limit, **({"before": before} if before else {})}
        return LogPage.model_validate(await self._json("GET", "/context/log", params=params))

    async def append_log(self, text: str) -> LogEntry:
        return LogEntry.model_validate(
            await self._json("POST", "/context/log", json={"text": text})
        )

    # -- service ------------------------------------------------------------------------

    async def health(self) -> Health:
        return Health.model_validate(await self._json("GET", "/health"))

    async def info(self) -> Info:
        return Info.model_validate(await self._json("GET", "/info"))

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._json("GET", "/v1/models"))["data"]]

    async def adapters(self) -> AdapterList:
        return AdapterList.model_validate(await self._json("GET", "/admin/adapters"))

    async def rollback(self, name: str, version: int | None = None) -> AdapterInfo:
        body = {"version": version} if version else {}
        data = await self._json("POST", f"/admin/adapters/{name}/rollback", json=body)
        return AdapterInfo.model_validate(data)

    # -- the original SDK's conveniences ------------------------------------------------

    async def generate_response(
        self, message: str, system_context: str | None = None, **options: Any
    ) -> str:
        """The answer's text, continuing this client's conversation."""
        reply = await self.chat(
            message, context=system_context, conversation_id=self.conversation_id, **options
        )
        self.conversation_id = reply.conversation_id
        self.history += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": reply.response},
        ]
        return reply.response

    async def load_session_context(self, path: str | Path, project: str | None = None) -> str:
        """A context file's text; for a tier's file name that is not here
        (SESSION_BRIEFING.md, PROJECT_CONTEXT.md, PORTFOLIO_CONTEXT.md), the tier as
        the gateway has it."""
        text, tier = _core.read_context_file(path)
        return text if text is not None else (await self.get_tier(tier, project)).content

    async def save_conversation(self, path: str | Path) -> Path:
        """Write this client's conversation as JSON (the gateway's record of it when
        there is one)."""
        messages = self.history
        if self.conversation_id:
            recorded = (await self.conversation(self.conversation_id)).messages
            messages = [{"role": m.role, "content": m.content} for m in recorded]
        path = Path(path)
        await asyncio.to_thread(
            path.write_text, _core.conversation_record(self.conversation_id, messages)
        )
        return path
