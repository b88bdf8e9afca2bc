"""Conflicts by causality: two sites' stores (each its own namespace in the real
Redis), their changes handed over by hand in every order. A version the other site
superseded with its next edit is history, not a conflict; both sites end with the
same current versions and the same conflict records, whatever the order; a
resolution replicates like an edit; a clock that runs ahead loses no edit."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as redis

from context_store.store import ContextStore
from proto.context import ContextChanged

pytestmark = pytest.mark.integration


def pair(
    client: redis.Redis, history_keep: int = 100, **clocks: Any
) -> tuple[ContextStore, ContextStore]:
    stores = []
    for site in ("desktop", "vps"):
        namespace = f"conv-{uuid.uuid4().hex[:8]}"
        client.test_prefixes.append(namespace)  # type: ignore[attr-defined]
        clock = clocks.get(site, time.time)
        stores.append(ContextStore(client, namespace, site, clock, history_keep))
    return stores[0], stores[1]


async def outbox(store: ContextStore) -> list[ContextChanged]:
    return [event for _, event in await store.read_outbox("0-0", count=10_000)]


async def exchange(desktop: ContextStore, vps: ContextStore) -> None:
    """Hand each site every change the other has made (the heal)."""
    for event in await outbox(desktop):
        await vps.apply(event)
    for event in await outbox(vps):
        await desktop.apply(event)


async def state(store: ContextStore) -> dict[str, Any]:
    docs = {}
    for doc in await store.docs():
        d = await store.get(doc)
        assert d is not None
        docs[doc] = (d.content, d.hlc, d.site)
    conflicts = {
        c.conflict_id: (c.content, c.hlc, c.site, c.winner) for c in await store.conflicts()
    }
    history = {doc: [v.model_dump() for v in await store.history(doc)] for doc in docs}
    return {"docs": docs, "conflicts": conflicts, "history": history}


async def test_a_superseded_version_is_history_not_a_conflict(client: redis.Redis) -> None:
    """The issue's minimal case: partition; the desktop writes d1 then d2; the VPS then
    writes v; heal. Only d2 and v were concurrent. (The VPS's clock a second ahead:
    v is the later edit even when all three land in the same millisecond.)"""
    desktop, vps = pair(client, vps=lambda: time.time() + 1)
    await desktop.write("briefing", "d1", 0)
    await desktop.write("briefing", "d2", 1)
    await vps.write("briefing", "v", 0)
    await exchange(desktop, vps)
    a, b = await state(desktop), await state(vps)
    assert a == b
    assert a["docs"]["briefing"][0] == "v"  # the later of the two concurrent edits
    assert [content for content, *_ in a["conflicts"].values()] == ["d2"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
async def test_every_delivery_order_ends_the_same(
    client: redis.Redis, order: tuple[int, ...]
) -> None:
    desktop, vps = pair(client)
    await desktop.write("briefing", "base", 0)
    for event in await outbox(desktop):
        await vps.apply(event)
    sent_before = len(await outbox(desktop))
    # Partitioned: two edits on each side over the same base.
    await desktop.write("briefing", "d1", 1)
    await desktop.write("briefing", "d2", 2)
    await vps.write("briefing", "v1", 1)
    await vps.write("briefing", "v2", 2)
    to_vps = (await outbox(desktop))[sent_before:]
    to_desktop = await outbox(vps)
    deliveries = [(vps, e) for e in to_vps] + [(desktop, e) for e in to_desktop]
    for index in order:  # the four changes, shuffled (and each site's own reordered)
        target, event = deliveries[index]
        await target.apply(event)
    a, b = await state(desktop), await state(vps)
    assert a == b
    # d1 and v1 were each superseded by their own site's next edit: not conflicts. Of
    # the two concurrent heads, d2 and v2, one is current and the other the one record.
    conflicts = [content for content, *_ in a["conflicts"].values()]
    assert len(conflicts) == 1
    assert {a["docs"]["briefing"][0], *conflicts} == {"d2", "v2"}


async def test_a_resolution_replicates_and_is_idempotent(client: redis.Redis) -> None:
    desktop, vps = pair(client)
    await desktop.write("briefing", "mine", 0)
    await vps.write("briefing", "theirs", 0)
    await exchange(desktop, vps)
    [conflict] = await desktop.conflicts()
    assert await state(desktop) == await state(vps)
    sent = len(await outbox(desktop))
    resolved = await desktop.resolve(conflict.conflict_id, "conflict")
    assert resolved is not None and resolved.content == conflict.content
    assert await desktop.resolve(conflict.conflict_id, "conflict") is None  # already settled
    for event in (await outbox(desktop))[sent:]:
        await vps.apply(event)
        await vps.apply(event)  # a redelivery changes nothing
    assert await vps.conflicts() == [] and await desktop.conflicts() == []
    assert await state(desktop) == await state(vps)
    assert (await vps.get("briefing")).content == conflict.content  # type: ignore[union-attr]


async def test_a_site_whose_clock_runs_ahead_wins_concurrent_edits_and_loses_none(
    client: redis.Redis,
) -> None:
    """Documented behaviour: the later hybrid-logical-clock time wins a concurrent
    edit, so a site whose clock is 5 minutes ahead wins them; the other edit is kept as
    a conflict record. An edit made after seeing the skewed one still wins (the clock
    moves past what it has seen), so skew never hides a later, informed edit."""
    desktop, vps = pair(client, vps=lambda: time.time() + 300)
    await desktop.write("briefing", "desktop, concurrent", 0)
    await vps.write("briefing", "vps, concurrent (clock ahead)", 0)
    await exchange(desktop, vps)
    a = await state(desktop)
    assert a == await state(vps)
    assert a["docs"]["briefing"][0] == "vps, concurrent (clock ahead)"
    assert [content for content, *_ in a["conflicts"].values()] == ["desktop, concurrent"]
    # The desktop, having seen the VPS's version, edits again: that edit wins.
    current = await desktop.get("briefing")
    assert current is not None
    sent = len(await outbox(desktop))
    await desktop.write("briefing", "desktop, after seeing it", current.version)
    for event in (await outbox(desktop))[sent:]:
        await vps.apply(event)
    assert (await vps.get("briefing")).content == "desktop, after seeing it"  # type: ignore[union-attr]
    assert await state(desktop) == await state(vps)


async def test_a_version_id_from_one_site_is_valid_on_the_other(client: redis.Redis) -> None:
    """The global ETag: a client that read the briefing on the desktop saves on the
    VPS (the phone moved from LAN to VPS) — accepted once synced, refused when the
    VPS has a version the client never saw."""
    from context_store.store import VersionConflict

    desktop, vps = pair(client)
    read = await desktop.write("briefing", "read on the desktop", 0)
    await exchange(desktop, vps)
    on_vps = await vps.get("briefing")
    assert on_vps is not None and (on_vps.hlc, on_vps.site) == (read.hlc, read.site)
    saved = await vps.write("briefing", "saved on the vps", f"{read.hlc}|{read.site}")
    assert saved.content == "saved on the vps"
    with pytest.raises(VersionConflict) as stale:  # written over content it never saw
        await vps.write("briefing", "blind", f"{read.hlc}|{read.site}")
    assert stale.value.current_id == f"{saved.hlc}|{saved.site}"


async def test_a_resolution_against_an_edit_it_never_saw_is_refused(client: redis.Redis) -> None:
    """The owner resolves a conflict while a newer edit from the other site has just
    arrived: the resolution names the winner the owner was shown, so it is refused
    (read the records again) rather than hiding the newer edit."""
    from context_store.store import VersionConflict

    desktop, vps = pair(client)
    await desktop.write("briefing", "mine", 0)
    await vps.write("briefing", "theirs", 0)
    await exchange(desktop, vps)
    [conflict] = await desktop.conflicts()
    winner = await vps.get("briefing")
    assert winner is not None
    sent = len(await outbox(vps))
    await vps.write("briefing", "newer, from the vps", f"{winner.hlc}|{winner.site}")
    for event in (await outbox(vps))[sent:]:
        await desktop.apply(event)
    with pytest.raises(VersionConflict):
        await desktop.resolve(conflict.conflict_id, "conflict", conflict.winner)
    assert (await desktop.get("briefing")).content == "newer, from the vps"  # type: ignore[union-attr]
    [still] = await desktop.conflicts()  # the record is still there, against the newer one
    assert still.conflict_id == conflict.conflict_id


@pytest.mark.parametrize("seed", range(6))
async def test_history_retention_is_the_same_on_both_sites_whatever_the_order(
    client: redis.Redis, seed: int
) -> None:
    """Retention keeps the current version, every conflict record and the newest 3
    superseded versions; delivered in any order (seeded shuffles), both sites keep the
    same history, byte for byte, and a dropped version delivered again stays dropped."""
    import random

    desktop, vps = pair(client, history_keep=3)
    for n in range(8):
        current = await desktop.get("briefing")
        await desktop.write("briefing", f"desktop {n}", current.version if current else 0)
    await vps.write("briefing", "vps, concurrent", 0)  # a conflict with everything above
    to_vps, to_desktop = await outbox(desktop), await outbox(vps)
    deliveries = [(vps, e) for e in to_vps] + [(desktop, e) for e in to_desktop]
    random.Random(seed).shuffle(deliveries)
    for target, event in deliveries:
        await target.apply(event)
    a, b = await state(desktop), await state(vps)
    assert a == b
    history = a["history"]["briefing"]
    states = [v["state"] for v in history]
    assert states.count("superseded") == 3 and states.count("current") == 1
    kept = {v["id"] for v in history}
    [conflict] = await desktop.conflicts()
    for ref in (f"{conflict.hlc}-{conflict.site}", conflict.winner.replace("|", "-")):
        assert ref in kept  # a conflict record's version and its winner are never dropped
    assert len(await desktop.known_ids("briefing")) == 9  # dropped, not forgotten
    dropped = to_vps[0]  # "desktop 0": superseded long ago
    assert await vps.apply(dropped) is False
    assert await state(vps) == b
