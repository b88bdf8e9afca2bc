"""The training dataset: chats in `{"messages": [...]}` JSONL, from three sources.

1. generated examples in the four areas (trainer_job.examples);
2. the live context tiers: questions answered from the owner's own documents;
3. conversations the owner marked for training through the gateway;
plus any JSONL files given with --extra (their lines must already be valid chats).

Every chat is validated (roles, alternation, empty turns, length against the model's
context), duplicates are removed, and train/eval are split by a hash of each chat's
content: deterministic, and a chat stays on its side when the dataset grows.

    python -m trainer_job dataset --out data/            # writes train.jsonl, eval.jsonl,
                                                         # and dataset.json (counts, sha256)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from services.settings import MeshSettings
from trainer_job.examples import Chat, generated_chats

ROLES = ("system", "user", "assistant")
TRAIN_FILE, EVAL_FILE, REPORT_FILE = "train.jsonl", "eval.jsonl", "dataset.json"


class DatasetError(ValueError):
    """A chat or an input file that cannot be used; the message names where."""


def validate(chat: object, where: str) -> Chat:
    """The chat as a list of {role, content} dicts, or DatasetError naming `where`."""
    if not isinstance(chat, list) or not chat:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    cleaned: Chat = []
    for index, message in enumerate(chat):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(f"{where}: message {index} has role {role!r}; expected {ROLES}")
        if not isinstance(content, str) or not content.strip():
            raise DatasetError(f"{where}: message {index} ({role}) is empty")
        if role == "system" and index != 0:
            raise DatasetError(f"{where}: a system message may only come first")
        cleaned.append({"role": role, "content": content})
    turns = cleaned[1:] if cleaned[0]["role"] == "system" else cleaned
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DatasetError(f"{where}: roles must alternate user/assistant from the start")
    if not turns or turns[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: the chat must end with an assistant answer")
    return cleaned


def read_jsonl(path: Path) -> list[Chat]:
    """Chats from a `{"messages": [...]}` JSONL file; DatasetError names file and line."""
    chats = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "messages" not in record:
            raise DatasetError(f'{where}: expected an object with "messages"')
        chats.append(validate(record["messages"], where))
    return chats


def write_jsonl(path: Path, chats: Iterable[Chat]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for chat in chats:
            handle.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")


def fingerprint(chat: Chat) -> str:
    """Identity for de-duplication and the split: roles and whitespace-normalised text."""
    canonical = [(m["role"], " ".join(m["content"].split())) for m in chat]
    return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()


# -- the live context tiers -------------------------------------------------------------

TIER_LABELS = {
    "portfolio": "portfolio",
    "briefing": "session briefing",
}
SECTION = re.compile(r"^#{1,3}\s+(.+?)\s*$", re.MULTILINE)
MAX_ANSWER_CHARS = 600


def _clip(text: str) -> str:
    text = text.strip()
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    cut = text[:MAX_ANSWER_CHARS]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > 0 else cut


def _sections(content: str) -> list[tuple[str, str]]:
    """(heading, body) for every markdown section with a body."""
    heads = list(SECTION.finditer(content))
    sections = []
    for index, head in enumerate(heads):
        end = heads[index + 1].start() if index + 1 < len(heads) else len(content)
        body = content[head.end() : end].strip()
        if body:
            sections.append((head.group(1), body))
    return sections


def context_chats(documents: dict[str, str], log_texts: list[str]) -> list[Chat]:
    """Questions answered from the owner's documents (`doc name -> markdown`) and log."""
    chats = []
    for doc, content in sorted(documents.items()):
        label = TIER_LABELS.get(doc) or (
            f"project context of {doc.split('/', 1)[1]}" if doc.startswith("project/") else doc
        )
        for heading, body in _sections(content):
            answer = _clip(body)
            chats.append(_qa(f"What does my {label} say about {heading}?", answer))
            chats.append(_qa(f"In the {label}, what is under '{heading}'?", answer))
    for text in log_texts:
        first = text.strip().splitlines()[0].lstrip("# ").strip() if text.strip() else ""
        if first:
            chats.append(_qa(f"What did the session log record about '{first}'?", _clip(text)))
    return chats


