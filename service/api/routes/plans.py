"""/v1/plans: submit, read (with long poll), list, cancel, and follow trial by trial over SSE."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.api import limits
from service.api.model_checks import ModelChecks, ModelChecksDep
from service.api.reads import ReadsDep
from service.auth.audit import AuditDep
from service.auth.deps import ReaderDep, SubmitterDep
from service.auth.quotas import SubmitRateDep, tenant_full, too_many
from service.config import Settings
from service.core.deps import JsonBody, SessionDep, SettingsDep
from service.core.principal import Principal
from service.core.problems import ProblemException, field_error, validation_problem
from service.core.webhooks import RefusedTarget, check_target
from service.feed.events import KEEPALIVE, Cursor, events
from service.feed.hub import PlanFeed
from service.feed.plan_views import PlanBody, not_found, plan_body, plan_out, render
from service.schemas.examples import (
    EVENTS_EXAMPLE,
    PAGE_EXAMPLE,
    PLAN_EXAMPLE,
    PLAN_EXAMPLES,
    response_example,
)
from service.schemas.plan import PlanOut, PlanPage, PlanStatus, PlanSummary
from service.schemas.spec import PlanSpec
from service.store import deliveries, plans
from service.store.models import Plan
from workers import engine

router = APIRouter(prefix="/v1/plans", tags=["plans"])

INVALID_EXAMPLE = {
    "type": "https://trainplan.dev/problems/validation-error",
    "title": "The request is invalid",
    "status": 422,
    "detail": "invalid: model.layers.8. Linear cannot take input of shape [64] (per sample)",
    "errors": [
        {
            "loc": ["model", "layers", 8],
            "field": "model.layers.8",
            "msg": "Linear cannot take input of shape [64] (per sample)",
            "type": "spec_error",
        }
    ],
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such plan (problem details)"}
}


def _check_buildable(spec: PlanSpec, checks: ModelChecks, settings: Settings) -> None:
    """What the spec costs (limits), then the engine's checks beyond the schema (the model
    builds on the meta device, the LoRA targets exist, ...): a 422 now, not a failed plan
    later."""
    limits.check_before_build(spec, settings)
    try:
        facts = checks.facts(spec)
        limits.check_built(spec, facts, settings)
        engine.check(spec, facts)
    except engine.SpecError as exc:
        error = field_error(exc.loc, exc.message, "spec_error")
    except ImportError as exc:
        error = field_error(
            ("model", "source"),
            f"this server lacks the package for this source: {exc.name}",
            "missing_dependency",
        )
    else:
        return
    raise ProblemException.from_body(validation_problem([error]))


@router.post(
    "",
    status_code=202,
    response_model=PlanOut,
    summary="Submit a plan",
    dependencies=[JsonBody],
    responses={
        415: {"description": "The body is not sent as application/json (problem details)"},
        **response_example(
            202,
            PLAN_EXAMPLE | {"status": PlanStatus.queued, "result": None},
            "Queued; Location names the plan",
        ),
        **response_example(200, PLAN_EXAMPLE, "The stored plan of the same spec (no new plan)"),
        429: {
            "description": "Over the key's submit rate or the tenant's cap on queued plans "
            "(problem details; Retry-After, RateLimit-* headers)"
        },
        **response_example(
            422,
            INVALID_EXAMPLE,
            "Invalid spec: problem details naming the field",
            "application/problem+json",
        ),
    },
)
def submit_plan(
    response: Response,
    principal: SubmitterDep,
    session: SessionDep,
    settings: SettingsDep,
    checks: ModelChecksDep,
    rate: SubmitRateDep,
    audit: AuditDep,
    spec: Annotated[PlanSpec, Body(openapi_examples=PLAN_EXAMPLES)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> PlanOut | Response:
    """With API keys, each key's submits are rate-limited (RateLimit headers on every answer)."""
    grant = rate.take(principal.key_id) if principal.key_id else None
    if grant is not None and not grant.allowed:
        raise too_many(grant)
    if spec.callback_url is not None:
        _check_callback(spec.callback_url, settings)
    answer = submit_spec(response, principal, session, settings, checks, spec, idempotency_key)
    sent = answer if isinstance(answer, Response) else response  # where the headers go
    plan_id = submitted_plan_id(answer, response)
    if spec.callback_url is not None:
        deliveries.subscribe(
            session, plan_id=plan_id, tenant=principal.tenant, url=spec.callback_url
        )
    audit.record(principal, "submit", plan_id)
    if grant is not None:
        sent.headers.update(grant.headers())
    return answer


