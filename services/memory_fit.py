"""Will this model fit? The memory a worker needs for a model with a backend and a
precision (weights + KV cache for its context and slots + working buffers), against
what the host (or GPU) has, and what to use instead when it does not fit. The
worker says it at start; `make doctor` says it before anything is started.

Weights: bytes per parameter of each precision (llama.cpp's Q4_K_M averages 4.85
bits, Q8_0 8.5; bitsandbytes' NF4 4.5 with its scales), or a GGUF file's own size.
KV cache: 2 (K and V) x layers x KV heads x head dims x tokens x bytes per value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 2**30
BYTES_PER_PARAM = {
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "4bit": 0.5625,
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 1.0625,
    "q4_k_m": 0.606,
}
OVERHEAD = 1 * GiB  # the runtime, compute buffers, the process itself
DEFAULT_CONTEXT = 4096  # tokens per request assumed when the backend sets no bound


@dataclass(frozen=True)
class Shape:
    """What the footprint depends on, from a config.json (or GGUF metadata)."""

    params: int
    layers: int
    kv_heads: int
    head_dim: int
    max_context: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        layers = int(config["num_hidden_layers"])
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
        per_layer = attention + 3 * hidden * inter + 2 * hidden
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        return cls(
            params=layers * per_layer + embeddings + hidden,
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_context=int(config.get("max_position_embeddings") or DEFAULT_CONTEXT),
        )


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    overhead: int = OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    def describe(self) -> str:
        return (
            f"~{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f} + KV cache "
            f"{self.kv_cache / GiB:.1f} + {self.overhead / GiB:.1f} working)"
        )


@dataclass(frozen=True)
class Plan:
    """A worker's choice: backend, precision and how many tokens it keeps."""

    backend: str  # transformers, vllm, llamacpp
    precision: str  # float32/float16/bfloat16/4bit, or a GGUF type (q4_k_m, …)
    context: int  # tokens per request; 0: the backend's default
    capacity: int
    device: str = "cpu"  # cpu, or cuda…
    gguf_bytes: int | None = None  # a GGUF file's size, when serving one as it is

    def footprint(self, shape: Shape) -> Footprint:
        if self.gguf_bytes is not None:
            weights = self.gguf_bytes
        else:
            weights = int(shape.params * BYTES_PER_PARAM.get(self.precision, 4.0))
        bound = 8192 if self.backend == "llamacpp" else DEFAULT_CONTEXT
        context = self.context or min(shape.max_context, bound)
        # llama.cpp and CUDA keep K and V in f16; transformers on CPU in its dtype.
        kv_bytes = 4 if self.backend == "transformers" and self.precision == "float32" else 2
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * context * self.capacity
        return Footprint(weights, kv * kv_bytes)


def verdict(plan: Plan, shape: Shape, available: int) -> tuple[bool, str]:
    """(fits, one line saying so, with what to use instead when it does not)."""
    need = plan.footprint(shape)
    where = "GPU" if plan.device.startswith("cuda") else "host"
    text = (
        f"{plan.backend} {plan.precision}: needs {need.describe()}; "
        f"{available / GiB:.1f} GiB available on the {where}"
    )
    if need.total <= available:
        return True, text + ": fits"
    return False, f"{text}: WILL NOT FIT. {_instead(plan, shape, available)}"


def _instead(plan: Plan, shape: Shape, available: int) -> str:
    """The first change that fits, trying them in the order a user would: a smaller
    precision (or llama.cpp on a CPU), then a shorter context, then fewer slots; each
    keeps the ones before it."""
    steps: list[Plan] = []
    option = plan
    if plan.device.startswith("cuda"):
        if plan.precision != "4bit":
            option = _with(option, precision="4bit")
            steps.append(option)
    elif plan.backend != "llamacpp":
        option = _with(option, backend="llamacpp", precision="q4_k_m", gguf_bytes=None)
        steps.append(option)
    elif plan.precision != "q4_k_m" and plan.gguf_bytes is None:
        option = _with(option, precision="q4_k_m")
        steps.append(option)
    for context in (4096, 2048):
        if option.context == 0 or option.context > context:
            option = _with(option, context=context)
            steps.append(option)
    if option.capacity > 1:
        steps.append(_with(option, capacity=1))
    for option in steps:
        need = option.footprint(shape)
        if need.total <= available:
            return f"Use {_settings(plan, option)}: {need.describe()}."
    return "Nothing fits: use a smaller model, or a host with more memory."


