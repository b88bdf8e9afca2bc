"""The worker process: load the backend, consume jobs, keep the liveness record fresh."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from inference_worker.adapters import AdapterLoader
from inference_worker.backends.base import Backend
from inference_worker.jobs import DeliveryCounter, JobRunner, Pacing
from inference_worker.settings import WorkerSettings
from proto.adapters import AdapterPublished
from proto.messages import WorkerStatus
from services import liveness
from services.adapters import AdapterRegistry, CurrentVersions
from services.bus import Topology, WorkerBus
from services.errors import PermanentError
from services.gguf import ExportError
from services.paths import adapter_registry, model_ref, served_name
from services.redis_client import Keys, connect

log = logging.getLogger(__name__)


def build_backend(settings: WorkerSettings) -> Backend:
    if settings.backend == "echo":
        from inference_worker.backends.echo import EchoBackend

        return EchoBackend()
    if settings.backend == "llamacpp":
        return build_llamacpp(settings)
    if settings.backend == "vllm":
        from inference_worker.backends.vllm_backend import VllmBackend

        return VllmBackend(
            resolve_model_ref(settings.model),
            settings.model_name,
            settings.dtype,
            kv_cache_memory_bytes=settings.vllm_kv_cache_bytes or None,
        )
    from inference_worker.backends.transformers_backend import TransformersBackend

    return TransformersBackend(
        resolve_model_ref(settings.model),
        settings.device,
        settings.dtype,
        settings.model_name,
        max_batch=settings.capacity,
        quantization=settings.quantization,
        handoff_ms=settings.handoff_ms,
        unstreamed_handoff_ms=settings.unstreamed_handoff_ms,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        prefix_cache_bytes=settings.prefix_cache_bytes,
        prefix_cache_block_tokens=settings.prefix_cache_block_tokens,
    )


def build_llamacpp(settings: WorkerSettings) -> Backend:
    """MESH_MODEL a .gguf file: served as it is. Otherwise a Hugging Face folder or hub
    id (empty: the demo model), converted at start, once, into the registry's
    `_base/<model name>/model-<MESH_LLAMACPP_QUANT>.gguf`; that folder also lets the
    worker export an adapter version's GGUF form when the version lacks one."""
    from inference_worker.backends.llamacpp_backend import LlamaCppBackend
    from inference_worker.backends.llamacpp_batched import LlamaCppBatchedBackend
    from services.gguf import ensure_base_gguf, local_model_dir

    kind = LlamaCppBatchedBackend if settings.llamacpp_batched else LlamaCppBackend
    common: dict[str, Any] = {
        "slots": settings.capacity,
        "threads": settings.llamacpp_threads,
        "n_ctx": settings.llamacpp_context,
    }
    if settings.model.endswith(".gguf"):
        return kind(settings.model, settings.model_name, **common)
    ref = resolve_model_ref(settings.model)
    name = served_name(ref, settings.model_name)
    registry = settings.adapter_registry or adapter_registry()
    folder = functools.cache(lambda: local_model_dir(ref))

    def prepare() -> Path:
        try:
            return ensure_base_gguf(folder(), registry, name, settings.llamacpp_quant)
        except ExportError as exc:
            raise PermanentError(f"cannot make the GGUF of {ref}: {exc}") from exc

    target = AdapterRegistry(registry).base_gguf(name, settings.llamacpp_quant)
    return kind(str(target), name, prepare=prepare, adapter_base=folder, **common)


def resolve_model_ref(model: str) -> str:
    """MESH_MODEL, or the demo model's folder when it is empty."""
    try:
        return model_ref(model)
    except FileNotFoundError as exc:
        raise PermanentError(str(exc)) from exc


