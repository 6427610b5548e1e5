"""The simulator against real devices, from finished real-device plans.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.schemas.plan import PlanStatus
from service.store.models import Plan


def fidelity(session: Session) -> list[dict[str, Any]]:
    """Simulated against real max micro-batch over finished real-device plans, per model and
    device: how many, how often the simulation over-predicted, the mean and worst error; and
    ln(real / simulated peak) as count, mean and standard deviation (sufficient for a normal
    fit: what `bench.calibrate --fidelity` adds to the plans' risk)."""
    error = (func.abs(Plan.predicted_max - Plan.real_max) * 1.0) / func.nullif(Plan.real_max, 0)
    over = func.sum(case((Plan.predicted_max > Plan.real_max, 1), else_=0))
    x = Plan.log_peak_ratio
    rows = session.execute(
        select(
            Plan.model_name,
            Plan.device_kind,
            Plan.device_name,
            func.count(),
            over,
            func.avg(error),
            func.max(error),
            func.count(x),
            func.avg(x),
            func.avg(x * x),
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
            "peak_ratio_plans": int(ratios),
            "log_peak_ratio_mean": None if ratios == 0 else float(first),
            "log_peak_ratio_sd": None if ratios == 0 else _sd(float(first), float(second)),
        }
        for model, kind, device, count, over_count, mean, worst, ratios, first, second in rows
    ]


def _sd(mean: float, mean_of_squares: float) -> float:
    """Population standard deviation from E[x] and E[x^2] (clamped: rounding can dip below 0)."""
    return math.sqrt(max(0.0, mean_of_squares - mean * mean))
