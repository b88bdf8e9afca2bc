"""GGUF export and the llamacpp backends on the demo model: the files land in the
registry with their sha256, the backends' greedy answers equal llama.cpp called
directly on the same file, the GGUF adapter changes the answer as the peft adapter
does, concurrency (one batch of sequences, or a context per slot), stop strings,
cancellation at the next token, and the conversion a worker does at start.

Every backend test runs on both: `batched` (the default, one context decoding every
request in one batch) and `slots` (a context per slot)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inference_worker.adapters import AdapterRefused, verify
from inference_worker.backends.base import Finished, TextDelta
from proto.messages import ChatJob, ChatMessage, SamplingParams
from services.errors import PermanentError
from tests.inference_worker.test_adapters import greedy_ids, make_adapter
from trainer_job.publish import write_version

pytestmark = pytest.mark.slow
QUESTION = "What is continuity?"
TYPES = ("f16", "q8_0", "q4_k_m")


def need_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed; .ci/run runs `make llamacpp`")
        pytest.skip("needs the llamacpp extra: make llamacpp")


@pytest.fixture(scope="module")
def registry(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo model in three GGUF types, and one adapter version with its GGUF form."""
    need_llama_cpp()
    from services.gguf import export_adapter, export_base

    root = tmp_path_factory.mktemp("gguf-registry")
    export_base(demo_model, root, "demo-model", list(TYPES))
    source = make_adapter(demo_model, tmp_path_factory.mktemp("lora"), seed=5)
    write_version(source, root, "continuity", "demo-model")
    export_adapter(root, "continuity", 1, demo_model)
    yield root


def job(content: str = QUESTION, model: str | None = None, **sampling) -> ChatJob:
    params = {"max_tokens": 24, "temperature": 0, "top_p": 1, "repetition_penalty": 1.0}
    return ChatJob(
        job_id=uuid.uuid4().hex,
        model=model,
        messages=[ChatMessage(role="user", content=content)],
        sampling=SamplingParams(**{**params, **sampling}),
        created_at=datetime.now(UTC),
    )


def with_system(system: str, question: str, **sampling) -> ChatJob:
    return job(question, **sampling).model_copy(
        update={
            "messages": [
                ChatMessage(role="system", content=system),
                ChatMessage(role="user", content=question),
            ]
        }
    )


async def answer(backend, chat: ChatJob) -> tuple[str, Finished]:
    events = [event async for event in backend.generate(chat)]
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def direct(path: Path, prompt_ids: list[int], max_tokens: int, lora: Path | None = None) -> str:
    """llama.cpp called directly on the file: the reference."""
    from llama_cpp import Llama

    llm = Llama(str(path), lora_path=str(lora) if lora else None, verbose=False)
    out = llm.create_completion(
        prompt_ids,
        max_tokens=max_tokens,
        temperature=0,
        top_k=0,
        min_p=0,
        top_p=1,
        repeat_penalty=1.0,
    )
    return out["choices"][0]["text"]


MODES = ("batched", "slots")


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def make_backend(path: Path, mode: str, slots: int = 1, **options):
    from inference_worker.backends.llamacpp_backend import LlamaCppBackend
    from inference_worker.backends.llamacpp_batched import LlamaCppBatchedBackend

    kind = LlamaCppBatchedBackend if mode == "batched" else LlamaCppBackend
    return kind(str(path), slots=slots, **options)


def backend(registry: Path, mode: str, kind: str = "f16", slots: int = 1):
    return make_backend(registry / "_base/demo-model" / f"model-{kind}.gguf", mode, slots)


