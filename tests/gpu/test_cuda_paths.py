"""The CUDA paths on the demo model: fp16 and NF4 serving with the prefix cache warm
against it off, the cache's default size from free VRAM, and a few QLoRA steps.

    make test-gpu        # on a host with CUDA (skipped everywhere else)

`make test` leaves these out (`-m "not gpu"`); this machine has no GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_worker.backends.transformers_backend import TransformersBackend
from services.settings import MeshSettings
from tests.inference_worker.test_prefix_cache import answer, answers, job
from trainer_job.dataset import build, gather_sources
from trainer_job.train import TrainConfig, run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


async def cuda_backend(model: Path, dtype: str, quantization: str, cache: int | None):
    backend = TransformersBackend(
        str(model),
        device="cuda",
        dtype=dtype,
        quantization=quantization,
        max_batch=8,
        prefix_cache_bytes=cache,
    )
    await backend.start()
    return backend


@pytest.mark.parametrize(("dtype", "quantization"), [("auto", "none"), ("auto", "4bit")])
async def test_the_prefix_cache_on_cuda_answers_as_the_cache_off(
    demo_model: Path, dtype: str, quantization: str
) -> None:
    warm = await cuda_backend(demo_model, dtype, quantization, None)  # sized from VRAM
    off = await cuda_backend(demo_model, dtype, quantization, 0)
    stats = warm.prefix_cache
    free, _ = torch.cuda.mem_get_info()
    assert stats is not None and 0 < stats.capacity_bytes <= free
    await answer(warm, job("Warm the tiers up."))
    jobs = [job("What is the four-tier handoff system?"), job("Hello", system="Unshared.")]
    warm_answers = await answers(warm, jobs)
    assert warm_answers[0][1].cached_tokens > 100 and warm_answers[1][1].cached_tokens == 0
    assert [t for t, _ in warm_answers] == [t for t, _ in await answers(off, jobs)]
    block = next(iter(warm.scheduler.prefix_cache._blocks.values()))  # type: ignore[union-attr]
    assert block.keys.device.type == "cuda" and block.keys.dtype == torch.float16
    if quantization == "4bit":
        layer = warm.model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "Linear4bit"
    for backend in (warm, off):
        await backend.close()


def test_a_few_qlora_steps_on_cuda_lower_the_loss(demo_model: Path, tmp_path: Path) -> None:
    import asyncio

    data = tmp_path / "data"
    build(asyncio.run(gather_sources(MeshSettings(), [], include_live=False)), data, 0.1)
    config = TrainConfig(
        model=str(demo_model),
        data_path=data,
        output_dir=tmp_path / "run",
        max_steps=24,
        batch_size=8,
        gradient_accumulation_steps=1,
        lora_r=8,
        lora_alpha=16,
        learning_rate=2e-3,
        save_steps=12,
        progress=False,
        quantization="4bit",
        device="cuda",
    )
    result = run_training(config)
    numbers = result.evaluation["eval"]
    assert numbers["eval_loss_after"] < numbers["eval_loss_before"]
    assert (config.output_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("quantization", ["none", "4bit"])
async def test_constrained_rows_on_cuda_validate(demo_model: Path, quantization: str) -> None:
    """The grammar mask on CUDA logits (the bitmask is filled on the CPU and moved):
    eight sampled json_schema answers in one batch, in fp16 and NF4."""
    import asyncio
    import json

    from proto.messages import ResponseFormat
    from tests.inference_worker.test_constrained import job as constrained_job
    from tests.inference_worker.test_constrained import run
    from tests.schemas import TASK_SCHEMA, valid_task

    backend = await cuda_backend(demo_model, "auto", quantization, None)
    structured = ResponseFormat(type="json_schema", json_schema=TASK_SCHEMA)
    jobs = [
        constrained_job(
            "Describe the next task.",
            response_format=structured,
            sampling={"temperature": 1.0, "seed": seed},
        )
        for seed in range(8)
    ]
    try:
        for text, _, finished in await asyncio.gather(*(run(backend, chat) for chat in jobs)):
            assert finished.reason == "stop", text
            valid_task(json.loads(text))
    finally:
        await backend.close()
