"""docker-compose.yml, its Dockerfiles and the observe profile's files. There is no
Docker engine here: the file is validated against the Compose Specification's JSON
schema (vendored by check-jsonschema) and the facts that matter are checked."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.paths import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_schema() -> dict[str, Any]:
    vendored = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(vendored.read_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())

    def deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
        while error.context:
            error = max(error.context, key=lambda e: len(e.absolute_path))
        return error

    return [
        f"{deepest(e).json_path}: {deepest(e).message}"
        for e in validator.iter_errors(document)
        if "Unevaluated properties" not in e.message
    ]


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []


def test_the_schema_check_catches_mistakes(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["depends_on"] = {"redis": {"condition": "when_ready"}}
    broken["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"] = [
        {"driver": "nvidia", "capabilites": ["gpu"]}
    ]
    errors = schema_errors(broken)
    assert any("when_ready" in e for e in errors)
    assert any("capabilites" in e for e in errors)


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and not service["healthcheck"].get("disable"), f"{name}: no healthcheck"
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert rule["condition"] in {"service_healthy", "service_completed_successfully"}


def test_no_default_passwords_and_every_secret_is_in_the_example_env(
    compose: dict[str, Any],
) -> None:
    text = COMPOSE.read_text()
    secret_like = re.compile(r"PASSWORD|_KEY|_USER")
    required = set(re.findall(r"\$\{(\w+):\?", text))
    defaults = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))
    assert {"MESH_RABBITMQ_PASSWORD", "MESH_REDIS_PASSWORD", "MESH_API_KEY"} <= required
    assert not [name for name in defaults if secret_like.search(name)], defaults
    assert "guest" not in text
    example = dict(
        line.split("=", 1)
        for line in (REPO_ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= example.keys()
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    # The example's placeholders are refused by what reads them.
    from gateway.settings import GatewaySettings

    with pytest.raises(ValueError):
        GatewaySettings(api_key=example["MESH_API_KEY"])


def test_only_the_gateway_is_published_beyond_localhost(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if name == "gateway":
                assert port.startswith("${MESH_GATEWAY_BIND:-127.0.0.1}:")
            else:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port}"
    for name in ("rabbitmq", "redis"):
        assert "ports" not in compose["services"][name]


def test_profiles_gpu_worker_and_trainer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiles = {n: tuple(s.get("profiles", ())) for n, s in services.items()}
    assert profiles["worker-gpu"] == ("gpu",) and profiles["trainer"] == ("train",)
    assert profiles["prometheus"] == profiles["grafana"] == ("observe",)
    gpu = services["worker-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    env = gpu["environment"]
    assert (env["MESH_QUANTIZATION"], env["MESH_DTYPE"]) == ("4bit", "float16")
    assert int(env["MESH_PRIORITY"]) > int(services["worker-cpu"]["environment"]["MESH_PRIORITY"])
    assert services["trainer"]["command"][:4] == ["python", "-m", "trainer_job", "run"]
    for name in ("gateway", "worker-cpu", "worker-gpu", "trainer"):
        mounts = [v.split(":")[1] for v in services[name]["volumes"]]
        assert "/data/adapters" in mounts, f"{name} lacks the adapter registry"


def test_images_are_pinned_and_build_contexts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image!r}"
        if "build" in service:
            context = REPO_ROOT / service["build"]["context"]
            dockerfile = context / service["build"]["dockerfile"]
            assert context.is_dir() and dockerfile.is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_copy_what_exists_and_run_unprivileged(dockerfile: str) -> None:
    text = (REPO_ROOT / "deploy" / "docker" / dockerfile).read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), f"{dockerfile}: COPY {source}"
    assert "USER mesh" in text and text.count("FROM ") >= 2  # multi-stage
    if dockerfile == "Dockerfile":
        # PyPI's default torch would bring gigabytes of CUDA libraries into the CPU image.
        assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_the_dashboard_only_uses_metrics_the_gateway_exports() -> None:
    from gateway.metrics import Metrics
    from proto.messages import PrefixCacheStats, WorkerStatus

    metrics = Metrics()
    now = datetime.now(UTC)
    worker = WorkerStatus(
        worker_id="w1",
        site="desktop",
        device="cuda",
        model_family="mistral",
        base_model="m",
        adapters={"continuity": 2},
        capacity=8,
        in_flight=1,
        gpu_memory_bytes=1 << 30,
        prefix_cache=PrefixCacheStats(
            capacity_bytes=1 << 30,
            bytes=1 << 20,
            blocks=16,
            block_tokens=16,
            lookups=3,
            lookup_tokens=3000,
            hit_tokens=2000,
            evictions=1,
        ),
        started_at=now,
        updated_at=now,
    )
    metrics.observe_fleet([worker], queue_depth=3)
    metrics.ttft.observe(0.1)
    metrics.request_seconds.labels("/chat").observe(0.2)
    metrics.requests.labels("/chat", "200").inc()
    metrics.tokens_in.inc(3000)
    metrics.tokens_cached.inc(2000)
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in metrics.render().decode().splitlines()
        if line and not line.startswith("#")
    }
    dashboard = json.loads((REPO_ROOT / "deploy/grafana/dashboards/mesh.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bmesh_\w+", target["expr"])
    }
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in (
        "requests",
        "errors",
        "first token",
        "latency",
        "tokens/s",
        "queue",
        "workers by site",
        "gpu memory",
        "adapter versions",
        "prefix cache hit rate",
    ):
        assert topic in titles, topic


def test_prometheus_reads_the_gateway_with_the_metrics_key(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [gateway] = [job for job in config["scrape_configs"] if job["job_name"] == "gateway"]
    secret_file = Path(gateway["authorization"]["credentials_file"])
    assert secret_file.parent == Path("/run/secrets")
    assert secret_file.name in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"][secret_file.name] == {"environment": "MESH_METRICS_API_KEY"}