def _check_callback(url: str, settings: Settings) -> None:
    """A 422 at `callback_url` for a target the service will not call (or with webhooks off)."""
    if settings.webhook_secret is None:
        message = "webhooks are off on this server (the operator sets TRAINPLAN_WEBHOOK_SECRET)"
    else:
        try:
            check_target(url, allow_private=settings.webhook_allow_private)
            return
        except RefusedTarget as exc:
            message = str(exc)
    error = field_error(("callback_url",), message, "refused_target")
    raise ProblemException.from_body(validation_problem([error]))


def submit_spec(
    response: Response,
    principal: Principal,
    session: Session,
    settings: Settings,
    checks: ModelChecks,
    spec: PlanSpec,
    idempotency_key: str | None,
) -> PlanOut | Response:
    tenant = principal.tenant
    # Idempotency keys are the tenant's own: two tenants may send the same one.
    idempotency = _tenant_key(tenant, idempotency_key) if idempotency_key else None
    if idempotency:
        existing = plans.find_by_idempotency_key(session, key=idempotency)
        if existing is not None:
            return _existing(existing, session)
    spec_hash = spec.spec_hash
    versions = engine.versions()
    reuse_key = plans.reuse_key(spec_hash, versions)
    answer = None
    if not spec.refresh:
        existing = plans.find_reusable(session, reuse_key=reuse_key, tenant=tenant)
        if existing is not None:
            return _existing(existing, session)
        answer = plans.find_answer(
            session, reuse_key=reuse_key
        )  # another tenant's: copied, not shown
    if answer is None:
        active = plans.active_plans(session, tenant=tenant)
        if active >= settings.tenant_max_active:
            raise tenant_full(tenant, active, settings.tenant_max_active)
        _check_buildable(spec, checks, settings)
    for attempt in range(20):  # two submits of one idempotency key at once: one wins
        if attempt:
            time.sleep(0.005 * attempt)
        try:
            plan = plans.create_plan(
                session,
                spec=spec.canonical(),
                spec_hash=spec_hash,
                idempotency_key=idempotency,
                versions=versions,
                reuse_key=reuse_key,
                tenant=tenant,
                answer=answer,
            )
            break
        except IntegrityError:
            session.rollback()
            if idempotency and (found := plans.find_by_idempotency_key(session, key=idempotency)):
                return _existing(found, session)
    else:
        raise ProblemException(503, "busy", "Busy", "could not enqueue the plan; retry")
    if answer is not None:
        return _existing(plan, session)
    response.headers["Location"] = f"/v1/plans/{plan.id}"
    return plan_out(plan)


def submitted_plan_id(answer: PlanOut | Response, response: Response) -> str:
    """The id of the plan `submit_spec` queued or found: its Location, on the stored plan's
    response or on the one `submit_spec` was handed."""
    sent = answer if isinstance(answer, Response) else response
    return sent.headers["Location"].rsplit("/", 1)[-1]


def _tenant_key(tenant: str, idempotency_key: str) -> str:
    return hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).hexdigest()


def _existing(plan: Plan, session: Session) -> Response:
    return render(plan, session).response(200, f"/v1/plans/{plan.id}")


@router.get(
    "",
    response_model=PlanPage,
    summary="List plans, newest first",
    responses=response_example(200, PAGE_EXAMPLE),
)
def list_plans(
    principal: ReaderDep,
    audit: AuditDep,
    session: SessionDep,
    settings: SettingsDep,
    status: PlanStatus | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$")] = None,
) -> Response:
    """Reads only the columns a summary shows, and serialises the page once."""
    audit.record(principal, "list")
    page = plans.list_plans(
        session,
        status=status,
        model=model,
        limit=min(limit, settings.page_size_max),
        cursor=int(cursor) if cursor else None,
        tenant=principal.tenant_filter,
    )
    items = [PlanSummary.model_validate(row) for row in page.items]
    body = PlanPage(items=items, next_cursor=page.next_cursor).model_dump_json()
    return Response(body, media_type="application/json")


