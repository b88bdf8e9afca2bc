"""Training speed and memory: LoRA (fp32 base) against QLoRA (NF4 4-bit base) on this
machine's CPU, each in its own process so peak memory is its own.

    python bench/training.py            # table + bench/results/training.json
    python bench/training.py --quick    # the demo model only, fewer steps

Two models: the demo model (3.6M parameters: per-step overhead dominates), and a
randomly initialised ~110M-parameter Mistral built on the spot (weights dominate, so
the 4-bit base's memory saving shows). Ratios are QLoRA / LoRA from the same run.
On CUDA hosts the same script measures the GPU path (QLoRA there is the default).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"


def child(model: str, quantization: str, steps: int, batch: int, data: str) -> None:
    """One measurement; prints a JSON line."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from trainer_job.dataset import TRAIN_FILE, read_jsonl
    from trainer_job.train import ChatDataset, PadCollator, TrainConfig, load_model, resolve_device

    device = resolve_device("auto")
    config = TrainConfig(
        model=model,
        data_path=Path(data),
        output_dir=Path(tempfile.mkdtemp()),
        lora_r=16,
        lora_alpha=32,
        quantization=quantization,  # type: ignore[arg-type]
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset = ChatDataset(tokenizer, read_jsonl(Path(data) / TRAIN_FILE), 256)
    model_obj, quantized = load_model(config, device)

    class Clock(TrainerCallback):
        started = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the first steps warm up allocators and kernels
                self.started = time.perf_counter()

    clock = Clock()
    trainer = Trainer(
        model=model_obj,
        args=TrainingArguments(
            output_dir=str(config.output_dir),
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=1e-4,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            logging_steps=10_000,
            use_cpu=device == "cpu",
            seed=0,
            remove_unused_columns=False,
            fp16=device == "cuda" and not torch.cuda.is_bf16_supported(),
            bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
        ),
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[clock],
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    elapsed = time.perf_counter() - clock.started
    print(
        json.dumps(
            {
                "device": device,
                "quantized": quantized,
                "steps_per_s": (steps - 2) / elapsed,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20
                if device == "cuda"
                else None,
                "trainable_params": sum(
                    p.numel() for p in model_obj.parameters() if p.requires_grad
                ),
            }
        )
    )


def measure(model: str, quantization: str, steps: int, batch: int, data: Path) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            model,
            quantization,
            str(steps),
            str(batch),
            str(data),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"bench child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, quantization, steps, batch, data = args.child
        child(model, quantization, int(steps), int(batch), data)
        return

    import asyncio

    from services.settings import MeshSettings
    from trainer_job.dataset import build, gather_sources
    from trainer_job.demo_model import DemoModelSpec, build_random_model, ensure_demo_model

    demo = ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build(asyncio.run(gather_sources(MeshSettings(), [], include_live=False)), data)
        models = {"demo (3.6M)": (str(demo), 8, 30 if args.quick else 60)}
        if not args.quick:
            shape = DemoModelSpec(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                max_position_embeddings=1024,
            )
            big = build_random_model(Path(tmp) / "m", shape, demo)  # ~110M parameters
            models["random (110M)"] = (str(big), 4, 8)
        rows = []
        for label, (path, batch, steps) in models.items():
            lora = measure(path, "none", steps, batch, data)
            qlora = measure(path, "4bit", steps, batch, data)
            rows.append(
                {
                    "model": label,
                    "batch": batch,
                    "steps": steps,
                    "lora": lora,
                    "qlora": qlora,
                    "qlora_speed_ratio": qlora["steps_per_s"] / lora["steps_per_s"],
                    "qlora_peak_memory_ratio": qlora["peak_rss_mib"] / lora["peak_rss_mib"],
                }
            )
    print(
        f"{'model':<15}{'batch':>6}{'LoRA step/s':>13}{'QLoRA step/s':>14}{'speed':>8}"
        f"{'LoRA MiB':>10}{'QLoRA MiB':>11}{'memory':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<15}{r['batch']:>6}{r['lora']['steps_per_s']:>13.2f}"
            f"{r['qlora']['steps_per_s']:>14.2f}{r['qlora_speed_ratio']:>7.2f}x"
            f"{r['lora']['peak_rss_mib']:>10.0f}{r['qlora']['peak_rss_mib']:>11.0f}"
            f"{r['qlora_peak_memory_ratio']:>7.2f}x"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"written: {RESULTS / 'training.json'}")


if __name__ == "__main__":
    main()
