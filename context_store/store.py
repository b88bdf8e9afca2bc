"""The four handoff tiers in one site's Redis: versioned documents with history,
an append-only log, conflict records, and an outbox of local changes for sync."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

import redis.asyncio as redis

from context_store import scripts
from proto.context import Conflict, ContextChanged, Document, DocVersion, LogEntry, VersionInfo
from services.errors import PermanentError

# The client decodes replies (`decode_responses=True`, services.redis_client), so every
# key, field and value read back is a str; redis-py types them as `bytes | str` whatever
# the client. These name what the replies are.
_Fields = dict[str, str]  # a hash, or a stream entry's fields
_Entries = list[tuple[str, _Fields]]  # a stream range: (entry id, fields)


class VersionConflict(PermanentError):
    """The write named a version that is no longer current. `current`: this site's
    number of the current version; `current_id`: its 'hlc|site' ('' when none)."""

    code = "version_conflict"

    def __init__(self, doc: str, current: int, current_id: str = "") -> None:
        super().__init__(f"{doc} is at version {current}")
        self.current = current
        self.current_id = current_id


def doc_name(tier: str, project: str | None = None) -> str:
    return f"project/{project}" if tier == "project" else tier


Clock = Callable[[], float]  # seconds since the epoch, as time.time


def _now(clock: Clock = time.time) -> tuple[int, str]:
    now = clock()
    return int(now * 1000), datetime.fromtimestamp(now, UTC).isoformat()


class ContextStore:
    """One site's context store. Every write is one Lua script: atomic and CAS."""

    def __init__(
        self, client: redis.Redis, namespace: str, site: str, clock: Clock = time.time
    ) -> None:
        self.client = client
        self.site = site
        self.clock = clock  # tests set a site's clock ahead or behind
        self.prefix = f"{namespace}:ctx"
        self._write = client.register_script(scripts.WRITE_DOC)
        self._apply_doc = client.register_script(scripts.APPLY_DOC)
        self._append = client.register_script(scripts.APPEND_LOG)
        self._apply_log = client.register_script(scripts.APPLY_LOG)
        self._count_after = client.register_script(
            "return #redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', 100000)"
        )

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def outbox(self) -> str:
        return self._key("outbox")

    async def stamp(self) -> str | None:
        """Moves with every change of a document or the log, local or synced in (the
        site's hybrid logical clock): equal stamps, same content. None: no change yet."""
        return cast("str | None", await self.client.get(self._key("hlc")))

    # -- documents ----------------------------------------------------------------------

    async def get(self, doc: str) -> Document | None:
        fields = cast(_Fields, await self.client.hgetall(self._key("doc", doc)))
        return _document(doc, fields) if fields else None

    async def get_many(self, docs: list[str]) -> dict[str, Document | None]:
        """Several documents in one round trip (prompt assembly, on every chat)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for doc in docs:
                pipe.hgetall(self._key("doc", doc))
            found = await pipe.execute()
        return {doc: _document(doc, f) if f else None for doc, f in zip(docs, found, strict=True)}

    def _doc_keys(self, doc: str) -> dict[str, str]:
        return {
            part: self._key(part, doc) for part in ("doc", "hist", "known", "heads", "gone", "vers")
        } | {"dconf": self._key("conflicts-of", doc)}

    async def write(
        self, doc: str, content: str, expected_version: int | str, also_replaces: str = ""
    ) -> Document:
        """Replace `doc` if it is still at `expected_version`: this site's version number
        (0: it must not exist) or a version id 'hlc|site', which names the same version
        on every site. `also_replaces`: 'hlc|site' of a conflicting version this one
        settles."""
        now_ms, written_at = _now(self.clock)
        sha = hashlib.sha256(content.encode()).hexdigest()
        k = self._doc_keys(doc)
        ok, version, hlc = await self._write(
            keys=[
                k["doc"],
                k["hist"],
                k["known"],
                self._key("hlc"),
                self.outbox,
                self._key("docs"),
                k["heads"],
                k["gone"],
                k["vers"],
                self._key("conflicts"),
                k["dconf"],
            ],
            args=[
                expected_version,
                content,
                self.site,
                now_ms,
                sha,
                written_at,
                doc,
                also_replaces,
            ],
        )
        if not int(ok):
            raise VersionConflict(doc, int(version), str(hlc))
        return Document(
            doc=doc,
            version=int(version),
            content=content,
            hlc=str(hlc),
            site=self.site,
            sha256=sha,
            written_at=written_at,
        )

    async def put_if_changed(self, doc: str, content: str) -> Document | None:
        """Write `content` as the next version unless it is already current (import)."""
        current = await self.get(doc)
        if current and current.sha256 == hashlib.sha256(content.encode()).hexdigest():
            return None
        return await self.write(doc, content, current.version if current else 0)

    async def docs(self) -> list[str]:
        return sorted(cast("set[str]", await self.client.smembers(self._key("docs"))))

    async def history(self, doc: str) -> list[VersionInfo]:
        entries = cast(_Entries, await self.client.xrange(self._key("hist", doc)))
        return [
            VersionInfo(
                version=int(f["version"]),
                hlc=f["hlc"],
                site=f["site"],
                sha256=f["sha256"],
                written_at=f["written_at"],
                size=len(f["content"]),
            )
            for _, f in entries
        ]

    async def known_versions(self, doc: str) -> list[DocVersion]:
        """Every version of `doc` this site knows (its own and the other sites',
        current, superseded or conflicting), oldest first by (hlc, site)."""
        raw = cast(_Fields, await self.client.hgetall(self._key("vers", doc)))
        versions = [DocVersion(doc=doc, **json.loads(value)) for value in raw.values()]
        return sorted(versions, key=lambda v: (int(v.hlc), v.site))

    async def version(self, doc: str, number: int) -> Document | None:
        for _, fields in cast(_Entries, await self.client.xrange(self._key("hist", doc))):
            if int(fields["version"]) == number:
                return _document(doc, fields)
        return None

    # -- log ----------------------------------------------------------------------------

    async def append_log(self, text: str) -> LogEntry:
        now_ms, written_at = _now(self.clock)
        entry_id = uuid.uuid4().hex
        hlc = await self._append(
            keys=[self._key("log"), self._key("log-entries"), self._key("hlc"), self.outbox],
            args=[entry_id, text, self.site, now_ms, written_at],
        )
        return LogEntry(
            entry_id=entry_id, text=text, hlc=str(hlc), site=self.site, written_at=written_at
        )

    async def log(self, limit: int = 50, before: str | None = None) -> list[LogEntry]:
        """Entries newest first, ordered by (hlc, site, entry id); `before` is a cursor."""
        upper = f"({before}" if before else "+"
        members = cast(
            "list[str]", await self.client.zrevrangebylex(self._key("log"), upper, "-", 0, limit)
        )
        return await self._entries(members)

    async def log_cursor(self, entry: LogEntry) -> str:
        return f"{int(entry.hlc):019d}|{entry.site}|{entry.entry_id}"

    async def _entries(self, members: list[str]) -> list[LogEntry]:
        ids = [member.rsplit("|", 1)[1] for member in members]
        if not ids:
            return []
        raw = await self.client.hmget(self._key("log-entries"), ids)
        return [
            LogEntry(entry_id=entry_id, **json.loads(data))
            for entry_id, data in zip(ids, raw, strict=True)
            if data
        ]

    async def log_size(self) -> int:
        return int(await self.client.zcard(self._key("log")))

    # -- conflicts ----------------------------------------------------------------------

    async def conflicts(self) -> list[Conflict]:
        records = cast(_Fields, await self.client.hgetall(self._key("conflicts")))
        return sorted(
            (Conflict(conflict_id=cid, **json.loads(raw)) for cid, raw in records.items()),
            key=lambda c: (c.doc, int(c.hlc)),
        )

    async def resolve(
        self, conflict_id: str, keep: str, seen_winner: str | None = None
    ) -> Document | None:
        """Settle a conflict with a new version that replaces both the current one and
        the conflicting one: with the current content (keep='current') or the
        conflicting content (keep='conflict'). It replicates like any edit, so the
        record goes on every site, and resolving twice changes nothing more. None when
        there is no such record (any more). `seen_winner`: the winner the owner was
        shown; if another edit has won since, VersionConflict."""
        raw = await self.client.hget(self._key("conflicts"), conflict_id)
        if raw is None:
            return None
        record = Conflict(conflict_id=conflict_id, **json.loads(raw))
        # Against the winner the record names, and only while the conflicting version is
        # still open: an edit that arrived meanwhile makes this a VersionConflict (read
        # the records again), never a silent replacement of something nobody saw.
        if seen_winner is not None and seen_winner != record.winner:
            current = await self.get(record.doc)
            raise VersionConflict(
                record.doc,
                current.version if current else 0,
                f"{current.hlc}|{current.site}" if current else "",
            )
        expected, kept = record.winner, await self.version_by_id(record.doc, record.winner)
        if kept is None:  # a record from before versions were kept by id
            current = await self.get(record.doc)
            if current is None:
                return None
            expected, kept_content = f"{current.hlc}|{current.site}", current.content
        else:
            kept_content = kept.content
        content = record.content if keep == "conflict" else kept_content
        return await self.write(
            record.doc, content, expected, also_replaces=f"{record.hlc}|{record.site}"
        )

    async def version_by_id(self, doc: str, version_id: str) -> DocVersion | None:
        """A known version of `doc` by its 'hlc|site'."""
        raw = await self.client.hget(self._key("vers", doc), version_id)
        return DocVersion(doc=doc, **json.loads(raw)) if raw else None

    # -- sync ---------------------------------------------------------------------------

    async def apply(self, event: ContextChanged) -> bool:
        """Apply a change from another site; idempotent. True when it changed anything."""
        now_ms, _ = _now(self.clock)
        if event.version is not None:
            v = event.version
            if int(v.hlc) >= 2**53:  # Lua numbers are doubles: exact only below 2^53
                raise PermanentError(f"{v.doc}: hlc {v.hlc} is out of range")
            k = self._doc_keys(v.doc)
            [applied] = await self._apply_doc(
                keys=[
                    k["doc"],
                    k["hist"],
                    k["known"],
                    self._key("hlc"),
                    self._key("conflicts"),
                    self._key("docs"),
                    self._key("seen"),
                    k["heads"],
                    k["gone"],
                    k["vers"],
                    k["dconf"],
                ],
                args=[v.doc, v.content, v.hlc, v.site, v.base, v.sha256, v.written_at, now_ms],
            )
            return int(applied) >= 0
        if event.entry is not None:
            e = event.entry
            applied = await self._apply_log(
                keys=[
                    self._key("log"),
                    self._key("log-entries"),
                    self._key("hlc"),
                    self._key("seen"),
                ],
                args=[e.entry_id, e.text, e.hlc, e.site, e.written_at, now_ms],
            )
            return bool(int(applied))
        return False

    async def seen(self) -> dict[str, str]:
        """Origin site -> newest hlc applied from it."""
        return dict(cast(_Fields, await self.client.hgetall(self._key("seen"))))

    async def changes_since(self, since_hlc: int) -> list[ContextChanged]:
        """This site's own changes newer than `since_hlc`, oldest first (catch-up)."""
        changes: list[tuple[int, ContextChanged]] = []
        for doc in await self.docs():
            for _, f in cast(_Entries, await self.client.xrange(self._key("hist", doc))):
                if f["site"] == self.site and int(f["hlc"]) > since_hlc:
                    changes.append((int(f["hlc"]), _doc_event(self.site, doc, f)))
        start = f"({since_hlc:019d}|~"
        members = cast("list[str]", await self.client.zrangebylex(self._key("log"), start, "+"))
        for member in members:
            hlc, site, _ = member.split("|", 2)
            if site == self.site:
                [entry] = await self._entries([member])
                changes.append((int(hlc), ContextChanged(origin=self.site, entry=entry)))
        return [change for _, change in sorted(changes, key=lambda item: item[0])]

    async def read_outbox(self, after: str, count: int = 100) -> list[tuple[str, ContextChanged]]:
        """Local changes not yet published, after the stream id `after`."""
        entries = cast(
            _Entries, await self.client.xrange(self.outbox, f"({after}", "+", count=count)
        )
        return [(entry_id, _outbox_event(self.site, f)) for entry_id, f in entries]

    async def unpublished(self) -> int:
        """How many local changes the sync process has not published yet (counted in
        Redis: the backlog itself does not travel; at most 100,000)."""
        marker = await self.sent_marker()
        return int(await self._count_after(keys=[self.outbox], args=[f"({marker}"]))

    async def sent_marker(self) -> str:
        return cast("str | None", await self.client.get(self._key("outbox-sent"))) or "0-0"

    async def mark_sent(self, entry_id: str) -> None:
        await self.client.set(self._key("outbox-sent"), entry_id)


def _document(doc: str, f: dict[str, str]) -> Document:
    return Document(
        doc=doc,
        version=int(f["version"]),
        content=f["content"],
        hlc=f["hlc"],
        site=f["site"],
        sha256=f["sha256"],
        written_at=f["written_at"],
    )


def _doc_event(site: str, doc: str, f: dict[str, str]) -> ContextChanged:
    version = DocVersion(
        doc=doc,
        content=f["content"],
        hlc=f["hlc"],
        site=f["site"],
        base=f["base"],
        sha256=f["sha256"],
        written_at=f["written_at"],
    )
    return ContextChanged(origin=site, version=version)


def _outbox_event(site: str, f: dict[str, str]) -> ContextChanged:
    if f["kind"] == "doc":
        return _doc_event(site, f["doc"], f)
    entry = LogEntry(
        entry_id=f["entry_id"],
        text=f["text"],
        hlc=f["hlc"],
        site=f["site"],
        written_at=f["written_at"],
    )
    return ContextChanged(origin=site, entry=entry)
