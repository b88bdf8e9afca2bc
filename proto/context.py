"""Context store contracts: the sync events between sites and the REST bodies.

A document is named `portfolio`, `briefing` or `project/NAME`. Hybrid-logical-clock
timestamps (`hlc`) are integers: milliseconds since the epoch times 1000, plus a
counter; carried as strings on the wire so that no JSON parser rounds them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.messages import BusMessage

DOC_PATTERN = r"^(portfolio|briefing|project/[a-z0-9][a-z0-9._-]{0,63})$"
Tier = Literal["portfolio", "project", "briefing"]


class DocVersion(BusMessage):
    """One version of a document, as written at its origin site."""

    doc: str = Field(pattern=DOC_PATTERN, description="portfolio, briefing or project/NAME.")
    content: str = Field(description="The whole markdown document.")
    hlc: str = Field(pattern=r"^\d{1,19}$", description="Hybrid-logical-clock timestamp.")
    site: str = Field(description="The site that wrote it.")
    base: str = Field(
        description="'hlc|site' of the version it replaced (several, comma-separated, for a "
        "resolution that settles a conflict); empty for the first."
    )
    sha256: str = Field(description="sha256 of the content.")
    written_at: str = Field(description="Wall-clock time of the write (ISO 8601, UTC).")


class DroppedVersion(BusMessage):
    """A version its site's history retention dropped: what it replaced, without its
    content (catch-up sends this instead, so the other site still learns what it
    superseded)."""

    doc: str = Field(pattern=DOC_PATTERN, description="portfolio, briefing or project/NAME.")
    hlc: str = Field(pattern=r"^\d{1,19}$", description="Hybrid-logical-clock timestamp.")
    site: str = Field(description="The site that wrote it.")
    base: str = Field(description="As in DocVersion.")


class LogEntry(BusMessage):
    """One session-log entry; never changed once written."""

    entry_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Unique id.")
    text: str = Field(description="The entry, markdown.")
    hlc: str = Field(pattern=r"^\d{1,19}$", description="Hybrid-logical-clock timestamp.")
    site: str = Field(description="The site that wrote it.")
    written_at: str = Field(description="Wall-clock time of the write (ISO 8601, UTC).")


class ContextChanged(BusMessage):
    """Event: a site changed its context store (a document version or a log entry)."""

    type: Literal["context_changed"] = Field(default="context_changed", description="Type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    origin: str = Field(description="The site where the change was made.")
    version: DocVersion | None = Field(default=None, description="A new document version.")
    entry: LogEntry | None = Field(default=None, description="A new log entry.")
    dropped: DroppedVersion | None = Field(
        default=None, description="A version of the origin's that its retention dropped."
    )
    numbering: str | None = Field(
        default=None,
        max_length=64,
        description="The name of the numbering `seq` belongs to (see ContextSyncPage).",
    )
    seq: int | None = Field(
        default=None,
        ge=1,
        description="The origin's own sequence number of this change (1, 2, 3, ... with no "
        "gaps): what lets a site say which of the origin's changes it holds. None for a "
        "change made before sequence numbers.",
    )


class ContextSyncRequest(BusMessage):
    """Command: send me those of your own changes that I lack (catch-up)."""

    type: Literal["context_sync_request"] = Field(
        default="context_sync_request", description="Type."
    )
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    site: str = Field(description="The site asking.")
    since: dict[str, str] = Field(
        default_factory=dict,
        description="Sent by releases before `after`: origin -> newest hlc applied. Not "
        "answered any more (such a site is told to upgrade).",
    )
    after: dict[str, int] | None = Field(
        default=None,
        description="Origin site -> the greatest n such that the asker holds all of the "
        "origin's changes 1..n.",
    )
    have: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Origin site -> sequence numbers above `after` the asker holds "
        "already (at most a thousand listed; more are merely sent again).",
    )
    send_back: str | None = Field(
        default=None,
        max_length=400,
        description="The asker's Redis restarted and may have lost its last changes: send "
        "back, in ContextSyncReturns, its own changes you hold, after this cursor ('' "
        "from the start).",
    )
    numberings: dict[str, str] = Field(
        default_factory=dict,
        description="Origin site -> the numbering `after` and `have` count (from its "
        "pages); another one than the origin's own means: send everything.",
    )


class ContextSyncPage(BusMessage):
    """Answer to a ContextSyncRequest: one bounded page of the answering site's own
    changes that the asker lacks, oldest first."""

    type: Literal["context_sync_page"] = Field(default="context_sync_page", description="Type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    origin: str = Field(description="The answering site (whose changes these are).")
    site: str = Field(description="The site that asked.")
    numbering: str = Field(
        max_length=64,
        description="Names the origin's numbering of its changes: a new name after its "
        "Redis restarted (which may have lost its last changes and give their numbers "
        "again), and the page then answers from the start.",
    )
    changes: list[ContextChanged] = Field(description="Each with its `seq`.")
    through: int = Field(
        ge=0,
        description="Once these are applied, the asker holds every one of the origin's "
        "changes 1..through (those it lacked are here; the others it had, or the "
        "origin's history retention dropped them).",
    )
    more: bool = Field(description="More changes follow: ask again after applying these.")


class ContextSyncReturn(BusMessage):
    """Answer to a request with `send_back`: one bounded page of the asker's own
    changes (versions and log entries) that the answering site holds."""

    type: Literal["context_sync_return"] = Field(default="context_sync_return", description="Type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    origin: str = Field(description="The answering site.")
    site: str = Field(description="The site that asked (whose changes these are).")
    changes: list[ContextChanged] = Field(description="Oldest first, without numbers.")
    cursor: str = Field(max_length=400, description="Ask again after this one.")
    more: bool = Field(description="More follow: ask again with `send_back` = `cursor`.")


# -- REST -----------------------------------------------------------------------------


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Document(ApiModel):
    doc: str
    version: int = Field(description="This site's version number; send it back in If-Match.")
    content: str
    hlc: str
    site: str = Field(description="Where this version was written.")
    sha256: str
    written_at: str


class DocumentWrite(ApiModel):
    content: str = Field(max_length=2_000_000, description="The whole new document (markdown).")


class VersionInfo(ApiModel):
    id: str = Field(
        description="'<hlc>-<site>': names this version on every site (its ETag, unquoted)."
    )
    hlc: str
    site: str = Field(description="Where this version was written.")
    base: list[str] = Field(description="Ids of the versions it replaced (none for the first).")
    state: Literal["current", "superseded", "conflict"] = Field(
        description="current; superseded by a later version; or a conflict record (an edit "
        "made concurrently with the current one, not replaced yet)."
    )
    sha256: str
    written_at: str
    size: int = Field(description="Characters of content.")


class OldVersion(VersionInfo):
    content: str


class History(ApiModel):
    doc: str
    versions: list[VersionInfo] = Field(
        description="Every version this site holds, oldest first by (hlc, site): the same "
        "list on every site once synced. Superseded versions beyond the newest "
        "MESH_CONTEXT_HISTORY_KEEP are dropped; current and conflicting ones never."
    )


class LogAppend(ApiModel):
    text: str = Field(min_length=1, max_length=100_000, description="The entry (markdown).")


class LogPage(ApiModel):
    entries: list[LogEntry] = Field(description="Newest first.")
    next_before: str | None = Field(description="Pass as `before` for the next (older) page.")


class Conflict(ApiModel):
    conflict_id: str
    doc: str
    content: str = Field(description="The losing version's content.")
    hlc: str
    site: str
    written_at: str
    winner: str = Field(description="'hlc|site' of the version that won.")


class ConflictResolve(ApiModel):
    conflict_id: str = Field(max_length=200, description="From GET /context/conflicts.")
    winner: str | None = Field(
        default=None,
        max_length=60,
        description="The record's `winner` as you were shown it: when another edit has "
        "won since, the resolution is refused (409) instead of replacing an edit you never "
        "saw. Without it, the current winner is taken.",
    )
    keep: Literal["current", "conflict"] = Field(
        description="current: keep the current content; conflict: make the losing version's "
        "content current. Either way a new version replaces both, on every site."
    )


class SectionReport(ApiModel):
    tier: Literal["briefing", "project", "portfolio", "log"]
    doc: str | None = Field(description="Document name; None for the log.")
    version: int | None = Field(description="Version that went in (documents).")
    tokens: int = Field(description="Tokens of this section in the prompt (0 when dropped).")
    included: bool
    cut: str | None = Field(description="What was left out of this section, if anything.")


class ContextReport(ApiModel):
    """What the tiers contributed to a prompt."""

    budget: int
    tokens: int
    sections: list[SectionReport]


class ContextPreview(ApiModel):
    text: str = Field(description="The assembled context, as the model sees it.")
    report: ContextReport
