"""The training dataset: generated areas, validation, de-duplication, the split, the
live sources (real Redis), and readable errors for bad input files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from context_store.store import ContextStore
from services.paths import REPO_ROOT
from services.redis_client import Keys
from services.settings import MeshSettings
from trainer_job.dataset import (
    DatasetError,
    build,
    context_chats,
    fingerprint,
    gather_sources,
    read_jsonl,
    validate,
)
from trainer_job.examples import AREAS, generated_chats


def _qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_generated_examples_cover_the_four_areas_and_are_distinct() -> None:
    chats = generated_chats()
    assert len({fingerprint(chat) for _, chat in chats}) == len(chats) >= 500
    by_area = {area for area, _ in chats}
    assert (
        by_area
        == set(AREAS)
        == {
            "continuity_theory",
            "handoff_system",
            "architecture",
            "practical_scenarios",
        }
    )
    for _, chat in chats:
        validate(chat, "generated")


@pytest.mark.parametrize(
    ("chat", "complaint"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}], "empty"),
        (
            [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}],
            "system message may only come first",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}],
            "alternate",
        ),
        ([{"role": "user", "content": "q"}], "end with an assistant"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
    ],
)
def test_invalid_chats_are_refused_with_the_reason(chat: list, complaint: str) -> None:
    with pytest.raises(DatasetError, match=complaint):
        validate(chat, "here")


def test_a_bad_input_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "extra.jsonl"
    good = json.dumps({"messages": _qa("q", "a")})
    path.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(DatasetError, match=rf"{path}:3: not JSON"):
        read_jsonl(path)
    path.write_text(f"{good}\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}))
    with pytest.raises(DatasetError, match=rf"{path}:2: the chat must end"):
        read_jsonl(path)


def test_build_dedups_drops_long_chats_and_splits_deterministically(tmp_path: Path) -> None:
    chats = [_qa(f"question {i}", f"answer {i}") for i in range(200)]
    duplicate = _qa("question  7", "answer 7")  # same after whitespace normalisation
    long_chat = _qa("long " * 50, "answer")
    sources = {"a": chats, "b": [duplicate, long_chat]}

    def words(chat: list[dict[str, str]]) -> int:
        return sum(len(m["content"].split()) for m in chat)

    report = build(sources, tmp_path / "one", 0.2, words, max_tokens=20)
    assert (report.duplicates, report.too_long) == (1, 1)
    assert report.train + report.eval == 200 and 20 < report.eval < 60
    train = read_jsonl(tmp_path / "one" / "train.jsonl")
    held_out = read_jsonl(tmp_path / "one" / "eval.jsonl")
    assert not {fingerprint(c) for c in train} & {fingerprint(c) for c in held_out}

    again = build(sources, tmp_path / "two", 0.2, words, max_tokens=20)
    assert again.sha256 == report.sha256
    # Growing the dataset keeps every chat on the side it was on.
    build({"a": [*chats, _qa("new", "one")]}, tmp_path / "three", 0.2)
    held_out_after = {fingerprint(c) for c in read_jsonl(tmp_path / "three" / "eval.jsonl")}
    assert {fingerprint(c) for c in held_out} <= held_out_after


def test_context_tiers_become_questions_about_the_owners_documents() -> None:
    documents = {
        "briefing": "# Briefing\n\n## Next step\n\nWire the trainer into the CronJob.\n",
        "project/mesh": "## Constraints\n\nThe desktop has 8 GB of VRAM.\n",
    }
    chats = context_chats(documents, ["## Fixed the sync lag\nIt was the outbox."])
    pairs = {(c[0]["content"], c[1]["content"]) for c in chats}
    assert (
        "What does my session briefing say about Next step?",
        "Wire the trainer into the CronJob.",
    ) in pairs
    assert (
        "What does my project context of mesh say about Constraints?",
        "The desktop has 8 GB of VRAM.",
    ) in pairs
    assert any("Fixed the sync lag" in q and "outbox" in a for q, a in pairs)


@pytest.mark.integration
async def test_live_sources_read_the_tiers_and_marked_conversations(
    mesh_settings: MeshSettings, redis_client
) -> None:
    settings = MeshSettings(namespace=f"{mesh_settings.namespace}-ds")
    store = ContextStore(redis_client, settings.namespace, "desktop")
    keys = Keys(settings.namespace)
    try:
        await store.write("portfolio", "# Portfolio\n\n## Garden\n\nThe garden planner.\n", 0)
        conversation = [
            json.dumps({"role": "user", "content": "Which bed gets tomatoes?", "at": "x"}),
            json.dumps({"role": "assistant", "content": "The south bed.", "at": "x"}),
        ]
        await redis_client.rpush(keys.conversation("k1", "c1"), *conversation)
        await redis_client.rpush(keys.conversation("k1", "c2"), *conversation[:1])
        await redis_client.hset(keys.training_conversations(), "k1:c1", "now")
        sources = await gather_sources(settings, [])
    finally:
        names = [n async for n in redis_client.scan_iter(match=f"{settings.namespace}:*")]
        await redis_client.delete(*names)
    assert sources["marked_conversations"] == [_qa("Which bed gets tomatoes?", "The south bed.")]
    assert (
        _qa("What does my portfolio say about Garden?", "The garden planner.")
        in sources["context_tiers"]
    )


def test_cli_reports_a_bad_file_in_one_line(tmp_path: Path, demo_model: Path) -> None:
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer_job",
            "dataset",
            "--out",
            str(tmp_path / "out"),
            "--extra",
            str(bad),
            "--no-live",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"trainer_job dataset: {bad}:1: the chat must end with an assistant answer"
    )
    assert not (tmp_path / "out").exists()
