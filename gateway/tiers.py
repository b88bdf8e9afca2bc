"""The context tiers of a chat's prompt, assembled once per change rather than per chat.

Assembling reads four documents and the log and counts their tokens: several Redis
round trips and some CPU on every chat, for text that changes a few times a day.
The store's stamp (its hybrid logical clock) moves with every change on every site —
a local write, a log entry, a version another site synced in — so one GET tells
whether the assembly kept for a project is still the current one.
"""

from __future__ import annotations

from context_store.assembly import Assembly, TokenCounter, assemble
from context_store.store import ContextStore


class TierCache:
    def __init__(
        self,
        store: ContextStore,
        count_tokens: TokenCounter,
        budget: int,
        default_project: str | None,
        size: int = 64,
    ) -> None:
        self.store = store
        self.count_tokens = count_tokens
        self.budget = budget
        self.default_project = default_project or None
        self.size = size
        self._kept: dict[str | None, tuple[str | None, Assembly | None]] = {}

    async def get(self, project: str | None) -> Assembly | None:
        """The tiers for a prompt about `project` (the default one when None), or None
        when there is nothing to add."""
        if self.budget <= 0:
            return None
        project = project or self.default_project
        # The stamp is read before the documents: a change landing in between makes
        # the next request assemble again, never a stale assembly kept as current.
        stamp = await self.store.stamp()
        kept = self._kept.get(project)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        assembly = await assemble(self.store, self.count_tokens, self.budget, project)
        found = assembly if assembly.text else None
        if len(self._kept) >= self.size and project not in self._kept:
            self._kept.pop(next(iter(self._kept)))
        self._kept[project] = (stamp, found)
        return found
