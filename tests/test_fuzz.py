"""Schemathesis against the live OpenAPI schema: every route, generated and mutated inputs.

No response may be a 5xx, and every response must match the schema's declared status codes,
content types and bodies. The app runs without a worker, so submitted plans only queue; long polls
are capped at one second so a fuzzed `?wait=` cannot stall the run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.store.db import upgrade  # noqa: E402

DB_URL = f"sqlite:///{Path(tempfile.mkdtemp(prefix='trainplan-fuzz-')) / 'fuzz.db'}"
upgrade(DB_URL)
APP = create_app(
    Settings(database_url=DB_URL, embedded_worker=False, max_wait_seconds=1.0),
    migrate=False,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_fails_and_keeps_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
