"""Admission hooks: a scheduler's request in, the same plan the API makes, its answer out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.api.model_checks import ModelChecks, ModelChecksDep
from service.api.reads import ReadsDep
from service.api.routes.plans import submit_spec, submitted_plan_id
from service.auth.deps import SubmitterDep
from service.config import Settings
from service.core.deps import SessionDep, SettingsDep
from service.core.principal import Principal
from service.core.problems import ProblemException
from service.integrations import kubernetes
from service.schemas.plan import FINAL
from service.schemas.spec import PlanSpec
from service.store import plans

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
    reads: ReadsDep,
) -> JSONResponse:
    """A workload annotated `trainplan.dev/spec` gets its plan's micro-batch, accumulation and
    learning rate in its containers' environment; an infeasible or failed plan denies it; one
    that is not done within `TRAINPLAN_ADMISSION_WAIT_SECONDS` is admitted unchanged with a
    warning (or denied: `TRAINPLAN_ADMISSION_ON_TIMEOUT=deny`) and answers the next request.
    The wait is the long poll's: on the process's change feed, not a query loop of its own."""
    raw = await request.body()
    try:
        review = kubernetes.parse(raw)
    except kubernetes.MalformedReview as exc:
        verdict = kubernetes.Verdict(False, code=400, message=str(exc))
        return JSONResponse(kubernetes.answer(kubernetes.uid_of(raw), verdict))
    submitted = await run_in_threadpool(_submit, review, principal, session, settings, checks)
    if isinstance(submitted, kubernetes.Verdict):
        return JSONResponse(kubernetes.answer(review.uid, submitted))
    spec, plan_id = submitted
    try:
        async with reads.feed.watch(plan_id) as followed:
            await followed.wait_until(
                lambda s: s is None or s.final, settings.admission_wait_seconds
            )
    except ProblemException:  # the store is away: as if the plan were not done in time
        pass
    verdict = await run_in_threadpool(_verdict, review, spec, plan_id, session, settings)
    return JSONResponse(kubernetes.answer(review.uid, verdict))


def _submit(
    review: kubernetes.Review,
    principal: Principal,
    session: Session,
    settings: Settings,
    checks: ModelChecks,
) -> kubernetes.Verdict | tuple[PlanSpec, str]:
    """The annotated spec submitted as `POST /v1/plans` submits it (the spec and its plan's
    id), or the verdict where there is nothing to plan or the spec is refused."""
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
    return spec, submitted_plan_id(answer, response)


def _verdict(
    review: kubernetes.Review, spec: PlanSpec, plan_id: str, session: Session, settings: Settings
) -> kubernetes.Verdict:
    """The answer for the plan as the store has it now."""
    session.expire_all()
    plan = plans.get_plan(session, plan_id=plan_id)
    if plan is None or plan.status not in FINAL:
        message = f"trainplan: plan {plan_id} is not done yet; apply again to get its settings"
        if settings.admission_on_timeout == "deny":
            return kubernetes.Verdict(False, code=503, message=message)
        return kubernetes.Verdict(True, warnings=[message])
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
