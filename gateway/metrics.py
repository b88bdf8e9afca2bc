"""Prometheus metrics of one gateway process (GET /metrics)."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from proto.messages import WorkerStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mesh_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "mesh_http_request_seconds",
            "End-to-end HTTP latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("mesh_http_in_flight", "HTTP requests being served", registry=r)
        self.ttft = Histogram(
            "mesh_time_to_first_token_seconds",
            "From job submission to its first text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mesh_queue_wait_seconds",
            "From job creation until a worker started it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_in = Counter("mesh_prompt_tokens", "Prompt tokens of answered jobs", registry=r)
        self.tokens_out = Counter("mesh_completion_tokens", "Generated tokens", registry=r)
        self.tokens_cached = Counter(
            "mesh_cached_prompt_tokens",
            "Prompt tokens of answered jobs that a worker's prefix cache already held",
            registry=r,
        )
        self.jobs = Counter("mesh_jobs", "Jobs by outcome", ["outcome"], registry=r)
        self.response_cache = Counter(
            "mesh_response_cache",
            "Response cache lookups by result (hit: answered without a worker)",
            ["result"],
            registry=r,
        )
        self.live_workers = Gauge("mesh_live_workers", "Live workers of this family", registry=r)
        # The fleet as the workers' liveness records describe it, read at scrape time.
        worker = ["worker_id", "site", "device"]
        self.workers = Gauge(
            "mesh_workers", "Live workers by site and device", ["site", "device"], registry=r
        )
        self.worker_in_flight = Gauge("mesh_worker_in_flight", "Jobs running", worker, registry=r)
        self.worker_capacity = Gauge("mesh_worker_capacity", "Jobs at once", worker, registry=r)
        self.worker_tokens = Gauge(
            "mesh_worker_tokens_generated", "Tokens decoded since start", worker, registry=r
        )
        self.worker_gpu_memory = Gauge(
            "mesh_worker_gpu_memory_bytes", "GPU memory reserved", worker, registry=r
        )
        self.adapter_version = Gauge(
            "mesh_adapter_version",
            "Adapter version each worker serves",
            ["adapter", "worker_id", "site"],
            registry=r,
        )
        self.queue_depth = Gauge("mesh_queue_depth", "Jobs waiting for a worker", registry=r)
        self.prefix_caches = PrefixCacheCollector()
        r.register(self.prefix_caches)

    def observe_fleet(self, workers: list[WorkerStatus], queue_depth: int | None) -> None:
        """Replace the fleet gauges with what the liveness records say now."""
        for gauge in (
            self.workers,
            self.worker_in_flight,
            self.worker_capacity,
            self.worker_tokens,
            self.worker_gpu_memory,
            self.adapter_version,
        ):
            gauge.clear()
        self.live_workers.set(len(workers))
        counts: dict[tuple[str, str], int] = {}
        for w in workers:
            counts[(w.site, w.device)] = counts.get((w.site, w.device), 0) + 1
            labels = (w.worker_id, w.site, w.device)
            self.worker_in_flight.labels(*labels).set(w.in_flight)
            self.worker_capacity.labels(*labels).set(w.capacity)
            self.worker_tokens.labels(*labels).set(w.tokens_generated)
            if w.gpu_memory_bytes is not None:
                self.worker_gpu_memory.labels(*labels).set(w.gpu_memory_bytes)
            for name, version in w.adapters.items():
                self.adapter_version.labels(name, w.worker_id, w.site).set(version)
        for (site, device), count in counts.items():
            self.workers.labels(site, device).set(count)
        if queue_depth is not None:
            self.queue_depth.set(queue_depth)
        self.prefix_caches.workers = list(workers)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by its route template (not its raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        self.metrics.in_flight.inc()

        async def send_and_record(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.request_seconds.labels(name).observe(time.perf_counter() - started)


class PrefixCacheCollector(Collector):
    """Each live worker's prefix cache, from its liveness record. Its counters count
    since that worker started (a restarted worker has a new id), so they are
    Prometheus counters: `rate(mesh_worker_prefix_cache_hit_tokens_total[5m]) /
    rate(mesh_worker_prefix_cache_lookup_tokens_total[5m])` is the hit rate."""

    COUNTERS = (
        ("lookups", "Prompts looked up in the prefix cache"),
        ("lookup_tokens", "Tokens of the prompts looked up"),
        ("hit_tokens", "Prompt tokens found in the prefix cache (not read again)"),
        ("evictions", "Prefix cache blocks dropped to make room"),
    )
    GAUGES = (
        ("bytes", "Bytes of keys and values the prefix cache holds"),
        ("capacity_bytes", "Most bytes the prefix cache may hold"),
        ("blocks", "Blocks the prefix cache holds"),
    )
    LABELS = ("worker_id", "site", "device")

    def __init__(self) -> None:
        self.workers: list[Any] = []

    def collect(self) -> list[Metric]:
        families: list[CounterMetricFamily | GaugeMetricFamily] = [
            CounterMetricFamily(f"mesh_worker_prefix_cache_{field}", text, labels=self.LABELS)
            for field, text in self.COUNTERS
        ]
        families += [
            GaugeMetricFamily(f"mesh_worker_prefix_cache_{field}", text, labels=self.LABELS)
            for field, text in self.GAUGES
        ]
        fields = [f for f, _ in self.COUNTERS + self.GAUGES]
        for worker in self.workers:
            stats = getattr(worker, "prefix_cache", None)
            if stats is None:
                continue
            labels = [worker.worker_id, worker.site, worker.device]
            for family, name in zip(families, fields, strict=True):
                family.add_metric(labels, getattr(stats, name))
        return list(families)
