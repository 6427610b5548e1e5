"""The audit trail as `GET /v1/audit` returns it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from service.schemas.common import UtcDatetime


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: UtcDatetime
    tenant: str
    key_id: str | None = None
    action: Literal["submit", "cancel", "read", "list", "stream"]
    plan_id: str | None = None


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None = None
