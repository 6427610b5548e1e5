"""The queue as workers see it: claim the next plan, keep its lease, record trials, finish.

The claim is one atomic UPDATE ... RETURNING: on PostgreSQL its subquery takes the oldest queued
row with FOR UPDATE SKIP LOCKED, so N workers never wait on each other nor claim one plan twice;
on SQLite the single statement holds the write lock throughout.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.schemas.plan import PlanStatus
from service.schemas.problem import problem
from service.schemas.result import PlanResult
from service.store.common import now, rows_changed
from service.store.models import Plan, TrialRow
from service.store.plans import get_plan


def claim_next(
    session: Session, *, worker_id: str, lease_seconds: float, device_kinds: tuple[str, ...]
) -> Plan | None:
    """Atomically take a runnable plan (queued, or running with an expired lease): the one
    with the lowest fair key (`fair_key`), which serves tenants in turn, so one tenant's
    backlog cannot starve another's."""
    stamp = now()
    runnable = or_(
        Plan.status == PlanStatus.queued,
        (Plan.status == PlanStatus.running) & (Plan.lease_until < stamp),
    )
    pick = (
        select(Plan.id)
        .where(runnable, Plan.cancel_requested.is_(False), Plan.device_kind.in_(device_kinds))
        .order_by(Plan.fair_key, Plan.seq)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (
        update(Plan)
        .where(Plan.id == pick.scalar_subquery())
        .values(
            status=PlanStatus.running,
            worker_id=worker_id,
            attempts=Plan.attempts + 1,
            lease_until=stamp + timedelta(seconds=lease_seconds),
            started_at=stamp,
            updated_at=stamp,
        )
        .returning(Plan.id)
    )
    plan_id = session.execute(stmt).scalar()
    session.commit()
    return get_plan(session, plan_id=plan_id) if plan_id else None


def fail_exhausted(session: Session, *, max_attempts: int) -> int:
    """Fail plans whose lease ended after their last allowed attempt."""
    stamp = now()
    stmt = (
        update(Plan)
        .where(
            Plan.status == PlanStatus.running,
            Plan.lease_until < stamp,
            Plan.attempts >= max_attempts,
        )
        .values(
            status=PlanStatus.failed,
            finished_at=stamp,
            updated_at=stamp,
            error=problem(
                "worker-lost",
                "Plan abandoned",
                f"the worker holding this plan stopped answering "
                f"{max_attempts} times; the plan was failed",
                500,
            ),
        )
    )
    count = rows_changed(session, stmt=stmt)
    session.commit()
    return int(count or 0)


def extend_lease(session: Session, *, plan_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Heartbeat; False when the plan is no longer ours (lease lost, cancelled elsewhere)."""
    stamp = now()
    stmt = (
        update(Plan)
        .where(Plan.id == plan_id, Plan.worker_id == worker_id, Plan.status == PlanStatus.running)
        .values(lease_until=stamp + timedelta(seconds=lease_seconds), updated_at=stamp)
    )
    ok = rows_changed(session, stmt=stmt) == 1
    session.commit()
    return ok


def is_cancel_requested(session: Session, *, plan_id: str) -> bool:
    return bool(session.scalar(select(Plan.cancel_requested).where(Plan.id == plan_id)))


def add_trial(
    session: Session, *, plan_id: str, attempt: int, index: int, trial: dict[str, Any]
) -> None:
    session.add(
        TrialRow(
            plan_id=plan_id,
            attempt=attempt,
            index=index,
            batch_size=trial["batch_size"],
            fits=trial["fits"],
            peak_bytes=trial["peak_bytes"],
            duration_s=trial["duration_s"],
            phase=trial.get("phase", "search"),
            scenario=trial.get("scenario"),
            reason=trial.get("reason"),
            created_at=now(),
        )
    )
    session.commit()


def finish(
    session: Session,
    *,
    plan_id: str,
    worker_id: str,
    status: str,
    result: PlanResult | None = None,
    error: dict[str, Any] | None = None,
    versions: dict[str, str] | None = None,
    made_with: str | None = None,
) -> bool:
    """Record the end of a plan, only if this worker still holds it (no double finish). The
    columns the lists and fidelity statistics filter on are read off the typed result; the
    worker stamps the `versions` it ran with and their reuse key `made_with` (in a rolling
    upgrade they may differ from the API's that queued the plan)."""
    stamp = now()
    prediction = result.prediction if result is not None else None
    stmt = (
        update(Plan)
        .where(Plan.id == plan_id, Plan.worker_id == worker_id, Plan.status == PlanStatus.running)
        .values(
            status=status,
            result=result.model_dump(mode="json") if result is not None else None,
            error=error,
            finished_at=stamp,
            updated_at=stamp,
            lease_until=None,
            device_name=result.device.name if result is not None else None,
            predicted_max=prediction.predicted_max_micro_batch_size if prediction else None,
            real_max=prediction.real_max_micro_batch_size if prediction else None,
            log_peak_ratio=_log_ratio(prediction.peak_ratio if prediction else None),
            max_micro_batch_size=result.max_micro_batch_size if result is not None else None,
            **({"versions": versions, "reuse_key": made_with} if versions else {}),
        )
    )
    ok = rows_changed(session, stmt=stmt) == 1
    session.commit()
    return ok


def _log_ratio(ratio: float | None) -> float | None:
    return math.log(ratio) if ratio is not None and ratio > 0 else None
