"""LoRA / QLoRA fine-tuning with transformers' Trainer and peft.

On CUDA the default is QLoRA: NF4 4-bit base with double quantisation, fp16 compute
on GPUs without bf16 (the RTX 2080), bf16 where the GPU has it, and gradient
checkpointing. On CPU the default is LoRA in fp32. QLoRA on CPU (`--quantization 4bit`)
is offered because tests/trainer_job/test_train.py checks that bitsandbytes' CPU 4-bit
path gives the same LoRA gradients as the same weights dequantised to fp32; its compute
dtype there is fp32.

Loss is computed on the assistant turns only. Checkpoints are written every
`save_steps` and a run started again on the same output folder resumes from the last
one. With a fixed seed a run is deterministic on CPU.

Output folder:
    checkpoints/       Trainer checkpoints (resume points)
    adapter/           adapter_config.json + adapter_model.safetensors
    evaluation.json    eval loss/perplexity before and after, probes, dataset sha256
    train_config.json  the options of this run (a resumed run must match them)
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer_job.dataset import EVAL_FILE, REPORT_FILE, TRAIN_FILE, read_jsonl
from trainer_job.examples import Chat

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says what to change."""


@dataclass
class TrainConfig:
    """Options, named as in the original training script where it had them."""

    model: str
    data_path: Path
    output_dir: Path
    num_epochs: float = 3.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_seq_length: int = 512
    seed: int = 42
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides epochs)
    warmup_steps: int = 0
    save_steps: int = 50
    logging_steps: int = 10
    quantization: Literal["auto", "none", "4bit"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | None = None  # None: on for 4-bit, off otherwise
    use_wandb: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """What must match for a resumed run to be the same run."""
        keep = asdict(self)
        for volatile in ("output_dir", "progress", "logging_steps", "save_steps", "use_wandb"):
            keep.pop(volatile)
        keep["data_path"] = str(self.data_path)
        keep["target_modules"] = list(self.target_modules)
        return keep


# -- data -------------------------------------------------------------------------------


def encode_chat(tokenizer, chat: Chat, max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels for one chat; labels are -100 outside the assistant turns.

    The chat template renders the text; each assistant turn's characters are found by
    rendering the chat up to it, and the tokens whose text starts inside a turn are
    labelled (the turn's end-of-sequence token included, so the model learns to stop).
    None when truncation to `max_length` leaves no assistant token.
    """
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    spans = []
    for index, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(chat[:index], tokenize=False)
        through = tokenizer.apply_chat_template(chat[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise TrainingError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(through)))
    encoded = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=False
    )
    ids = encoded["input_ids"][:max_length]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE
        for token, offset in zip(ids, encoded["offset_mapping"], strict=False)
    ]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


class ChatDataset:
    """Tokenised chats (a map-style dataset for the Trainer)."""

    def __init__(self, tokenizer, chats: list[Chat], max_length: int) -> None:
        encoded = [encode_chat(tokenizer, chat, max_length) for chat in chats]
        self.items = [item for item in encoded if item is not None]
        self.dropped = len(chats) - len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class PadCollator:
    """Right-pads a batch: pad id for inputs, -100 for labels, 0 in the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]):
        import torch

        width = max(len(item["input_ids"]) for item in batch)

        def pad(values: list[int], filler: int) -> list[int]:
            return values + [filler] * (width - len(values))

        return {
            "input_ids": torch.tensor([pad(b["input_ids"], self.pad_id) for b in batch]),
            "labels": torch.tensor([pad(b["labels"], IGNORE) for b in batch]),
            "attention_mask": torch.tensor([pad([1] * len(b["input_ids"]), 0) for b in batch]),
        }


# -- model ------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {requested} asked for, but CUDA is not available")
    return requested


def compute_dtype(device: str):
    """fp32 on CPU; on CUDA bf16 where the GPU has it, else fp16 (RTX 20xx: no bf16)."""
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(config: TrainConfig, device: str):
    """The base model (4-bit or full precision) wrapped in a fresh LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = config.quantization == "4bit" or (
        config.quantization == "auto" and device.startswith("cuda")
    )
    dtype = compute_dtype(device)
    checkpointing = (
        quantized if config.gradient_checkpointing is None else config.gradient_checkpointing
    )
    if quantized:
        model = AutoModelForCausalLM.from_pretrained(
            config.model,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            ),
            dtype=dtype,
            device_map={"": device},
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    else:
        # Full-precision LoRA trains in fp32 master weights on every device; on CUDA the
        # Trainer's autocast runs the matmuls in fp16/bf16.
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
        model.to(device)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainingError(f"LoRA target modules {config.target_modules}: {exc}") from exc
    return model, quantized


# -- progress ---------------------------------------------------------------------------


def progress_callback():
    """A tqdm bar over optimizer steps with the latest loss and learning rate; ETA is
    tqdm's own."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # no stubs (types-tqdm)
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar: Any = None  # the tqdm bar (untyped), from on_train_begin on

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step"
            )

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['learning_rate']:.2e}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Progress()