def _qa(question: str, answer: str) -> Chat:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


async def read_context(settings: MeshSettings) -> tuple[dict[str, str], list[str]]:
    """The current documents and the most recent log entries of this site's store."""
    from context_store.store import ContextStore
    from services.redis_client import connect

    client = connect(settings.redis_url)
    try:
        store = ContextStore(client, settings.namespace, "trainer")
        names = await store.docs()
        found = await store.get_many(names) if names else {}
        documents = {name: doc.content for name, doc in found.items() if doc}
        log = [entry.text for entry in await store.log(limit=200)]
    finally:
        await client.aclose()
    return documents, log


async def read_marked_conversations(settings: MeshSettings) -> list[Chat]:
    """Every conversation the owner marked for training (gateway: PUT /conversation/training)."""
    from services.conversations import ConversationStore
    from services.redis_client import Keys, connect

    client = connect(settings.redis_url)
    try:
        marked = await ConversationStore(client, Keys(settings.namespace)).marked_for_training()
    finally:
        await client.aclose()
    return [[{"role": m.role, "content": m.content} for m in c.messages] for c in marked]


# -- building ---------------------------------------------------------------------------


@dataclass
class DatasetReport:
    sources: Counter = field(default_factory=Counter)
    duplicates: int = 0
    too_long: int = 0
    invalid: list[str] = field(default_factory=list)
    train: int = 0
    eval: int = 0
    sha256: str = ""

    def as_dict(self) -> dict:
        return {
            "sources": dict(self.sources),
            "duplicates_removed": self.duplicates,
            "too_long_removed": self.too_long,
            "invalid_removed": self.invalid,
            "train": self.train,
            "eval": self.eval,
            "sha256": self.sha256,
        }


def build(
    sources: dict[str, list[Chat]],
    out: Path,
    eval_fraction: float = 0.1,
    token_count: Callable[[Chat], int] | None = None,
    max_tokens: int = 0,
) -> DatasetReport:
    """Validate, de-duplicate, drop chats longer than `max_tokens`, split, write."""
    if not 0 < eval_fraction < 1:
        raise DatasetError("eval fraction must be between 0 and 1")
    report = DatasetReport()
    seen: set[str] = set()
    train: list[Chat] = []
    held_out: list[Chat] = []
    for source, chats in sources.items():
        for index, chat in enumerate(chats):
            try:
                chat = validate(chat, f"{source} #{index + 1}")
            except DatasetError as exc:
                # Generated and live sources are skipped with a record; --extra files
                # were already validated line by line and fail loudly before this.
                report.invalid.append(str(exc))
                continue
            key = fingerprint(chat)
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            if token_count and max_tokens and token_count(chat) > max_tokens:
                report.too_long += 1
                continue
            report.sources[source] += 1
            bucket = int(key[:8], 16) / 0xFFFFFFFF
            (held_out if bucket < eval_fraction else train).append(chat)
    if not train or not held_out:
        raise DatasetError(
            f"too few usable chats to split ({len(train)} train, {len(held_out)} eval)"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / TRAIN_FILE, train)
    write_jsonl(out / EVAL_FILE, held_out)
    digest = hashlib.sha256()
    for name in (TRAIN_FILE, EVAL_FILE):
        digest.update((out / name).read_bytes())
    report.train, report.eval, report.sha256 = len(train), len(held_out), digest.hexdigest()
    (out / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


async def gather_sources(
    settings, extra: list[Path], include_live: bool = True
) -> dict[str, list[Chat]]:
    """Every source's chats; --extra files are validated first, failing on a bad line."""
    sources: dict[str, list[Chat]] = {}
    for area, chat in generated_chats():
        sources.setdefault(f"generated:{area}", []).append(chat)
    for path in extra:
        sources[f"file:{path.name}"] = read_jsonl(path)
    if include_live:
        documents, log = await read_context(settings)
        sources["context_tiers"] = context_chats(documents, log)
        sources["marked_conversations"] = await read_marked_conversations(settings)
    return sources


def chat_token_counter(model_ref: str) -> Callable[[Chat], int]:
    """Tokens of a chat as the model's own chat template renders it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_ref)

    def count(chat: Chat) -> int:
        return len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False))

    return count