def test_exports_are_in_the_registry_with_their_hashes(registry: Path) -> None:
    base = json.loads((registry / "_base/demo-model/manifest.json").read_text())
    assert set(base["files"]) == {f"model-{t}.gguf" for t in TYPES}
    for name, digest in base["files"].items():
        assert (
            hashlib.sha256((registry / "_base/demo-model" / name).read_bytes()).hexdigest()
            == digest
        )
    sizes = {t: (registry / "_base/demo-model" / f"model-{t}.gguf").stat().st_size for t in TYPES}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    folder = verify(registry, "continuity", 1, "demo-model")  # the GGUF is hashed too
    assert (folder / "adapter-f16.gguf").is_file()


def test_an_altered_gguf_is_refused_and_an_unlisted_one_never_read(
    registry: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "registry"
    shutil.copytree(registry, copy)
    (copy / "continuity/1/adapter-q8_0.gguf").write_bytes(b"GGUF")  # not listed: never read
    assert verify(copy, "continuity", 1, "demo-model")
    (copy / "continuity/1/adapter.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterRefused, match="unexpected files"):
        verify(copy, "continuity", 1, "demo-model")
    (copy / "continuity/1/adapter.bin").unlink()
    (copy / "continuity/1/adapter-f16.gguf").write_bytes(b"GGUF tampered")
    with pytest.raises(AdapterRefused, match=r"adapter-f16\.gguf does not match"):
        verify(copy, "continuity", 1, "demo-model")


@pytest.mark.parametrize("kind", TYPES)
async def test_greedy_answers_equal_llama_cpp_called_directly(
    registry: Path, kind: str, mode: str
) -> None:
    served = backend(registry, mode, kind)
    await served.start()
    chat = job(max_tokens=32)
    text, finished = await answer(served, chat)
    reference = direct(Path(served.model_path), served._encode(chat), 32)
    assert text == reference and text
    assert finished.completion_tokens == 32 and finished.reason == "length"
    await served.close()


async def test_the_gguf_adapter_changes_the_answer_as_the_peft_adapter_does(
    registry: Path, demo_model: Path, mode: str
) -> None:
    served = backend(registry, mode)
    await served.start()
    await served.load_adapter("continuity", 1, verify(registry, "continuity", 1, "demo-model"))
    base_text, _ = await answer(served, job(max_tokens=16))
    adapter_text, _ = await answer(served, job(model="continuity", max_tokens=16))
    again, _ = await answer(served, job(max_tokens=16))  # switching back resets the cache
    assert adapter_text != base_text == again
    # peft (fp32) and llama.cpp (f16 weights and adapter) agree on the first tokens;
    # later ones may part where two logits are within f16 rounding of each other.
    peft_first = greedy_ids(demo_model, registry / "continuity/1", 8, question=QUESTION)
    gguf_first = served.tokenize(adapter_text, special=False)[:8]
    assert gguf_first == peft_first
    assert (
        greedy_ids(demo_model, None, 8, question=QUESTION)
        == served.tokenize(base_text, special=False)[:8]
    )
    assert adapter_text == direct(
        Path(served.model_path),
        served._encode(job()),
        16,
        registry / "continuity/1/adapter-f16.gguf",
    )
    await served.close()


async def test_concurrent_jobs_share_the_slots_and_match_sequential_answers(
    registry: Path, mode: str
) -> None:
    served = backend(registry, mode, "q8_0", slots=2)
    await served.start()
    questions = [
        "What is continuity?",
        "What does the phone do?",
        "What is an adapter?",
        "What does the gateway do?",
    ]
    sequential = [(await answer(served, job(q)))[0] for q in questions]
    together = await asyncio.gather(*(answer(served, job(q)) for q in questions))
    assert [text for text, _ in together] == sequential
    await served.close()


async def test_a_chat_with_the_same_tiers_reads_only_its_new_tokens(
    registry: Path, mode: str
) -> None:
    """Each job takes the free slot holding the longest start of its prompt, so the
    tiers stay read in one slot while another prompt is served by the other."""
    served = backend(registry, mode, "q8_0", slots=2)
    await served.start()
    tiers = "Portfolio, project, briefing and log: the four tiers of the owner. " * 6

    first = with_system(tiers, "What is continuity?")
    other = with_system("Another system prompt entirely, for another chat.", "Hello")
    second = with_system(tiers, "What does the phone do?")
    assert (await answer(served, first))[1].cached_tokens == 0
    assert (await answer(served, other))[1].cached_tokens == 0  # took the empty slot
    text, finished = await answer(served, second)
    ids, earlier = served._encode(second), served._encode(first)
    shared = next(i for i, (a, b) in enumerate(zip(ids, earlier, strict=False)) if a != b)
    assert shared > 100
    assert finished.cached_tokens == shared  # read only from where the prompts part
    assert (await answer(served, other))[1].cached_tokens == len(served._encode(other)) - 1
    # An answer cut by a stop string reports it too (it ends before the thread does).
    stopped = second.model_copy(
        update={"sampling": second.sampling.model_copy(update={"stop": [text.split()[1]]})}
    )
    _, finished = await answer(served, stopped)
    assert finished.reason == "stop" and finished.cached_tokens > shared
    await served.close()

    fresh = backend(registry, mode, "q8_0")
    await fresh.start()
    reference, cold = await answer(fresh, second)
    assert (text, cold.cached_tokens) == (reference, 0)
    await fresh.close()


async def test_stop_strings_min_tokens_and_refusals(
    registry: Path, demo_model: Path, tmp_path: Path, mode: str
) -> None:
    served = backend(registry, mode)
    await served.start()
    full, _ = await answer(served, job(max_tokens=32))
    stop = full.split()[3]
    cut, finished = await answer(served, job(max_tokens=32, stop=[stop]))
    assert finished.reason == "stop" and cut == full[: full.index(stop)]
    _, forced = await answer(served, job("Hi", max_tokens=40, min_tokens=40))
    assert forced.completion_tokens == 40
    with pytest.raises(PermanentError, match="not served here"):
        await answer(served, job(model="nope"))
    # A version published without its GGUF form cannot be served by llama.cpp.
    write_version(make_adapter(demo_model, tmp_path / "lora", 9), tmp_path, "plain", "demo-model")
    # A GGUF lying there without being listed (an export in progress) is not loaded.
    (tmp_path / "plain/1/adapter-f16.gguf").write_bytes(
        (registry / "continuity/1/adapter-f16.gguf").read_bytes()
    )
    with pytest.raises(PermanentError, match="no GGUF form"):
        await served.load_adapter("plain", 1, verify(tmp_path, "plain", 1, "demo-model"))
    assert served.adapters == {}
    await served.close()


async def test_cancelling_stops_decoding_at_the_next_token(registry: Path, mode: str) -> None:
    served = backend(registry, mode)
    await served.start()
    stream = served.generate(job(max_tokens=2000, min_tokens=2000))
    async for event in stream:
        if isinstance(event, TextDelta):
            break
    await stream.aclose()  # the client went away
    await asyncio.sleep(0.05)
    stopped_at = served.tokens_generated
    await asyncio.sleep(0.3)
    assert served.tokens_generated == stopped_at < 2000  # nothing decodes after the cancel
    text, _ = await answer(served, job(max_tokens=4))  # the slot is free again
    assert text
    await served.close()


NEAR_TIE = 0.05  # nats between the two most likely tokens


async def token_ids(backend, chat: ChatJob) -> tuple[list[int], list[float]]:
    """The answer's token ids, and at each the margin between its two most likely
    tokens (log probabilities are taken from the same logits the pick reads)."""
    ids: list[int] = []
    margins: list[float] = []
    async for event in backend.generate(chat.model_copy(update={"logprobs": 2})):
        if isinstance(event, TextDelta):
            for token in event.logprobs or ():
                ids.append(token.token_id)
                top = [t.logprob for t in token.top]
                margins.append(top[0] - top[1] if len(top) > 1 else math.inf)
    return ids, margins


def until_near_tie(ids: list[int], margins: list[float]) -> list[int]:
    """The part of a greedy answer any batch must reproduce: up to its first near-tie."""
    for n, margin in enumerate(margins):
        if margin < NEAR_TIE:
            return ids[:n]
    return ids


async def test_requests_for_different_adapters_share_the_batch_and_keep_their_answers(
    registry: Path,
) -> None:
    """In one context, requests for the base and for an adapter take turns; each gets
    the answer it gets alone, and a seeded sampled answer is reproducible.

    llama.cpp's arithmetic depends on a batch's make-up (its matrix kernels change with
    the number of rows), and which requests share a step depends on timing: where the
    two most likely tokens are within a hair of each other, a batch may pick the other
    one. So each greedy answer must match its answer alone up to its first near-tie
    (the base model's: about the whole answer; the random adapter's, " holds holds",
    sooner); the seeded sampled one must match on its first tokens."""
    served = backend(registry, "batched", "q8_0", slots=4)
    await served.start()
    await served.load_adapter("continuity", 1, verify(registry, "continuity", 1, "demo-model"))
    chats = [
        job("What is continuity?"),
        job("What is continuity?", model="continuity"),
        job("What does the phone do?", model="continuity"),
        job("What is an adapter?", temperature=0.9, top_p=0.9, seed=7),
    ]
    alone = [await token_ids(served, chat) for chat in chats]
    expected = [until_near_tie(*answer) for answer in alone[:3]] + [alone[3][0][:6]]
    assert len(expected[0]) >= 16, alone[0]  # the base model's answer is far from ties
    assert alone[0][0] != alone[1][0]  # the adapter was applied to its own requests only

    def kept(answers: list[tuple[list[int], list[float]]]) -> bool:
        return all(
            ids[: len(want)] == want for (ids, _), want in zip(answers, expected, strict=True)
        )

    together = await asyncio.gather(*(token_ids(served, chat) for chat in chats))
    assert kept(together), (expected, together)
    # A request cancelled midway leaves the others' answers as they were.
    long = served.generate(job("What does the gateway do?", max_tokens=500, min_tokens=500))

    async def cancel_soon() -> None:
        async for event in long:
            if isinstance(event, TextDelta):
                break
        await long.aclose()

    results = await asyncio.gather(cancel_soon(), *(token_ids(served, chat) for chat in chats))
    assert kept(list(results[1:])), (expected, results[1:])
    await served.close()


async def test_a_version_without_its_gguf_form_is_exported_once_by_the_worker(
    registry: Path, demo_model: Path, tmp_path: Path, mode: str
) -> None:
    """Published where the converter could not run (or rolled back to): the first
    llama.cpp worker that needs it exports it, lists its sha256, and serves it."""
    from services.gguf import ensure_adapter_gguf

    write_version(make_adapter(demo_model, tmp_path / "lora", 11), tmp_path, "late", "demo-model")
    gguf = registry / "_base/demo-model/model-f16.gguf"
    served = make_backend(gguf, mode, adapter_base=lambda: demo_model)
    await served.start()
    await served.load_adapter("late", 1, verify(tmp_path, "late", 1, "demo-model"))
    exported = tmp_path / "late/1/adapter-f16.gguf"
    manifest = json.loads((tmp_path / "late/1/manifest.json").read_text())
    assert (
        manifest["files"]["adapter-f16.gguf"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    )
    assert verify(tmp_path, "late", 1, "demo-model")  # a worker elsewhere accepts it too
    text, _ = await answer(served, job(model="late", max_tokens=16))
    assert text == direct(gguf, served._encode(job()), 16, exported)
    await served.close()
    written = exported.stat().st_mtime_ns
    ensure_adapter_gguf(tmp_path, "late", 1, demo_model)  # once: the next worker reuses it
    assert exported.stat().st_mtime_ns == written


def test_a_worker_converts_a_model_folder_once_and_verifies_it_after(
    demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers starting together convert once; a later start only verifies; a file
    that does not match its manifest (a crash, a bad disk) is converted again."""
    need_llama_cpp()
    import threading

    from services import gguf

    conversions: list[list[str]] = []
    real = gguf.export_base

    def counted(model_dir: Path, registry: Path, base_model: str, types: list[str]) -> dict:
        conversions.append(types)
        return real(model_dir, registry, base_model, types)

    monkeypatch.setattr(gguf, "export_base", counted)
    found: list[Path] = []
    starts = [
        threading.Thread(
            target=lambda: found.append(
                gguf.ensure_base_gguf(demo_model, tmp_path, "demo-model", "q4_k_m")
            )
        )
        for _ in range(2)
    ]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join()
    target = tmp_path / "_base/demo-model/model-q4_k_m.gguf"
    assert found == [target, target] and conversions == [["q4_k_m"]]
    assert gguf.listed_gguf(tmp_path, "demo-model", "q4_k_m") == target
    assert gguf.ensure_base_gguf(demo_model, tmp_path, "demo-model", "q4_k_m") == target
    assert len(conversions) == 1
    with target.open("r+b") as damaged:
        damaged.truncate(target.stat().st_size // 2)
    assert gguf.listed_gguf(tmp_path, "demo-model", "q4_k_m") is None
    gguf.ensure_base_gguf(demo_model, tmp_path, "demo-model", "q4_k_m")
    assert len(conversions) == 2 and gguf.listed_gguf(tmp_path, "demo-model", "q4_k_m") == target
    with pytest.raises(gguf.ExportError, match="not a Hugging Face model folder"):
        gguf.ensure_base_gguf(tmp_path / "nothing", tmp_path, "other", "q4_k_m")


async def test_a_request_cancelled_twice_gives_its_room_back(registry: Path) -> None:
    """The worker cancels a job's task again while it is closing (a second CancelJob,
    the drain): the one slot must still be given back, or the backend takes nothing."""
    import contextlib

    served = backend(registry, "batched", slots=1)
    await served.start()

    async def consume() -> None:
        async for _ in served.generate(job(max_tokens=2000, min_tokens=2000)):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.5)  # decoding by now
    task.cancel()
    await asyncio.sleep(0)  # it is in its clean-up now
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    text, _ = await asyncio.wait_for(answer(served, job(max_tokens=4)), 30)
    assert text
    await served.close()
    from services.errors import RetryableError

    with pytest.raises(RetryableError, match="closing"):  # another worker may take it
        await answer(served, job(max_tokens=4))


async def test_a_prefix_one_sequence_holds_is_shared_with_the_others(registry: Path) -> None:
    """While one chat with the tiers runs in a slot, another chat with the same tiers
    in the other slot reads only its own tokens: the cells holding the tiers become
    both sequences' (the unified cache), and its answer is the one it gets cold."""
    tiers = "Portfolio, project, briefing and log: the four tiers of the owner. " * 6
    served = backend(registry, "batched", "q8_0", slots=2)
    await served.start()
    running = served.generate(with_system(tiers, "What is continuity?", max_tokens=400))
    async for event in running:
        if isinstance(event, TextDelta):
            break  # its prompt is read: the tiers are in its sequence's cells
    second = with_system(tiers, "What does the phone do?")
    text, finished = await answer(served, second)
    await running.aclose()
    ids, first_ids = (
        served._encode(second),
        served._encode(with_system(tiers, "What is continuity?")),
    )
    shared = next(i for i, (a, b) in enumerate(zip(ids, first_ids, strict=False)) if a != b)
    assert shared > 100 and finished.cached_tokens == shared
    await served.close()

    fresh = backend(registry, "batched", "q8_0")
    await fresh.start()
    reference, cold = await answer(fresh, second)
    assert (text, cold.cached_tokens) == (reference, 0)
    await fresh.close()
