"""Catch-up sends exactly what the other site lacks, in bounded pages, read from an
index: two sites' stores in the real Redis (each its own namespace), the pages
handed over by hand as the sync process would. Also the upgrade of a store written
by an earlier release (versions in its record, no numbers)."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import pytest
import redis.asyncio as redis

from context_store import store as store_module
from context_store.store import ContextStore
from proto.context import ContextChanged, DocVersion
from services.private_servers import PrivateRedis
from services.redis_client import connect

pytestmark = pytest.mark.integration


def site(client: redis.Redis, name: str) -> ContextStore:
    namespace = f"catch-{uuid.uuid4().hex[:8]}"
    client.test_prefixes.append(namespace)  # type: ignore[attr-defined]
    return ContextStore(client, namespace, name)


async def catch_up(asker: ContextStore, origin: ContextStore) -> list[list[ContextChanged]]:
    """Ask, answer, apply, until the answer has no `more` (what the sync processes do
    over the broker): the changes of each page."""
    pages = []
    while True:
        request = await asker.catch_up_request()
        returned = await origin.give_back(request)
        if returned is not None:  # the asker's Redis restarted: its own changes, back
            await asker.apply_return(returned)
        page = await origin.answer(request)
        if page is None:
            return pages
        pages.append(page.changes)
        await asker.apply_page(page)
        if not page.more:
            return pages


async def holdings(store: ContextStore) -> tuple[dict[str, int], dict[str, list[int]]]:
    request = await store.catch_up_request()
    return request.after or {}, request.have


def texts(changes: list[ContextChanged]) -> list[str]:
    return [c.entry.text if c.entry else c.version.content for c in changes]  # type: ignore[union-attr]


async def test_catch_up_sends_only_what_is_missing_in_bounded_pages(client: redis.Redis) -> None:
    desktop, vps = site(client, "desktop"), site(client, "vps")
    assert await catch_up(vps, desktop) == [[]]  # the first contact: which numbering
    written = []
    for n in range(250):
        if n % 3:
            text = f"entry {n}"
            await desktop.append_log(text)
        else:
            current = await desktop.get("briefing")
            text = f"briefing {n}"
            await desktop.write("briefing", text, current.version if current else 0)
        written.append(text)
    events = [event for _, event in await desktop.read_outbox("0-0", count=1000)]
    assert [e.seq for e in events] == list(range(1, 251))
    assert {e.numbering for e in events} == {(await vps.catch_up_request()).numberings["desktop"]}
    # Some arrived live, out of order: 1..41, and every fifth after (46, 51, ...).
    live = events[:40] + events[40::5]
    for event in reversed(live):
        await vps.apply(event)
    after, have = await holdings(vps)
    assert after == {"desktop": 41} and have["desktop"] == [e.seq for e in events[45::5]]

    pages = await catch_up(vps, desktop)
    sent = [text for page in pages for text in texts(page)]
    missing = [text for text in written if text not in texts(live)]
    assert sent == missing  # each one once, oldest first, none it had
    assert all(len(page) <= store_module.PAGE_CHANGES for page in pages) and len(pages) == 2
    assert await holdings(vps) == ({"desktop": 250}, {})
    assert await catch_up(vps, desktop) == []  # nothing more to send
    assert (await vps.get("briefing")).content == (await desktop.get("briefing")).content  # type: ignore[union-attr]
    assert await vps.log_size() == 250 - 84


async def test_a_page_is_bounded_by_size(client: redis.Redis) -> None:
    desktop, vps = site(client, "desktop"), site(client, "vps")
    big = "x" * 400_000
    for n in range(4):
        current = await desktop.get("portfolio")
        await desktop.write("portfolio", f"{n} {big}", current.version if current else 0)
    pages = await catch_up(vps, desktop)
    assert [[c.seq for c in page] for page in pages] == [[1, 2, 3], [4]]  # 1.2 MB, then 0.4


async def test_what_the_retention_dropped_is_still_told_so_no_conflict_appears(
    client: redis.Redis,
) -> None:
    """The VPS holds the desktop's first version; the live events of the next nine are
    lost, and the desktop's retention (3) drops five of them. Catch-up tells the VPS of
    the dropped ones (what each replaced, without content), so the first version is
    superseded on the VPS too: no conflict record appears, and both sites keep the same
    history."""
    desktop, vps = site(client, "desktop"), site(client, "vps")
    desktop.history_keep = vps.history_keep = 3
    await catch_up(vps, desktop)
    await desktop.write("briefing", "d0", 0)
    [first] = [event for _, event in await desktop.read_outbox("0-0")]
    await vps.apply(first)
    for n in range(1, 10):
        current = await desktop.get("briefing")
        await desktop.write("briefing", f"d{n}", current.version)  # type: ignore[union-attr]
    pages = await catch_up(vps, desktop)
    changes = [change for page in pages for change in page]
    assert [c.seq for c in changes] == list(range(2, 11))
    assert [c.dropped is not None for c in changes] == [True] * 5 + [False] * 4
    assert await vps.conflicts() == [] and await desktop.conflicts() == []
    assert (await vps.get("briefing")).content == "d9"  # type: ignore[union-attr]
    desktop_history = [v.model_dump() for v in await desktop.history("briefing")]
    assert [v.model_dump() for v in await vps.history("briefing")] == desktop_history
    assert [v["state"] for v in desktop_history] == ["superseded"] * 3 + ["current"]


async def test_a_store_from_an_earlier_release_is_upgraded_and_caught_up(
    client: redis.Redis,
) -> None:
    """The layout before versions were kept by id: the document's record (a stream) held
    every version in full, and changes had no numbers."""
    desktop, vps = site(client, "desktop"), site(client, "vps")
    key = desktop._key
    versions = [("one", "1000000", ""), ("two", "2000000", "1000000|desktop")]
    for n, (content, hlc, base) in enumerate(versions, 1):
        fields = {
            "version": str(n),
            "content": content,
            "hlc": hlc,
            "site": "desktop",
            "base": base,
            "sha256": "s",
            "written_at": "2026-11-01T00:00:00+00:00",
        }
        await client.xadd(key("hist", "briefing"), fields)  # type: ignore[arg-type]
        await client.hset(key("doc", "briefing"), mapping=fields)  # type: ignore[arg-type]
    await client.sadd(key("docs"), "briefing")
    for hlc, entry_id in (("1500000", "e1"), ("2500000", "e2")):
        entry = {"text": f"entry {entry_id}", "hlc": hlc, "site": "desktop", "written_at": "t"}
        await client.hset(key("log-entries"), entry_id, json.dumps(entry))
        await client.zadd(key("log"), {f"{int(hlc):019d}|desktop|{entry_id}": 0})

    assert await desktop.upgrade() == 4
    assert await desktop.upgrade() == 0  # once
    history = await desktop.history("briefing")
    assert [(v.id, v.state) for v in history] == [
        ("1000000-desktop", "superseded"),
        ("2000000-desktop", "current"),
    ]
    pages = await catch_up(vps, desktop)
    assert sorted(texts(pages[0])) == ["entry e1", "entry e2", "one", "two"]
    assert (await vps.get("briefing")).content == "two"  # type: ignore[union-attr]
    assert [v.model_dump() for v in await vps.history("briefing")] == [
        v.model_dump() for v in history
    ]
    assert await vps.conflicts() == []


async def test_a_redis_that_went_back_in_time_numbers_anew_and_is_still_caught_up(
    client: redis.Redis, tmp_path: Path
) -> None:
    """The desktop's Redis restarts from an older copy of its files (a restored backup;
    or an AOF without fsync that lost its last second): its numbers 6..10 are given
    again, to new changes. The VPS held 1..10 of the old numbering; the new 6..8 must
    reach it all the same, by catch-up alone (their live events lost). And the desktop
    gets back from the VPS the five entries it lost."""
    if not PrivateRedis.available():
        pytest.skip("needs redis-server (Debian's package)")
    server = PrivateRedis(tmp_path / "desktop")
    server.start()
    desktop = ContextStore(connect(server.url), "rollback", "desktop")
    vps = site(client, "vps")
    try:
        for n in range(5):
            await desktop.append_log(f"kept {n}")
        await asyncio.to_thread(server.stop)
        shutil.copytree(tmp_path / "desktop", tmp_path / "backup")
        await asyncio.to_thread(server.start)
        await desktop.client.connection_pool.disconnect()  # (its connections are gone)
        for n in range(5):
            await desktop.append_log(f"lost {n}")
        await catch_up(vps, desktop)
        assert (await holdings(vps))[0] == {"desktop": 10}
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp_path / "desktop")
        shutil.copytree(tmp_path / "backup", tmp_path / "desktop")
        await asyncio.to_thread(server.start)
        await desktop.client.connection_pool.disconnect()
        assert await desktop.log_size() == 5
        for n in range(3):
            await desktop.append_log(f"after {n}")
        await catch_up(vps, desktop)
        texts = {entry.text for entry in await vps.log(100)}
        assert {"after 0", "after 1", "after 2"} <= texts
        assert (await holdings(vps))[0] == {"desktop": 8}
        assert await catch_up(vps, desktop) == []
        await catch_up(desktop, vps)  # the desktop asks, and is sent back what it lost
        assert [e.model_dump() for e in await desktop.log(100)] == [
            e.model_dump() for e in await vps.log(100)
        ]
        assert await desktop.log_size() == 13
        assert (await desktop.catch_up_request()).send_back is None  # once
    finally:
        await desktop.client.aclose()
        await asyncio.to_thread(server.stop)


async def test_a_store_of_the_previous_release_is_upgraded_and_caught_up(
    client: redis.Redis,
) -> None:
    """The previous release's layout: versions kept by id (heads, gone, vers), but no
    numbers, no index of superseded versions, and its record (`hist`) held each
    version in full."""
    from proto.context import DocVersion

    desktop, vps = site(client, "desktop"), site(client, "vps")
    first = await desktop.write("briefing", "one", 0)
    await desktop.write("briefing", "two", first.version)
    theirs = DocVersion(
        doc="briefing",
        content="theirs",
        hlc=str(int(first.hlc) - 5),
        site="elsewhere",
        base="",
        sha256="x",
        written_at=first.written_at,
    )
    await desktop.apply(ContextChanged(origin="elsewhere", version=theirs))
    await desktop.append_log("an entry")
    before = [v.model_dump() for v in await desktop.history("briefing")]
    key = desktop._key
    await client.delete(key("own"), key("own-count"), key("numbering"), key("layout"))
    await client.delete(key("old", "briefing"), key("tomb", "briefing"))
    versions = {v.hlc: v for v in await desktop.known_versions("briefing")}
    await client.delete(key("hist", "briefing"))
    for n, hlc in enumerate(sorted(h for h, v in versions.items() if v.site == "desktop"), 1):
        v = versions[hlc]
        fields = {"version": str(n), **v.model_dump(exclude={"doc"})}
        await client.xadd(key("hist", "briefing"), fields)  # type: ignore[arg-type]

    assert await desktop.upgrade() == 3  # its two versions and its entry
    assert [v.model_dump() for v in await desktop.history("briefing")] == before
    pages = await catch_up(vps, desktop)
    assert sorted(texts(pages[0])) == ["an entry", "one", "two"]
    # "theirs" is not the desktop's to send: it comes from its own site ("elsewhere").
    await vps.apply(ContextChanged(origin="elsewhere", version=theirs))
    assert [v.model_dump() for v in await vps.history("briefing")] == before
    assert [c.model_dump() for c in await vps.conflicts()] == [
        c.model_dump() for c in await desktop.conflicts()
    ]


async def test_a_change_that_cannot_be_applied_does_not_stop_the_ones_after_it(
    client: redis.Redis,
) -> None:
    from proto.context import ContextSyncPage, LogEntry

    vps = site(client, "vps")

    def entry(n: int, hlc: str) -> ContextChanged:
        e = LogEntry(entry_id=f"e{n}", text=f"entry {n}", hlc=hlc, site="desktop", written_at="t")
        return ContextChanged(origin="desktop", entry=e, seq=n, numbering="n1")

    bad = ContextChanged(
        origin="desktop",
        version=DocVersion(
            doc="briefing",
            content="from the far future",
            hlc=str(2**60),  # beyond what the store's clock can hold exactly
            site="desktop",
            base="",
            sha256="x",
            written_at="t",
        ),
        seq=2,
        numbering="n1",
    )
    page = ContextSyncPage(
        origin="desktop",
        site="vps",
        numbering="n1",
        changes=[entry(1, "1000"), bad, entry(3, "3000"), entry(4, str(2**60))],
        through=4,
        more=False,
    )
    assert await vps.apply_page(page) == 2
    assert [e.text for e in await vps.log(10)] == ["entry 3", "entry 1"]
    assert (await holdings(vps))[0] == {"desktop": 4}
    assert int(await vps.stamp() or 0) < 2**53  # the clock did not follow them
