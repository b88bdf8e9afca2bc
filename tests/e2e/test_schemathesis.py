"""Property-based requests from the committed openapi.json against a running gateway:
no 5xx, and every response matches the schema (status, content type, body).

Valid requests (positive) and invalid ones (negative); bounded: a few dozen
examples per operation, generations capped at 8 tokens. Derandomized, so that
every run (and CI) sends the same requests; `make fuzz` (MESH_FUZZ_EXAMPLES, default
2,000 per operation and mode) is the long random pass for hunting bugs.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.launcher import MeshProcesses
from services.paths import REPO_ROOT
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_gateway(mesh: MeshProcesses) -> Iterator[str]:
    """A second gateway on the running mesh with short generations."""
    port = free_port()
    mesh.start_process(
        "gateway-fuzz",
        "gateway",
        {
            "MESH_HTTP_PORT": str(port),
            "MESH_MAX_TOKENS_CAP": "8",
            "MESH_DEFAULT_MAX_TOKENS": "8",
            "MESH_REQUEST_TIMEOUT_S": "60",
            "MESH_LOG_LEVEL": "WARNING",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        probe = MeshProcesses(mesh.env, "127.0.0.1", port)
        probe.wait_ready(60)
        yield url
    finally:
        mesh.stop_process("gateway-fuzz")


def test_no_server_errors_and_responses_match_the_schema(
    mesh: MeshProcesses, fuzz_gateway: str
) -> None:
    # Hypothesis driven directly: schemathesis' pytest plugin does not load on pytest 9.
    document = json.loads((REPO_ROOT / "openapi.json").read_text())
    headers = {"Authorization": f"Bearer {mesh.api_key}"}  # type: ignore[attr-defined]
    operations = [
        result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()
    ]
    assert len(operations) >= 12
    hunting = int(os.environ.get("MESH_FUZZ_EXAMPLES", "0"))  # make fuzz: random draws
    modes = [(GenerationMode.POSITIVE, hunting or 15), (GenerationMode.NEGATIVE, hunting or 10)]
    for operation, (mode, examples) in itertools.product(operations, modes):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=not hunting,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=fuzz_gateway, headers=headers, checks=CHECKS, timeout=60
            )

        try:
            call()
        except Unsatisfiable:
            # Nothing invalid can be sent to an operation that takes no input.
            assert mode is GenerationMode.NEGATIVE, operation.label
