"""The catalogue, health and readiness resources: typed, so the OpenAPI document says what
each route answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GpuOut(BaseModel):
    """One card of the simulated device's catalogue."""

    name: str
    memory_bytes: int = Field(description="Usable memory: the card's less what the driver keeps.")
    memory_gib: float
    memory_source: str
    tflops: dict[str, float | None] = Field(
        description="Dense peak TFLOP/s by precision (datasheet); null: the card lacks it."
    )
    measured_matmul_tflops: dict[str, float | None]
    bandwidth_gbs: float
    architecture: str
    compute_capability: str
    supports_bf16: bool
    supports_tf32: bool


class GpuPage(BaseModel):
    items: list[GpuOut]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    status: Literal["ready", "unavailable"]
    schema_version: str | None = Field(default=None, alias="schema")
    detail: str | None = None
