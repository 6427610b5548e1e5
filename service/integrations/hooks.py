"""What every scheduler's admission hook shares: the plan's numbers as a job's environment, its
nodes, and the state of a submitted plan as one outcome each adapter answers in its own
convention (Kubernetes: an AdmissionReview; SkyPilot: a mutated request or a 400; Slurm: the
lines job_submit.lua reads)."""

from __future__ import annotations

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
        error = error if isinstance(error, dict) else {}
        message = f"trainplan: plan {plan_id} {status}: {error.get('detail', '')}"
        return Outcome("failed", plan_id, message, int(error.get("status", 422)))
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


def node_layout(result: dict[str, Any]) -> tuple[int, int]:
    """(nodes, GPUs per node) as the plan's own launch specs lay its world out
    (`configs.launch`, the engine's `layout`): one rule for every scheduler."""
    launch = result["configs"]["launch"]
    return int(launch["nodes"]), int(launch["gpus_per_node"])
