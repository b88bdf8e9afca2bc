"""One site's context store against the real Redis: versions, CAS, history, log,
markdown round trips and prompt assembly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from context_store.assembly import assemble
from context_store.markdown import export_dir, import_dir
from context_store.store import ContextStore, VersionConflict
from services.redis_client import connect
from services.settings import MeshSettings
from tests.conftest import remove_namespace

pytestmark = pytest.mark.integration
STARTER = Path(__file__).resolve().parents[2] / "context_store" / "starter"


@pytest.fixture
async def store(namespace: str) -> AsyncIterator[ContextStore]:
    settings = MeshSettings(namespace=f"{namespace}-ctx")
    client = connect(settings.redis_url)
    yield ContextStore(client, settings.namespace, "desktop")
    await client.aclose()
    await remove_namespace(settings)


async def test_writes_are_compare_and_set_and_every_version_is_kept(store: ContextStore) -> None:
    first = await store.write("briefing", "one", 0)
    with pytest.raises(VersionConflict) as stale:
        await store.write("briefing", "lost?", 0)
    assert stale.value.current == 1
    second = await store.write("briefing", "two", first.version)
    assert (await store.get("briefing")).content == "two"  # type: ignore[union-attr]
    history = await store.history("briefing")
    assert [v.id for v in history] == [f"{first.hlc}-desktop", f"{second.hlc}-desktop"]
    assert [v.state for v in history] == ["superseded", "current"]
    assert history[1].base == [history[0].id]
    assert (await store.version("briefing", 1)).content == "one"  # type: ignore[union-attr]
    assert (await store.version("briefing", history[0].id)).content == "one"  # type: ignore[union-attr]
    assert await store.version("briefing", 7) is None
    assert int(second.hlc) > int(first.hlc)


async def test_a_thousand_concurrent_writers_never_overwrite_silently(store: ContextStore) -> None:
    await store.write("portfolio", "v1", 0)

    async def writer(n: int) -> str | None:
        current = await store.get("portfolio")
        try:
            await store.write("portfolio", f"writer {n}", current.version)  # type: ignore[union-attr]
            return f"writer {n}"
        except VersionConflict:
            return None

    results = await asyncio.gather(*(writer(n) for n in range(1000)))
    winners = [r for r in results if r is not None]
    history = await store.history("portfolio")
    # every successful write is a version of its own; every other one got a conflict
    assert len(history) == 1 + len(winners)
    contents = [(await store.version("portfolio", v.id)).content for v in history[1:]]  # type: ignore[union-attr]
    assert sorted(contents) == sorted(winners)
    assert len(winners) >= 1 and results.count(None) == 1000 - len(winners)


async def test_the_log_is_ordered_and_paged_newest_first(store: ContextStore) -> None:
    written = [await store.append_log(f"entry {n}") for n in range(7)]
    page = await store.log(3)
    assert [e.text for e in page] == ["entry 6", "entry 5", "entry 4"]
    older = await store.log(3, await store.log_cursor(page[-1]))
    assert [e.text for e in older] == ["entry 3", "entry 2", "entry 1"]
    assert [int(e.hlc) for e in written] == sorted(int(e.hlc) for e in written)


async def test_markdown_import_is_idempotent_and_export_round_trips(
    store: ContextStore, tmp_path: Path
) -> None:
    assert await import_dir(store, STARTER) == {"documents": 3, "log_entries": 1}
    assert await import_dir(store, STARTER) == {"documents": 0, "log_entries": 0}
    await store.append_log("a second entry\nwith two lines")
    await export_dir(store, tmp_path)
    assert (tmp_path / "projects" / "mesh" / "PROJECT_CONTEXT.md").read_text() == (
        STARTER / "projects" / "mesh" / "PROJECT_CONTEXT.md"
    ).read_text()
    assert await import_dir(store, tmp_path) == {"documents": 0, "log_entries": 0}
    assert await store.log_size() == 2


async def test_assembly_keeps_priority_order_and_drops_whole_sections_first(
    store: ContextStore,
) -> None:
    await store.write("briefing", "Now: ship the gateway. " * 5, 0)
    await store.write("project/mesh", "Architecture notes. " * 20, 0)
    await store.write("portfolio", "All projects. " * 40, 0)
    for n in range(5):
        await store.append_log(f"session {n} done")

    def count(text: str) -> int:  # one token per word is enough to test the rules
        return len(text.split())

    full = await assemble(store, count, 10_000, "mesh")
    assert [s.tier for s in full.report.sections] == ["briefing", "project", "portfolio", "log"]
    assert all(s.included and s.cut is None for s in full.report.sections)
    # In the text, what changes least comes first (a longer start shared by prompts,
    # for the workers' prefix caches): portfolio, project, briefing, then the log,
    # oldest entry first.
    order = ["All projects", "Architecture", "ship the gateway", "session 0", "session 4"]
    assert [full.text.index(marker) for marker in order] == sorted(
        full.text.index(marker) for marker in order
    )
    assert full.report.tokens == sum(s.tokens for s in full.report.sections)

    # Room for the briefing and the project only: the portfolio goes whole, then
    # the oldest log entries.
    tight = await assemble(store, count, 80, "mesh")
    by_tier = {s.tier: s for s in tight.report.sections}
    assert by_tier["briefing"].included and by_tier["project"].included
    assert not by_tier["portfolio"].included and by_tier["portfolio"].cut.startswith("whole")  # type: ignore[union-attr]
    assert "All projects" not in tight.text
    assert tight.report.tokens <= 80
    if by_tier["log"].included:
        assert "session 4 done" in tight.text  # the newest entries are the ones kept

    # A budget smaller than the briefing: only then is text cut.
    tiny = await assemble(store, count, 6, "mesh")
    assert tiny.report.sections[0].cut == "the end of the briefing"
    assert tiny.report.tokens <= 6


async def test_a_conflict_can_be_resolved_either_way(store: ContextStore) -> None:
    from proto.context import ContextChanged, DocVersion

    mine = await store.write("briefing", "mine", 0)
    # An edit made elsewhere on the same (empty) base, with an older timestamp: it loses.
    theirs = DocVersion(
        doc="briefing",
        content="theirs",
        hlc=str(int(mine.hlc) - 5),
        site="vps",
        base="",
        sha256="x",
        written_at=mine.written_at,
    )
    assert await store.apply(ContextChanged(origin="vps", version=theirs))
    [conflict] = await store.conflicts()
    assert (conflict.content, conflict.site) == ("theirs", "vps")
    assert (await store.get("briefing")).content == "mine"  # type: ignore[union-attr]
    assert await store.apply(ContextChanged(origin="vps", version=theirs)) is False  # idempotent

    restored = await store.resolve(conflict.conflict_id, "conflict")
    assert restored is not None and restored.content == "theirs" and restored.version == 2
    assert await store.conflicts() == []
    # mine, theirs, and the resolution that replaced both
    history = await store.history("briefing")
    assert [v.state for v in history] == ["superseded", "superseded", "current"]
    assert sorted(history[2].base) == sorted(v.id for v in history[:2])
