"""Admission hooks: a scheduler's request in, the same plan the API makes, its answer out."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.api.model_checks import ModelChecks, ModelChecksDep
from service.api.routes.plans import submit_spec
from service.auth.deps import SubmitterDep
from service.config import Settings
from service.core.deps import SessionDep, SettingsDep
from service.core.principal import Principal
from service.core.problems import ProblemException
from service.integrations import kubernetes
from service.schemas.plan import FINAL
from service.schemas.spec import PlanSpec
from service.store import plans
from service.store.models import Plan

router = APIRouter(prefix="/v1/integrations", tags=["integrations"])


@router.post(
    "/kubernetes/mutate",
    summary="Kubernetes mutating admission webhook (AdmissionReview v1 in, JSONPatch out)",
)
async def kubernetes_mutate(
    request: Request,
    principal: SubmitterDep,
    session: SessionDep,
    settings: SettingsDep,
    checks: ModelChecksDep,
) -> JSONResponse:
    """A workload annotated `trainplan.dev/spec` gets its plan's micro-batch, accumulation and
    learning rate in its containers' environment; an infeasible or failed plan denies it; one
    that is not done within `TRAINPLAN_ADMISSION_WAIT_SECONDS` is admitted unchanged with a
    warning (or denied: `TRAINPLAN_ADMISSION_ON_TIMEOUT=deny`) and answers the next request."""
    raw = await request.body()
    try:
        review = kubernetes.parse(raw)
    except kubernetes.MalformedReview as exc:
        verdict = kubernetes.Verdict(False, code=400, message=str(exc))
        return JSONResponse(kubernetes.answer(kubernetes.uid_of(raw), verdict))
    verdict = await run_in_threadpool(_admit, review, principal, session, settings, checks)
    return JSONResponse(kubernetes.answer(review.uid, verdict))


def _admit(
    review: kubernetes.Review,
    principal: Principal,
    session: Session,
    settings: Settings,
    checks: ModelChecks,
) -> kubernetes.Verdict:
    text = review.annotations.get(kubernetes.SPEC_ANNOTATION)
    if text is None:
        return kubernetes.Verdict(True)  # not ours: admitted as it is
    try:
        spec = PlanSpec.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        message = f"{kubernetes.SPEC_ANNOTATION}: {where}: {first['msg']}"
        return kubernetes.Verdict(False, code=422, message=message)
    response = Response()
    try:
        answer = submit_spec(response, principal, session, settings, checks, spec, None)
    except ProblemException as exc:
        body = exc.body
        errors = body.get("errors") or []
        detail = "; ".join(f"{e.get('field')}: {e.get('msg')}" for e in errors) or body.get(
            "detail"
        )
        return kubernetes.Verdict(False, code=int(body.get("status", 422)), message=str(detail))
    sent = answer if isinstance(answer, Response) else response  # where Location went
    plan_id = sent.headers["Location"].rsplit("/", 1)[-1]
    plan = _wait(session, plan_id, settings.admission_wait_seconds)
    if plan is None or plan.status not in FINAL:
        message = f"trainplan: plan {plan_id} is not done yet; apply again to get its settings"
        if settings.admission_on_timeout == "deny":
            return kubernetes.Verdict(False, code=503, message=message)
        return kubernetes.Verdict(True, warnings=[message])
    return _verdict(review, plan, spec)


def _wait(session: Session, plan_id: str, seconds: float) -> Plan | None:
    """The plan once it is final, or as it is when the time is up."""
    deadline = time.monotonic() + seconds
    while True:
        session.expire_all()
        plan = plans.get_plan(session, plan_id=plan_id)
        if plan is None or plan.status in FINAL or time.monotonic() >= deadline:
            return plan
        time.sleep(0.1)


def _verdict(review: kubernetes.Review, plan: Plan, spec: PlanSpec) -> kubernetes.Verdict:
    result: dict[str, Any] | None = plan.result
    if result is None:
        error = plan.error or {}
        message = f"trainplan: plan {plan.id} {plan.status}: {error.get('detail', '')}"
        return kubernetes.Verdict(False, code=int(error.get("status", 422)), message=message)
    if not result.get("feasible", True):
        reasons = "; ".join(result.get("suggestions") or []) or "no micro-batch fits"
        message = f"trainplan: plan {plan.id} does not fit: {reasons}"
        return kubernetes.Verdict(False, code=422, message=message[:1000])
    per_node = spec.training.parallelism.gpus_per_node
    return kubernetes.Verdict(True, patch=kubernetes.patch_for(review, plan.id, result, per_node))
