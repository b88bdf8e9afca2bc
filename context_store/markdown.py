"""The tiers as markdown files in a folder, so they can live in git.

    PORTFOLIO_CONTEXT.md, SESSION_BRIEFING.md, SESSION_LOG.md,
    projects/NAME/PROJECT_CONTEXT.md (one per project)

SESSION_LOG.md holds one `### <entry id> · <site> · <time>` section per entry; on
import, entries whose id is already in the store are skipped, so importing the
same folder twice changes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from context_store.store import ContextStore

FILES = {"portfolio": "PORTFOLIO_CONTEXT.md", "briefing": "SESSION_BRIEFING.md"}
LOG_FILE = "SESSION_LOG.md"
PROJECT_FILE = "PROJECT_CONTEXT.md"
ENTRY = re.compile(r"^### (?P<id>[A-Za-z0-9_-]+) · (?P<site>[^·]+) · (?P<at>.+)$", re.M)
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


async def export_dir(store: ContextStore, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for doc in await store.docs():
        document = await store.get(doc)
        if document is None:
            continue
        if doc.startswith("project/"):
            path = folder / "projects" / doc.split("/", 1)[1] / PROJECT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            path = folder / FILES[doc]
        path.write_text(document.content)
        written.append(path)
    entries = []
    cursor = None
    while page := await store.log(500, cursor):
        entries.extend(page)
        cursor = await store.log_cursor(page[-1])
    lines = ["# Session log\n"]
    for entry in reversed(entries):  # oldest first
        lines.append(f"### {entry.entry_id} · {entry.site} · {entry.written_at}\n")
        lines.append(entry.text.strip() + "\n")
    (folder / LOG_FILE).write_text("\n".join(lines))
    written.append(folder / LOG_FILE)
    return written


async def import_dir(store: ContextStore, folder: Path) -> dict[str, int]:
    """Import the folder; returns how many document versions and log entries were new."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    counts = {"documents": 0, "log_entries": 0}
    for doc, name in FILES.items():
        if (folder / name).is_file():
            counts["documents"] += bool(
                await store.put_if_changed(doc, (folder / name).read_text())
            )
    for path in sorted((folder / "projects").glob(f"*/{PROJECT_FILE}")):
        project = path.parent.name
        if not PROJECT_NAME.match(project):
            raise ValueError(f"{path}: project names match {PROJECT_NAME.pattern}")
        counts["documents"] += bool(
            await store.put_if_changed(f"project/{project}", path.read_text())
        )
    if (folder / LOG_FILE).is_file():
        counts["log_entries"] = await _import_log(store, (folder / LOG_FILE).read_text())
    return counts


async def _import_log(store: ContextStore, text: str) -> int:
    known = {entry.entry_id for entry in await _all_entries(store)}
    known_texts = {entry.text.strip() for entry in await _all_entries(store)}
    matches = list(ENTRY.finditer(text))
    added = 0
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        if match["id"] in known or not body or body in known_texts:
            continue
        await store.append_log(body)
        added += 1
    # A hand-written log without entry headings: every paragraph is one entry.
    if not matches:
        body = re.sub(r"^# .*\n", "", text).strip()
        for paragraph in (p.strip() for p in body.split("\n\n")):
            if paragraph and paragraph not in known_texts:
                await store.append_log(paragraph)
                added += 1
    return added


async def _all_entries(store: ContextStore) -> list:
    entries, cursor = [], None
    while page := await store.log(500, cursor):
        entries.extend(page)
        cursor = await store.log_cursor(page[-1])
    return entries
