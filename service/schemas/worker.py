"""The worker resource as `GET /v1/workers` returns it, read straight off the stored row."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from service.schemas.common import UtcDatetime

WorkerState = Literal["alive", "stopped", "lost"]


class WorkerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    hostname: str
    devices: dict[str, Any]
    started_at: UtcDatetime
    heartbeat_at: UtcDatetime
    current_plan_id: str | None = None
    plans_done: int = 0
    stopped: bool = False
    state: WorkerState = "alive"


class WorkerPage(BaseModel):
    items: list[WorkerOut]
