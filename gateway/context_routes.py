"""The context tiers over HTTP (scope `context`): read with an ETag, write with
If-Match, history, old versions, the log, conflicts, and a preview of the prompt."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Response

from context_store.assembly import assemble
from context_store.store import VersionConflict, doc_name
from gateway.auth import ContextKey
from gateway.deps import Context as Store
from gateway.deps import CountTokens, Settings
from gateway.errors import ApiError
from gateway.routes import ERRORS
from proto.context import (
    Conflict,
    ConflictResolve,
    ContextPreview,
    Document,
    DocumentWrite,
    History,
    LogAppend,
    LogEntry,
    LogPage,
    OldVersion,
)

router = APIRouter(prefix="/context", tags=["context"])
TierPath = Literal["portfolio", "project", "briefing"]
ProjectQuery = Annotated[
    str | None,
    Query(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="The project (tier=project)."),
]
CONTEXT_ERRORS = {
    **ERRORS,
    409: ERRORS[400] | {"description": "Version conflict"},
    412: ERRORS[400] | {"description": "If-Match names a version that is no longer current"},
    428: ERRORS[400] | {"description": "If-Match is required"},
}


def _doc(tier: str, project: str | None) -> str:
    if tier == "project" and not project:
        raise ApiError(
            400, "invalid_request_error", "tier 'project' needs ?project=NAME", "project_required"
        )
    return doc_name(tier, project)


# A version's ETag is global: '"<hlc>-<site>"' names the same version on every site
# once synced, so a client that moves from the desktop to the VPS keeps its place.
# The old per-site '"vN"' is still accepted in If-Match for this release (a compare
# with this site's version number), and X-Context-Version carries that number.
VERSION_HEADER = "X-Context-Version"
GLOBAL_TAG = re.compile(r'(?:W/)?"?(\d{1,19})-([a-z0-9][a-z0-9-]{0,31})"?')
LOCAL_TAG = re.compile(r'(?:W/)?"?v?(\d+)"?')


def _etag(hlc: str, site: str) -> str:
    return f'"{hlc}-{site}"'


def _version_headers(document: Document) -> dict[str, str]:
    return {"ETag": _etag(document.hlc, document.site), VERSION_HEADER: str(document.version)}


def _expected_version(if_match: str | None) -> int | str:
    """The version the client edited: this site's number ("vN", "v0" for a new
    document), or a version id 'hlc|site' (the global ETag)."""
    if if_match is None:
        raise ApiError(
            428,
            "invalid_request_error",
            'send If-Match with the ETag of the version you edited ("v0" for a new document)',
            "if_match_required",
        )
    tag = if_match.strip()
    if match := GLOBAL_TAG.fullmatch(tag):
        return f"{match.group(1)}|{match.group(2)}"
    if match := LOCAL_TAG.fullmatch(tag):
        return int(match.group(1))
    raise ApiError(400, "invalid_request_error", f"unreadable If-Match: {if_match}", "bad_if_match")


@router.post(
    "/log",
    operation_id="append_log_entry",
    response_model=LogEntry,
    status_code=201,
    responses=CONTEXT_ERRORS,
)
async def append_log(body: LogAppend, key: ContextKey, store: Store) -> LogEntry:
    """Append an entry to the session log (entries are never edited)."""
    return await store.append_log(body.text)


@router.get(
    "/log", operation_id="list_log_entries", response_model=LogPage, responses=CONTEXT_ERRORS
)
async def list_log(
    key: ContextKey,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[str | None, Query(max_length=200, description="Cursor from a page.")] = None,
) -> LogPage:
    """Log entries, newest first, a page at a time."""
    entries = await store.log(limit, before)
    cursor = await store.log_cursor(entries[-1]) if len(entries) == limit else None
    return LogPage(entries=entries, next_before=cursor)


@router.get(
    "/conflicts",
    operation_id="list_conflicts",
    response_model=list[Conflict],
    responses=CONTEXT_ERRORS,
)
async def list_conflicts(key: ContextKey, store: Store) -> list[Conflict]:
    """Versions that lost to a concurrent edit at another site, kept for review."""
    return await store.conflicts()


@router.post(
    "/conflicts/resolve",
    operation_id="resolve_conflict",
    response_model=Document | None,
    responses=CONTEXT_ERRORS,
)
async def resolve_conflict(body: ConflictResolve, key: ContextKey, store: Store) -> Document | None:
    """Settle a conflict with a new version that replaces both: the current content
    (keep=current) or the losing version's (keep=conflict). It replicates like an edit."""
    if not any(c.conflict_id == body.conflict_id for c in await store.conflicts()):
        raise ApiError(404, "invalid_request_error", "no such conflict", "not_found")
    try:
        return await store.resolve(body.conflict_id, body.keep, body.winner)
    except VersionConflict as exc:
        raise ApiError(409, "invalid_request_error", exc.message, exc.code) from exc


