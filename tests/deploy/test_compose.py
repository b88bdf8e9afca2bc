"""docker-compose.yml, its Dockerfiles and the observe profile's files. There is no
Docker engine here: the file is validated against the Compose Specification's JSON
schema (vendored by check-jsonschema) and the facts that matter are checked."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import tarfile
import tomllib
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.paths import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"

# What a 7B needs in a llama.cpp CPU worker (k8s/README.md, "Sizing the CPU worker").
GiB = 1 << 30
GGUF_BYTES_7B = {"f16": 14.5e9, "q8_0": 7.7e9, "q4_k_m": 4.4e9}  # Mistral 7B's GGUF files
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V x 32 layers x 8 KV heads x 128 x f16
HOST_MEMORY, HOST_CORES = 16 * GiB, 8  # the host the CPU workers are sized for


def cpu_worker_memory_need(quant: str, context: int, capacity: int) -> float:
    """Weights + the KV cache of every slot's context + ~1 GiB (compute buffer, Python)."""
    return GGUF_BYTES_7B[quant] + KV_BYTES_PER_TOKEN * context * capacity + GiB


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


def interpolated_default(value: Any) -> str:
    """`${VAR:-default}` as compose reads it with VAR unset; anything else as it is."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def compose_bytes(value: str) -> int:
    """Compose's byte values (docker's units: binary, b/k/m/g suffixes)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", value.strip().lower())
    assert match, value
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def compose_seconds(value: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def test_the_cpu_worker_runs_llamacpp_sized_for_a_7b_on_16_gb(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-cpu"]
    env = {k: interpolated_default(v) for k, v in worker["environment"].items()}
    assert (env["MESH_BACKEND"], env["MESH_LLAMACPP_QUANT"]) == ("llamacpp", "q4_k_m")
    assert int(env["MESH_LLAMACPP_THREADS"]) == HOST_CORES
    context, capacity = int(env["MESH_LLAMACPP_CONTEXT"]), int(env["MESH_CAPACITY"])
    assert context >= 4096 and capacity >= 2
    limit = compose_bytes(interpolated_default(worker["deploy"]["resources"]["limits"]["memory"]))
    need = cpu_worker_memory_need(env["MESH_LLAMACPP_QUANT"], context, capacity)
    # Redis, RabbitMQ, the gateway, context sync and the OS keep ~4 GiB of the host.
    assert need <= limit <= HOST_MEMORY - 4 * GiB, (need / GiB, limit / GiB)
    # It writes the base model's GGUF into the registry at its first start.
    [adapters] = [v for v in worker["volumes"] if v.split(":")[1] == "/data/adapters"]
    assert adapters.split(":")[2:] in ([], ["rw"]), adapters
    # ... which converts a 7B for 10-20 minutes before the model loads.
    assert compose_seconds(worker["healthcheck"]["start_period"]) >= 30 * 60


def dockerfile_stages(text: str) -> list[tuple[str, list[str]]]:
    """Each stage: its name and its instructions (lines joined, comments dropped, the
    global ARGs' ${NAME}s resolved to their defaults)."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instructions.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[tuple[str, list[str]]] = []
    for instruction in instructions:
        keyword, _, rest = instruction.partition(" ")
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), rest)
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = resolved.split()
            stages.append((words[2] if len(words) == 3 else f"stage-{len(stages)}", []))
        else:
            stages[-1][1].append(f"{keyword} {resolved}")
    return stages


def test_the_cpu_image_builds_llamacpp_portably_and_carries_the_converter(
    tmp_path: Path,
) -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    [version] = re.findall(r"^LLAMACPP_VERSION := (\S+)$", makefile, re.MULTILINE)
    [cmake_args] = re.findall(r'CMAKE_ARGS="([^"]+)"', makefile)
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["llamacpp"]
    assert f"llama-cpp-python=={version}" in extra
    assert any(d.startswith("sentencepiece==") for d in extra)  # Mistral's tokenizer.model
    stages = dockerfile_stages((REPO_ROOT / "deploy/docker/Dockerfile").read_text())
    runs = {name: " ".join(i for i in body if i.startswith("RUN ")) for name, body in stages}
    [wheel_stage] = [name for name, run in runs.items() if "pip wheel" in run]
    built = runs[wheel_stage]
    # The Makefile's portable build of the extra's version, the pip cache kept between builds.
    assert f"llama-cpp-python=={version}" in built and f'CMAKE_ARGS="{cmake_args}"' in built
    assert "--mount=type=cache,target=/root/.cache/pip" in built
    assert "build-essential" in built and "cmake" in built
    final_name, final = stages[-1]
    assert final_name != wheel_stage and "build-essential" not in runs[final_name]
    assert "libgomp1" in runs[final_name]  # llama.cpp's OpenMP runtime
    # The project installs with the extra from the wheel the stage built, never PyPI's sdist.
    [(installed, install)] = [(n, i) for n, b in stages for i in b if "'.[llamacpp]'" in i]
    [wheels] = re.findall(r"--find-links (\S+)", install)
    assert f"COPY --from={wheel_stage} {wheels} {wheels}" in dict(stages)[installed]
    assert f"COPY --from={installed} /opt/venv /opt/venv" in final
    assert "--only-binary llama-cpp-python" in install
    # The converter: copied into the image from the wheel stage, and pointed at.
    env = dict(
        word.split("=", 1)
        for instruction in final
        if instruction.startswith("ENV ")
        for word in shlex.split(instruction)[1:]
    )
    source = env["MESH_LLAMACPP_SOURCE"]
    assert f"COPY --from={wheel_stage} {source} {source}" in final
    # The wheel stage's extraction, run on a stand-in sdist laid out as the real one.
    [extract] = [i for i in dict(stages)[wheel_stage] if "tar -x" in i]
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp"
    members = {
        f"{prefix}/convert_hf_to_gguf.py": "",
        f"{prefix}/convert_lora_to_gguf.py": "",
        f"{prefix}/conversion/__init__.py": "",
        f"{prefix}/gguf-py/gguf/__init__.py": "",
        f"{prefix}/ggml/src/ggml.c": "",  # the C sources stay behind
        f"llama_cpp_python-{version}/llama_cpp/__init__.py": "",
    }
    sdist_dir = tmp_path / "sdist"
    sdist_dir.mkdir()
    with tarfile.open(sdist_dir / f"llama_cpp_python-{version}.tar.gz", "w:gz") as sdist:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            sdist.addfile(info, io.BytesIO(text.encode()))
    out = tmp_path / "converter"
    command = extract.removeprefix("RUN ").replace("/sdist/", f"{sdist_dir}/")
    ran = subprocess.run(
        ["sh", "-ec", command.replace(source, str(out))],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "LLAMACPP_VERSION": version},
        check=False,
    )
    assert ran.returncode == 0, ran.stderr or command
    extracted = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert extracted == {
        "convert_hf_to_gguf.py",
        "convert_lora_to_gguf.py",
        "conversion/__init__.py",
        "gguf-py/gguf/__init__.py",
    }


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


def test_the_cpu_image_serves_the_phone_runtime_from_the_lockfile() -> None:
    """The gateway serves wllama from gateway/web/vendor/node_modules: the image puts
    `npm ci`'s output there (nothing comes from a CDN at run time)."""
    from gateway.web_routes import WLLAMA

    stages = dockerfile_stages((REPO_ROOT / "deploy/docker/Dockerfile").read_text())
    [(vendor, body)] = [(n, b) for n, b in stages if any("npm ci" in i for i in b)]
    assert any("package-lock.json" in i for i in body if i.startswith("COPY "))
    target = "/app/" + str(WLLAMA.relative_to(REPO_ROOT)).split("/node_modules")[0]
    assert any(
        i.startswith(f"COPY --from={vendor} ") and i.endswith(f"{target}/node_modules")
        for i in stages[-1][1]
    ), stages[-1][1]
    lock = json.loads((REPO_ROOT / "gateway/web/vendor/package-lock.json").read_text())
    package = json.loads((REPO_ROOT / "gateway/web/vendor/package.json").read_text())
    pinned = package["dependencies"]["@wllama/wllama"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned)  # an exact version, not a range
    locked = lock["packages"]["node_modules/@wllama/wllama"]
    assert locked["version"] == pinned and locked["integrity"].startswith("sha512-")