def _gpu_memory_bytes(device: str) -> int | None:
    """Memory reserved by this process on its GPU, for /metrics; None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.memory_reserved()) if torch.cuda.is_available() else None


class Worker:
    def __init__(self, settings: WorkerSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.worker_id = (
            settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.topology = Topology(settings.namespace, settings.model_family)
        self.bus = WorkerBus(self.topology, self.worker_id, settings.capacity, settings.priority)
        self.redis = connect(settings.redis_url)
        self.keys = Keys(settings.namespace)
        self.runner = JobRunner(
            backend,
            self.bus,
            Pacing(settings.coalesce_tokens, settings.coalesce_ms / 1000),
            Pacing(settings.unstreamed_coalesce_tokens, settings.unstreamed_coalesce_ms / 1000),
            settings.cancel_memory_s,
            DeliveryCounter(self.redis, self.keys, settings.max_deliveries),
        )
        self.started_at = datetime.now(UTC)
        self.current = CurrentVersions(settings, self.redis)
        self.loader = AdapterLoader(
            backend,
            settings.adapter_registry or adapter_registry(),
            settings.adapter_source,
            settings.adapter_key,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._adapter_lock = asyncio.Lock()
        self.broken = False  # the backend reported it can no longer serve

    def status(self) -> WorkerStatus:
        return WorkerStatus(
            worker_id=self.worker_id,
            site=self.settings.site,
            device=self.backend.device,
            model_family=self.settings.model_family,
            base_model=self.backend.base_model,
            adapters=self.backend.adapters,
            capacity=self.settings.capacity,
            in_flight=self.runner.in_flight,
            jobs_completed=self.runner.completed,
            jobs_cancelled=self.runner.cancelled,
            tokens_generated=self.backend.tokens_generated,
            gpu_memory_bytes=_gpu_memory_bytes(self.backend.device),
            prefix_cache=self.backend.prefix_cache,
            started_at=self.started_at,
            updated_at=datetime.now(UTC),
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Each job runs as its own task, so up to `capacity` (the prefetch) run at once.
        task = asyncio.create_task(self._run_job(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, message: AbstractIncomingMessage) -> None:
        try:
            await self.runner.handle(message)
        except Exception:
            # Typically the connection dropped mid-reply: the job is unacked and the
            # broker redelivers it.
            log.exception(
                "job %s: not acknowledged; the broker will redeliver it", message.message_id
            )

    async def on_adapter_published(self, event: AdapterPublished) -> None:
        if event.base_model != self.backend.base_model:
            return  # another family's adapter
        await self.install_adapter(event.name, event.version)

    async def load_current_adapters(self) -> None:
        for name, current in (await self.current.all()).items():
            if current.base_model == self.backend.base_model:
                await self.install_adapter(name, current.version)

    async def install_adapter(self, name: str, version: int) -> None:
        # One install at a time, and the version recorded as current when this one's
        # turn comes wins: a slow install of v3 cannot land after a rollback to v2.
        async with self._adapter_lock:
            current = await self.current.get(name)
            if current is not None:
                version = current.version
            if self.backend.adapters.get(name) == version:
                return
            if await self.loader.install(name, version):
                await liveness.publish_status(
                    self.redis, self.keys, self.status(), self.settings.liveness_ttl_s
                )

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            try:
                if (await self.backend.health()).get("ok", True):
                    await liveness.publish_status(
                        self.redis, self.keys, self.status(), self.settings.liveness_ttl_s
                    )
                    if self.settings.health_file and self.bus.connected:
                        self.settings.health_file.touch()
                elif not self.broken:
                    await self._retire_broken_backend()
            except Exception as exc:
                log.warning("liveness record not refreshed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.heartbeat_s)

    async def _retire_broken_backend(self) -> None:
        """The backend can no longer serve: take no more jobs (others' workers get
        them), leave the live set, and let the probe fail so the worker is restarted."""
        self.broken = True
        log.error("the %s backend can no longer serve; taking no more jobs", self.settings.backend)
        await self.bus.stop_consuming()
        await liveness.remove_status(self.redis, self.keys, self.worker_id)

    async def run(self) -> None:
        await self.backend.start()
        await self.bus.start(self.settings.amqp_url)
        await liveness.publish_status(
            self.redis, self.keys, self.status(), self.settings.liveness_ttl_s
        )
        heartbeat = asyncio.create_task(self._heartbeat())
        await self.bus.consume_control(self.runner.cancel)
        # Event and state: listen first, then load what is current, so no version
        # published in between is missed.
        await self.bus.consume_adapters(self.on_adapter_published)
        await self.load_current_adapters()
        await self.bus.consume(self._on_message)
        cache = self.backend.prefix_cache
        log.info(
            "worker %s consuming %s (capacity %d, priority %d, %s, prefix cache %s)",
            self.worker_id,
            self.topology.job_queue,
            self.settings.capacity,
            self.settings.priority,
            self.backend.device,
            "off"
            if cache is None or not cache.capacity_bytes
            else f"{cache.capacity_bytes / 2**20:.0f} MiB",
        )
        await self._stopping.wait()
        await self._drain()
        heartbeat.cancel()
        await liveness.remove_status(self.redis, self.keys, self.worker_id)
        await self.bus.close()
        await self.redis.aclose()
        await self.backend.close()
        log.info("worker %s stopped", self.worker_id)

    async def _drain(self) -> None:
        """Take no new jobs; let the running ones finish (they are acked as they end)."""
        await self.bus.stop_consuming()
        if self._tasks:
            log.info("draining %d job(s)", len(self._tasks))
            _, pending = await asyncio.wait(self._tasks, timeout=self.settings.drain_timeout_s)
            # Unfinished ones are not acked: closing the channel hands them back.
            for task in pending:
                task.cancel()

    def stop(self) -> None:
        self._stopping.set()


def say_memory_fit(settings: WorkerSettings) -> None:
    """The start line on memory: whether the model fits with this backend and precision,
    and what to use instead when it does not (it still tries)."""
    from services.memory_fit import check

    env = {
        "MESH_BACKEND": settings.backend,
        "MESH_MODEL": settings.model,
        "MESH_CAPACITY": str(settings.capacity),
        "MESH_DEVICE": settings.device,
        "MESH_DTYPE": settings.dtype,
        "MESH_QUANTIZATION": settings.quantization,
        "MESH_LLAMACPP_QUANT": settings.llamacpp_quant,
        "MESH_LLAMACPP_CONTEXT": str(settings.llamacpp_context),
    }
    try:
        result = check(env)
    except (OSError, ValueError, RuntimeError) as exc:
        log.info("memory: cannot tell whether the model fits: %s", exc)
        return
    if result is not None:
        fits, text = result
        log.log(logging.INFO if fits else logging.WARNING, "memory: %s", text)


async def serve(settings: WorkerSettings) -> None:
    if settings.backend != "echo":
        await asyncio.to_thread(say_memory_fit, settings)
    worker = Worker(settings, build_backend(settings))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, worker.stop)
    await worker.run()