@router.get(
    "/preview",
    operation_id="preview_context",
    response_model=ContextPreview,
    responses=CONTEXT_ERRORS,
)
async def preview(
    key: ContextKey,
    store: Store,
    settings: Settings,
    count_tokens: CountTokens,
    project: ProjectQuery = None,
    budget: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
) -> ContextPreview:
    """The context a chat would get now, and what went in."""
    assembly = await assemble(
        store,
        count_tokens,
        budget or settings.context_budget,
        project or settings.default_project or None,
    )
    return ContextPreview(text=assembly.text, report=assembly.report)


@router.get(
    "/{tier}",
    operation_id="get_context_document",
    response_model=Document,
    responses=CONTEXT_ERRORS,
)
async def get_document(
    tier: TierPath, key: ContextKey, store: Store, response: Response, project: ProjectQuery = None
) -> Document:
    """The current version; its ETag is the version to send back in If-Match."""
    document = await store.get(_doc(tier, project))
    if document is None:
        raise ApiError(404, "invalid_request_error", "no such document yet", "not_found")
    response.headers.update(_version_headers(document))
    return document


@router.put(
    "/{tier}",
    operation_id="put_context_document",
    response_model=Document,
    responses=CONTEXT_ERRORS,
)
async def put_document(
    tier: TierPath,
    body: DocumentWrite,
    key: ContextKey,
    store: Store,
    response: Response,
    project: ProjectQuery = None,
    if_match: Annotated[
        str | None,
        Header(description='The ETag of the version edited ("v0" for a new document).'),
    ] = None,
) -> Document:
    """Replace the document if it is still at the If-Match version (412 otherwise)."""
    expected = _expected_version(if_match)
    try:
        document = await store.write(_doc(tier, project), body.content, expected)
    except VersionConflict as exc:
        headers = {VERSION_HEADER: str(exc.current)}
        if exc.current_id:
            headers["ETag"] = _etag(*exc.current_id.split("|", 1))
        raise ApiError(
            412,
            "invalid_request_error",
            f"{exc.message}; read it again and reapply your edit",
            "version_conflict",
            headers,
        ) from exc
    response.headers.update(_version_headers(document))
    return document


@router.get(
    "/{tier}/history",
    operation_id="get_context_history",
    response_model=History,
    responses=CONTEXT_ERRORS,
)
async def history(
    tier: TierPath, key: ContextKey, store: Store, project: ProjectQuery = None
) -> History:
    """Every version this site holds (its own and the other sites': current,
    superseded, conflicting), oldest first: the same list on every site once synced."""
    doc = _doc(tier, project)
    return History(doc=doc, versions=await store.history(doc))


@router.get(
    "/{tier}/versions/{version}",
    operation_id="get_context_version",
    response_model=OldVersion,
    responses=CONTEXT_ERRORS,
)
async def old_version(
    tier: TierPath,
    version: Annotated[
        str,
        Path(
            max_length=60,
            description="The version's id (`<hlc>-<site>`, as in its ETag and the history), "
            "or, for this release, this site's version number.",
        ),
    ],
    key: ContextKey,
    store: Store,
    project: ProjectQuery = None,
) -> OldVersion:
    """One version, as it was."""
    ref: int | str
    if match := GLOBAL_TAG.fullmatch(version):
        ref = f"{match.group(1)}|{match.group(2)}"
    elif version.isascii() and version.isdigit():
        ref = int(version)
    else:
        raise ApiError(
            400,
            "invalid_request_error",
            "name a version by its id ('<hlc>-<site>') or this site's number",
            "bad_version",
        )
    document = await store.version(_doc(tier, project), ref)
    if document is None:
        raise ApiError(404, "invalid_request_error", "no such version", "not_found")
    return document
