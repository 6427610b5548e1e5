"""`training.parallelism.layout: "auto"`: the tensor- and context-parallel degrees with the
shortest time to train on a fixed world size, FSDP over the rest (torchtitan's composition).

Candidates. Tensor parallelism: powers of two up to one node (`gpus_per_node`) and the world,
that the attention and key/value heads divide (a TP group across nodes would all-reduce twice a
layer over the network: not offered). Context parallelism: powers of two up to 8, for a causal
LM on token data whose rows the ring can run (whole rows, sdpa or flash attention) and whose
seq_len 2N divides. Each candidate is refused or planned by the same checks and the same exact
plan as a spec that names it.

The bound. Every tensor-parallel degree is planned at context parallelism 1; for one
tensor-parallel degree, context parallelism doubles only while the doubled layout could take
fewer micro-steps per optimizer step than the one planned. Nothing else can make it faster under
the plan's time model: each GPU does the same work per sample (the same tokens per GPU; the
ring's chunks add up to one rank's causal attention, tested in
tests/engine/test_context_parallel.py), FSDP gathers the same 1/tp of the parameters over the
same dp x cp = world / tp ranks once per micro-step, and the ring adds its traffic. Doubling cp
halves each rank's share of every sample and doubles its samples per step; the parameters and
optimizer state per rank do not change (sharded over the whole world either way), so its max
micro-batch is at most 2 m + 1 where m is the planned layout's, and it takes at least
ceil(2 b / (2 m + 1)) micro-steps for the planned layout's b samples per rank. Where that is
not fewer than the planned layout's micro-steps, the doubled layout (and every larger one, by
the same argument from it) cannot be faster, and `skipped` says so. A layout that does not fit
at all always gets its doubled context tried.

Sequence parallelism goes with every tensor-parallel layout on token data whose seq_len the
degree divides (and no context parallelism): it moves the same bytes as the all-reduces it
replaces (an all-gather and a reduce-scatter each), and each rank keeps and normalises 1/N of
the tokens between the split layers, so under the time model it is never slower and never
holds more; layouts without it are not planned.

Ranking: feasible first, then time to train (`throughput.total_time_s`), then fewer
model-parallel ranks (fewer collectives on the critical path for the same time).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from service.schemas.result import LayoutCheck, LayoutChoice, PlanResult
from workers.engine.compiled import CompiledJob
from workers.engine.context_parallel import check as check_context_parallel
from workers.engine.errors import SpecError
from workers.engine.planner import per_rank_batch
from workers.engine.tensor_parallel import check as check_tensor_parallel

MAX_CONTEXT_PARALLEL = 8
# (job, label) -> the job as planned (policies it chose resolved) and its plan, its probes
# reported under `label`
PlanFn = Callable[[CompiledJob, str], tuple[CompiledJob, PlanResult]]


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int

    @property
    def name(self) -> str:
        return f"tp{self.tp} cp{self.cp}"

    def on(self, job: CompiledJob) -> CompiledJob:
        """The job laid out this way (a fixed layout: its plan searches nothing more), with
        sequence parallelism wherever TP runs alone on token data (see the module's
        docstring)."""
        t = job.training
        seq_len = getattr(job.data, "seq_len", None)
        sequence = self.tp > 1 and self.cp == 1 and seq_len is not None and seq_len % self.tp == 0
        parallelism = t.parallelism.model_copy(
            update={
                "strategy": "fsdp",
                "tensor_parallel": self.tp,
                "context_parallel": self.cp,
                "sequence_parallel": sequence,
                "layout": "fixed",
            }
        )
        return job.with_training(t.model_copy(update={"parallelism": parallelism}))


def choose(job: CompiledJob, plan: PlanFn) -> tuple[CompiledJob, PlanResult, LayoutChoice]:
    """The job under the chosen layout, its plan, and the choice as the result reports it."""
    results: dict[Layout, PlanResult] = {}
    jobs: dict[Layout, CompiledJob] = {}
    skipped: list[str] = []
    for tp in _tensor_parallel_degrees(job, skipped):
        cp = 1
        while True:
            layout = Layout(tp, cp)
            jobs[layout], results[layout] = plan(layout.on(job), f"layout={layout.name}")
            fewest = _fewest_micro_steps_doubled(results[layout], job, layout)
            if fewest is not None:
                if _traceable(Layout(tp, cp * 2), job, []):
                    skipped.append(
                        f"tp{tp} cp{cp * 2} and above: at least {fewest} micro-steps a step, "
                        f"no fewer than tp{tp} cp{cp}'s {results[layout].accumulation_steps}, "
                        "so more context parallelism cannot be faster"
                    )
                break
            cp *= 2
            if cp > MAX_CONTEXT_PARALLEL or not _traceable(Layout(tp, cp), job, skipped):
                break
    ranked = sorted(results, key=lambda layout: _rank(layout, results[layout]))
    best = ranked[0]
    world = job.training.world_size
    choice = LayoutChoice(
        tensor_parallel=best.tp,
        context_parallel=best.cp,
        data_parallel=world // (best.tp * best.cp),
        checked=[_check(layout, results[layout], world) for layout in ranked],
        skipped=skipped,
    )
    return jobs[best], results[best], choice


def _tensor_parallel_degrees(job: CompiledJob, skipped: list[str]) -> list[int]:
    t = job.training
    most = min(t.parallelism.gpus_per_node, t.world_size)
    out, tp = [1], 2
    while tp <= most:
        if _traceable(Layout(tp, 1), job, skipped):
            out.append(tp)
        tp *= 2
    return out


def _traceable(layout: Layout, job: CompiledJob, skipped: list[str]) -> bool:
    """Whether the layout can be planned at all; why not goes to `skipped`."""
    t = job.training
    group = layout.tp * layout.cp
    if t.world_size % group:
        skipped.append(f"{layout.name}: does not divide world_size {t.world_size}")
        return False
    if t.world_size // group > t.global_batch_size:
        return False  # more data ranks than samples: never reached (degrees only grow)
    laid_out = layout.on(job)
    try:
        check_tensor_parallel(laid_out)
        check_context_parallel(laid_out)
    except SpecError as exc:
        skipped.append(f"{layout.name}: {exc.message}")
        return False
    return True


def _fewest_micro_steps_doubled(result: PlanResult, job: CompiledJob, layout: Layout) -> int | None:
    """The fewest micro-steps a step the layout with twice the context parallelism could take,
    where that is no fewer than this layout's (the module's bound); None where it might be."""
    group = layout.tp * layout.cp * 2
    if not result.feasible or job.training.world_size % group:
        return None  # try it (or find it cannot be laid out)
    per_rank = per_rank_batch(job.training.global_batch_size, job.training.world_size // group)
    fewest = math.ceil(per_rank / (2 * result.max_micro_batch_size + 1))
    return fewest if fewest >= result.accumulation_steps else None


def _rank(layout: Layout, result: PlanResult) -> tuple[bool, float, int]:
    total = result.throughput.total_time_s if result.throughput is not None else None
    return (
        not result.feasible,
        total if total is not None else float("inf"),
        layout.tp * layout.cp,
    )


def _check(layout: Layout, result: PlanResult, world: int) -> LayoutCheck:
    t = result.throughput
    split = t.split if t is not None else None
    return LayoutCheck(
        tensor_parallel=layout.tp,
        context_parallel=layout.cp,
        data_parallel=world // (layout.tp * layout.cp),
        feasible=result.feasible,
        max_micro_batch_size=result.max_micro_batch_size,
        micro_batch_size=result.micro_batch_size,
        accumulation_steps=result.accumulation_steps,
        peak_bytes=result.memory.peak,
        samples_per_second=t.samples_per_second if t is not None else None,
        step_time_s=t.step_time_s if t is not None else None,
        total_time_s=t.total_time_s if t is not None else None,
        tensor_parallel_s=split.tensor_parallel_s if split is not None else 0.0,
        context_parallel_s=split.context_parallel_s if split is not None else 0.0,
        communication_s=split.communication_s if split is not None else 0.0,
    )
