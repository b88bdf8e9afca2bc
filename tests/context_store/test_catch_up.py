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
    """Ask, answer, apply, until the answer has no `more` (what the sync processes do
    over the broker): the changes of each page."""
    pages = []
    while True:
        page = await origin.answer(await asker.catch_up_request())
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
    assert (await holdings(vps))[0] == {"desktop": 12}


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


async def test_a_site_that_lost_its_data_numbers_again_and_is_still_caught_up(
    client: redis.Redis,
) -> None:
    """The desktop's Redis restarts without AOF: its store is empty and its numbers
    start at 1 again. The VPS holds 1..5 of the old numbering; the new changes 1..3
    must reach it all the same (by catch-up alone: their live events were lost)."""
    desktop, vps = site(client, "desktop"), site(client, "vps")
    for n in range(5):
        await desktop.append_log(f"before {n}")
    await catch_up(vps, desktop)
    assert (await holdings(vps))[0] == {"desktop": 5}
    names = [name async for name in client.scan_iter(match=f"{desktop.prefix}:*")]
    await client.delete(*names)  # the data is gone
    for n in range(3):
        await desktop.append_log(f"after {n}")
    pages = await catch_up(vps, desktop)
    assert [texts(page) for page in pages] == [["after 0", "after 1", "after 2"]]
    assert (await holdings(vps))[0] == {"desktop": 3}
    assert await vps.log_size() == 8
    assert await catch_up(vps, desktop) == []