@router.get(
    "/{plan_id}",
    response_model=PlanOut,
    responses=NOT_FOUND | response_example(200, PLAN_EXAMPLE),
    summary="Read a plan; ?wait=N long-polls until it ends",
)
async def get_plan(
    plan_id: str,
    principal: ReaderDep,
    audit: AuditDep,
    reads: ReadsDep,
    wait: Annotated[float, Query(ge=0, le=3600)] = 0,
) -> Response:
    """A finished plan is served from its stored serialised form. A long poll waits on the
    process's change feed (no query of its own while it waits) and is answered with the
    stored form the feed read once for all its waiters."""
    tenant = principal.tenant_filter
    view = await run_in_threadpool(plan_body, plan_id, reads.factory, tenant)
    audit.record(principal, "read", plan_id)
    timeout = min(wait, reads.settings.max_wait_seconds)
    if view.status.final or timeout <= 0:
        return view.response()
    async with reads.feed.watch(plan_id) as followed:
        state = await followed.wait_until(lambda s: s is None or s.final, timeout)
    if state is not None and state.final_body is not None:
        return PlanBody(state.status, state.final_body).response()
    view = await run_in_threadpool(plan_body, plan_id, reads.factory, tenant)
    return view.response()


@router.post(
    "/{plan_id}/cancel",
    response_model=PlanOut,
    status_code=202,
    responses=NOT_FOUND
    | response_example(202, PLAN_EXAMPLE | {"status": PlanStatus.cancelled, "result": None})
    | {409: {"description": "The plan already succeeded or failed (problem details)"}},
    summary="Cancel: a queued plan at once, a running one at its next trial; 409 once ended",
)
def cancel_plan(
    plan_id: str, principal: SubmitterDep, audit: AuditDep, session: SessionDep
) -> PlanOut:
    plan = plans.request_cancel(session, plan_id=plan_id, tenant=principal.tenant_filter)
    if plan is None:
        raise not_found(plan_id)
    if plan.status in (PlanStatus.succeeded, PlanStatus.failed):
        raise ProblemException(
            409,
            "plan-ended",
            "The plan has ended",
            f"plan {plan_id} has already {plan.status}: there is nothing to cancel",
        )
    audit.record(principal, "cancel", plan_id)
    return plan_out(plan, session)


@router.get(
    "/{plan_id}/events",
    responses=NOT_FOUND
    | response_example(200, EVENTS_EXAMPLE, media_type="text/event-stream")
    | {204: {"description": "Last-Event-ID names the end of a plan that has ended"}},
    summary="Server-sent events: one `trial` per probe, then one `end`; resumes at Last-Event-ID",
    response_class=StreamingResponse,
)
async def plan_events(
    plan_id: str,
    principal: ReaderDep,
    audit: AuditDep,
    reads: ReadsDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    status = await run_in_threadpool(_status_of, reads.factory, plan_id, principal.tenant_filter)
    audit.record(principal, "stream", plan_id)
    cursor = Cursor.parse(last_event_id)
    if cursor.ended and status.final:
        return Response(status_code=204)  # tells EventSource not to reconnect
    return StreamingResponse(
        _event_stream(plan_id, reads.feed, cursor, reads.settings.keepalive_seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _status_of(factory: sessionmaker[Session], plan_id: str, tenant: str | None) -> PlanStatus:
    with factory() as session:
        row = plans.follow(session, plan_id=plan_id, tenant=tenant)
    if row is None:
        raise not_found(plan_id)
    return PlanStatus(row[0])


async def _event_stream(
    plan_id: str, feed: PlanFeed, cursor: Cursor, keepalive: float
) -> AsyncIterator[bytes]:
    """Follows the plan on the process's change feed: events as its state moves, a comment
    when idle (which also finds a client that has gone)."""
    try:
        async with feed.watch(plan_id) as followed:
            while (state := followed.state) is not None:
                version = followed.version
                for chunk in events(state, cursor):
                    yield chunk
                if state.final:
                    return
                if not await followed.wait(version, keepalive):
                    yield KEEPALIVE
    except ProblemException:  # gone between the check and the first read
        return
