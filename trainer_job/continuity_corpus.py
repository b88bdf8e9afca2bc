"""Generated continuity/handoff conversations: the demo model's training text.

The mesh's own domain (the four handoff tiers, sessions, sites, adapters) written
as short question/answer chats. Deterministic for a given seed, so the demo model
built from it is the same on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

TIERS = {
    "portfolio": (
        "PORTFOLIO_CONTEXT.md",
        "lists every project and how the projects relate to each other",
        "rarely, about once a week",
    ),
    "project": (
        "PROJECT_CONTEXT.md",
        "records the architecture of one project, the reasons behind it and its constraints",
        "after each important decision",
    ),
    "briefing": (
        "SESSION_BRIEFING.md",
        "says what is happening right now and what the next session should pick up",
        "at the start of every session",
    ),
    "log": (
        "SESSION_LOG.md",
        "keeps an append-only record of what each session did",
        "after every session, and old entries are never edited",
    ),
}

HOSTS = {
    "desktop": "the desktop with the RTX 2080 is the primary brain and serves requests first",
    "VPS": "the VPS is the backup and relay, reachable from anywhere, and takes the overflow",
    "phone": "the phone talks to the desktop on the LAN first and falls back to the VPS",
}

FACTS = [
    (
        "What is continuity?",
        "Continuity means that each session starts where the last one stopped. "
        "The assistant reads the briefing, the project context and the recent log, "
        "so nothing that was decided is lost between sessions.",
    ),
    (
        "What is the four-tier handoff system?",
        "The handoff system keeps context in four tiers: the portfolio, the project, "
        "the session briefing and the session log. Each tier changes at its own pace, "
        "and together they carry what matters from one session to the next.",
    ),
    (
        "How do I maintain continuity?",
        "Update the session briefing when you start, record decisions in the project "
        "context, and append a short entry to the session log when you stop. "
        "The next session reads them first.",
    ),
    (
        "Why is the session log append-only?",
        "The log is the history of what happened. Entries are only added, never edited, "
        "so every site can merge them without losing one.",
    ),
    (
        "What happens when the desktop is asleep?",
        "When the desktop is asleep the VPS workers take every job, so the phone still "
        "gets an answer. When the desktop wakes up it takes work first again.",
    ),
    (
        "How are edits kept in sync between sites?",
        "Each site keeps its own copy of the tiers and publishes its edits. The later "
        "edit wins, the losing version is kept as a conflict record, and the log merges "
        "by union, so no edit is lost.",
    ),
    (
        "What is an adapter?",
        "An adapter is a small set of LoRA weights trained on the owner's own documents. "
        "Workers load a new adapter version without a restart.",
    ),
    (
        "How does a new adapter reach the workers?",
        "The trainer publishes the adapter version with a manifest of hashes. Every "
        "worker fetches it, checks the hashes and loads it in place.",
    ),
    (
        "What should the briefing contain?",
        "The briefing says what is happening now: the current goal, the open questions "
        "and the first thing to do in the next session.",
    ),
    (
        "What goes into the project context?",
        "The project context holds the architecture, the reasons for each decision and "
        "the constraints that every session must respect.",
    ),
]

QUESTION_FORMS = [
    "What is {doc} for?",
    "What does {doc} contain?",
    "Tell me about the {tier} tier.",
    "When does the {tier} tier change?",
    "Explain the {tier} document.",
]

HOST_FORMS = [
    "What does the {host} do?",
    "What is the role of the {host}?",
    "Explain the {host} in the mesh.",
]


@dataclass(frozen=True)
class Example:
    """One chat: the user's question and the assistant's answer."""

    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]


def _tier_examples() -> Iterator[Example]:
    for tier, (doc, what, when) in TIERS.items():
        answer = f"{doc} is the {tier} tier. It {what}. It changes {when}."
        for form in QUESTION_FORMS:
            yield Example(form.format(doc=doc, tier=tier), answer)


def _host_examples() -> Iterator[Example]:
    for host, role in HOSTS.items():
        answer = f"In the mesh, {role}."
        for form in HOST_FORMS:
            yield Example(form.format(host=host), answer[0].upper() + answer[1:])


def examples() -> list[Example]:
    """Every distinct example, in a stable order."""
    items = [Example(q, a) for q, a in FACTS]
    items.extend(_tier_examples())
    items.extend(_host_examples())
    return items


def training_chats(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`count` chats sampled from the examples; some carry a short system prompt."""
    rng = random.Random(seed)
    pool = examples()
    systems = [
        None,
        "You are the owner's continuity assistant.",
        "You are a helpful assistant that knows the four-tier handoff system.",
    ]
    chats = []
    for _ in range(count):
        example = rng.choice(pool)
        chat = example.messages()
        system = rng.choice(systems)
        if system:
            chat.insert(0, {"role": "system", "content": system})
        chats.append(chat)
    return chats


