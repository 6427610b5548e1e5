"""Schemathesis against the live OpenAPI schema, with API keys on and all of its checks: every
route, generated and mutated inputs.

No response may be a 5xx; every response must match the schema's declared status codes, headers,
content types and bodies; invalid data is rejected, a 405 names every method served, a missing
or wrong token is a 401. One check is left out for one operation: `positive_data_acceptance` on
`POST /v1/plans`, because whether a model spec is valid depends on what JSON Schema cannot say (a
layer list's shapes must chain, a transformers config must build); such a spec is a 422 naming
the field, never a 5xx, which the other checks hold it to. Likewise SkyPilot's admin policy,
whose body is a JSON string holding YAML (a string that is not one is SkyPilot's 400
rejection, as its convention wants). The app runs without a worker, so
submitted plans only queue; long polls are capped at one second so a fuzzed `?wait=` cannot stall
the run, and the admission hooks wait 50 ms for their plans.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402

from service.api.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.store import keys  # noqa: E402
from service.store.db import make_engine, make_session_factory, upgrade  # noqa: E402

DB_URL = f"sqlite:///{Path(tempfile.mkdtemp(prefix='trainplan-fuzz-')) / 'fuzz.db'}"
upgrade(DB_URL)
# API keys, as the compose file and manifests run: one tenant's admin key
with make_session_factory(make_engine(DB_URL))() as _session:
    TOKEN, _ = keys.issue_key(_session, tenant="fuzz", scopes=["submit", "read", "admin"])
APP = create_app(
    Settings(
        database_url=DB_URL,
        embedded_worker=False,
        max_wait_seconds=1.0,
        admission_wait_seconds=0.05,  # the hooks' wait for a plan no worker runs here
        auth_mode="keys",
        submit_rate_per_minute=1_000_000,
    ),
    migrate=False,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
load_all_checks()


@schema.auth()
class BearerToken:
    """The key, set the way schemathesis knows of (so its auth checks can remove or spoil it)."""

    def get(self, case: schemathesis.Case, context: object) -> str:
        return TOKEN

    def set(self, case: schemathesis.Case, data: str, context: object) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


SEMANTIC_PATHS = (
    "/v1/plans",
    "/v1/integrations/slurm/submit",  # the same spec, as Slurm's hook sends it
    "/v1/integrations/skypilot/policy",
)
ALL_CHECKS = CHECKS.get_all()
SEMANTIC = [check for check in ALL_CHECKS if check.__name__ == "positive_data_acceptance"]


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_fails_and_keeps_its_schema(case: schemathesis.Case) -> None:
    semantic = case.operation.method.upper() == "POST" and case.operation.path in SEMANTIC_PATHS
    case.call_and_validate(
        checks=ALL_CHECKS,
        excluded_checks=SEMANTIC if semantic else None,
    )
