"""The plan result of DESIGN.md: what a succeeded plan answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class DeviceInfo(BaseModel):
    backend: Literal["simulated", "cpu", "cuda"]
    name: str
    memory_bytes: int = Field(description="Capacity the search plans against (before headroom).")


class LrScalingInfo(BaseModel):
    rule: Literal["linear", "sqrt", "none"]
    base_lr: float
    base_batch_size: int
    factor: float
    warmup_steps: int = Field(description="Suggested linear warm-up, in optimizer steps (0: none).")


class MemoryBreakdown(BaseModel):
    """Bytes at the peak of one steady-state training iteration; the parts add up to `peak`."""

    parameters: int
    gradients: int
    optimizer_state: int
    input_batch: int
    activations: int
    temporary: int
    overhead: int
    peak: int
    capacity: int


class Throughput(BaseModel):
    samples_per_second: float
    step_time_s: float = Field(description="One optimizer step (all accumulation micro-steps).")
    epoch_time_s: float
    total_time_s: float = 0.0
    measured: bool
    assumed_utilization: float | None = None
    flops_per_sample: float | None = None


class Trial(BaseModel):
    batch_size: int
    fits: bool
    peak_bytes: int
    duration_s: float
    reason: str | None = None
    phase: Literal["search", "breakdown", "what_if"] = "search"
    scenario: str | None = Field(
        default=None, description="The what-if neighbour this probe belongs to, if any."
    )


class WhatIf(BaseModel):
    """The exact max micro-batch under one neighbouring choice of the spec."""

    change: Literal["precision", "gradient_checkpointing", "gpu"]
    value: str | bool
    device: DeviceInfo
    feasible: bool
    max_micro_batch_size: int
    peak_bytes: int = Field(description="Peak at the max micro-batch (at 1 when infeasible).")
    search_bound_reached: bool = False
    trials: list[Trial]


class PlanWarning(BaseModel):
    code: str
    message: str


class PlanResult(BaseModel):
    feasible: bool = True
    device: DeviceInfo
    max_micro_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    global_batch_size: int
    effective_global_batch_size: int
    learning_rate: float
    lr_scaling: LrScalingInfo
    iterations_per_epoch: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    memory: MemoryBreakdown
    throughput: Throughput | None = None
    trials: list[Trial]
    search_bound_reached: bool = False
    warnings: list[PlanWarning] = Field(default_factory=list)
    suggestions: list[str] = Field(default_factory=list)
    configs: dict[str, Any] = Field(default_factory=dict)
    what_if: list[WhatIf] = Field(
        default_factory=list,
        description="Max micro-batch: other precision, checkpointing toggled, bigger card.",
    )
    model_summary: dict[str, Any] = Field(default_factory=dict)
