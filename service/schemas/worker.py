"""The worker resource as `GET /v1/workers` returns it, read straight off the stored row."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from service.schemas.common import UtcDatetime

# busy: heartbeat fresh, running a plan; idle: fresh, waiting for one; stopped: shut down
# cleanly; lost: no heartbeat for longer than a lease (its plans are claimed again).
WorkerState = Literal["busy", "idle", "stopped", "lost"]


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
    state: WorkerState = "idle"


class WorkerPage(BaseModel):
    items: list[WorkerOut]
