"""GGUF forms of the base model and of published adapters, with llama.cpp's own
converters (they ship inside the llama-cpp-python source distribution, with the
`gguf` package copy they need: PyPI's gguf lacks LazyChunkedTensor).

Who makes them:
- the trainer, when it publishes a version (`export_adapter`, before the version is
  made current), and on request:
      python -m trainer_job export-gguf                 # base (f16, q8_0, Q4_K_M) + every adapter
      python -m trainer_job export-gguf --types f16 --adapters continuity
- a llama.cpp worker whose MESH_MODEL is a Hugging Face folder: `ensure_base_gguf`
  converts it once; and `ensure_adapter_gguf` for a version that lacks its GGUF form
  (one published while the converter was missing, or rolled back to). A file lock
  makes "once" hold for several workers sharing the registry.

Where the files go (the adapter registry, so CPU workers and the phone can fetch and
verify them):
    <registry>/_base/<base model>/model-<type>.gguf + manifest.json (sha256 of each)
    <registry>/<adapter>/<version>/adapter-f16.gguf, added to that version's manifest
    <registry>/_base/<base model>/phone-<adapter>-v<N>-<type>.gguf + phone.json: the
        phone's one file, the base with the current adapter merged in (`export_phone`)

A locally trained byte-level BPE tokenizer (the demo model's) is not in the
converter's table of known pre-tokenizer hashes; its GPT-2 byte-level regex is
llama.cpp's `gpt-2` pre-tokenizer, so it is declared as such by subclassing the
converter's model class (its extension point), never by editing the converter.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proto.adapters import (
    ADAPTER_GGUF,
    MANIFEST,
    PHONE_FILE,
    PHONE_MANIFEST,
    PHONE_TYPES,
    AdapterManifest,
    PhoneModel,
    PhoneModels,
)
from services.adapters import AdapterRegistry, file_sha256
from services.paths import cache_dir

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the version the llamacpp extra pins
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


class ExportError(RuntimeError):
    """The export cannot run; the message says what is missing."""


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one process at a time (an advisory lock on a file beside the output):
    workers sharing a registry volume convert a model once, the others wait for it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- the converter's source ---------------------------------------------------------------


def converter_dir() -> Path:
    """llama.cpp's converter scripts and gguf-py, from the llama-cpp-python sdist,
    downloaded once into the cache (MESH_LLAMACPP_SOURCE overrides)."""
    configured = os.environ.get("MESH_LLAMACPP_SOURCE")
    if configured:
        return Path(configured)
    target = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        if fetched.returncode != 0:
            raise ExportError(
                f"cannot download the llama-cpp-python sdist: {fetched.stderr[-300:]}"
            )
        [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
        staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=target.parent))
        with tarfile.open(sdist) as archive:
            members = [
                m
                for m in archive.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
                # Plain files and folders with relative names only: what the "data"
                # filter allows (Debian 12's Python 3.11.2 predates that filter).
                name = Path(member.name)
                if (
                    not (member.isfile() or member.isdir())
                    or name.is_absolute()
                    or (".." in name.parts)
                ):
                    raise ExportError(f"unexpected entry in the sdist: {member.name}")
            archive.extractall(staging, members=members)
        os.replace(staging, target)
    return target


def _import_converter() -> tuple[Any, Any, Any]:
    source = converter_dir()
    for path in (str(source / "gguf-py"), str(source)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import gguf

    # llama.cpp's converter, importable only once its sdist is on sys.path (above)
    from conversion import ModelBase, get_model_class  # type: ignore[import-not-found]

    if not hasattr(gguf, "LazyChunkedTensor"):
        raise ExportError("the gguf package found is not llama.cpp's own copy (PyPI's is too old)")
    return gguf, ModelBase, get_model_class


def _byte_level_bpe(model_dir: Path) -> bool:
    """A GPT-2-style byte-level BPE tokenizer (llama.cpp's `gpt-2` pre-tokenizer)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text())
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("model", {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )


# -- base model -------------------------------------------------------------------------------


def convert_base(model_dir: Path, out: Path, outtype: str) -> Path:
    """An HF model folder to one GGUF file with llama.cpp's converter."""
    import torch

    gguf, ModelBase, get_model_class = _import_converter()
    hparams = ModelBase.load_hparams(model_dir, False)
    converter = get_model_class(hparams["architectures"][0])
    if _byte_level_bpe(model_dir):

        class ByteLevelBpe(converter):  # type: ignore[misc, valid-type]
            model_arch = converter.model_arch

            def set_vocab(self) -> None:
                self._set_vocab_gpt2()  # no sentencepiece probing for a BPE tokenizer

            def get_vocab_base_pre(self, tokenizer: Any) -> str:
                return "gpt-2"

        converter = ByteLevelBpe
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    with torch.inference_mode():
        model = converter(model_dir, file_type, out, eager=False, hparams=hparams)
        model.write()
    return out


def quantize(source: Path, out: Path, kind: str) -> Path:
    """K-quants come from llama.cpp's C quantizer (llama-cpp-python, the llamacpp extra)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(f"{kind} needs llama-cpp-python (pip install '.[llamacpp]')") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[kind])
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if code != 0:
        raise ExportError(f"llama_model_quantize returned {code} for {kind}")
    return out


def export_base(
    model_dir: Path, registry: Path, base_model: str, types: list[str]
) -> dict[str, Any]:
    """`<registry>/_base/<base_model>/model-<type>.gguf` + a manifest of sha256s."""
    folder = AdapterRegistry(registry).base_folder(base_model)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    manifest: dict[str, Any] = (
        json.loads(manifest_path.read_text())
        if manifest_path.is_file()
        else {"base_model": base_model, "files": {}}
    )
    f16 = None
    for kind in types:
        name = AdapterRegistry(registry).base_gguf(base_model, kind).name
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            partial = Path(tmp) / name
            if kind in CONVERTER_TYPES:
                convert_base(model_dir, partial, kind)
            elif kind in QUANTIZER_TYPES:
                if f16 is None:
                    f16 = Path(tmp) / "model-f16.gguf"
                    convert_base(model_dir, f16, "f16")
                quantize(f16, partial, kind)
                f16 = None  # lives in this temporary folder only
            else:
                raise ExportError(f"unknown GGUF type {kind!r}")
            manifest["files"][name] = file_sha256(partial)
            os.replace(partial, folder / name)
        log.info("base %s: %s", base_model, name)
    manifest["created_at"] = datetime.now(UTC).isoformat()
    _write_json_atomically(manifest_path, manifest)
    return manifest


def local_model_dir(ref: str, weights: bool = True) -> Path:
    """A model reference (a local folder or a hub id) as a local folder: a hub id is
    fetched (or found in the hub's cache) with what a conversion reads. An adapter's
    conversion reads only the base's configuration: `weights=False` skips the weights."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]
    if weights:
        patterns.append("*.safetensors")
    return Path(snapshot_download(ref, allow_patterns=patterns))


def listed_gguf(registry: Path, base_model: str, kind: str) -> Path | None:
    """The base model's GGUF in `kind` when its manifest lists it with the sha256 the
    file has (a file a crash left unlisted or half-written is not trusted)."""
    path = AdapterRegistry(registry).base_gguf(base_model, kind)
    try:
        listed = json.loads((path.parent / MANIFEST).read_text())["files"].get(path.name)
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    if not listed or not path.is_file() or file_sha256(path) != listed:
        return None
    return path


def ensure_base_gguf(model_dir: Path, registry: Path, base_model: str, kind: str) -> Path:
    """The GGUF of `model_dir` in `kind`: the verified file of an earlier conversion, or
    converted now (minutes for a 7B), once however many workers ask at the same time."""
    target = AdapterRegistry(registry).base_gguf(base_model, kind)
    started = time.monotonic()
    with _exclusive(target.parent / f".convert-{kind}.lock"):
        found = listed_gguf(registry, base_model, kind)
        if found is not None:
            log.info("%s verified in %.1f s", found, time.monotonic() - started)
            return found
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
        log.info("converting %s to %s (once; a 7B takes minutes) ...", model_dir, target.name)
        export_base(model_dir, registry, base_model, [kind])
    log.info("converted %s to %s in %.1f s", model_dir, target, time.monotonic() - started)
    return target


# -- adapters ---------------------------------------------------------------------------------


def convert_adapter(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """A peft LoRA folder to a GGUF LoRA (f16), with llama.cpp's own script."""
    source = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), str(source)])}
    done = subprocess.run(
        [
            sys.executable,
            str(source / "convert_lora_to_gguf.py"),
            "--base",
            str(base_dir),
            "--outtype",
            "f16",
            "--outfile",
            str(out),
            str(adapter_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0 or not out.is_file():
        raise ExportError(f"convert_lora_to_gguf failed: {done.stderr[-500:]}")
    return out


def export_adapter(registry: Path, name: str, version: int, base_dir: Path) -> AdapterManifest:
    """Add `adapter-f16.gguf` to a published version and list it in its manifest.
    The version's weights do not change: this only adds a derived file."""
    folder = registry / name / str(version)
    manifest = AdapterManifest.model_validate_json((folder / MANIFEST).read_text())
    if ADAPTER_GGUF in manifest.files and (folder / ADAPTER_GGUF).is_file():
        return manifest
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        partial = convert_adapter(folder, base_dir, Path(tmp) / ADAPTER_GGUF)
        manifest.files[ADAPTER_GGUF] = file_sha256(partial)
        os.replace(partial, folder / ADAPTER_GGUF)
    _write_json_atomically(folder / MANIFEST, manifest.model_dump(mode="json"))
    log.info("%s v%d: %s", name, version, ADAPTER_GGUF)
    return manifest


def ensure_adapter_gguf(registry: Path, name: str, version: int, base_dir: Path) -> Path:
    """A version's GGUF form, exported now if it has none (once across workers)."""
    folder = registry / name / str(version)
    started = time.monotonic()
    # The lock lives beside the version folders: workers refuse unexpected files in one.
    with _exclusive(registry / name / f".gguf-{version}.lock"):
        exported = ADAPTER_GGUF not in json.loads((folder / MANIFEST).read_text())["files"]
        export_adapter(registry, name, version, base_dir)
    if exported:
        log.info(
            "%s v%d: exported %s in %.1f s", name, version, ADAPTER_GGUF, time.monotonic() - started
        )
    return folder / ADAPTER_GGUF


def export_adapters(
    registry: Path, names: list[str] | None, base_dir: Path, base_model: str
) -> list[AdapterManifest]:
    """Every version of the named adapters (all when None) trained on `base_model`."""
    exported = []
    versions = AdapterRegistry(registry)
    for name in names or versions.names():
        for version in versions.versions(name):
            manifest = versions.manifest(name, version)
            if manifest is not None and manifest.base_model == base_model:
                exported.append(export_adapter(registry, name, version, base_dir))
    return exported


# -- the phone's model ---------------------------------------------------------------------

# What a model folder holds besides its weights and config: the tokenizer and chat
# template the converter writes into the GGUF.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
# The browser runtime (wllama) has a 4 GiB WebAssembly heap: a larger file cannot load.
PHONE_RUNTIME_BYTES = 4 << 30


def merged_model(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """The base with a LoRA adapter merged into its weights, as a Hugging Face folder
    (what llama.cpp's converter reads). Merged in the base's own dtype, so a 7B in
    bf16 needs about 15 GB of memory here, once per phone export."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    for path in base_dir.iterdir():  # tokenizer, chat template, generation config
        if (
            path.is_file()
            and not (out / path.name).exists()
            and not path.name.endswith(WEIGHT_SUFFIXES)
        ):
            shutil.copy2(path, out / path.name)
    return out


def unsaid_tokens(model_dir: Path) -> list[int]:
    """The tool-call marker of the model's family (the web client offers no tools)."""
    from transformers import AutoTokenizer

    from inference_worker.backends.tool_calls import family_of

    tools = family_of(AutoTokenizer.from_pretrained(model_dir))
    return [tools.marker_id] if tools is not None else []


def phone_file_name(adapter: tuple[str, int] | None, kind: str) -> str:
    return f"phone-{adapter[0]}-v{adapter[1]}-{kind}.gguf" if adapter else f"phone-base-{kind}.gguf"


def export_phone(
    model_dir: Path,
    registry: Path,
    base_model: str,
    adapter: tuple[str, int] | None,
    kind: str = "q4_k_m",
) -> PhoneModel:
    """The phone's model: `adapter` (name, version; None: the base alone) merged into
    the base, quantized to `kind`, listed in `phone.json` with its sha256 and size as
    the current one. The file it replaces stays listed as `previous` (a phone halfway
    through downloading it can finish); the one before that is deleted."""
    if kind not in PHONE_TYPES:
        raise ExportError(f"a phone model is {' or '.join(PHONE_TYPES)}, not {kind!r}")
    versions = AdapterRegistry(registry)
    folder = versions.base_folder(base_model)
    name = phone_file_name(adapter, kind)
    if not re.fullmatch(PHONE_FILE, name):
        raise ExportError(f"{name}: the adapter's name is too long for a phone model's file")
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / ".phone.lock"), tempfile.TemporaryDirectory(dir=folder) as tmp:
        source = model_dir
        if adapter is not None:
            adapter_dir = versions.folder(*adapter)
            if versions.manifest(*adapter) is None:
                raise ExportError(f"no {adapter[0]} v{adapter[1]} in {registry}")
            source = merged_model(model_dir, adapter_dir, Path(tmp) / "merged")
        partial = Path(tmp) / name
        if kind == "q8_0":
            convert_base(source, partial, "q8_0")
        else:
            quantize(convert_base(source, Path(tmp) / "f16.gguf", "f16"), partial, kind)
        exported = PhoneModel(
            unsaid_tokens=unsaid_tokens(model_dir),
            file=name,
            base_model=base_model,
            adapter=adapter[0] if adapter else None,
            adapter_version=adapter[1] if adapter else None,
            type=kind,  # type: ignore[arg-type]
            sha256=file_sha256(partial),
            size=partial.stat().st_size,
            created_at=datetime.now(UTC).isoformat(),
        )
        listed = versions.phone_models(base_model)
        os.replace(partial, folder / name)
        kept = listed.current if listed.current and listed.current.file != name else listed.previous
        if kept is not None and kept.file == name:
            kept = None
        for old in (listed.current, listed.previous):
            if old is not None and old.file not in (name, kept.file if kept else None):
                (folder / old.file).unlink(missing_ok=True)
        _write_json_atomically(
            folder / PHONE_MANIFEST,
            PhoneModels(current=exported, previous=kept).model_dump(mode="json"),
        )
    log.info("phone model %s: %s (%d bytes)", exported.label, name, exported.size)
    if exported.size > PHONE_RUNTIME_BYTES * 0.9:
        log.warning(
            "%s is %.1f GB: the browser runtime's heap is 4 GiB (weights, cache and work "
            "space), so it will not load on a phone; export a smaller base (1-3B)",
            name,
            exported.size / 1e9,
        )
    return exported


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    # The temporary file lives beside the version folder, not in it: workers refuse
    # a version folder holding files they do not expect.
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent.parent, prefix=".manifest-", delete=False
    ) as partial:
        partial.write(json.dumps(data, indent=2) + "\n")
    os.replace(partial.name, path)
