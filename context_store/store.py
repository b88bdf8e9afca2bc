"""The four handoff tiers in one site's Redis: versioned documents with history,
an append-only log, conflict records, and an outbox of local changes for sync."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Literal, cast

import redis.asyncio as redis
from redis.exceptions import ResponseError

from context_store import scripts
from proto.context import (
    Conflict,
    ContextChanged,
    ContextSyncPage,
    ContextSyncRequest,
    ContextSyncReturn,
    Document,
    DocVersion,
    DroppedVersion,
    LogEntry,
    OldVersion,
    VersionInfo,
)
from services.errors import PermanentError
from services.redis_client import worth_waiting_out

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
HISTORY_KEEP = 100  # superseded versions kept per document (MESH_CONTEXT_HISTORY_KEEP)
PAGE_CHANGES = 100  # a catch-up page: at most this many changes ...
PAGE_BYTES = 1_000_000  # ... and about this much content (at least one change)
HAVE_LISTED = 1000  # numbers above the watermark a catch-up request lists
_DOC_PARTS = ("doc", "hist", "known", "heads", "gone", "vers", "old", "tomb")
_SITE_KEYS = {"entries": "log-entries"}  # a script's name for a key -> the key's name

log = logging.getLogger(__name__)


def _now(clock: Clock = time.time) -> tuple[int, str]:
    now = clock()
    return int(now * 1000), datetime.fromtimestamp(now, UTC).isoformat()


class ContextStore:
    """One site's context store. Every write is one Lua script: atomic and CAS."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        site: str,
        clock: Clock = time.time,
        history_keep: int = HISTORY_KEEP,
    ) -> None:
        self.client = client
        self.site = site
        self.clock = clock  # tests set a site's clock ahead or behind
        # Every site of a mesh must keep the same number, or their histories differ.
        self.history_keep = history_keep
        self.prefix = f"{namespace}:ctx"
        self._write = client.register_script(scripts.WRITE_DOC)
        self._apply_doc = client.register_script(scripts.APPLY_DOC)
        self._append = client.register_script(scripts.APPEND_LOG)
        self._apply_log = client.register_script(scripts.APPLY_LOG)
        self._apply_dropped = client.register_script(scripts.APPLY_DROPPED)
        self._advance = client.register_script(scripts.ADVANCE)
        self._adopt = client.register_script(scripts.ADOPT_NUMBERING)
        self._holdings = client.register_script(scripts.HOLDINGS)
        self._own_page = client.register_script(scripts.OWN_PAGE)
        self._upgrade_doc = client.register_script(scripts.UPGRADE_DOC)
        self._upgrade_log = client.register_script(scripts.UPGRADE_LOG)
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
        return {part: self._key(part, doc) for part in _DOC_PARTS} | {
            "dconf": self._key("conflicts-of", doc)
        }

    def _script_keys(self, names: tuple[str, ...], doc: str = "", origin: str = "") -> list[str]:
        """The keys a script takes, in the order it names them (scripts.DOC_KEYS,
        scripts.LOG_KEYS); `above` is the one of `origin`'s numbers."""
        doc_keys = self._doc_keys(doc) if doc else {}
        keys = []
        for name in names:
            if name in doc_keys:
                keys.append(doc_keys[name])
            elif name == "above":
                keys.append(self._key("above", origin or self.site))
            else:
                keys.append(self._key(_SITE_KEYS.get(name, name)))
        return keys

    async def write(
        self, doc: str, content: str, expected_version: int | str, also_replaces: str = ""
    ) -> Document:
        """Replace `doc` if it is still at `expected_version`: this site's version number
        (0: it must not exist) or a version id 'hlc|site', which names the same version
        on every site. `also_replaces`: 'hlc|site' of a conflicting version this one
        settles."""
        now_ms, written_at = _now(self.clock)
        sha = hashlib.sha256(content.encode()).hexdigest()
        ok, version, hlc = await self._write(
            keys=self._script_keys(scripts.DOC_KEYS, doc),
            args=[
                expected_version,
                content,
                self.site,
                now_ms,
                sha,
                written_at,
                doc,
                also_replaces,
                self.history_keep,
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
        """Every version of `doc` this site holds, oldest first by (hlc, site), with
        its state: the same list on every site that holds the same versions."""
        return [info for _, info in await self._held(doc)]

    async def known_versions(self, doc: str) -> list[DocVersion]:
        """Every version of `doc` this site holds (its own and the other sites',
        current, superseded or conflicting), oldest first by (hlc, site)."""
        return [version for version, _ in await self._held(doc)]

    async def _held(
        self, doc: str, version_id: str | None = None
    ) -> list[tuple[DocVersion, VersionInfo]]:
        """The versions of `doc` held (or the one `version_id`), with their states,
        oldest first by (hlc, site); read at one instant."""
        k = self._doc_keys(doc)
        async with self.client.pipeline(transaction=True) as pipe:
            if version_id is None:
                pipe.hvals(k["vers"])
            else:
                pipe.hmget(k["vers"], [version_id])
            pipe.smembers(k["heads"])
            pipe.hmget(k["doc"], ["hlc", "site"])
            raw, heads, (hlc, site) = await pipe.execute()
        current = f"{hlc}|{site}"
        versions = [DocVersion(doc=doc, **json.loads(value)) for value in raw if value]
        versions.sort(key=lambda v: (int(v.hlc), v.site))
        return [(v, _info(v, current, cast("set[str]", heads))) for v in versions]

    async def version(self, doc: str, ref: int | str) -> OldVersion | None:
        """One version `doc` had, by its id ('hlc|site', or 'hlc-site' as in the history
        and ETags) or by this site's number (while this site's record of its numbers
        holds it: the last thousand). None when this site does not hold it (any more:
        see the history retention)."""
        if isinstance(ref, str) and "|" not in ref:
            ref = ref.replace("-", "|", 1)
        if isinstance(ref, int):
            found = await self._id_of_number(doc, ref)
            if found is None:
                return None
            ref = found
        held = await self._held(doc, ref)
        if not held:
            return None
        [(version, info)] = held
        return OldVersion(**info.model_dump(), content=version.content)

    async def _id_of_number(self, doc: str, number: int) -> str | None:
        entries = cast(_Entries, await self.client.xrevrange(self._key("hist", doc)))
        for _, fields in entries:
            if int(fields["version"]) == number:
                # 'id' since versions are kept by id; before, the entry held the version
                return fields.get("id") or f"{fields['hlc']}|{fields['site']}"
        return None

    # -- log ----------------------------------------------------------------------------

    async def append_log(self, text: str) -> LogEntry:
        now_ms, written_at = _now(self.clock)
        entry_id = uuid.uuid4().hex
        hlc = await self._append(
            keys=self._script_keys(scripts.LOG_KEYS),
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
        expected, kept = record.winner, await self.version(record.doc, record.winner)
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

    async def known_ids(self, doc: str) -> set[str]:
        """'hlc|site' of every version of `doc` this site has ever held, including those
        the history retention dropped since."""
        return cast("set[str]", await self.client.smembers(self._key("known", doc)))

    # -- sync ---------------------------------------------------------------------------

    async def apply(self, event: ContextChanged) -> bool:
        """Apply a change from another site; idempotent. True when it changed anything."""
        now_ms, _ = _now(self.clock)
        # Every apply script takes these last (scripts.APPLY_DOC, APPLY_DROPPED, APPLY_LOG).
        common: list[str | int] = [
            now_ms,
            event.origin,
            "" if event.seq is None else str(event.seq),
            event.numbering or "",
            self.history_keep,
            self.site,
        ]
        if event.version is not None:
            v = event.version
            _check_hlc(v.doc, v.hlc)
            [applied] = await self._apply_doc(
                keys=self._script_keys(scripts.DOC_KEYS, v.doc, event.origin),
                args=[v.doc, v.content, v.hlc, v.site, v.base, v.sha256, v.written_at, *common],
            )
            return int(applied) >= 0
        if event.dropped is not None:
            d = event.dropped
            _check_hlc(d.doc, d.hlc)
            [applied] = await self._apply_dropped(
                keys=self._script_keys(scripts.DOC_KEYS, d.doc, event.origin),
                args=[d.doc, d.hlc, d.site, d.base, *common],
            )
            return bool(int(applied))
        if event.entry is not None:
            e = event.entry
            _check_hlc("the log", e.hlc)
            applied = await self._apply_log(
                keys=self._script_keys(scripts.LOG_KEYS, origin=event.origin),
                args=[e.entry_id, e.text, e.hlc, e.site, e.written_at, *common],
            )
            return bool(int(applied))
        return False

    async def catch_up_request(self) -> ContextSyncRequest:
        """What this site holds of the other sites' changes: per origin, n (all of 1..n
        held), the numbers above n held, and the numbering those count; read at one
        instant. (`since`, the newest hlc applied from each, is for a site still on
        the release before numbering.)"""
        got, numberings, early, seen, want_back = await self._holdings(
            keys=self._script_keys(scripts.LOG_KEYS), args=[self._key("above", ""), HAVE_LISTED]
        )
        send_back = None
        if want_back:
            send_back = cast("str | None", await self.client.get(self._key("back-cursor"))) or ""
        return ContextSyncRequest(
            site=self.site,
            after={site: int(n) for site, n in _pairs(got).items()},
            have={
                site: [int(n) for n in numbers]
                for site, numbers in _pairs(early).items()
                if numbers
            },
            numberings=_pairs(numberings),
            since=_pairs(seen),
            send_back=send_back,
        )

    async def answer(self, request: ContextSyncRequest) -> ContextSyncPage | None:
        """One page of what the asker lacks of this site's own changes; None when it
        lacks nothing."""
        after = (request.after or {}).get(self.site, 0)
        have = set(request.have.get(self.site, []))
        named = request.numberings.get(self.site)
        numbering, changes, through, more = await self.own_changes(after, have)
        if named != numbering:  # its numbers count another numbering: from the start
            numbering, changes, through, more = await self.own_changes(0, set())
        elif not changes and through <= after:
            return None
        return ContextSyncPage(
            origin=self.site,
            site=request.site,
            numbering=numbering,
            changes=changes,
            through=through,
            more=more,
        )

    async def apply_page(self, page: ContextSyncPage) -> int:
        """Apply a catch-up page (idempotent); returns how many changes were new. A
        change that cannot be applied at all is logged and passed over, so that it
        does not stop every change after it (Redis away is raised: the page waits)."""
        await self._adopt(
            keys=self._script_keys(scripts.LOG_KEYS, origin=page.origin),
            args=[page.origin, page.numbering],
        )
        applied = await self._apply_each(page.changes, page.origin)
        await self._advance(
            keys=self._script_keys(scripts.LOG_KEYS, origin=page.origin),
            args=[page.origin, page.through, page.numbering],
        )
        return applied

    async def _apply_each(self, changes: list[ContextChanged], sender: str) -> int:
        applied = 0
        for change in changes:  # oldest first; each one atomic
            try:
                applied += await self.apply(change)
            except (PermanentError, ResponseError) as exc:
                if isinstance(exc, ResponseError) and worth_waiting_out(exc):
                    raise  # Redis out of memory, busy, read-only: the page waits
                log.error("context: passing over change %s from %s: %s", change.seq, sender, exc)
        return applied

    async def give_back(self, request: ContextSyncRequest) -> ContextSyncReturn | None:
        """For an asker whose Redis restarted (`send_back`): one page of its own changes
        this site holds, after the cursor: its versions (document by document), then
        its log entries. None when it did not ask."""
        if request.send_back is None:
            return None
        changes: list[ContextChanged] = []
        size, cursor = 0, request.send_back
        async for ref, change in self._changes_of(request.site, request.send_back):
            if changes and (len(changes) >= PAGE_CHANGES or size >= PAGE_BYTES):
                return ContextSyncReturn(
                    origin=self.site, site=request.site, changes=changes, cursor=cursor, more=True
                )
            changes.append(change)
            size += _size(change)
            cursor = ref
        return ContextSyncReturn(
            origin=self.site, site=request.site, changes=changes, cursor=cursor, more=False
        )

    async def _changes_of(self, site: str, after: str) -> AsyncIterator[tuple[str, ContextChanged]]:
        """`site`'s versions and log entries held here, in cursor order, after `after`
        ('doc|NAME|ID' or 'log|MEMBER'; '' from the start)."""
        if not after.startswith("log|"):
            after_doc, after_id = after[4:].split("|", 1) if after else ("", "0|")
            after_hlc, _ = after_id.split("|", 1)
            for doc in await self.docs():
                if doc < after_doc:
                    continue
                for version in await self.known_versions(doc):  # oldest first
                    if version.site != site or (
                        doc == after_doc and int(version.hlc) <= int(after_hlc)
                    ):
                        continue
                    ref = f"doc|{doc}|{version.hlc}|{version.site}"
                    yield ref, ContextChanged(origin=site, version=version)
            after = ""
        start = f"({after[4:]}" if after else "-"
        while True:
            members = cast(
                "list[str]",
                await self.client.zrangebylex(self._key("log"), start, "+", 0, 500),
            )
            if not members:
                return
            wanted = [m for m in members if m.split("|", 2)[1] == site]
            entries = {e.entry_id: e for e in await self._entries(wanted)}
            for member in wanted:
                if entry := entries.get(member.rsplit("|", 1)[1]):
                    yield f"log|{member}", ContextChanged(origin=site, entry=entry)
            start = f"({members[-1]}"

    async def apply_return(self, returned: ContextSyncReturn) -> int:
        """Take back this site's own changes another site held (after a Redis restart)."""
        applied = await self._apply_each(returned.changes, returned.origin)
        if returned.more:
            await self.client.set(self._key("back-cursor"), returned.cursor)
        else:
            await self.client.delete(self._key("want-back"), self._key("back-cursor"))
        return applied

    async def own_changes(
        self, after: int, have: set[int], max_changes: int = PAGE_CHANGES
    ) -> tuple[str, list[ContextChanged], int, bool]:
        """One catch-up page: this site's own changes numbered above `after`, but for
        those in `have`, oldest first, at most `max_changes` and about PAGE_BYTES of
        content. Returns (numbering, changes, through, more): with these, the asker
        holds all of 1..through; `more`: ask again for the rest. Index reads, no scan."""
        changes: list[ContextChanged] = []
        size = 0
        numbering = ""
        while True:
            numbering, counter, flat = await self._own_page(
                keys=self._script_keys(scripts.LOG_KEYS), args=[after, max_changes]
            )
            refs = [(str(flat[i]), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]
            wanted = [(ref, seq) for ref, seq in refs if seq not in have]
            events = await self._own_events(wanted, str(numbering))
            for (_, seq), event in zip(wanted, events, strict=True):
                if event is None:
                    continue
                if changes and (len(changes) >= max_changes or size >= PAGE_BYTES):
                    return str(numbering), changes, after, True
                changes.append(event)
                size += _size(event)
                after = seq
            if len(refs) < max_changes:
                return str(numbering), changes, max(after, int(counter)), False
            after = refs[-1][1]  # a page of changes all held already: read on

    async def _own_events(
        self, refs: list[tuple[str, int]], numbering: str
    ) -> list[ContextChanged | None]:
        """The changes behind `own` refs: a version (or, when the retention dropped it,
        what it replaced), or a log entry. None for one that cannot be read."""
        async with self.client.pipeline(transaction=False) as pipe:
            for ref, _ in refs:
                kind, rest = ref.split("|", 1)
                if kind == "log":
                    pipe.hmget(self._key("log-entries"), [rest])
                else:
                    doc, version_id = rest.split("|", 1)  # doc names hold no '|'
                    pipe.hget(self._key("vers", doc), version_id)
                    pipe.hget(self._key("tomb", doc), version_id)
            replies = iter(await pipe.execute())
        events: list[ContextChanged | None] = []
        for ref, seq in refs:
            kind, rest = ref.split("|", 1)
            if kind == "log":
                [raw], tomb = next(replies), None
            else:
                raw, tomb = next(replies), next(replies)
            event = ContextChanged(origin=self.site, seq=seq, numbering=numbering)
            try:
                if kind == "log" and raw is not None:
                    entry = LogEntry(entry_id=rest, **json.loads(raw))
                    events.append(event.model_copy(update={"entry": entry}))
                elif raw is not None:
                    version = DocVersion(doc=rest.split("|", 1)[0], **json.loads(raw))
                    events.append(event.model_copy(update={"version": version}))
                elif kind == "doc" and tomb is not None:
                    doc, version_id = rest.split("|", 1)
                    hlc, site = version_id.split("|", 1)
                    dropped = DroppedVersion(doc=doc, hlc=hlc, site=site, base=str(tomb))
                    events.append(event.model_copy(update={"dropped": dropped}))
                else:
                    events.append(None)
            except ValueError as exc:  # a record this release cannot read: not sent
                log.error("context: cannot send %s: %s", ref, exc)
                events.append(None)
        return events

    async def upgrade(self) -> int:
        """Bring a store from an earlier release to this layout (idempotent; once): every
        document taken over, the versions its record holds kept as history, and this
        site's own changes numbered for catch-up. Returns how many were numbered."""
        if await self.client.get(self._key("layout")) == LAYOUT:
            return 0
        numbered, failed = 0, 0
        for doc in await self.docs():
            try:
                numbered += int(
                    await self._upgrade_doc(
                        keys=self._script_keys(scripts.DOC_KEYS, doc),
                        args=[doc, self.site, self.history_keep],
                    )
                )
            except ResponseError as exc:
                if worth_waiting_out(exc):
                    raise
                failed += 1  # the others go on; this one is tried again at the next start
                log.error("context: cannot upgrade %s: %s", doc, exc)
        numbered += int(
            await self._upgrade_log(keys=self._script_keys(scripts.LOG_KEYS), args=[self.site])
        )
        if not failed:
            await self.client.set(self._key("layout"), LAYOUT)
        return numbered

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


LAYOUT = "2"  # versions kept by id, own changes numbered


def _check_hlc(doc: str, hlc: str) -> None:
    if int(hlc) >= 2**53:  # Lua numbers are doubles: exact only below 2^53
        raise PermanentError(f"{doc}: hlc {hlc} is out of range")


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A flat [key, value, key, value, ...] reply as a dict."""
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _size(event: ContextChanged) -> int:
    if event.version is not None:
        return len(event.version.content.encode())
    return len(event.entry.text.encode()) if event.entry is not None else 100


def _info(version: DocVersion, current: str, heads: set[str]) -> VersionInfo:
    vid = f"{version.hlc}|{version.site}"
    state: Literal["current", "superseded", "conflict"] = (
        "current" if vid == current else "conflict" if vid in heads else "superseded"
    )
    return VersionInfo(
        id=f"{version.hlc}-{version.site}",
        hlc=version.hlc,
        site=version.site,
        base=[b.replace("|", "-") for b in version.base.split(",") if b],
        state=state,
        sha256=version.sha256,
        written_at=version.written_at,
        size=len(version.content),
    )


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


def _doc_event(site: str, doc: str, f: dict[str, str], seq: int | None = None) -> ContextChanged:
    version = DocVersion(
        doc=doc,
        content=f["content"],
        hlc=f["hlc"],
        site=f["site"],
        base=f["base"],
        sha256=f["sha256"],
        written_at=f["written_at"],
    )
    return ContextChanged(origin=site, version=version, seq=seq)


def _outbox_event(site: str, f: dict[str, str]) -> ContextChanged:
    seq = int(f["seq"]) if "seq" in f else None  # none in entries from before numbering
    numbering = f.get("numbering")
    if f["kind"] == "doc":
        return _doc_event(site, f["doc"], f, seq).model_copy(update={"numbering": numbering})
    entry = LogEntry(
        entry_id=f["entry_id"],
        text=f["text"],
        hlc=f["hlc"],
        site=f["site"],
        written_at=f["written_at"],
    )
    return ContextChanged(origin=site, entry=entry, seq=seq, numbering=numbering)
