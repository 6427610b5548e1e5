"""GPU catalogue, workers, health, readiness and Prometheus metrics."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text

from service.auth.deps import AdminDep, ReaderDep
from service.core.deps import SessionDep, SettingsDep
from service.schemas.audit import AuditEventOut, AuditPage
from service.schemas.examples import (
    FIDELITY_EXAMPLE,
    GPUS_EXAMPLE,
    METRICS_EXAMPLE,
    WORKERS_EXAMPLE,
    response_example,
)
from service.schemas.plan import PlanStatus
from service.schemas.system import GpuPage, Health, Readiness
from service.schemas.worker import WorkerOut, WorkerPage, WorkerState
from service.store import audit_trail, common, fidelity_stats, plans, registry
from service.store.models import TrialRow
from workers import engine

router = APIRouter()


@router.get(
    "/v1/gpus",
    tags=["catalogue"],
    summary="The simulated device's GPU catalogue",
    responses=response_example(200, GPUS_EXAMPLE),
)
def gpus(_: ReaderDep) -> GpuPage:
    return GpuPage.model_validate({"items": engine.gpus()})


class FidelityRow(BaseModel):
    model: str
    device_kind: str
    device: str | None
    plans: int
    over_predicted: int = Field(description="Plans whose simulated answer was above the real one.")
    mean_abs_relative_error: float | None
    max_abs_relative_error: float | None
    peak_ratio_plans: int = Field(
        default=0, description="Plans whose real and simulated peaks were both known."
    )
    log_peak_ratio_mean: float | None = Field(
        default=None, description="Mean of ln(real / simulated peak) at the real answer."
    )
    log_peak_ratio_sd: float | None = Field(
        default=None, description="Its standard deviation (population)."
    )


class FidelityOut(BaseModel):
    items: list[FidelityRow]


@router.get(
    "/v1/fidelity",
    tags=["catalogue"],
    summary="The simulator against real devices: predicted vs real max micro-batch",
    response_model=FidelityOut,
    responses=response_example(200, FIDELITY_EXAMPLE),
)
def fidelity(_: AdminDep, session: SessionDep) -> FidelityOut:
    """Every plan on a real device (cuda, cpu) first searches its simulated twin; this groups
    their predicted and real answers by model and device."""
    return FidelityOut(items=[FidelityRow(**row) for row in fidelity_stats.fidelity(session)])


@router.get(
    "/v1/workers",
    tags=["workers"],
    summary="Workers, with their last heartbeat and state: busy, idle, stopped or lost",
    response_model=WorkerPage,
    responses=response_example(200, WORKERS_EXAMPLE),
)
def workers(_: AdminDep, session: SessionDep, settings: SettingsDep) -> WorkerPage:
    stale = timedelta(seconds=max(settings.lease_seconds, settings.heartbeat_seconds * 3))
    now = common.now()
    items = []
    for row in registry.list_workers(session):
        worker = WorkerOut.model_validate(row)
        items.append(worker.model_copy(update={"state": worker_state(worker, now - stale)}))
    return WorkerPage(items=items)


def worker_state(worker: WorkerOut, stale_before: datetime) -> WorkerState:
    if worker.stopped:
        return "stopped"
    if worker.heartbeat_at < stale_before:
        return "lost"
    return "busy" if worker.current_plan_id else "idle"


AUDIT_EXAMPLE = {
    "items": [
        {
            "id": 42,
            "at": "2026-11-24T05:00:00Z",
            "tenant": "vision-team",
            "key_id": "0f8c2b1e-8d4e-4a43-9d8e-2b0c6f1f3a11",
            "action": "submit",
            "plan_id": "3d1f6c2a-5b7e-4f0a-9c1d-8e2f4a6b7c90",
        }
    ],
    "next_cursor": None,
}


@router.get(
    "/v1/audit",
    tags=["workers"],
    summary="The audit trail (admin): which key submitted, cancelled, read or followed what",
    response_model=AuditPage,
    responses=response_example(200, AUDIT_EXAMPLE),
)
def audit(
    _: AdminDep,
    session: SessionDep,
    tenant: Annotated[str | None, Query(max_length=100)] = None,
    plan_id: Annotated[str | None, Query(max_length=36)] = None,
    key_id: Annotated[str | None, Query(max_length=36)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,18}$")] = None,
) -> AuditPage:
    """Newest first; written by each API process once a second (TRAINPLAN_AUTH_MODE=keys)."""
    page = audit_trail.audit_events(
        session,
        tenant=tenant,
        plan_id=plan_id,
        key_id=key_id,
        limit=limit,
        cursor=int(cursor) if cursor else None,
    )
    items = [AuditEventOut.model_validate(r) for r in page.items]
    return AuditPage(items=items, next_cursor=page.next_cursor)


@router.get(
    "/healthz",
    tags=["health"],
    summary="Liveness: the process answers",
    responses=response_example(200, {"status": "ok"}),
)
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    tags=["health"],
    summary="Readiness: the database answers and is migrated",
    response_model_exclude_none=True,
    responses=response_example(200, {"status": "ready", "schema": "0009"})
    | response_example(503, {"status": "unavailable", "detail": "connection refused"}, "Not ready"),
)
def readyz(session: SessionDep, response: Response) -> Readiness:
    try:
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:
        response.status_code = 503
        return Readiness(status="unavailable", detail=str(exc).splitlines()[0][:200])
    return Readiness(status="ready", schema_version=version)


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses=response_example(200, METRICS_EXAMPLE, media_type="text/plain"),
)
def metrics(_: AdminDep, session: SessionDep) -> Response:
    depth = plans.queue_depth(session)
    lines = ["# HELP trainplan_plans Plans in the store by status", "# TYPE trainplan_plans gauge"]
    for status in PlanStatus:
        lines.append(f'trainplan_plans{{status="{status}"}} {depth.get(status, 0)}')
    trials = session.execute(select(TrialRow.fits, func.count()).group_by(TrialRow.fits)).all()
    counts = {bool(fits): n for fits, n in trials}
    lines += [
        "# HELP trainplan_store_trials Trials recorded in the store",
        "# TYPE trainplan_store_trials gauge",
        f'trainplan_store_trials{{fits="true"}} {counts.get(True, 0)}',
        "# HELP trainplan_store_ooms Trials that did not fit (OOM) recorded in the store",
        "# TYPE trainplan_store_ooms gauge",
        f"trainplan_store_ooms {counts.get(False, 0)}",
    ]
    body = generate_latest(REGISTRY) + ("\n".join(lines) + "\n").encode()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
