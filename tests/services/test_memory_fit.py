"""The memory a model needs with a backend and a precision, against what the host
has: Mistral 7B's real shape, the advice when it does not fit, and the doctor's line."""

from __future__ import annotations

import json
from pathlib import Path

from services.memory_fit import GiB, Plan, Shape, plan_from_env, verdict

# mistralai/Mistral-7B-Instruct-v0.3's config.json (the fields the estimate reads).
MISTRAL_7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 32,
    "vocab_size": 32768,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}


def test_mistral_7b_has_its_published_size_and_kv_cache() -> None:
    shape = Shape.from_config(MISTRAL_7B)
    assert 7.2e9 < shape.params < 7.3e9  # 7.25B parameters
    q4 = Plan("llamacpp", "q4_k_m", context=4096, capacity=4).footprint(shape)
    assert 4.0 * GiB < q4.weights < 4.2 * GiB  # the 4.37 GB (4.07 GiB) Q4_K_M file
    assert q4.kv_cache == 4 * 4096 * 128 * 1024  # 128 KiB per token, f16 K and V
    fp32 = Plan("transformers", "float32", context=0, capacity=4).footprint(shape)
    assert fp32.weights > 26 * GiB  # the ~29 GB that cannot load on a 16 GB VPS


def test_a_7b_in_fp32_on_16_gb_is_told_to_use_llama_cpp() -> None:
    shape = Shape.from_config(MISTRAL_7B)
    fits, text = verdict(Plan("transformers", "float32", 0, 4), shape, 14 * GiB)
    assert not fits and "WILL NOT FIT" in text
    assert "Use MESH_BACKEND=llamacpp MESH_LLAMACPP_QUANT=q4_k_m:" in text
    fits, text = verdict(Plan("llamacpp", "q4_k_m", 4096, 4), shape, 14 * GiB)
    assert fits and text.endswith(": fits")


def test_the_advice_shortens_the_context_then_the_slots_when_needed() -> None:
    shape = Shape.from_config(MISTRAL_7B)
    # 8 GiB: q4_k_m weights (4.1) + 1 working leave ~2.9 GiB of KV: 4 x 4096 is 2 GiB.
    _, text = verdict(Plan("llamacpp", "q8_0", 8192, 4), shape, 8 * GiB)
    assert "Use MESH_LLAMACPP_QUANT=q4_k_m MESH_LLAMACPP_CONTEXT=4096:" in text
    _, text = verdict(Plan("llamacpp", "q4_k_m", 2048, 4), shape, 5.5 * GiB)
    assert "MESH_CAPACITY=1" in text
    _, text = verdict(Plan("llamacpp", "q4_k_m", 2048, 1), shape, 2 * GiB)
    assert "Nothing fits" in text
    # On a GPU (the RTX 2080's 8 GB), fp16 does not fit and NF4 does.
    _, text = verdict(Plan("transformers", "float16", 0, 8, "cuda"), shape, 7.5 * GiB)
    assert "Use MESH_QUANTIZATION=4bit" in text


def test_the_plan_is_read_as_the_worker_reads_its_settings(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"\0" * 1000)
    _, plan = plan_from_env({"MESH_BACKEND": "llamacpp", "MESH_MODEL": str(gguf)})
    assert (plan.precision, plan.gguf_bytes, plan.capacity) == ("q4_k_m", 1000, 4)
    _, plan = plan_from_env({"MESH_BACKEND": "llamacpp", "MESH_GGUF_TYPE": "q8_0"})
    assert plan.precision == "q8_0"  # the old name still works
    _, plan = plan_from_env({"MESH_QUANTIZATION": "4bit", "MESH_DEVICE": "cuda"})
    assert (plan.precision, plan.device) == ("4bit", "cuda")


def test_the_doctor_says_whether_the_model_fits(tmp_path: Path, monkeypatch) -> None:
    from services import doctor

    model = tmp_path / "mistral-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MISTRAL_7B))
    monkeypatch.setenv("MESH_MODEL", str(model))
    monkeypatch.setenv("MESH_DEVICE", "cpu")
    monkeypatch.setattr("services.memory_fit.available_memory", lambda device: 16 * GiB)
    monkeypatch.setenv("MESH_BACKEND", "transformers")
    line = doctor.memory_line()
    assert line.warning and "WILL NOT FIT" in line.text and "MESH_BACKEND=llamacpp" in line.text
    monkeypatch.setenv("MESH_BACKEND", "llamacpp")
    monkeypatch.setenv("MESH_LLAMACPP_CONTEXT", "4096")
    line = doctor.memory_line()
    assert not line.warning and line.text.endswith("fits")
