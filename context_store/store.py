"""The four handoff tiers in one site's Redis: versioned documents with history,
an append-only log, conflict records, and an outbox of local changes for sync."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, cast

import redis.asyncio as redis

from context_store import scripts
from proto.context import (
    Conflict,
    ContextChanged,
    ContextSyncPage,
    ContextSyncRequest,
    Document,
    DocVersion,
    LogEntry,
    OldVersion,
    VersionInfo,
)
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
HISTORY_KEEP = 100  # superseded versions kept per document (MESH_CONTEXT_HISTORY_KEEP)
PAGE_CHANGES = 100  # a catch-up page: at most this many changes ...
PAGE_BYTES = 1_000_000  # ... and about this much content (at least one change)
HAVE_LISTED = 1000  # numbers above the watermark a catch-up request lists


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
        self._advance = client.register_script(scripts.ADVANCE)
        self._adopt = client.register_script(scripts.ADOPT_NUMBERING)
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
                self._key("own-seq"),
                self._key("own"),
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
        k = self._doc_keys(doc)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(k["vers"])
            pipe.smembers(k["heads"])
            pipe.hmget(k["doc"], ["hlc", "site"])
            raw, heads, (hlc, site) = await pipe.execute()
        current = f"{hlc}|{site}"
        versions = [
            _info(DocVersion(doc=doc, **json.loads(value)), current, cast("set[str]", heads))
            for value in cast(_Fields, raw).values()
        ]
        return sorted(versions, key=lambda v: (int(v.hlc), v.site))

    async def known_versions(self, doc: str) -> list[DocVersion]:
        """Every version of `doc` this site knows (its own and the other sites',
        current, superseded or conflicting), oldest first by (hlc, site)."""
        raw = cast(_Fields, await self.client.hgetall(self._key("vers", doc)))
        versions = [DocVersion(doc=doc, **json.loads(value)) for value in raw.values()]
        return sorted(versions, key=lambda v: (int(v.hlc), v.site))

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
        k = self._doc_keys(doc)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(k["vers"], ref)
            pipe.smembers(k["heads"])
            pipe.hmget(k["doc"], ["hlc", "site"])
            raw, heads, (hlc, site) = await pipe.execute()
        if raw is None:
            return None
        version = DocVersion(doc=doc, **json.loads(raw))
        info = _info(version, f"{hlc}|{site}", cast("set[str]", heads))
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
            keys=[
                self._key("log"),
                self._key("log-entries"),
                self._key("hlc"),
                self.outbox,
                self._key("own-seq"),
                self._key("own"),
            ],
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

    async def known_ids(self, doc: str) -> set[str]:
        """'hlc|site' of every version of `doc` this site has ever held, including those
        the history retention dropped since."""
        return cast("set[str]", await self.client.smembers(self._key("known", doc)))

    async def version_by_id(self, doc: str, version_id: str) -> DocVersion | None:
        """A known version of `doc` by its 'hlc|site'."""
        raw = await self.client.hget(self._key("vers", doc), version_id)
        return DocVersion(doc=doc, **json.loads(raw)) if raw else None

    # -- sync ---------------------------------------------------------------------------

    async def apply(self, event: ContextChanged) -> bool:
        """Apply a change from another site; idempotent. True when it changed anything."""
        now_ms, _ = _now(self.clock)
        seq = "" if event.seq is None else str(event.seq)
        got, above = self._key("got"), self._key("above", event.origin)
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
                    self._key("own"),
                    got,
                    above,
                ],
                args=[
                    v.doc,
                    v.content,
                    v.hlc,
                    v.site,
                    v.base,
                    v.sha256,
                    v.written_at,
                    now_ms,
                    event.origin,
                    seq,
                    self.history_keep,
                    self.site,
                ],
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
                    got,
                    above,
                ],
                args=[e.entry_id, e.text, e.hlc, e.site, e.written_at, now_ms, event.origin, seq],
            )
            return bool(int(applied))
        return False

    async def catch_up_request(self) -> ContextSyncRequest:
        """What this site holds of the other sites' changes: per origin, n (all of 1..n
        held), the numbers above n held, and which numbering of the origin's those
        count (see `numbering`)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key("got"))
            pipe.hgetall(self._key("numberings"))
            got, numberings = await pipe.execute()
        after = {site: int(n) for site, n in cast(_Fields, got).items()}
        have: dict[str, list[int]] = {}
        for site in after:
            above = cast(
                "list[str]",
                await self.client.zrange(self._key("above", site), 0, HAVE_LISTED - 1),
            )
            if above:
                have[site] = [int(n) for n in above]
        return ContextSyncRequest(
            site=self.site, after=after, have=have, numberings=cast(_Fields, numberings)
        )

    async def numbering(self) -> str:
        """Names this store's numbering of its own changes. A store that lost its data
        (Redis restarted without AOF) numbers from 1 again, under a new name, so the
        other sites do not take its new changes for ones they hold."""
        key = self._key("numbering")
        await self.client.set(key, uuid.uuid4().hex, nx=True)
        return cast(str, await self.client.get(key))

    async def answer(self, request: ContextSyncRequest) -> ContextSyncPage | None:
        """One page of what the asker lacks of this site's own changes; None when it
        lacks nothing."""
        assert request.after is not None
        numbering = await self.numbering()
        named = request.numberings.get(self.site)
        after, have = request.after.get(self.site, 0), set(request.have.get(self.site, []))
        if named not in (None, numbering):
            after, have = 0, set()  # its numbers count a numbering this store lost
        changes, through, more = await self.own_changes(after, have)
        if named == numbering and not changes and through <= after:
            return None
        # (A page with nothing in it still tells the asker which numbering it holds.)
        return ContextSyncPage(
            origin=self.site,
            site=request.site,
            numbering=numbering,
            changes=changes,
            through=through,
            more=more,
        )

    async def apply_page(self, page: ContextSyncPage) -> int:
        """Apply a catch-up page (idempotent); returns how many changes were new."""
        await self._adopt(
            keys=[self._key("numberings"), self._key("got"), self._key("above", page.origin)],
            args=[page.origin, page.numbering],
        )
        applied = 0
        for change in page.changes:  # oldest first; each one atomic
            applied += await self.apply(change)
        await self.advance(page.origin, page.through)
        return applied

    async def own_changes(
        self, after: int, have: set[int], max_changes: int = PAGE_CHANGES
    ) -> tuple[list[ContextChanged], int, bool]:
        """One catch-up page: this site's own changes numbered above `after`, but for
        those in `have`, oldest first, at most `max_changes` and about PAGE_BYTES of
        content. Returns (changes, through, more): with these, the asker holds all of
        1..through; `more`: ask again for the rest. Index reads, no scan."""
        changes: list[ContextChanged] = []
        size = 0
        while True:
            counter, flat = await self._own_page(
                keys=[self._key("own"), self._key("own-seq")], args=[after, max_changes]
            )
            refs = [(str(flat[i]), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]
            wanted = [(ref, seq) for ref, seq in refs if seq not in have]
            events = await self._own_events(wanted)
            for (_, seq), event in zip(wanted, events, strict=True):
                if event is None:  # dropped by the history retention since
                    continue
                if changes and (len(changes) >= max_changes or size >= PAGE_BYTES):
                    return changes, after, True
                changes.append(event)
                size += len(event.version.content if event.version else event.entry.text)  # type: ignore[union-attr]
                after = seq
            if len(refs) < max_changes:
                return changes, max(after, int(counter)), False
            after = refs[-1][1]  # a page of changes all held or dropped: read on

    async def _own_events(self, refs: list[tuple[str, int]]) -> list[ContextChanged | None]:
        async with self.client.pipeline(transaction=False) as pipe:
            for ref, _ in refs:
                kind, rest = ref.split("|", 1)
                if kind == "log":
                    pipe.hget(self._key("log-entries"), rest)
                else:
                    doc, version_id = rest.split("|", 1)  # doc names hold no '|'
                    pipe.hget(self._key("vers", doc), version_id)
            found = await pipe.execute()
        events: list[ContextChanged | None] = []
        for (ref, seq), raw in zip(refs, found, strict=True):
            kind, rest = ref.split("|", 1)
            if raw is None:
                events.append(None)
            elif kind == "log":
                entry = LogEntry(entry_id=rest, **json.loads(raw))
                events.append(ContextChanged(origin=self.site, entry=entry, seq=seq))
            else:
                doc = rest.split("|", 1)[0]
                version = DocVersion(doc=doc, **json.loads(raw))
                events.append(ContextChanged(origin=self.site, version=version, seq=seq))
        return events

    async def advance(self, origin: str, through: int) -> int:
        """A catch-up page from `origin` is applied: this site holds all of 1..through."""
        return int(
            await self._advance(
                keys=[self._key("got"), self._key("above", origin)], args=[origin, through]
            )
        )

    async def upgrade(self) -> int:
        """Bring a store from an earlier release to this layout (idempotent; once): every
        document taken over, the versions its record holds kept as history, and this
        site's own changes numbered for catch-up. Returns how many were numbered."""
        if await self.client.get(self._key("layout")) == LAYOUT:
            return 0
        numbered = 0
        for doc in await self.docs():
            k = self._doc_keys(doc)
            numbered += int(
                await self._upgrade_doc(
                    keys=[
                        k["doc"],
                        k["hist"],
                        k["known"],
                        k["heads"],
                        k["gone"],
                        k["vers"],
                        self._key("conflicts"),
                        k["dconf"],
                        self._key("own-seq"),
                        self._key("own"),
                    ],
                    args=[doc, self.site, self.history_keep],
                )
            )
        numbered += int(
            await self._upgrade_log(
                keys=[self._key("log"), self._key("own-seq"), self._key("own")], args=[self.site]
            )
        )
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
    if f["kind"] == "doc":
        return _doc_event(site, f["doc"], f, seq)
    entry = LogEntry(
        entry_id=f["entry_id"],
        text=f["text"],
        hlc=f["hlc"],
        site=f["site"],
        written_at=f["written_at"],
    )
    return ContextChanged(origin=site, entry=entry, seq=seq)
