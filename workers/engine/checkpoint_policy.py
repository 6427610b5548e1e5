"""`training.checkpointing.auto`: the checkpointing policy with the least recompute that fits.

Block policies, from the least recompute to the most memory saved: none, one block in 4, one in 2
(torchtitan's selective_ac_option), every block, every block with its saved inputs offloaded
(offload.py). Op-selective (every block keeps its matmul and attention outputs and recomputes
only the ops between them) is off that line: it recomputes no matmul, but every block's
pointwise ops, which is less than one whole block in 4 where matmuls dominate a block (an 8B
model) and more where they do not (a model a few hundred wide). So when the first block policy
that qualifies recomputes something, op-selective is planned too, and of the two that qualify
the one whose plan recomputes less per sample (`throughput.split.recompute_s`) is chosen.
so the policy only has to fit the micro-batch that needs no accumulation (the global batch per
data-parallel rank); where no policy fits that, it has to fit at all (BatchNorm models: 16).
The most saving policy is planned first: if even it does not reach the batch per rank, none
does, and the search looks for the least recompute that fits at all. Each policy planned is a
whole plan (its exact search), reported in `result.checkpointing`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from service.schemas.result import CheckpointingChoice, PlanResult, PolicyCheck
from service.schemas.spec import CheckpointingSpec
from workers.engine.compiled import CompiledJob
from workers.engine.job import has_batchnorm
from workers.engine.models import build_model
from workers.engine.plan_warnings import BATCHNORM_MIN
from workers.engine.planner import per_rank_batch


@dataclass(frozen=True)
class Policy:
    name: str
    checkpointing: bool
    every: int = 1
    offload: bool = False
    selective: Literal["block", "op"] = "block"

    def on(self, job: CompiledJob) -> CompiledJob:
        t = job.training
        policy = CheckpointingSpec(
            every=self.every, offload=self.offload, selective=self.selective, auto=True
        )
        changed = t.model_copy(
            update={"gradient_checkpointing": self.checkpointing, "checkpointing": policy}
        )
        return job.with_training(changed)


POLICIES = (
    Policy("none", False),
    Policy("every 4", True, every=4),
    Policy("every 2", True, every=2),
    Policy("full", True),
    Policy("full+offload", True, offload=True),
)
OP_SELECTIVE = Policy("op", True, selective="op")
# (job, label) -> the job's plan, its probes reported under `label`
PlanFn = Callable[[CompiledJob, str], PlanResult]


def choose(job: CompiledJob, plan: PlanFn) -> tuple[Policy, PlanResult, CheckpointingChoice]:
    """The chosen policy, the plan under it, and the choice as the result reports it."""
    results: dict[Policy, PlanResult] = {}

    def planned(policy: Policy) -> PlanResult:
        if policy not in results:
            results[policy] = plan(policy.on(job), f"checkpointing={policy.name}")
        return results[policy]

    per_rank = per_rank_batch(job.training.global_batch_size, job.training.data_parallel_size)
    most = planned(POLICIES[-1])
    needed = per_rank
    if most.max_micro_batch_size < per_rank:  # no policy reaches it: fit at all
        built = build_model(job.model, job.data, job.peft).module
        needed = min(per_rank, BATCHNORM_MIN) if has_batchnorm(built) else 1

    def reaches(policy: Policy) -> bool:
        return planned(policy).max_micro_batch_size >= needed

    chosen = next((p for p in POLICIES if reaches(p)), POLICIES[-1])
    if (
        chosen.checkpointing
        and reaches(OP_SELECTIVE)
        and _prefer_op(results[OP_SELECTIVE], results[chosen], reaches(chosen))
    ):
        chosen = OP_SELECTIVE
    checked = [
        PolicyCheck(
            policy=p.name,
            feasible=results[p].feasible,
            max_micro_batch_size=results[p].max_micro_batch_size,
            recompute_s_per_sample=_finite(_recompute(results[p])),
        )
        for p in (*POLICIES, OP_SELECTIVE)
        if p in results
    ]
    choice = CheckpointingChoice(
        policy=chosen.name,
        gradient_checkpointing=chosen.checkpointing,
        every=chosen.every,
        offload=chosen.offload,
        selective=chosen.selective,
        needed=needed,
        checked=checked,
    )
    return chosen, results[chosen], choice


def _prefer_op(op: PlanResult, block: PlanResult, block_reaches: bool) -> bool:
    """Op-selective (which reaches the batch) over the first block policy that qualifies: where
    that one does not reach it, or recomputes more per sample."""
    return not block_reaches or _recompute(op) < _recompute(block)


def _recompute(result: PlanResult) -> float:
    """Seconds of recomputation per sample of the plan's global batch."""
    split = result.throughput.split if result.throughput is not None else None
    if split is None:
        return float("inf")
    return split.recompute_s / max(result.effective_global_batch_size, 1)


def _finite(value: float) -> float | None:
    return value if value != float("inf") else None
