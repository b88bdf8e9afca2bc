"""Trainer job commands.

python -m trainer_job dataset --out DIR            # build train.jsonl / eval.jsonl
python -m trainer_job train --data_path DIR --output_dir RUN [options]
python -m trainer_job publish RUN --name NAME [--force]
python -m trainer_job run --name NAME [options]    # dataset -> train -> evaluate -> publish
python -m trainer_job export-gguf [--types f16,q8_0,q4_k_m] [--adapters NAME ...] [--no-base]
python -m trainer_job export-gguf --phone [--phone-type q4_k_m|q8_0] [--phone-adapter NAME]
python -m trainer_job build-demo-model [--force] [--out DIR]

The base model is MESH_MODEL (a local folder or hub id), or the demo model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from trainer_job.settings import TrainerSettings


def _dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        help='more chats: a {"messages": [...]} JSONL file (repeatable)',
    )
    parser.add_argument(
        "--no-live",
        action="store_true",
        help="leave out the context tiers and marked conversations (Redis)",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="share of chats held out for evaluation (default 0.1)",
    )


def _train_options(parser: argparse.ArgumentParser) -> None:
    from trainer_job.train import DEFAULT_TARGETS, TrainConfig

    d = TrainConfig(model="", data_path=Path(), output_dir=Path())
    add = parser.add_argument
    add("--num_epochs", "--num-epochs", type=float, default=d.num_epochs)
    add("--batch_size", "--batch-size", type=int, default=d.batch_size)
    add(
        "--gradient_accumulation_steps",
        "--gradient-accumulation-steps",
        type=int,
        default=d.gradient_accumulation_steps,
    )
    add("--learning_rate", "--learning-rate", type=float, default=d.learning_rate)
    add("--lora_r", "--lora-r", type=int, default=d.lora_r)
    add("--lora_alpha", "--lora-alpha", type=int, default=d.lora_alpha)
    add("--lora_dropout", "--lora-dropout", type=float, default=d.lora_dropout)
    add(
        "--target_modules",
        "--target-modules",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated module names",
    )
    add("--max_seq_length", "--max-seq-length", type=int, default=d.max_seq_length)
    add("--seed", type=int, default=d.seed)
    add(
        "--max_steps",
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="stop after this many optimizer steps (overrides epochs)",
    )
    add("--warmup_steps", "--warmup-steps", type=int, default=d.warmup_steps)
    add(
        "--save_steps",
        "--save-steps",
        type=int,
        default=d.save_steps,
        help="checkpoint every N steps (an interrupted run resumes from the last)",
    )
    add("--logging_steps", "--logging-steps", type=int, default=d.logging_steps)
    add(
        "--quantization",
        choices=["auto", "none", "4bit"],
        default=d.quantization,
        help="auto: QLoRA (4-bit) on CUDA, LoRA fp32 on CPU",
    )
    add("--device", default=d.device, help="auto, cpu, cuda, cuda:1 …")
    add(
        "--gradient_checkpointing",
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on with 4-bit",
    )
    add("--use_wandb", "--use-wandb", action="store_true", help="report to Weights & Biases")
    add("--no-progress", action="store_true", help="no progress bar")


def _train_config(args, model: str, data: Path, output: Path):
    from trainer_job.train import TrainConfig

    return TrainConfig(
        model=model,
        data_path=data,
        output_dir=output,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        max_seq_length=args.max_seq_length,
        seed=args.seed,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        quantization=args.quantization,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
        use_wandb=args.use_wandb,
        progress=not args.no_progress,
    )


def _build_dataset(settings: TrainerSettings, args, out: Path, max_tokens: int):
    from trainer_job.dataset import build, chat_token_counter, gather_sources

    sources = asyncio.run(gather_sources(settings, args.extra, include_live=not args.no_live))
    counter = chat_token_counter(settings.model_ref())
    report = build(sources, out, args.eval_fraction, counter, max_tokens)
    print(
        f"dataset: {report.train} train, {report.eval} eval chats in {out} "
        f"({report.duplicates} duplicates, {report.too_long} too long, "
        f"{len(report.invalid)} invalid removed)"
    )
    return report


def _publish(settings: TrainerSettings, source: Path, name: str, force: bool) -> None:
    from trainer_job.publish import publish

    base = None
    if settings.export_gguf:
        from services.gguf import local_model_dir

        base = local_model_dir(settings.model_ref(), weights=False)  # the config is enough
    manifest = asyncio.run(
        publish(settings, source, settings.registry(), name, settings.served_name(), force, base)
    )
    loss = manifest.eval.get("eval_loss_after")
    note = f", held-out loss {loss:.4f}" if loss is not None else ""
    print(f"published {manifest.name} v{manifest.version} for {manifest.base_model}{note}")


def _export_gguf(settings: TrainerSettings, args) -> int:
    from proto.adapters import ADAPTER_GGUF
    from services.adapters import AdapterRegistry, current_versions, make_current
    from services.gguf import export_adapters, export_base

    model_dir = Path(settings.model_ref())
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: export needs a local model folder (MESH_MODEL)")
    registry, base = settings.registry(), settings.served_name()
    if args.phone:
        return _export_phone(settings, args, model_dir)
    if not args.no_base:
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        written = export_base(model_dir, registry, base, types)
        files = ", ".join(sorted(written["files"]))
        print(f"base {base}: {files} in {AdapterRegistry(registry).base_folder(base)}")
    exported = export_adapters(registry, args.adapters, model_dir, base)
    for manifest in exported:
        print(f"adapter {manifest.name} v{manifest.version}: {ADAPTER_GGUF}")
    # Workers that could not serve the current versions without a GGUF form
    # (llamacpp) load them now: announce the current versions again.
    by_version = {(m.name, m.version): m for m in exported}  # all trained on `base`
    for name, current in asyncio.run(current_versions(settings)).items():
        served = by_version.get((name, current.version))
        if served is not None:
            asyncio.run(make_current(settings, served))
    return 0


def _export_phone(settings: TrainerSettings, args, model_dir: Path) -> int:
    """The phone's one file: the base with the current version of an adapter merged in."""
    from services.adapters import current_versions
    from services.gguf import ExportError, export_phone

    base = settings.served_name()
    current = {
        name: c.version
        for name, c in asyncio.run(current_versions(settings)).items()
        if c.base_model == base
    }
    adapter: tuple[str, int] | None = None
    if args.phone_adapter == "none":
        adapter = None
    elif args.phone_adapter:
        if args.phone_adapter not in current:
            raise ExportError(f"{args.phone_adapter} has no current version for {base}")
        adapter = (args.phone_adapter, current[args.phone_adapter])
    elif len(current) == 1:
        adapter = next(iter(current.items()))
    elif current:
        raise ExportError(
            f"several adapters are current ({', '.join(sorted(current))}): "
            "choose one with --phone-adapter NAME (or none)"
        )
    model = export_phone(model_dir, settings.registry(), base, adapter, args.phone_type)
    print(f"phone model {model.label}: {model.file}, {model.size} bytes, sha256 {model.sha256}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_job",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-demo-model", help="build the small demo model")
    build.add_argument("--out", type=Path, default=None, help="target folder (default: cache)")
    build.add_argument("--force", action="store_true", help="rebuild even if present")

    dataset = commands.add_parser("dataset", help="build the chat dataset")
    dataset.add_argument("--out", type=Path, required=True, help="output folder")
    dataset.add_argument(
        "--max_seq_length",
        "--max-seq-length",
        type=int,
        default=512,
        help="chats longer than this (in tokens) are left out",
    )
    _dataset_options(dataset)

    train = commands.add_parser("train", help="fine-tune a LoRA/QLoRA adapter")
    train.add_argument(
        "--data_path", "--data-path", type=Path, required=True, help="a `dataset` output folder"
    )
    train.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        required=True,
        help="run folder (rerun on it to resume)",
    )
    _train_options(train)

    publish = commands.add_parser("publish", help="publish an adapter version to the workers")
    publish.add_argument("source", type=Path, help="a `train` output folder, or a peft folder")
    publish.add_argument("--name", required=True, help="adapter name")
    publish.add_argument(
        "--base-model",
        default=None,
        help="the base model's served name (default: MESH_MODEL_NAME / folder)",
    )
    publish.add_argument(
        "--force", action="store_true", help="publish even if the evaluation gate says no"
    )

    run = commands.add_parser("run", help="dataset -> train -> evaluate -> publish")
    run.add_argument("--name", required=True, help="adapter name")
    run.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the dataset and run folders go (default .cache/train)",
    )
    run.add_argument("--force", action="store_true", help="publish even if not improved")
    _dataset_options(run)
    _train_options(run)

    export = commands.add_parser("export-gguf", help="GGUF of the base model and adapters")
    export.add_argument(
        "--types",
        default="f16,q8_0,q4_k_m",
        help="base model types: f32, f16, bf16, q8_0, q4_k_m (default: the last three)",
    )
    export.add_argument(
        "--adapters",
        nargs="*",
        default=None,
        help="adapter names (default: every adapter of this base model)",
    )
    export.add_argument("--no-base", action="store_true", help="only the adapters")
    export.add_argument(
        "--phone",
        action="store_true",
        help="only the phone's model: the base with the current adapter merged in, quantized",
    )
    export.add_argument("--phone-type", default="q4_k_m", choices=["q4_k_m", "q8_0"])
    export.add_argument(
        "--phone-adapter",
        default=None,
        help="the adapter merged in (default: the only current one; 'none': the base alone)",
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from services.gguf import ExportError
    from trainer_job.dataset import DatasetError
    from trainer_job.publish import PublishRefused
    from trainer_job.train import TrainingError

    settings = TrainerSettings()
    if getattr(args, "base_model", None):
        settings.model_name = args.base_model
    try:
        return _dispatch(args, settings)
    except (
        DatasetError,
        TrainingError,
        PublishRefused,
        ExportError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"trainer_job {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"trainer_job {args.command}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args, settings: TrainerSettings) -> int:
    if args.command == "build-demo-model":
        from services.paths import demo_model_dir
        from trainer_job.demo_model import ensure_demo_model, is_built

        target = args.out or demo_model_dir()
        if is_built(target) and not args.force:
            print(f"demo model: present at {target}")
            return 0
        path = ensure_demo_model(target, force=args.force)
        print(f"demo model: built at {path}")
        return 0
    if args.command == "dataset":
        _build_dataset(settings, args, args.out, args.max_seq_length)
        return 0
    if args.command == "train":
        from trainer_job.train import train

        config = _train_config(args, settings.model_ref(), args.data_path, args.output_dir)
        evaluation = train(config)
        numbers = evaluation["eval"]
        print(
            f"trained: held-out loss {numbers['eval_loss_before']:.4f} -> "
            f"{numbers['eval_loss_after']:.4f} in {numbers['train_steps']:.0f} steps; "
            f"adapter in {args.output_dir / 'adapter'}"
        )
        return 0
    if args.command == "publish":
        _publish(settings, args.source, args.name, args.force)
        return 0
    if args.command == "export-gguf":
        return _export_gguf(settings, args)
    if args.command == "run":
        from trainer_job.train import train

        # An interrupted run is picked up again: same dataset, last checkpoint.
        # A finished one (published or refused) is kept under its time stamp.
        runs = (args.work_dir or settings.work()) / args.name
        pending = runs / "pending"
        data, output = pending / "dataset", pending / "run"
        if (data / "dataset.json").is_file():  # written last: the dataset is whole
            print(f"resuming the unfinished run in {pending}")
        else:
            _build_dataset(settings, args, data, args.max_seq_length)
        evaluation = train(_train_config(args, settings.model_ref(), data, output))
        print("evaluation:", json.dumps(evaluation["eval"]))
        try:
            _publish(settings, output, args.name, args.force)
        finally:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            pending.rename(runs / stamp)
            print(f"run kept in {runs / stamp}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
