"""The plan resource as the API returns it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.schemas.result import PlanResult, Trial

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class PlanOut(BaseModel):
    id: str
    status: Status
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: dict[str, Any]
    spec_hash: str
    attempts: int = 0
    worker_id: str | None = None
    cancel_requested: bool = False
    error: dict[str, Any] | None = Field(default=None, description="RFC 9457 problem details.")
    result: PlanResult | None = None
    trials: list[Trial] = Field(default_factory=list, description="Trials so far (this attempt).")


class PlanSummary(BaseModel):
    id: str
    status: Status
    created_at: datetime
    finished_at: datetime | None = None
    model: str
    spec_hash: str
    max_micro_batch_size: int | None = None


class PlanPage(BaseModel):
    items: list[PlanSummary]
    next_cursor: str | None = None
