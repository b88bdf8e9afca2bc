"""The evaluation gate and the registry writes behind `publish`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proto.adapters import AdapterManifest
from trainer_job.publish import gate, read_run, write_version


def _evaluation(before: float, after: float, dataset: str = "d1") -> dict:
    return {
        "eval": {"eval_loss_before": before, "eval_loss_after": after},
        "dataset_sha256": dataset,
        "probes": [{"question": "q", "base": "b", "adapter": "a"}],
    }


def _manifest(after: float, dataset: str = "d1") -> AdapterManifest:
    return AdapterManifest(
        name="continuity",
        version=3,
        base_model="demo-model",
        files={},
        eval={"eval_loss_after": after},
        dataset_sha256=dataset,
        created_at="now",
    )


def test_the_gate_wants_a_lower_held_out_loss() -> None:
    assert gate(_evaluation(2.0, 1.5), None) is None
    assert "did not improve: 2.0000 before, 2.0000 after" in gate(_evaluation(2.0, 2.0), None)
    assert "did not improve" in gate(_evaluation(2.0, 2.5), None)
    assert "no evaluation numbers" in gate({}, None)


def test_the_gate_compares_with_the_served_version_on_the_same_dataset() -> None:
    assert "not better than v3's 1.4000" in gate(_evaluation(2.0, 1.5), _manifest(1.4))
    assert gate(_evaluation(2.0, 1.3), _manifest(1.4)) is None
    # Another dataset: the numbers are not comparable, only the base comparison counts.
    assert gate(_evaluation(2.0, 1.5, "d2"), _manifest(1.4)) is None


def _peft_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


def test_versions_are_numbered_and_carry_the_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _peft_folder(run / "adapter")
    (run / "evaluation.json").write_text(json.dumps(_evaluation(2.0, 1.5)))
    folder, evaluation = read_run(run)
    first = write_version(folder, tmp_path / "reg", "continuity", "demo-model", evaluation)
    second = write_version(folder, tmp_path / "reg", "continuity", "demo-model", evaluation)
    assert (first.version, second.version) == (1, 2)
    saved = AdapterManifest.model_validate_json(
        (tmp_path / "reg" / "continuity" / "2" / "manifest.json").read_text()
    )
    assert saved.eval["eval_loss_after"] == 1.5 and saved.probes[0].adapter == "a"
    assert saved.dataset_sha256 == "d1" and len(saved.files["adapter_model.safetensors"]) == 64
    assert not [p for p in (tmp_path / "reg" / "continuity").iterdir() if p.name.startswith(".")]


def test_pickles_and_bad_names_are_not_published(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        write_version(pickled, tmp_path / "reg", "continuity", "demo-model")
    with pytest.raises(ValueError, match="adapter names match"):
        write_version(_peft_folder(tmp_path / "ok"), tmp_path / "reg", "../up", "demo-model")
