"""The demo model: a real Mistral-architecture model that answers about its domain."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainer_job.demo_model import BUILD_INFO, DemoModelSpec, ensure_demo_model, is_built


def test_it_is_a_mistral_model_with_a_mistral_chat_template(
    reference_model: tuple[Any, Any],
) -> None:
    model, tokenizer = reference_model
    assert type(model).__name__ == "MistralForCausalLM"
    prompt = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST]"


@pytest.mark.parametrize(
    ("question", "expected_words"),
    [
        ("What is the four-tier handoff system?", {"portfolio", "briefing", "log"}),
        ("What does the phone do?", {"phone", "VPS"}),
        ("Why is the session log append-only?", {"never", "edited"}),
    ],
)
def test_it_answers_domain_questions_in_english(
    reference_greedy: Callable[..., tuple[str, int, int]], question: str, expected_words: set[str]
) -> None:
    answer, _, _ = reference_greedy([{"role": "user", "content": question}], 80)
    assert expected_words <= set(answer.replace(",", " ").replace(".", " ").split()), answer
    assert answer.strip().endswith(".")


def test_a_build_is_reused_and_a_stale_one_is_rebuilt(tmp_path: Path) -> None:
    tiny = DemoModelSpec(
        train_steps=3,
        chats=60,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    target = tmp_path / "model"
    ensure_demo_model(target, spec=tiny)
    assert is_built(target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-model-")]
    weights = target / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    ensure_demo_model(target, spec=tiny)
    assert weights.stat().st_mtime_ns == stamp  # present: not rebuilt

    info = json.loads((target / BUILD_INFO).read_text())
    (target / BUILD_INFO).write_text(json.dumps({**info, "builder_version": -1}))
    assert not is_built(target)
    ensure_demo_model(target, spec=tiny)
    assert is_built(target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(target).config.model_type == "mistral"
    assert AutoTokenizer.from_pretrained(target).chat_template
