"""Admission hooks: a scheduler's request in, the same plan the API makes, its answer out in the
scheduler's own convention. Each adapter (service/integrations/) reads its request and writes
its answer; the flow between is shared: the spec submitted as `POST /v1/plans` submits it (a
known spec reuses its plan), a wait on the process's change feed bounded by
`TRAINPLAN_ADMISSION_WAIT_SECONDS`, then the plan as the store has it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.api.model_checks import ModelChecks, ModelChecksDep
from service.api.reads import PlanReads, ReadsDep
from service.api.routes.plans import submit_spec, submitted_plan_id
from service.auth.deps import SubmitterDep
from service.config import Settings
from service.core.deps import SessionDep, SettingsDep
from service.core.principal import Principal
from service.core.problems import ProblemException
from service.integrations import kubernetes, skypilot, slurm
from service.integrations.hooks import Outcome, outcome_of
from service.schemas.spec import PlanSpec
from service.store import plans

router = APIRouter(prefix="/v1/integrations", tags=["integrations"])


@dataclass(frozen=True)
class Refusal:
    """A spec the hook cannot plan: its reason and the status the API would have answered."""

    code: int
    message: str


@dataclass(frozen=True)
class Hook:
    """What every adapter's route gets: the caller and the service's pieces."""

    principal: Principal
    session: Session
    settings: Settings
    checks: ModelChecks
    reads: PlanReads

    async def plan(self, text: str, where: str) -> Refusal | Outcome:
        """Submit the spec `text` (found at `where`, for messages) and wait for its plan."""
        plan_id = await run_in_threadpool(self._submit, text, where)
        if isinstance(plan_id, Refusal):
            return plan_id
        try:
            async with self.reads.feed.watch(plan_id) as followed:
                await followed.wait_until(
                    lambda s: s is None or s.final, self.settings.admission_wait_seconds
                )
        except ProblemException:  # the store is away: as if the plan were not done in time
            pass
        return await run_in_threadpool(self._outcome, plan_id)

    def _submit(self, text: str, where: str) -> Refusal | str:
        """The id of the plan the spec submitted (queued or reused), or why it was refused."""
        try:
            spec = PlanSpec.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "spec"
            return Refusal(422, f"{where}: {field}: {first['msg']}")
        response = Response()
        try:
            answer = submit_spec(
                response, self.principal, self.session, self.settings, self.checks, spec, None
            )
        except ProblemException as exc:
            body = exc.body
            errors = body.get("errors") or []
            detail = "; ".join(f"{e.get('field')}: {e.get('msg')}" for e in errors)
            return Refusal(int(body.get("status", 422)), str(detail or body.get("detail")))
        return submitted_plan_id(answer, response)

    def _outcome(self, plan_id: str) -> Outcome:
        self.session.expire_all()
        plan = plans.get_plan(self.session, plan_id=plan_id)
        if plan is None:
            return outcome_of(plan_id, None, None, None)
        return outcome_of(plan.id, plan.status, plan.result, plan.error)


def _hook(
    principal: SubmitterDep,
    session: SessionDep,
    settings: SettingsDep,
    checks: ModelChecksDep,
    reads: ReadsDep,
) -> Hook:
    return Hook(principal, session, settings, checks, reads)


HookDep = Annotated[Hook, Depends(_hook)]


@router.post(
    "/kubernetes/mutate",
    summary="Kubernetes mutating admission webhook (AdmissionReview v1 in, JSONPatch out)",
)
async def kubernetes_mutate(request: Request, hook: HookDep) -> JSONResponse:
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
    text = review.annotations.get(kubernetes.SPEC_ANNOTATION)
    if text is None:  # not ours: admitted as it is
        return JSONResponse(kubernetes.answer(review.uid, kubernetes.Verdict(True)))
    outcome = await hook.plan(text, kubernetes.SPEC_ANNOTATION)
    if isinstance(outcome, Refusal):
        verdict = kubernetes.Verdict(False, code=outcome.code, message=outcome.message)
        return JSONResponse(kubernetes.answer(review.uid, verdict))
    if outcome.kind == "planned":
        assert outcome.result is not None
        patch = kubernetes.patch_for(review, outcome.plan_id, outcome.result)
        verdict = kubernetes.Verdict(True, patch=patch)
    elif outcome.kind == "pending" and hook.settings.admission_on_timeout == "allow":
        verdict = kubernetes.Verdict(True, warnings=[outcome.message])
    else:
        verdict = kubernetes.Verdict(False, code=outcome.code, message=outcome.message)
    return JSONResponse(kubernetes.answer(review.uid, verdict))


@router.post(
    "/skypilot/policy",
    summary="SkyPilot admin policy (RestfulAdminPolicy: a user request in, the mutated one out)",
    response_class=JSONResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "string",
                        "description": "SkyPilot's UserRequest.encode(): the JSON text of "
                        "{task, skypilot_config, request_name, ...}, the first two YAML texts",
                    }
                }
            },
        }
    },
    responses={
        200: {"description": "The mutated request: a JSON string of the task's and config's YAML"},
        400: {
            "description": "Rejected: SkyPilot shows the text as the reason",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    },
)
async def skypilot_policy(request: Request, hook: HookDep) -> Response:
    """A task whose `envs` carry `TRAINPLAN_SPEC` gets the plan's accelerators per node,
    `num_nodes`, its numbers in `envs` and (where it has none) the plan's torchrun `run`; a task
    without one passes unchanged. A refused spec, an infeasible or failed plan, and a plan not
    done within `TRAINPLAN_ADMISSION_WAIT_SECONDS` (with a retry hint: the plan is reused
    when the request comes again) are 400s, which SkyPilot shows as the rejection's reason."""
    try:
        task, config = skypilot.parse(await request.body())
    except skypilot.MalformedRequest as exc:
        return PlainTextResponse(f"trainplan: {exc}", status_code=400)
    text = skypilot.spec_text(task)
    if text is None:
        return Response(skypilot.encode(task, config), media_type="application/json")
    outcome = await hook.plan(text, f"envs.{skypilot.SPEC_ENV}")
    if isinstance(outcome, Refusal):
        return PlainTextResponse(f"trainplan: {outcome.message}", status_code=400)
    if outcome.kind != "planned":
        hint = " (retry in a minute)" if outcome.kind == "pending" else ""
        return PlainTextResponse(outcome.message + hint, status_code=400)
    assert outcome.result is not None
    changed = skypilot.mutated(task, outcome.plan_id, outcome.result)
    return Response(skypilot.encode(changed, config), media_type="application/json")


@router.post(
    "/slurm/submit",
    summary="Slurm job_submit.lua: a plan spec in, key=value lines out",
    response_class=PlainTextResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PlanSpec"}}},
        }
    },
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        422: {
            "description": "A spec the hook cannot plan: decision=reject and the field",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    },
)
async def slurm_submit(request: Request, hook: HookDep) -> PlainTextResponse:
    """The body is the spec a batch script's `#TRAINPLAN` line carries (JSON). The answer is
    `key=value` lines for deploy/slurm/job_submit.lua: `decision` accept | reject | pending,
    and for accept the job's nodes, GPUs per node and the plan's environment; a spec that
    cannot be planned is a 422 (or the API's own status) with decision=reject."""
    raw = await request.body()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        refused = slurm.refused("trainplan: the spec is not UTF-8 text")
        return PlainTextResponse(refused, status_code=422)
    outcome = await hook.plan(text, "#TRAINPLAN")
    if isinstance(outcome, Refusal):  # the hook reads the lines whatever the status
        refused = slurm.refused(f"trainplan: {outcome.message}")
        return PlainTextResponse(refused, status_code=outcome.code)
    return PlainTextResponse(slurm.lines(outcome))