# -- the run ----------------------------------------------------------------------------


def _check_resume(config: TrainConfig, checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    saved = config.output_dir / "train_config.json"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and saved.is_file():
        before = json.loads(saved.read_text())
        if before != config.fingerprint():
            changed = sorted(
                k
                for k in before.keys() | config.fingerprint().keys()
                if before.get(k) != config.fingerprint().get(k)
            )
            raise TrainingError(
                f"{config.output_dir} holds an unfinished run with other options "
                f"({', '.join(changed)}); use another --output_dir or delete it"
            )
    config.output_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config.fingerprint(), indent=2) + "\n")
    return last


@dataclass
class TrainResult:
    evaluation: dict
    model: object  # the trained PeftModel, in eval mode
    tokenizer: object


def train(config: TrainConfig) -> dict:
    """Train, evaluate before/after, save the adapter; returns the evaluation record."""
    return run_training(config).evaluation


def run_training(config: TrainConfig) -> TrainResult:
    """`train`, also handing back the model and tokenizer (for tests and benchmarks)."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    from trainer_job.evaluate import PROBES, eval_loss, probe_answers

    for name in (TRAIN_FILE, EVAL_FILE):
        if not (config.data_path / name).is_file():
            raise TrainingError(
                f"{config.data_path / name} is missing: build it with "
                "`python -m trainer_job dataset --out DIR`"
            )
    if config.use_wandb:
        try:
            importlib.import_module("wandb")  # only a check that it is installed
        except ImportError as exc:
            raise TrainingError("--use_wandb needs the wandb package: pip install wandb") from exc
    device = resolve_device(config.device)
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set = ChatDataset(
        tokenizer, read_jsonl(config.data_path / TRAIN_FILE), config.max_seq_length
    )
    eval_set = ChatDataset(
        tokenizer, read_jsonl(config.data_path / EVAL_FILE), config.max_seq_length
    )
    if not len(train_set) or not len(eval_set):
        raise TrainingError("no usable training or evaluation chats (all too long?)")
    model, quantized = load_model(config, device)
    checkpoints = config.output_dir / "checkpoints"
    resume_from = _check_resume(config, checkpoints)
    half = compute_dtype(device) if device.startswith("cuda") else None
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        fp16=half is torch.float16,
        bf16=half is torch.bfloat16,
        use_cpu=device == "cpu",
        report_to=["wandb"] if config.use_wandb else "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=device.startswith("cuda"),
        label_names=["labels"],
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[progress_callback()] if config.progress else [],
    )
    with model.disable_adapter():
        before = eval_loss(trainer)
    if resume_from:
        log.info("resuming from %s", resume_from)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.monotonic() - started
    after = eval_loss(trainer)
    adapter_dir = config.output_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    model.eval()
    probes = probe_answers(model, tokenizer, PROBES)
    report = (
        json.loads((config.data_path / REPORT_FILE).read_text())
        if (config.data_path / REPORT_FILE).is_file()
        else {}
    )
    evaluation = {
        "eval": {
            "eval_loss_before": before,
            "eval_loss_after": after,
            "perplexity_before": math.exp(min(before, 50)),
            "perplexity_after": math.exp(min(after, 50)),
            "train_loss": float(result.training_loss),
            "train_steps": float(trainer.state.global_step),
            "train_examples": float(len(train_set)),
            "eval_examples": float(len(eval_set)),
            "train_seconds": round(seconds, 2),
        },
        "probes": probes,
        "dataset_sha256": report.get("sha256", ""),
        "device": device,
        "quantization": "4bit" if quantized else "none",
        "resumed_from": Path(resume_from).name if resume_from else None,
    }
    (config.output_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    return TrainResult(evaluation, model, tokenizer)
