"""Catch-up sends exactly what the other site lacks, in bounded pages, read from an
index: two sites' stores in the real Redis (each its own namespace), the pages
handed over by hand as the sync process would. Also the upgrade of a store written
by an earlier release (versions in its record, no numbers)."""

from __future__ import annotations

import json
import uuid

import pytest
import redis.asyncio as redis

from context_store import store as store_module
from context_store.store import ContextStore
from proto.context import ContextChanged

pytestmark = pytest.mark.integration


def site(client: redis.Redis, name: str) -> ContextStore:
    namespace = f"catch-{uuid.uuid4().hex[:8]}"
    client.test_prefixes.append(namespace)  # type: ignore[attr-defined]
    return ContextStore(client, namespace, name)


async def catch_up(asker: ContextStore, origin: ContextStore) -> list[list[ContextChanged]]:
    """Request, page, apply, advance, until `more` is false (the sync process's loop)."""
    pages = []
    while True:
        after, have = await asker.holdings()
        changes, through, more = await origin.own_changes(
            after.get(origin.site, 0), set(have.get(origin.site, []))
        )
        pages.append(changes)
        for change in changes:
            await asker.apply(change)
        await asker.advance(origin.site, through)
        if not more:
            return pages


def texts(changes: list[ContextChanged]) -> list[str]:
    return [c.entry.text if c.entry else c.version.content for c in changes]  # type: ignore[union-attr]


async def test_catch_up_sends_only_what_is_missing_in_bounded_pages(client: redis.Redis) -> None:
    desktop, vps = site(client, "desktop"), site(client, "vps")
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
    # Some arrived live, out of order: 1..41, and every fifth after (46, 51, ...).
    live = events[:40] + events[40::5]
    for event in reversed(live):
        await vps.apply(event)
    after, have = await vps.holdings()
    assert after == {"desktop": 41} and have["desktop"] == [e.seq for e in events[45::5]]

    pages = await catch_up(vps, desktop)
    sent = [text for page in pages for text in texts(page)]
    missing = [text for text in written if text not in texts(live)]
    assert sent == missing  # each one once, oldest first, none it had
    assert all(len(page) <= store_module.PAGE_CHANGES for page in pages) and len(pages) == 2
    assert await vps.holdings() == ({"desktop": 250}, {})
    assert await catch_up(vps, desktop) == [[]]  # nothing more to send
    assert (await vps.get("briefing")).content == (await desktop.get("briefing")).content  # type: ignore[union-attr]
    assert await vps.log_size() == 250 - 84


async def test_a_page_is_bounded_by_size_and_skips_what_retention_dropped(
    client: redis.Redis,
) -> None:
    desktop, vps = site(client, "desktop"), site(client, "vps")
    desktop.history_keep = 2
    big = "x" * 400_000
    for n in range(6):
        current = await desktop.get("portfolio")
        await desktop.write("portfolio", f"{n} {big}", current.version if current else 0)
    # Versions 0..2 were dropped by the retention (current + 2 superseded kept).
    pages = await catch_up(vps, desktop)
    assert [[c.seq for c in page] for page in pages] == [[4, 5, 6]]  # 1.2 MB: one page
    for n in range(6, 12):
        current = await desktop.get("portfolio")
        await desktop.write("portfolio", f"{n} {big}", current.version if current else 0)
    desktop.history_keep = 100
    pages = await catch_up(vps, desktop)
    assert [[c.seq for c in page] for page in pages] == [[10, 11, 12]]
    await vps.write("briefing", "so that the VPS has something of its own", 0)
    assert (await vps.holdings())[0] == {"desktop": 12}


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
