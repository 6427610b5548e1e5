"""How a plan is read for the API: the `PlanOut` view of a row, and the stored serialised form a
finished plan is served from (a plan never changes once it ends, so its response is rendered
once and kept; a GET then reads one column and sends its bytes)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache

from fastapi import Response
from sqlalchemy.orm import Session, sessionmaker

from service.core.problems import ProblemException
from service.schemas.plan import PlanOut, PlanStatus
from service.schemas.result import Trial
from service.store import plans
from service.store.models import Plan

SHOWS_TRIALS = frozenset({PlanStatus.running, PlanStatus.failed, PlanStatus.cancelled})


@cache
def body_schema() -> str:
    """Names the response shape a stored body was rendered in: after an upgrade that changes
    `PlanOut`, stored bodies no longer match and are rendered again on their next read."""
    schema = json.dumps(PlanOut.model_json_schema(), sort_keys=True).encode()
    return hashlib.sha256(schema).hexdigest()[:16]


def plan_out(plan: Plan, session: Session | None = None) -> PlanOut:
    """The plan as the API shows it; with a session, a plan that is running or ended without a
    result also shows its current attempt's trials."""
    out = PlanOut.model_validate(plan)
    if session is not None and plan.status in SHOWS_TRIALS:
        out.trials = [
            Trial.model_validate(t)
            for t in plans.trials_of(session, plan_id=plan.id, attempt=plan.attempts)
        ]
    return out


def not_found(plan_id: str) -> ProblemException:
    return ProblemException(404, "not-found", "Not found", f"no plan {plan_id!r}")


@dataclass(frozen=True)
class PlanBody:
    """A plan's response as JSON bytes, and the status it was read at."""

    status: PlanStatus
    body: bytes

    def response(self, status_code: int = 200, location: str | None = None) -> Response:
        headers = {"Location": location} if location else None
        return Response(self.body, status_code, headers, media_type="application/json")


def plan_body(plan_id: str, factory: sessionmaker[Session], tenant: str | None = None) -> PlanBody:
    """The plan's response, or a 404. A finished plan's comes from its stored form (rendered
    and stored by the first read after it ended); any other's is rendered from the row."""
    with factory() as session:
        row = plans.stored_body(session, plan_id=plan_id, tenant=tenant)
        if row is None:
            raise not_found(plan_id)
        status, body, schema = row
        if body is not None and schema == body_schema():
            return PlanBody(PlanStatus(status), body.encode())
        plan = plans.get_plan(session, plan_id=plan_id)
        if plan is None:  # deleted between the two reads
            raise not_found(plan_id)
        return render(plan, session)


def render(plan: Plan, session: Session) -> PlanBody:
    """Serialise the plan; keep the bytes if it has ended."""
    if plan.body is not None and plan.body_schema == body_schema():
        return PlanBody(PlanStatus(plan.status), plan.body.encode())
    out = plan_out(plan, session)
    text = out.model_dump_json()
    if out.status.final:
        plans.store_body(session, plan_id=plan.id, body=text, schema=body_schema())
    return PlanBody(out.status, text.encode())
