"""The plan resource as the API returns it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import UtcDatetime
from service.schemas.result import PlanResult, Trial


class PlanStatus(StrEnum):
    """A plan's life: queued -> running -> succeeded | failed | cancelled (running again when a
    lease runs out). Member names equal their values, so any driver that adapts an Enum by
    name or by value stores the same text."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({PlanStatus.succeeded, PlanStatus.failed, PlanStatus.cancelled})


class PlanOut(BaseModel):
    """Read from the ORM row (`PlanOut.model_validate(plan)`); `trials` are the current
    attempt's, filled in by the route for a plan that is running or ended without a result."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: PlanStatus
    created_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    spec: dict[str, Any]
    spec_hash: str
    versions: dict[str, str] | None = Field(
        default=None,
        description="The engine, torch and catalogue it was made with: a submit reuses a stored "
        "plan only when they match the server's.",
    )
    attempts: int = 0
    worker_id: str | None = None
    cancel_requested: bool = False
    error: dict[str, Any] | None = Field(default=None, description="RFC 9457 problem details.")
    result: PlanResult | None = None
    trials: list[Trial] = Field(default_factory=list, description="Trials so far (this attempt).")


class PlanSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: PlanStatus
    created_at: UtcDatetime
    finished_at: UtcDatetime | None = None
    model: str = Field(validation_alias="model_name")
    spec_hash: str
    max_micro_batch_size: int | None = None


class PlanPage(BaseModel):
    items: list[PlanSummary]
    next_cursor: str | None = None


class DeliveryOut(BaseModel):
    """One completion webhook of a plan, as the store has it."""

    id: str
    url: str
    state: str = Field(description="waiting (the plan runs), retrying, delivered or failed.")
    attempts: int
    last_status: int | None = Field(default=None, description="The receiver's last HTTP status.")
    last_error: str | None = None
    next_attempt_at: UtcDatetime | None = None
    delivered_at: UtcDatetime | None = None
    created_at: UtcDatetime


class WebhookSecret(BaseModel):
    """How this tenant's completion webhooks are signed."""

    secret: str
    header: str = "Trainplan-Signature"
    scheme: str = Field(
        default="t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + body)>",
        description="Reject a t more than 300 s from now (replays).",
    )
