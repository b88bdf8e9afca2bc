"""LoRA training on the demo model (CPU): assistant-only labels, the loss drops, the
weights change, the saved adapter reloads to the same logits, a fixed seed repeats a
run exactly, a killed run resumes, and CPU QLoRA's gradients are the fp32 ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.paths import REPO_ROOT
from services.settings import MeshSettings
from trainer_job.dataset import build, gather_sources
from trainer_job.train import TrainConfig, TrainingError, encode_chat, run_training

pytestmark = pytest.mark.slow
SHORT = {
    "max_steps": 32,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "learning_rate": 2e-3,
    "save_steps": 8,
    "logging_steps": 4,
    "progress": False,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    out = tmp_path_factory.mktemp("dataset")
    sources = asyncio.run(gather_sources(MeshSettings(), [], include_live=False))
    build(sources, out, 0.1)
    return out


@pytest.fixture(scope="module")
def trained(dataset: Path, demo_model: Path, tmp_path_factory: pytest.TempPathFactory):
    config = TrainConfig(
        model=str(demo_model),
        data_path=dataset,
        output_dir=tmp_path_factory.mktemp("run"),
        **SHORT,
    )
    return config, run_training(config)


def test_labels_cover_the_assistant_turns_only(demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the log?"},
        {"role": "assistant", "content": "The append-only history."},
        {"role": "user", "content": "And the briefing?"},
        {"role": "assistant", "content": "What happens now."},
    ]
    encoded = encode_chat(tokenizer, chat, 512)
    assert encoded is not None
    labelled = [
        t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != -100
    ]
    assert tokenizer.decode(labelled) == ("The append-only history.</s>What happens now.</s>")
    assert encoded["input_ids"] == tokenizer.apply_chat_template(chat, return_dict=False)
    # Cut before the first answer: nothing left to learn from.
    assert encode_chat(tokenizer, chat, 8) is None


def test_training_lowers_the_held_out_loss(trained) -> None:
    _, result = trained
    numbers = result.evaluation["eval"]
    assert numbers["eval_loss_after"] < numbers["eval_loss_before"] - 0.5
    assert numbers["train_steps"] == SHORT["max_steps"]
    probes = result.evaluation["probes"]
    assert len(probes) == 5 and any(p["base"] != p["adapter"] for p in probes)


def test_weights_changed_and_the_saved_adapter_reloads_to_identical_logits(
    trained, demo_model: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config, result = trained
    saved = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in saved.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # peft starts B at zero

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_model), config.output_dir / "adapter"
    ).eval()
    ids = result.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is continuity?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        trained_logits = result.model(input_ids=ids).logits
        reloaded_logits = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=ids).logits
    assert torch.equal(trained_logits, reloaded_logits)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)


def _adapter_weights(folder: Path):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_a_fixed_seed_repeats_the_run_exactly(trained, dataset, demo_model, tmp_path) -> None:
    import torch

    config, _ = trained
    again = TrainConfig(model=str(demo_model), data_path=dataset, output_dir=tmp_path, **SHORT)
    run_training(again)
    first, second = _adapter_weights(config.output_dir), _adapter_weights(tmp_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_the_same(
    trained, dataset: Path, demo_model: Path, tmp_path: Path
) -> None:
    import torch

    config, _ = trained
    command = [
        sys.executable,
        "-m",
        "trainer_job",
        "train",
        "--data_path",
        str(dataset),
        "--output_dir",
        str(tmp_path),
        "--no-progress",
        *[f"--{k}={v}" for k, v in SHORT.items() if k != "progress"],
    ]
    env = {**os.environ, "MESH_MODEL": str(demo_model)}
    first = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    checkpoint = tmp_path / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    while not checkpoint.is_file():
        assert first.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (tmp_path / "adapter").exists()

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["resumed_from"] in {"checkpoint-8", "checkpoint-16", "checkpoint-24"}
    assert evaluation["eval"]["train_steps"] == SHORT["max_steps"]
    resumed, uninterrupted = _adapter_weights(tmp_path), _adapter_weights(config.output_dir)
    assert all(torch.allclose(resumed[name], uninterrupted[name], atol=1e-6) for name in resumed)


def test_resuming_with_other_options_is_refused(trained, dataset, demo_model) -> None:
    config, _ = trained
    (config.output_dir / "checkpoints" / "checkpoint-99").mkdir()
    changed = TrainConfig(
        model=str(demo_model),
        data_path=dataset,
        output_dir=config.output_dir,
        **{**SHORT, "learning_rate": 5e-4},
    )
    with pytest.raises(TrainingError, match="other options \\(learning_rate\\)"):
        run_training(changed)


def test_unknown_target_modules_are_a_clear_error(dataset, demo_model, tmp_path) -> None:
    config = TrainConfig(
        model=str(demo_model),
        data_path=dataset,
        output_dir=tmp_path,
        **{**SHORT, "max_steps": 1},
        target_modules=("no_such_proj",),
    )
    with pytest.raises(TrainingError, match="no_such_proj"):
        run_training(config)


def test_cpu_qlora_gradients_match_the_dequantised_fp32_model(demo_model: Path) -> None:
    """bitsandbytes warns that its CPU 4-bit backward may be wrong; CPU QLoRA is only
    offered because this agrees: LoRA gradients through the NF4 weights equal those
    through the same weights dequantised to fp32, on a padded batch of two chats."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from trainer_job.train import DEFAULT_TARGETS, PadCollator

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    quantized = AutoModelForCausalLM.from_pretrained(
        demo_model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        device_map={"": "cpu"},
    )
    dense = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense.get_submodule(name).weight.data.copy_(weight.float())
            replaced += 1
    assert replaced == 7 * dense.config.num_hidden_layers

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS))
    models = [get_peft_model(quantized, lora), get_peft_model(dense, lora)]
    generator = torch.Generator().manual_seed(0)
    pairs = zip(*(m.named_parameters() for m in models), strict=True)
    for (name, a), (_, b) in pairs:
        if "lora_" in name:  # non-zero A and B, so both get a gradient
            value = torch.randn(a.shape, generator=generator) * 0.05
            a.data.copy_(value)
            b.data.copy_(value)
    chats = [
        [
            {"role": "user", "content": "What is continuity?"},
            {"role": "assistant", "content": "Each session starts where the last stopped."},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    ]
    batch = PadCollator(tokenizer.pad_token_id)([encode_chat(tokenizer, c, 256) for c in chats])
    for model in models:
        model.train()
        model(**batch).loss.backward()
    grads = {
        name: (a.grad, b.grad)
        for (name, a), (_, b) in zip(*(m.named_parameters() for m in models), strict=True)
        if "lora_" in name
    }
    assert len(grads) == 2 * 7 * dense.config.num_hidden_layers
    for name, (through_nf4, through_fp32) in grads.items():
        assert through_nf4 is not None and through_fp32.abs().max() > 0, name
        error = (through_nf4 - through_fp32).norm() / through_fp32.norm()
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
