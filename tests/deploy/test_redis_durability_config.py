"""Redis runs with AOF wherever the mesh is deployed (the context tiers live there)."""

from __future__ import annotations

from typing import Any

import yaml

from services.paths import REPO_ROOT


def aof_flags(args: list[str]) -> dict[str, str]:
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    return {k: v for k, v in pairs.items() if k in ("--appendonly", "--appendfsync")}


def test_compose_runs_redis_with_aof_on_a_volume() -> None:
    compose: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    assert redis["command"][0] == "redis-server"
    assert aof_flags(redis["command"]) == {"--appendonly": "yes", "--appendfsync": "everysec"}
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_k8s_runs_redis_with_aof_on_a_persistent_volume() -> None:
    documents = list(yaml.safe_load_all((REPO_ROOT / "k8s" / "base" / "redis.yaml").read_text()))
    [statefulset] = [d for d in documents if d["kind"] == "StatefulSet"]
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    assert aof_flags(container["args"]) == {"--appendonly": "yes", "--appendfsync": "everysec"}
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    password = container["env"][0]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "mesh-secrets", "key": "redis-password"}  # never inline
