"""RabbitMQ definitions for a deployed broker: the mesh's user (from secrets, stored
as a salted SHA-256 hash the way RabbitMQ stores it), its vhost and permissions, and
the exchanges every service declares. No guest user: a broker that imports
definitions at boot does not create it.

    MESH_RABBITMQ_USER=mesh MESH_RABBITMQ_PASSWORD=… \\
        python -m services.rabbitmq_definitions --out /definitions/definitions.json

docker-compose runs this once before RabbitMQ starts (the `rabbitmq-definitions`
service); k8s runs it as the StatefulSet's init container.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from services.bus import Topology


def password_hash(password: str, salt: bytes | None = None) -> str:
    """rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(
    user: str, password: str, namespace: str = "mesh", vhost: str = "/"
) -> dict[str, Any]:
    topology = Topology(namespace, "mistral")
    exchanges = [
        (topology.jobs_exchange, "direct"),
        (topology.control_exchange, "fanout"),
        (topology.adapters_exchange, "fanout"),
        (topology.context_exchange, "topic"),
    ]
    return {
        "users": [
            {
                "name": user,
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"],
            }
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        ],
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": kind,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for name, kind in exchanges
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.rabbitmq_definitions")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--namespace", default=os.environ.get("MESH_NAMESPACE", "mesh"))
    args = parser.parse_args(argv)
    user = os.environ.get("MESH_RABBITMQ_USER", "")
    password = os.environ.get("MESH_RABBITMQ_PASSWORD", "")
    if not user or user == "guest":
        print("rabbitmq definitions: set MESH_RABBITMQ_USER (not guest)", file=sys.stderr)
        return 1
    if len(password) < 12 or "change" in password.lower():
        print(
            "rabbitmq definitions: MESH_RABBITMQ_PASSWORD must be at least 12 characters "
            "and not the example's placeholder",
            file=sys.stderr,
        )
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.with_suffix(".tmp")
    staging.write_text(json.dumps(definitions(user, password, args.namespace), indent=2))
    staging.chmod(0o644)  # RabbitMQ's own user reads it
    os.replace(staging, args.out)
    print(f"rabbitmq definitions: user {user}, written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
