"""The phone answering on its own: the model it downloads, what it needs to answer as
the mesh would (system prompt with the tiers, defaults), and the upload of the turns
it answered while no gateway was reachable.

The kit and the model need the `context` scope: the system prompt carries the tiers,
and the model the owner's adapter merged in (the phone's key has chat and context).
Uploading turns needs `chat`, as chatting does."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from gateway.auth import ChatKey, ContextKey
from gateway.deps import Adapters, Chat, Conversations, EngineDep, Settings
from gateway.engine import served_models
from gateway.routes import ERRORS
from gateway.translate import system_prompt
from proto.adapters import PHONE_FILE, PhoneModel
from proto.api import DeviceKit, TurnUpload, TurnUploadResult
from services.adapters import BASE_NAME, AdapterRegistry
from services.errors import NotFound

router = APIRouter(tags=["device"])
BaseName = Annotated[str, PathParam(pattern=BASE_NAME, description="Base model name.")]
PhoneFile = Annotated[str, PathParam(pattern=PHONE_FILE, description="The phone model's file.")]
DEVICE_TURN_REMEMBERED_S = 90 * 86_400  # a phone may stay offline for weeks


def phone_model(registry: AdapterRegistry, served: list[str]) -> PhoneModel | None:
    """The current phone model, of a base model live workers serve if one has one."""
    models = [m for base in registry.base_models() if (m := registry.phone_models(base).current)]
    models.sort(key=lambda m: (m.base_model not in served, m.base_model))
    return models[0] if models else None


@router.get("/device", operation_id="device_kit", response_model=DeviceKit, responses=ERRORS)
async def device_kit(
    key: ContextKey, chat: Chat, adapters: Adapters, engine: EngineDep, settings: Settings
) -> DeviceKit:
    """What the phone keeps to answer with no gateway reachable: its model's file,
    sha256 and size, and the system prompt a chat gets now (own prompt + tiers)."""
    served = served_models(await engine.workers())
    model = phone_model(adapters.registry, served)
    tiers = await chat.tiers.get(None)
    return DeviceKit(
        model=model,
        model_url=f"/device/model/{model.base_model}/{model.file}" if model else None,
        model_label=model.label if model else None,
        system_prompt=system_prompt(settings.system_prompt, tiers),
        history_messages=settings.history_messages,
        max_tokens=settings.default_max_tokens,
        temperature=settings.temperature,
        as_of=datetime.now(UTC).isoformat(),
    )


@router.get(
    "/device/model/{base_model}/{file_name}",
    operation_id="device_model_file",
    responses={
        **ERRORS,
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "The part a `Range` header asked for (a resumed download)."},
    },
    response_class=FileResponse,
)
async def device_model_file(
    key: ContextKey, adapters: Adapters, base_model: BaseName, file_name: PhoneFile
) -> FileResponse:
    """The phone model's file; `Range: bytes=N-` resumes a download (206)."""
    path = adapters.registry.phone_file(base_model, file_name)
    if path is None:
        raise NotFound(f"no phone model {file_name} for {base_model}")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"Cache-Control": "no-store"},  # the client keeps it in its own storage
    )


@router.post(
    "/conversation/turns",
    operation_id="upload_device_turns",
    response_model=TurnUploadResult,
    responses=ERRORS,
)
async def upload_device_turns(
    body: TurnUpload, key: ChatKey, chat: Chat, conversations: Conversations
) -> TurnUploadResult:
    """Turns the phone answered on its own, added to the conversation's history in
    order. Each turn is added once, however often (and from however many retries)
    it is uploaded. A time later than the gateway's clock (a phone's clock ahead) is
    recorded as now: a turn from the future would stay the key's latest forever."""
    await chat.turns.flush(key.key_id, body.conversation_id)  # the gateway's held ones first
    now = datetime.now(UTC)
    recorded = 0
    for turn in body.turns:
        recorded += await conversations.append_turn(
            key.key_id,
            body.conversation_id,
            turn.user,
            turn.assistant,
            at=min(turn.at, now),
            turn_id=f"device:{key.key_id}:{turn.turn_id}",
            answered_on=turn.answered_on,
            remember_s=DEVICE_TURN_REMEMBERED_S,
        )
    return TurnUploadResult(
        conversation_id=body.conversation_id,
        recorded=recorded,
        already_recorded=len(body.turns) - recorded,
    )
