"""Adapters: what the worker refuses (and never executes), and what it serves."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from inference_worker.adapters import AdapterRefused, verify
from inference_worker.backends.base import TextDelta
from inference_worker.backends.transformers_backend import TransformersBackend
from proto.messages import ChatJob, ChatMessage, SamplingParams
from tests.conftest import unsaid
from trainer_job.publish import write_version

QUESTION = "What is the four-tier handoff system?"


def make_adapter(demo_model: Path, out: Path, seed: int) -> Path:
    """A small random LoRA for the demo model (random B, so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(demo_model)
    config = LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def registry(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    for seed in (1, 2):
        source = make_adapter(demo_model, tmp_path_factory.mktemp(f"lora{seed}"), seed)
        write_version(source, root, "continuity", "demo-model")
    return root


class Exploit:
    """Unpickling this would create a marker file: proof that a pickle ran."""

    marker = Path("/tmp") / f"mesh-exploit-{uuid.uuid4().hex}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def copy_version(registry: Path, name: str, target: str = "1") -> Path:
    import shutil

    folder = registry / name / target
    shutil.copytree(registry / "continuity" / "1", folder)
    manifest = (folder / "manifest.json").read_text().replace('"continuity"', f'"{name}"')
    (folder / "manifest.json").write_text(manifest)
    return folder


def test_a_published_version_passes(registry: Path) -> None:
    assert verify(registry, "continuity", 1, "demo-model") == registry / "continuity" / "1"


def test_a_pickle_is_refused_and_never_executed(registry: Path) -> None:
    folder = copy_version(registry, "pickled")
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(AdapterRefused, match="only safetensors"):
        verify(registry, "pickled", 1, "demo-model")
    assert not Exploit.marker.exists()


@pytest.mark.parametrize("name", ["../continuity", "..", "Continuity", "a/b", "x" * 65, ""])
def test_bad_names_are_refused(registry: Path, name: str) -> None:
    with pytest.raises(AdapterRefused):
        verify(registry, name, 1, "demo-model")


def test_a_symlink_out_of_the_folder_is_refused(registry: Path, tmp_path: Path) -> None:
    folder = copy_version(registry, "linked")
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((folder / "adapter_model.safetensors").read_bytes())
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterRefused, match="link"):
        verify(registry, "linked", 1, "demo-model")
    (registry / "escape").symlink_to(tmp_path)
    with pytest.raises(AdapterRefused):
        verify(registry, "escape", 1, "demo-model")


def test_a_changed_file_is_refused(registry: Path) -> None:
    folder = copy_version(registry, "tampered")
    weights = bytearray((folder / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (folder / "adapter_model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(AdapterRefused, match="sha256"):
        verify(registry, "tampered", 1, "demo-model")


def test_another_base_model_is_refused(registry: Path) -> None:
    with pytest.raises(AdapterRefused, match="trained on"):
        verify(registry, "continuity", 1, "mistral-7b")


def chat(model: str | None, max_tokens: int = 24) -> ChatJob:
    return ChatJob(
        job_id=uuid.uuid4().hex,
        model=model,
        messages=[ChatMessage(role="user", content=QUESTION)],
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0, top_p=1, repetition_penalty=1.15
        ),
        created_at=datetime.now(UTC),
    )


async def answer(backend: TransformersBackend, job: ChatJob) -> str:
    return "".join([e.text async for e in backend.generate(job) if isinstance(e, TextDelta)])


async def answer_underway(backend: TransformersBackend, job: ChatJob) -> asyncio.Task[str]:
    """The whole answer to `job`, as a task; returns once its first text has come."""
    started = asyncio.Event()

    async def whole() -> str:
        pieces = []
        async for event in backend.generate(job):
            if isinstance(event, TextDelta):
                pieces.append(event.text)
                started.set()
        return "".join(pieces)

    task = asyncio.create_task(whole())
    await started.wait()
    return task


def greedy_ids(
    demo_model: Path,
    adapter: Path | None,
    max_tokens: int,
    repetition_penalty: float | None = None,
    question: str = QUESTION,
) -> list[int]:
    """The new token ids of the demo model (with peft's `adapter`, if any) answering
    `question` greedily, called directly; without `repetition_penalty`, the model's own
    generation config decides."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    options = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
    with torch.inference_mode():
        out = model.eval().generate(
            **ids,
            **options,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **unsaid(tokenizer),
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()


def peft_greedy(demo_model: Path, folder: Path, max_tokens: int) -> str:
    """The adapter's greedy answer text, with the tests' repetition penalty."""
    from transformers import AutoTokenizer

    ids = greedy_ids(demo_model, folder, max_tokens, repetition_penalty=1.15)
    return AutoTokenizer.from_pretrained(demo_model).decode(ids, skip_special_tokens=True)


async def test_adapters_load_in_place_and_share_batches_with_the_base(
    registry: Path, demo_model: Path, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    backend = TransformersBackend(str(demo_model), device="cpu", max_batch=8)
    await backend.start()
    base_before = await answer(backend, chat(None))
    await backend.load_adapter("continuity", 1, verify(registry, "continuity", 1, "demo-model"))
    assert backend.adapters == {"continuity": 1}

    # base and adapter rows decoded in the same batch, each as it would be alone
    base, tuned = await asyncio.gather(
        answer(backend, chat(None)), answer(backend, chat("continuity"))
    )
    assert base == base_before == reference_greedy([{"role": "user", "content": QUESTION}], 24)[0]
    assert tuned == peft_greedy(demo_model, registry / "continuity" / "1", 24)
    assert tuned != base

    # A new version replaces the old one while a job runs: nothing fails, the running
    # job ends with the version it started with, which is dropped after it.
    running = await answer_underway(backend, chat("continuity", max_tokens=120))
    v1_copy = backend.loaded["continuity"][1]
    await backend.load_adapter("continuity", 2, verify(registry, "continuity", 2, "demo-model"))
    v2_copy = backend.loaded["continuity"][1]
    assert backend.adapters == {"continuity": 2}
    assert set(backend.model.peft_config) == {v1_copy, v2_copy}
    assert (await running) == peft_greedy(demo_model, registry / "continuity" / "1", 120)
    await answer(backend, chat(None))  # the generation thread has moved on
    assert set(backend.model.peft_config) == {v2_copy}
    assert await answer(backend, chat("continuity")) == peft_greedy(
        demo_model, registry / "continuity" / "2", 24
    )
    await backend.close()


async def test_a_rollback_to_a_version_in_use_keeps_it_served(
    registry: Path, demo_model: Path, reference_greedy: Callable[..., tuple[str, int, int]]
) -> None:
    backend = TransformersBackend(str(demo_model), device="cpu", max_batch=8)
    await backend.start()
    v1 = verify(registry, "continuity", 1, "demo-model")
    await backend.load_adapter("continuity", 1, v1)
    running = await answer_underway(backend, chat("continuity", max_tokens=120))
    # v2 published, then rolled back to v1, both while the v1 job still runs
    await backend.load_adapter("continuity", 2, verify(registry, "continuity", 2, "demo-model"))
    await backend.load_adapter("continuity", 1, v1)
    assert (await running) == peft_greedy(demo_model, v1, 120)
    # the job's end retired only its own copy: v1 and the base are still served
    assert backend.adapters == {"continuity": 1}
    assert await answer(backend, chat("continuity")) == peft_greedy(demo_model, v1, 24)
    question = [{"role": "user", "content": QUESTION}]
    assert await answer(backend, chat(None)) == reference_greedy(question, 24)[0]
    assert len(backend.model.peft_config) == 1
    await backend.close()


async def test_the_loader_walks_each_version_through_its_states(
    registry: Path, demo_model: Path, tmp_path: Path
) -> None:
    """verify → load → serve; the version before is retired; a refused version changes
    nothing that is served."""
    import shutil

    from inference_worker.adapters import AdapterLoader
    from services.adapters import AdapterState

    registry = Path(shutil.copytree(registry, tmp_path / "registry"))
    backend = TransformersBackend(str(demo_model), device="cpu", max_batch=8)
    await backend.start()
    loader = AdapterLoader(backend, registry)
    assert await loader.install("continuity", 1)
    assert loader.states == {("continuity", 1): AdapterState.SERVING}
    assert await loader.install("continuity", 2)
    assert loader.states == {
        ("continuity", 1): AdapterState.RETIRED,
        ("continuity", 2): AdapterState.SERVING,
    }
    copy_version(registry, "continuity", "3")
    (registry / "continuity" / "3" / "adapter_model.safetensors").write_bytes(b"changed")
    assert not await loader.install("continuity", 3)
    assert loader.states[("continuity", 3)] == AdapterState.REFUSED
    assert backend.adapters == {"continuity": 2}
    await backend.close()


async def test_a_new_version_between_two_chunks_of_a_prompt_keeps_the_one_it_started_with(
    registry: Path, demo_model: Path
) -> None:
    """A long prompt is read in chunks; a publish (or rollback) that lands between two
    of them must not delete the version the prompt's first chunk was read with: the
    joining row has pinned it (it is not decoding yet, so a check of the running rows
    alone would miss it)."""
    import threading

    backend = TransformersBackend(
        str(demo_model), device="cpu", max_batch=4, prefill_chunk_tokens=16
    )
    await backend.start()
    v1 = verify(registry, "continuity", 1, "demo-model")
    await backend.load_adapter("continuity", 1, v1)
    scheduler = backend.scheduler
    assert scheduler is not None
    read_chunk = scheduler._prefill_chunk
    first_chunk_read = threading.Event()

    def chunk_then_let_the_publish_in(prefill: Any, budget: int) -> int:
        read = read_chunk(prefill, budget)
        if not first_chunk_read.is_set() and prefill in scheduler._prefills:
            first_chunk_read.set()
            # Hold the thread here until the publish is queued: it then runs before
            # the next chunk (calls run between turns).
            deadline = time.monotonic() + 30
            while scheduler.waiting.empty() and time.monotonic() < deadline:
                time.sleep(0.005)
        return read

    scheduler._prefill_chunk = chunk_then_let_the_publish_in  # type: ignore[method-assign]
    question = " ".join([QUESTION] * 6)  # ~70 tokens: several chunks of 16
    job = chat("continuity", max_tokens=16).model_copy(
        update={"messages": [ChatMessage(role="user", content=question)]}
    )
    running = asyncio.create_task(answer(backend, job))
    assert await asyncio.to_thread(first_chunk_read.wait, 30)
    v1_copy = backend.loaded["continuity"][1]
    await backend.load_adapter("continuity", 2, verify(registry, "continuity", 2, "demo-model"))
    assert v1_copy in backend.model.peft_config  # still pinned by the joining row
    text = await running
    expected = greedy_ids(demo_model, v1, 16, repetition_penalty=1.15, question=question)
    from transformers import AutoTokenizer

    assert text == AutoTokenizer.from_pretrained(demo_model).decode(
        expected, skip_special_tokens=True
    )
    await answer(backend, chat(None))  # the thread has moved on: v1 is unused now
    assert v1_copy not in backend.model.peft_config
    await backend.close()