def _with(plan: Plan, **changes: Any) -> Plan:
    return dataclasses.replace(plan, **changes)


def _settings(original: Plan, option: Plan) -> str:
    changed = []
    if option.backend != original.backend:
        changed.append(f"MESH_BACKEND={option.backend}")
    if option.precision != original.precision:
        name = "MESH_QUANTIZATION" if option.precision == "4bit" else "MESH_LLAMACPP_QUANT"
        changed.append(f"{name}={option.precision}")
    if option.context != original.context:
        name = "MESH_LLAMACPP_CONTEXT" if option.backend == "llamacpp" else "max_tokens"
        changed.append(f"{name}={option.context}")
    if option.capacity != original.capacity:
        changed.append(f"MESH_CAPACITY={option.capacity}")
    return " ".join(changed)


def shape_of(model: str) -> Shape | None:
    """A model's shape from its config.json (a folder) or its GGUF metadata (a file,
    when llama-cpp-python can read it); None when neither can be read here (a hub id
    not yet downloaded)."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        return Shape.from_config(json.loads((path / "config.json").read_text()))
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_shape(path)
    return None


def _gguf_shape(path: Path) -> Shape | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        arch = meta.get("general.architecture", "llama")
        hidden = int(meta[f"{arch}.embedding_length"])
        heads = int(meta[f"{arch}.attention.head_count"])
        return Shape(
            params=0,  # the file's size stands for the weights
            layers=int(meta[f"{arch}.block_count"]),
            kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
            max_context=int(meta.get(f"{arch}.context_length", DEFAULT_CONTEXT)),
        )
    except (KeyError, ValueError):
        return None
    finally:
        llm.close()


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check(env: Mapping[str, str] = os.environ) -> tuple[bool, str] | None:
    """The worker's plan against this host: (fits, the line to say), or None when the
    model's shape cannot be read here (a hub id not downloaded yet)."""
    from services.paths import model_ref

    model, plan = plan_from_env(env)
    try:
        ref = model_ref(model)
    except FileNotFoundError:
        return None
    shape = shape_of(ref)
    if shape is None:
        return None
    return verdict(plan, shape, available_memory(plan.device))


def available_memory(device: str) -> int:
    """Bytes free for a model: on a GPU, its free memory; else the host's (or the
    container's limit, when lower)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    from services.host_memory import available_ram

    return available_ram()


def plan_from_env(env: Mapping[str, str] = os.environ) -> tuple[str, Plan]:
    """The worker's plan from its MESH_* settings (with the worker's defaults), and its
    model reference."""
    backend = env.get("MESH_BACKEND", "transformers")
    model = env.get("MESH_MODEL", "")
    capacity = int(env.get("MESH_CAPACITY", "4"))
    device = env.get("MESH_DEVICE", "auto")
    if device == "auto":
        device = "cuda" if backend != "llamacpp" and _has_cuda() else "cpu"
    if backend == "llamacpp":
        quant = env.get("MESH_LLAMACPP_QUANT") or env.get("MESH_GGUF_TYPE") or "q4_k_m"
        gguf = (
            Path(model).stat().st_size
            if model.endswith(".gguf") and Path(model).is_file()
            else None
        )
        plan = Plan(
            "llamacpp",
            quant,
            int(env.get("MESH_LLAMACPP_CONTEXT", "0")),
            capacity,
            "cpu",
            gguf,
        )
    else:
        precision = (
            "4bit" if env.get("MESH_QUANTIZATION") == "4bit" else env.get("MESH_DTYPE", "auto")
        )
        if precision == "auto":
            precision = "float16" if device.startswith("cuda") else "float32"
        plan = Plan(backend, precision, 0, capacity, device)
    return model, plan
