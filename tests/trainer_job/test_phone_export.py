"""The phone's model: the current adapter merged into the base, quantized, listed with
its sha256 and size (`export-gguf --phone`), the previous file kept for a phone halfway
through downloading it and the one before deleted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proto.adapters import PHONE_MANIFEST, PhoneModels
from services.adapters import AdapterRegistry, file_sha256, make_current
from services.gguf import ExportError, export_phone, merged_model
from services.settings import MeshSettings
from tests.conftest import NAMESPACE, remove_namespace
from tests.web.test_device import gentle_adapter
from trainer_job.__main__ import main
from trainer_job.publish import write_version

pytestmark = pytest.mark.integration
BASE = "demo-model"


@pytest.fixture(scope="module")
def registry(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    for seed in (1, 2, 3):
        source = gentle_adapter(demo_model, tmp_path_factory.mktemp(f"lora{seed}"), seed=seed)
        write_version(source, root, "continuity", BASE)
    return root


def test_the_merged_model_answers_as_the_base_with_its_adapter(
    demo_model: Path, registry: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = merged_model(demo_model, registry / "continuity" / "1", tmp_path / "merged")
    assert (merged_dir / "tokenizer.json").is_file()  # the converter writes it into the GGUF
    tokens = torch.tensor([[1, 67, 294, 69, 380, 356, 270, 487]])
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(demo_model)
        expected = PeftModel.from_pretrained(base, registry / "continuity" / "1")(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(demo_model)(tokens).logits
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-3)  # the adapter changed something


def test_each_export_is_listed_and_the_one_before_the_previous_is_deleted(
    demo_model: Path, registry: Path
) -> None:
    versions = AdapterRegistry(registry)
    folder = versions.base_folder(BASE)
    exported = [
        export_phone(demo_model, registry, BASE, ("continuity", 1), "q4_k_m"),
        export_phone(demo_model, registry, BASE, ("continuity", 2), "q8_0"),
        export_phone(demo_model, registry, BASE, ("continuity", 3), "q8_0"),
    ]
    listed = PhoneModels.model_validate_json((folder / PHONE_MANIFEST).read_text())
    assert listed.current == exported[2] and listed.previous == exported[1]
    for model in exported[1:]:
        path = folder / model.file
        assert file_sha256(path) == model.sha256 and path.stat().st_size == model.size
        assert versions.phone_file(BASE, model.file) == path
        assert model.unsaid_tokens  # the demo model's tool-call marker
    assert not (folder / exported[0].file).exists()
    assert versions.phone_file(BASE, exported[0].file) is None
    assert exported[2].label == "demo-model+continuity@v3"
    # Only what phone.json lists is served: not a base export, a link, or another folder.
    (folder / "phone-evil-v1-q8_0.gguf").symlink_to(folder / exported[2].file)
    assert versions.phone_file(BASE, "phone-evil-v1-q8_0.gguf") is None
    assert versions.phone_file("../" + BASE, exported[2].file) is None
    # The same export again replaces the file in place and keeps the previous one.
    again = export_phone(demo_model, registry, BASE, ("continuity", 3), "q8_0")
    listed = PhoneModels.model_validate_json((folder / PHONE_MANIFEST).read_text())
    assert listed.current == again and listed.previous == exported[1]
    with pytest.raises(ExportError, match="q4_k_m or q8_0"):
        export_phone(demo_model, registry, BASE, None, "f16")
    with pytest.raises(ExportError, match="no continuity v9"):
        export_phone(demo_model, registry, BASE, ("continuity", 9), "q8_0")


async def test_the_command_merges_the_current_adapter_or_asks_which(
    demo_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A namespace of its own: the session's workers must not see these current versions.
    settings = MeshSettings(namespace=f"{NAMESPACE}x")
    registry = tmp_path / "registry"
    for name, seed in (("continuity", 4), ("writing", 5)):
        write_version(gentle_adapter(demo_model, tmp_path / name, seed=seed), registry, name, BASE)
    monkeypatch.setenv("MESH_NAMESPACE", settings.namespace)
    monkeypatch.setenv("MESH_ADAPTER_REGISTRY", str(registry))
    monkeypatch.setenv("MESH_MODEL", str(demo_model))
    monkeypatch.setenv("MESH_MODEL_NAME", BASE)
    for name in ("continuity", "writing"):
        loaded = AdapterRegistry(registry).manifest(name, 1)
        assert loaded is not None
        await make_current(settings, loaded)

    def run(*args: str) -> asyncio.Future[int]:
        return asyncio.get_running_loop().run_in_executor(None, main, ["export-gguf", *args])

    try:
        await _ask_and_merge(run, registry, capsys)
    finally:
        await remove_namespace(settings)


async def _ask_and_merge(run, registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("--phone") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error == (
        "trainer_job export-gguf: several adapters are current (continuity, writing): "
        "choose one with --phone-adapter NAME (or none)"
    )
    assert await run("--phone", "--phone-adapter", "writing", "--phone-type", "q8_0") == 0
    assert (
        "phone model demo-model+writing@v1: phone-writing-v1-q8_0.gguf" in capsys.readouterr().out
    )
    assert await run("--phone", "--phone-adapter", "none", "--phone-type", "q8_0") == 0
    listed = json.loads((AdapterRegistry(registry).base_folder(BASE) / PHONE_MANIFEST).read_text())
    assert listed["current"]["adapter"] is None and listed["previous"]["adapter"] == "writing"
    assert await run("--phone", "--phone-adapter", "nope") == 1
    assert "nope has no current version for demo-model" in capsys.readouterr().err
