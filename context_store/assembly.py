"""Build the model's context from the tiers within a token budget.

Order of importance (what the budget keeps first): briefing, then the project, then
the portfolio, then the most recent log entries. Whole sections (and the oldest log
entries) are left out before any text is cut; only a briefing that alone exceeds the
budget is cut.

Order in the text (a separate thing): what changes least comes first — portfolio,
project, briefing, then the log (oldest kept entry first, newest last) — so that
consecutive prompts share the longest possible start, which the workers' prefix
caches read only once (an edit of the briefing leaves the portfolio and project
cached; a new log entry leaves everything before the log cached).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from context_store.store import ContextStore
from proto.context import ContextReport, Document, LogEntry, SectionReport, Tier

TokenCounter = Callable[[str], int]
LAYOUT = ("portfolio", "project", "briefing", "log")  # the order in the text
TITLES = {
    "briefing": "Session briefing (SESSION_BRIEFING.md)",
    "project": "Project context: {name} (PROJECT_CONTEXT.md)",
    "portfolio": "Portfolio (PORTFOLIO_CONTEXT.md)",
    "log": "Recent session log (SESSION_LOG.md)",
}


@dataclass(frozen=True)
class Assembly:
    text: str
    report: ContextReport


def cached(count: TokenCounter, size: int = 512) -> TokenCounter:
    """`count` remembering recent texts: documents change rarely, chats come often.
    (A 15-page project document costs ~40 ms to tokenize on this machine.)"""
    return functools.lru_cache(maxsize=size)(count)


def _section(title: str, body: str) -> str:
    return f"## {title}\n{body.strip()}\n"


def _log_line(entry: LogEntry) -> str:
    return f"- [{entry.written_at[:16]}Z {entry.site}] {entry.text.strip()}"


async def assemble(
    store: ContextStore,
    count: TokenCounter,
    budget: int,
    project: str | None,
    log_entries: int = 50,
) -> Assembly:
    names: dict[Tier, str] = {
        "briefing": "briefing",
        "project": f"project/{project}",
        "portfolio": "portfolio",
    }
    if not project:
        del names["project"]
    found = await store.get_many(list(names.values()))
    docs: list[tuple[Tier, Document | None]] = [(tier, found[doc]) for tier, doc in names.items()]
    parts: dict[str, str] = {}  # tier -> its text, in order of importance
    reports: list[SectionReport] = []
    remaining = budget
    for tier, doc in docs:
        if doc is None or not doc.content.strip():
            continue
        text = _section(TITLES[tier].format(name=project), doc.content)
        tokens = count(text)
        if tokens <= remaining:
            parts[tier] = text
            remaining -= tokens
            reports.append(
                SectionReport(
                    tier=tier,
                    doc=doc.doc,
                    version=doc.version,
                    tokens=tokens,
                    included=True,
                    cut=None,
                )
            )
        elif tier == "briefing" and not parts:
            text, tokens = _cut_to(text, remaining, count)
            parts[tier] = text
            remaining -= tokens
            reports.append(
                SectionReport(
                    tier=tier,
                    doc=doc.doc,
                    version=doc.version,
                    tokens=tokens,
                    included=True,
                    cut="the end of the briefing",
                )
            )
        else:
            reports.append(
                SectionReport(
                    tier=tier,
                    doc=doc.doc,
                    version=doc.version,
                    tokens=0,
                    included=False,
                    cut=f"whole section ({tokens} tokens)",
                )
            )
    reports.append(_add_log(await store.log(log_entries), count, remaining, parts))
    used = sum(r.tokens for r in reports)
    text = "\n".join(parts[tier] for tier in LAYOUT if tier in parts)
    return Assembly(text, ContextReport(budget=budget, tokens=used, sections=reports))


def _add_log(
    entries: list[LogEntry], count: TokenCounter, remaining: int, parts: dict[str, str]
) -> SectionReport:
    """As many of the newest entries as fit, shown oldest first."""
    header = f"## {TITLES['log']}\n"
    if not entries:
        return SectionReport(tier="log", doc=None, version=None, tokens=0, included=False, cut=None)
    kept: list[str] = []
    tokens = count(header)
    for entry in entries:  # newest first
        line = _log_line(entry)
        cost = count(line + "\n")
        if tokens + cost > remaining:
            break
        kept.append(line)
        tokens += cost
    dropped = len(entries) - len(kept)
    cut = f"{dropped} older entries" if dropped else None
    if not kept:
        return SectionReport(tier="log", doc=None, version=None, tokens=0, included=False, cut=cut)
    parts["log"] = header + "\n".join(reversed(kept)) + "\n"
    return SectionReport(tier="log", doc=None, version=None, tokens=tokens, included=True, cut=cut)


def _cut_to(text: str, budget: int, count: TokenCounter) -> tuple[str, int]:
    """The longest prefix of `text` (on a line, else a word boundary) within `budget`."""
    low, high = 0, len(text)
    while low < high:  # binary search on characters
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    prefix = text[:low]
    for separator in ("\n", " "):
        if separator in prefix[len(prefix) // 2 :]:
            prefix = prefix[: prefix.rindex(separator)]
            break
    return prefix, count(prefix)
