"""What every scheduler's admission hook shares: the plan's numbers as a job's environment, its
nodes, and the state of a submitted plan as one outcome each adapter answers in its own
convention (Kubernetes: an AdmissionReview; SkyPilot: a mutated request or a 400; Slurm: the
lines job_submit.lua reads)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from service.schemas.plan import FINAL

OutcomeKind = Literal["planned", "pending", "failed", "infeasible"]


@dataclass(frozen=True)
class Outcome:
    """A submitted plan as a hook sees it when its wait ends."""

    kind: OutcomeKind
    plan_id: str
    message: str = ""
    code: int = 200
    result: dict[str, Any] | None = None  # planned: the plan's result


def outcome_of(plan_id: str, status: str | None, result: Any, error: Any) -> Outcome:
    """The outcome of plan `plan_id` in the store's state (`status` None: gone)."""
    if status is None or status not in FINAL:
        return Outcome(
            "pending",
            plan_id,
            f"trainplan: plan {plan_id} is not done yet; submit again to get its settings",
            503,
        )
    if not isinstance(result, dict):
        detail = (error or {}).get("detail", "") if isinstance(error, dict) else ""
        code = int((error or {}).get("status", 422)) if isinstance(error, dict) else 422
        return Outcome("failed", plan_id, f"trainplan: plan {plan_id} {status}: {detail}", code)
    if not result.get("feasible", True):
        reasons = "; ".join(result.get("suggestions") or []) or "no micro-batch fits"
        message = f"trainplan: plan {plan_id} does not fit: {reasons}"
        return Outcome("infeasible", plan_id, message[:1000], 422)
    return Outcome("planned", plan_id, result=result)


def plan_env(plan_id: str, result: dict[str, Any]) -> dict[str, str]:
    """The variables the generated loop and the launch specs read."""
    return {
        "MICRO_BATCH_SIZE": str(result["micro_batch_size"]),
        "GRAD_ACCUM_STEPS": str(result["accumulation_steps"]),
        "LEARNING_RATE": repr(float(result["learning_rate"])),
        "TRAINPLAN_PLAN_ID": plan_id,
    }


def node_layout(result: dict[str, Any], gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node) of the plan's world: whole nodes once it outgrows one."""
    world = int(result.get("world_size") or 1)
    per_node = min(gpus_per_node, world)
    return math.ceil(world / per_node), per_node
