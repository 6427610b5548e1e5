"""The simulator against real devices, from finished real-device plans.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.schemas.plan import PlanStatus
from service.store.models import Plan


def fidelity(session: Session) -> list[dict[str, Any]]:
    """Simulated against real max micro-batch over finished real-device plans, per model and
    device: how many, how often the simulation over-predicted, the mean and worst error."""
    error = (func.abs(Plan.predicted_max - Plan.real_max) * 1.0) / func.nullif(Plan.real_max, 0)
    over = func.sum(case((Plan.predicted_max > Plan.real_max, 1), else_=0))
    rows = session.execute(
        select(
            Plan.model_name,
            Plan.device_kind,
            Plan.device_name,
            func.count(),
            over,
            func.avg(error),
            func.max(error),
        )
        .where(Plan.status == PlanStatus.succeeded, Plan.real_max.is_not(None))
        .group_by(Plan.model_name, Plan.device_kind, Plan.device_name)
        .order_by(Plan.model_name, Plan.device_name)
    ).all()
    return [
        {
            "model": model,
            "device_kind": kind,
            "device": device,
            "plans": count,
            "over_predicted": int(over_count or 0),
            "mean_abs_relative_error": None if mean is None else float(mean),
            "max_abs_relative_error": None if worst is None else float(worst),
        }
        for model, kind, device, count, over_count, mean, worst in rows
    ]
