"""Generated training chats in the four areas the original system trained on:
continuity theory, the four-tier handoff system, the architecture of this mesh, and
practical scenarios. Each area crosses a small table of facts with several ways of
asking, so the set is large (600+ distinct chats) while every answer stays true.

Deterministic: the same list, in the same order, on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator

from trainer_job.continuity_corpus import HOSTS, TIERS

Chat = list[dict[str, str]]


def _chat(question: str, answer: str) -> Chat:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# -- continuity theory ------------------------------------------------------------------

CONCEPTS = {
    "continuity": "Continuity means each session starts where the last one stopped: "
    "the assistant reads what earlier sessions wrote down, so decisions and open "
    "questions are carried forward instead of rediscovered.",
    "context flow": "Context flows between sessions through written documents, not "
    "through memory. What one session writes into the tiers is what the next one reads.",
    "a handoff": "A handoff is the moment one session passes its state to the next: "
    "update the briefing, record decisions in the project context, append to the log.",
    "a session": "A session is one stretch of work with the assistant. It begins by "
    "reading the briefing and ends by writing a log entry.",
    "context loss": "Context loss happens when a decision lives only in one session's "
    "conversation. The cure is to write it into the project context before stopping.",
    "the context window": "The context window is what the model sees at once. The "
    "tiers are assembled into the system prompt in order of importance, so the "
    "briefing and project context survive even when the log must be cut.",
    "a decision record": "A decision record says what was decided, why, and what was "
    "rejected. It belongs in the project context so later sessions respect it.",
    "drift": "Drift is when sessions slowly contradict earlier decisions. Reading the "
    "project context at the start of each session keeps the work consistent.",
    "an open question": "An open question is something a session could not settle. "
    "It goes into the briefing so the next session sees it first.",
    "stale context": "Context is stale when a document no longer matches the work. "
    "Each tier has its own pace of change, and the briefing is refreshed every session.",
    "memory across devices": "The desktop, the VPS and the phone share the same tiers. "
    "Edits sync between sites, so a session can continue on any device.",
    "summarising a session": "A good session summary is short: what changed, what was "
    "decided, and what comes next. It is appended to the session log.",
}

CONCEPT_FORMS = [
    "What is {c}?",
    "Explain {c} to me.",
    "In the continuity approach, what does {c} mean?",
    "Can you describe {c} briefly?",
    "Why does {c} matter for an assistant?",
    "How should I think about {c}?",
    "Give me a short definition of {c}.",
    "What role does {c} play in the handoff system?",
]


def _theory() -> Iterator[Chat]:
    for concept, answer in CONCEPTS.items():
        for form in CONCEPT_FORMS:
            yield _chat(form.format(c=concept), answer)


# -- the four-tier handoff system -------------------------------------------------------

TIER_FACTS = {
    "purpose": "{doc} is the {tier} tier. It {what}.",
    "cadence": "The {tier} tier ({doc}) changes {when}.",
    "order": "In the system prompt the tiers come in this order: the session briefing, "
    "the project context, the portfolio, then the most recent log entries. {doc} is the "
    "{tier} tier.",
    "sync": "{doc} is versioned with compare-and-set: a save based on an old version is "
    "refused, and edits from the other site are merged without losing one.",
    "markdown": "{doc} can be exported to and imported from a markdown file with "
    "`python -m context_store export` and `python -m context_store import`.",
    "owner": "The owner writes {doc}; the assistant reads it at the start of a session "
    "and may suggest changes to it. It {what}.",
}

TIER_FORMS = {
    "purpose": [
        "What is {doc} for?",
        "What does the {tier} tier hold?",
        "Describe the {tier} document.",
        "What goes into {doc}?",
    ],
    "cadence": [
        "How often does {doc} change?",
        "When should I update the {tier} tier?",
        "How frequently is the {tier} document edited?",
    ],
    "order": [
        "Where does the {tier} tier appear in the prompt?",
        "In what order are the tiers read, and where is {doc}?",
    ],
    "sync": [
        "What happens if two sites edit {doc} at once?",
        "How is {doc} kept in sync?",
        "Can I lose an edit to the {tier} tier?",
    ],
    "markdown": [
        "How do I back up {doc}?",
        "Can I edit the {tier} tier as a file?",
    ],
    "owner": [
        "Who writes the {tier} tier?",
        "Does the assistant change {doc}?",
    ],
}

TIER_PAIRS = [
    (
        "briefing",
        "log",
        "The briefing says what is happening now and is rewritten each "
        "session; the log keeps every past session and is never edited.",
    ),
    (
        "project",
        "portfolio",
        "The project context covers one project in depth; the "
        "portfolio lists every project and how they relate.",
    ),
    (
        "briefing",
        "project",
        "The briefing is short-lived and about the next step; the "
        "project context is long-lived and about architecture, reasons and constraints.",
    ),
    (
        "log",
        "project",
        "The log records what happened, in order; the project context "
        "records what was decided and why, as it stands now.",
    ),
    (
        "portfolio",
        "briefing",
        "The portfolio changes about once a week and spans all "
        "projects; the briefing changes every session and covers only the current work.",
    ),
    (
        "portfolio",
        "log",
        "The portfolio is a map of all projects; the log is the "
        "history of sessions, appended to and never rewritten.",
    ),
]

PAIR_FORMS = [
    "What is the difference between the {a} tier and the {b} tier?",
    "How do the {a} and {b} tiers differ?",
    "Should this go in the {a} or the {b} tier?",
]


def _handoff() -> Iterator[Chat]:
    for tier, (doc, what, when) in TIERS.items():
        for fact, answer in TIER_FACTS.items():
            text = answer.format(doc=doc, tier=tier, what=what, when=when)
            for form in TIER_FORMS[fact]:
                yield _chat(form.format(doc=doc, tier=tier), text)
    for a, b, answer in TIER_PAIRS:
        for form in PAIR_FORMS:
            yield _chat(form.format(a=a, b=b), answer)


# -- the mesh's architecture ------------------------------------------------------------

COMPONENTS = {
    "gateway": (
        "The gateway is the mesh's front door: a FastAPI service with REST and SSE for "
        "the phone, the desktop and OpenAI clients. It checks API keys and limits, "
        "assembles the context into the prompt and puts chat jobs on RabbitMQ.",
        "If the gateway is down, clients fall back to the next gateway URL in their list, "
        "usually the VPS.",
    ),
    "inference worker": (
        "An inference worker takes chat jobs from RabbitMQ, runs the model and streams "
        "tokens back. GPU workers take work first; CPU workers take the overflow.",
        "If a worker dies mid-job, the job was not acknowledged, so RabbitMQ hands it to "
        "another worker and the client still gets one whole answer.",
    ),
    "context store": (
        "The context store keeps the four tiers in Redis: every document versioned, every "
        "write compare-and-set, and the session log append-only.",
        "If Redis restarts, the append-only file brings the tiers back; the other site "
        "also holds a full copy.",
    ),
    "trainer": (
        "The trainer builds a chat dataset from the owner's documents and chosen "
        "conversations, fine-tunes a LoRA adapter, evaluates it and publishes it.",
        "If training is interrupted, it resumes from its last checkpoint; a version that "
        "did not improve is not published.",
    ),
    "RabbitMQ": (
        "RabbitMQ carries the jobs: workers connect out to it, so a desktop behind NAT "
        "can serve a phone that only reaches the VPS.",
        "If the broker restarts, durable queues keep accepted jobs, and workers reconnect.",
    ),
    "Redis": (
        "Redis holds the context tiers, conversations, API keys, rate limits and the "
        "workers' liveness records.",
        "If Redis is unreachable, the gateway answers with a clear error instead of guessing.",
    ),
    "adapter registry": (
        "The adapter registry is a folder of adapter versions, each with a manifest of "
        "sha256 hashes, the base model and the evaluation numbers.",
        "A version with a wrong hash or a foreign base model is refused by every worker.",
    ),
    "context sync": (
        "Context sync copies every edit between the desktop and the VPS over RabbitMQ, so "
        "both sites hold the same tiers.",
        "While the link is down, edits wait in an outbox and are sent when it returns.",
    ),
    "liveness record": (
        "Each worker keeps a liveness record in Redis with a short lifetime: its site, "
        "device, base model, adapters, capacity and jobs in flight.",
        "A worker that stops refreshing its record disappears from /ready and /info.",
    ),
    "dead-letter queue": (
        "The dead-letter queue holds jobs that failed on every delivery, so one bad job "
        "cannot block the others.",
        "The client of a dead-lettered job gets a clear error instead of waiting forever.",
    ),
}

COMPONENT_FORMS = [
    ("What does the {c} do?", 0),
    ("What is the role of the {c} in the mesh?", 0),
    ("Explain the {c}.", 0),
    ("Why does the mesh have a {c}?", 0),
    ("What happens when the {c} fails?", 1),
    ("How does the mesh cope with a {c} problem?", 1),
    ("Is the mesh safe if the {c} breaks?", 1),
]


def _architecture() -> Iterator[Chat]:
    for component, answers in COMPONENTS.items():
        for form, which in COMPONENT_FORMS:
            yield _chat(form.format(c=component), answers[which])
    for host, role in HOSTS.items():
        answer = f"In the mesh, {role}."
        for form in ("What does the {h} do?", "What is the {h}'s job?", "Why is the {h} there?"):
            yield _chat(form.format(h=host), answer[0].upper() + answer[1:])


# -- practical scenarios ----------------------------------------------------------------

PROJECTS = ["the mesh", "the garden planner", "the thesis", "the budget app", "the novel"]

SCENARIOS = [
    (
        "I am starting a session on {p}. What should I do first?",
        "Read the session briefing for {p} first, then its project context, then the last "
        "few log entries. Start with the next step the briefing names.",
    ),
    (
        "I'm back on {p} after two weeks away. How do I pick it up again?",
        "After a long break, read the project context of {p} to recall its decisions, "
        "then the log entries since you left, then rewrite the briefing for today.",
    ),
    (
        "I just made an important decision about {p}. Where do I record it?",
        "Write it into the project context of {p}: what you decided, why, and what you "
        "rejected. Mention it in today's log entry too.",
    ),
    (
        "I am ending my session on {p}. What should I write down?",
        "Append a short entry to the session log: what changed on {p}, what was decided "
        "and what is next. Then update the briefing so the next session starts there.",
    ),
    (
        "I switched from the desktop to my phone while working on {p}. Will the context follow?",
        "Yes. The tiers for {p} sync between the desktop and the VPS, and the phone reads "
        "them through whichever gateway answers first.",
    ),
    (
        "Two of my devices saved different versions of the {p} briefing. What happens?",
        "The later edit wins and the other version is kept as a conflict record, so you "
        "can compare them and keep the right one. No edit to {p} is lost.",
    ),
    (
        "The desktop is off. Can I still ask about {p}?",
        "Yes. With the desktop off, the VPS workers take every job, and the context for "
        "{p} is on the VPS too.",
    ),
    (
        "My notes on {p} are getting too long for the prompt. What should I do?",
        "Move settled history from the briefing into the log, keep the project context of "
        "{p} to decisions and constraints, and let the assembler cut the oldest log entries.",
    ),
    (
        "How do I make the assistant learn what I know about {p}?",
        "Keep the {p} documents current and mark good conversations for training. The next "
        "training run builds a dataset from them and publishes a new adapter.",
    ),
    (
        "The new adapter gives worse answers about {p}. How do I go back?",
        "Roll the adapter back to its previous version through the gateway's admin "
        "endpoint. Workers switch without a restart, and {p} is answered as before.",
    ),
    (
        "I want to start a new project next to {p}. Where does it go?",
        "Add it to the portfolio with a line on how it relates to {p}, and give it its own "
        "project context and briefing.",
    ),
    (
        "What should the briefing for {p} look like at the end of the day?",
        "The briefing for {p} should name the current goal, the open questions and the "
        "very first thing to do next session, in a few lines.",
    ),
]

SCENARIO_PREFIXES = ["", "Quick question: ", "Help me out. ", "I need advice. ", "Hi! "]


def _scenarios() -> Iterator[Chat]:
    for project in PROJECTS:
        for question, answer in SCENARIOS:
            for prefix in SCENARIO_PREFIXES:
                text = prefix + question.format(p=project)
                yield _chat(text[0].upper() + text[1:], answer.format(p=project))


AREAS = {
    "continuity_theory": _theory,
    "handoff_system": _handoff,
    "architecture": _architecture,
    "practical_scenarios": _scenarios,
}


def generated_chats() -> list[tuple[str, Chat]]:
    """(area, chat) for every generated example, in a stable order."""
    return [(area, chat) for area, make in AREAS.items() for chat in make()]