# -- tool use ---------------------------------------------------------------------------
# A few functions over the mesh's own objects, in OpenAI's tool shape. Chats that offer
# them teach the demo model when to call one ([TOOL_CALLS]) and how to answer from a
# result, so that `make run` can show a tool call end to end.

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_tier",
            "description": "Read one of the four context tiers.",
            "parameters": {
                "type": "object",
                "properties": {"tier": {"enum": ["portfolio", "project", "briefing", "log"]}},
                "required": ["tier"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "append_log",
            "description": "Append an entry to the session log.",
            "parameters": {
                "type": "object",
                "properties": {"entry": {"type": "string"}},
                "required": ["entry"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "host_status",
            "description": "Whether a host of the mesh is up.",
            "parameters": {
                "type": "object",
                "properties": {"host": {"enum": ["desktop", "vps", "phone"]}},
                "required": ["host"],
            },
        },
    },
]

READ_FORMS = ["Show me the {tier} tier.", "Read the {tier} for me.", "What does the {tier} say?"]
LOG_FORMS = [
    "Log that {entry}.",
    "Add to the session log: {entry}.",
    "Note in the log that {entry}.",
]
HOST_STATUS_FORMS = ["Is the {host} up?", "Check whether the {host} is running."]
LOG_ENTRIES = [
    "the sync work is finished",
    "the adapter was retrained",
    "the briefing was updated",
    "the VPS was restarted",
]
TIER_TEXT = {
    "portfolio": "Two projects: the mesh and the phone client.",
    "project": "The mesh runs on the desktop, the VPS and the phone.",
    "briefing": "Goal: finish the sync work. Next: test it on the VPS.",
    "log": "Yesterday the context store moved to its new layout.",
}


@dataclass(frozen=True)
class ToolExample:
    """A chat that calls one tool: question, call, result, answer."""

    question: str
    name: str
    arguments: dict[str, str]
    result: str
    answer: str

    def messages(self, call_id: str) -> list[dict[str, object]]:
        call = {"id": call_id, "type": "function"}
        call["function"] = {"name": self.name, "arguments": self.arguments}  # type: ignore[assignment]
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": self.result},
            {"role": "assistant", "content": self.answer},
        ]


def tool_examples() -> list[ToolExample]:
    items = []
    for tier, text in TIER_TEXT.items():
        for form in READ_FORMS:
            answer = f"The {tier} tier says: {text}"
            items.append(
                ToolExample(form.format(tier=tier), "read_tier", {"tier": tier}, text, answer)
            )
    for entry in LOG_ENTRIES:
        for form in LOG_FORMS:
            items.append(
                ToolExample(
                    form.format(entry=entry),
                    "append_log",
                    {"entry": entry},
                    "appended",
                    f"Done: the log now says that {entry}.",
                )
            )
    for host in ("desktop", "vps", "phone"):
        for form in HOST_STATUS_FORMS:
            items.append(
                ToolExample(
                    form.format(host=host),
                    "host_status",
                    {"host": host},
                    "up",
                    f"Yes, the {host} is up.",
                )
            )
    return items


def tool_chats(count: int, seed: int = 0) -> list[tuple[list[dict[str, object]], list[dict]]]:
    """`count` chats with the tools offered, each with its tools: most call one, some
    (a plain question) are answered without a call."""
    rng = random.Random(seed + 1)
    calls, plain = tool_examples(), examples()
    chats = []
    for number in range(count):
        if rng.random() < 0.75:
            chat = rng.choice(calls).messages(f"call{number:05d}")
        else:
            chat = rng.choice(plain).messages()  # type: ignore[assignment]
        chats.append((chat, TOOLS))
    return chats
