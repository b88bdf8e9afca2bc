"""Adapter versions: the files a version is made of, the manifest beside them, and the
event that announces one. Where versions live is `services.adapters`' business."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.messages import BusMessage

ADAPTER_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
GGUF_FILE = r"^adapter-(f32|f16|bf16|q8_0)\.gguf$"  # llama.cpp's form, listed in the manifest
ADAPTER_GGUF = "adapter-f16.gguf"  # the form the exporter writes and llama.cpp workers load


def served_label(base_model: str, adapter: str | None = None, version: int | None = None) -> str:
    """Which model answered: `base`, or `base+adapter@vN` (system_fingerprint, served_by)."""
    return f"{base_model}+{adapter}@v{version}" if adapter else base_model


def adapter_files(listed: Iterable[str]) -> list[str]:
    """The files a version folder may hold: the adapter's own, and the GGUF forms among
    `listed` (its manifest's files)."""
    return [*ADAPTER_FILES, *(f for f in listed if re.fullmatch(GGUF_FILE, f))]


class Probe(BaseModel):
    """One probe question and the greedy answers of the base model and the adapter."""

    model_config = ConfigDict(extra="forbid")

    question: str
    base: str
    adapter: str


class AdapterManifest(BaseModel):
    """manifest.json of one adapter version folder."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME, description="The adapter's name.")
    version: int = Field(ge=1, description="Version number within the name.")
    base_model: str = Field(description="Name of the base model it was trained on.")
    files: dict[str, str] = Field(description="File name -> sha256 of every file it needs.")
    eval: dict[str, float] = Field(
        default_factory=dict,
        description="Evaluation numbers: eval_loss_before/after, perplexity_before/after, …",
    )
    probes: list[Probe] = Field(
        default_factory=list, description="Fixed questions answered greedily by base and adapter."
    )
    dataset_sha256: str = Field(default="", description="sha256 of the train+eval split used.")
    created_at: str = Field(description="When it was made (ISO 8601, UTC).")


class CurrentVersion(BaseModel):
    """The version of one adapter every worker must serve (a field of a Redis hash)."""

    version: int = Field(ge=1, description="The version to serve.")
    base_model: str = Field(description="Name of the base model it applies to.")


class AdapterPublished(BusMessage):
    """Event: `name` now points at `version`; every worker loads it in place."""

    type: Literal["adapter_published"] = Field(default="adapter_published", description="Type.")
    schema_version: Literal[1] = Field(default=1, description="Version of this schema.")
    name: str = Field(pattern=ADAPTER_NAME, description="The adapter's name.")
    version: int = Field(ge=1, description="The version to serve from now on.")
    base_model: str = Field(description="Name of the base model it applies to.")


# -- REST (gateway admin) -------------------------------------------------------------


class AdapterVersionInfo(BaseModel):
    version: int
    created_at: str
    base_model: str
    eval: dict[str, float] = Field(default_factory=dict)
    current: bool = Field(description="True for the version workers serve now.")


class AdapterInfo(BaseModel):
    name: str
    current_version: int | None = Field(description="What workers serve; null: none yet.")
    versions: list[AdapterVersionInfo] = Field(description="Every version, oldest first.")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]


class AdapterRollback(BaseModel):
    """Point the adapter at an earlier (or any existing) version."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(
        default=None, ge=1, description="The version to serve; absent: the one before the current."
    )


# -- the phone's model --------------------------------------------------------------------

PHONE_MANIFEST = "phone.json"  # beside the base model's GGUF exports
PHONE_FILE = r"^phone-[a-z0-9][a-z0-9._-]{0,63}-(q4_k_m|q8_0)\.gguf$"
PHONE_TYPES = ("q4_k_m", "q8_0")


class PhoneModel(BaseModel):
    """One GGUF file for the phone: the base model with an adapter version merged into
    it (or the base alone), quantized; what the web client downloads and checks."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(
        pattern=PHONE_FILE, description="File name, e.g. phone-continuity-v3-q4_k_m.gguf."
    )
    base_model: str = Field(description="The base model it was made from.")
    adapter: str | None = Field(default=None, description="The adapter merged in; null: none.")
    adapter_version: int | None = Field(default=None, ge=1, description="Its version.")
    type: Literal["q4_k_m", "q8_0"] = Field(description="Quantization.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file.")
    size: int = Field(ge=1, description="Bytes.")
    created_at: str = Field(description="When it was exported (ISO 8601, UTC).")
    unsaid_tokens: list[int] = Field(
        default_factory=list,
        description="Token ids the device never picks, as the workers do for a chat "
        "offered no tools: the model's tool-call marker.",
    )

    @property
    def label(self) -> str:
        """`demo-model+continuity@v3`, the system_fingerprint form."""
        return served_label(self.base_model, self.adapter, self.adapter_version)


class PhoneModels(BaseModel):
    """`phone.json`: the file to serve now, and the one before it (kept so a phone
    halfway through downloading it can finish)."""

    model_config = ConfigDict(extra="forbid")

    current: PhoneModel | None = None
    previous: PhoneModel | None = None
