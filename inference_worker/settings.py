"""Worker settings (MESH_* environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field

from services.settings import MeshSettings


class WorkerSettings(MeshSettings):
    backend: Literal["transformers", "vllm", "llamacpp", "echo"] = Field(
        default="transformers",
        description="MESH_BACKEND: transformers, vllm (GPU hosts; the gpu extra), llamacpp "
        "(CPU hosts; the llamacpp extra), or echo (benchmarks only).",
    )
    llamacpp_quant: str = Field(
        default="q4_k_m",
        pattern=r"^(f32|f16|bf16|q8_0|q4_k_m)$",
        # MESH_GGUF_TYPE: its name before the worker converted models itself.
        validation_alias=AliasChoices("llamacpp_quant", "MESH_LLAMACPP_QUANT", "MESH_GGUF_TYPE"),
        description="MESH_LLAMACPP_QUANT: llamacpp with a MESH_MODEL that is a Hugging Face "
        "folder (or empty: the demo model) serves <registry>/_base/<model name>/model-<type>"
        ".gguf, converted once at start when it is not there.",
    )
    llamacpp_batched: bool = Field(
        default=True,
        description="MESH_LLAMACPP_BATCHED: one llama.cpp context decodes every running "
        "request in one batch (false: a context per slot, the old backend).",
    )
    vllm_kv_cache_bytes: int = Field(
        default=0,
        ge=0,
        description="MESH_VLLM_KV_CACHE_BYTES: a fixed KV cache; 0: vLLM's memory fraction.",
    )
    llamacpp_threads: int = Field(
        default=0,
        ge=0,
        description="MESH_LLAMACPP_THREADS: threads of the batched context (0: the cores); "
        "per slot with MESH_LLAMACPP_BATCHED=false (0: the cores / capacity).",
    )
    llamacpp_context: int = Field(
        default=0,
        ge=0,
        description="MESH_LLAMACPP_CONTEXT tokens per request (the KV cache holds this many "
        "for each of MESH_CAPACITY); 0: the model's, at most 8192 when batched.",
    )
    model: str = Field(
        default="",
        description="MESH_MODEL: local folder or hub id of the base model; empty: the demo model.",
    )
    model_name: str = Field(
        default="",
        description="MESH_MODEL_NAME: the name clients use; empty: the model folder's name.",
    )
    adapter_registry: Path | None = Field(
        default=None, description="MESH_ADAPTER_REGISTRY: adapter versions (default .cache)."
    )
    adapter_source: str = Field(
        default="",
        description="MESH_ADAPTER_SOURCE: a gateway URL to fetch adapter files from, for a "
        "worker that does not share the registry volume; empty: the registry is local.",
    )
    adapter_key: str = Field(
        default="", description="MESH_ADAPTER_KEY: an API key with the `worker` scope."
    )
    device: str = Field(default="auto", description="MESH_DEVICE: auto, cpu, cuda, cuda:1 …")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="MESH_DTYPE: auto is fp16 on CUDA, fp32 on CPU."
    )
    quantization: Literal["none", "4bit"] = Field(
        default="none", description="MESH_QUANTIZATION: 4bit loads NF4 weights (bitsandbytes)."
    )
    capacity: int = Field(default=4, ge=1, le=256, description="Jobs run at once (= prefetch).")
    priority: int = Field(
        default=0, description="Consumer priority: GPU workers higher, so they take work first."
    )
    site: str = Field(default="local", description="Where this worker runs: desktop, vps, …")
    worker_id: str = Field(default="", description="Unique id; generated when empty.")
    heartbeat_s: float = Field(default=2.0, gt=0, description="Liveness refresh period.")
    liveness_ttl_s: float = Field(default=10.0, gt=0, description="Liveness record lifetime.")
    coalesce_tokens: int = Field(default=8, ge=1, description="Most tokens in one reply message.")
    coalesce_ms: float = Field(default=20.0, ge=0, description="Longest a token waits to be sent.")
    handoff_ms: float = Field(
        default=10.0,
        ge=0,
        description="transformers backend: how often a job's tokens pass from the generation "
        "thread to the event loop (the first at once).",
    )
    prefill_chunk_tokens: int = Field(
        default=512,
        ge=1,
        description="transformers backend: prompt tokens read per decoding step of the "
        "running jobs while new jobs join (long prompts are read in chunks).",
    )
    prefix_cache_bytes: int | None = Field(
        default=None,
        ge=0,
        description="MESH_PREFIX_CACHE_BYTES: most bytes of cached prompt prefixes (keys and "
        "values) the transformers backend keeps; unset: a quarter of the memory free on its "
        "device once the model is loaded; 0: no prefix cache.",
    )
    prefix_cache_block_tokens: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="MESH_PREFIX_CACHE_BLOCK_TOKENS: tokens per cached block.",
    )
    unstreamed_handoff_ms: float = Field(
        default=250.0,
        ge=0,
        description="The same for a job whose client does not stream and that has no stop "
        "strings (its end is handed over at once).",
    )
    unstreamed_coalesce_tokens: int = Field(
        default=256, ge=1, description="The same for a job whose client does not stream."
    )
    unstreamed_coalesce_ms: float = Field(
        default=500.0,
        ge=0,
        description="The same for a job whose client does not stream (also how soon, at "
        "most, a job whose gateway died is noticed: at its next reply).",
    )
    cancel_memory_s: float = Field(
        default=600.0, gt=0, description="How long a cancel is remembered for a job not yet seen."
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="A job delivered more often than this is set aside."
    )
    health_file: Path | None = Field(
        default=None,
        description="MESH_HEALTH_FILE: touched on every heartbeat once the model is loaded "
        "and the broker connected; `python -m inference_worker healthcheck` reads it.",
    )
    drain_timeout_s: float = Field(default=60.0, ge=0, description="SIGTERM: wait this long.")
