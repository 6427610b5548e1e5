"""Evaluation during training (`training.evaluation`): its own micro-batch and its time.

An evaluation step is forward only under `model.eval()` and `torch.no_grad()`: nothing is kept
for backward, so the largest micro-batch that fits is larger than training's, with the optimizer
state still resident and the gradients already freed (as `Trainer.evaluate` finds them between
steps). The same exact search finds it on the same device; the micro-batch used is the largest
power of two at most that (and at most the evaluation's samples per rank). Its time, from the
same roofline as the step's (or the measured probe on a real device), is added to
time-to-train: evaluations x micro-batches per evaluation x the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from service.schemas.result import EvaluationPlan
from workers.engine.compiled import CompiledJob
from workers.engine.devices import ProbeDevice, ProbeSession, TrialOutcome, open_session
from workers.engine.search import find_max_batch

MakeProbe = Callable[[ProbeSession], Callable[[int], TrialOutcome]]


def plan_evaluation(
    job: CompiledJob,
    device: ProbeDevice,
    make_probe: MakeProbe,
    total_optimizer_steps: int,
) -> EvaluationPlan | None:
    spec = job.training.evaluation
    if spec is None:
        return None
    per_rank = math.ceil(spec.num_samples / job.training.data_parallel_size)
    with open_session(device, job.for_evaluation()) as session:
        search = find_max_batch(
            make_probe(session),
            session.limit_bytes,
            min(job.search.max_batch_size, per_rank),
            session.predict_fits,
        )
        if search.max_batch < 1:
            first = search.trials[0]
            return EvaluationPlan(
                max_micro_batch_size=0,
                micro_batch_size=0,
                peak_bytes=first.peak_bytes,
                iterations=0,
                evaluations=evaluations(job, total_optimizer_steps),
            )
        micro = 1 << (search.max_batch.bit_length() - 1)
        at_micro = search.outcome_at(micro) or session.probe(micro)
        cost = session.step_cost(micro)
    step = cost.total_s() if cost is not None else at_micro.step_time_s
    iterations = math.ceil(per_rank / micro)
    count = evaluations(job, total_optimizer_steps)
    once = step * iterations if step is not None else None
    return EvaluationPlan(
        max_micro_batch_size=search.max_batch,
        micro_batch_size=micro,
        peak_bytes=at_micro.peak_bytes,
        iterations=iterations,
        evaluations=count,
        step_time_s=step,
        time_per_evaluation_s=once,
        total_time_s=once * count if once is not None else None,
    )


def evaluations(job: CompiledJob, total_optimizer_steps: int) -> int:
    """How many times the run evaluates: every `every_steps` optimizer steps, or once an epoch
    (a fraction of an epoch at the end counts as one)."""
    spec = job.training.evaluation
    assert spec is not None
    if spec.every_steps is not None:
        return total_optimizer_steps // spec.every_steps
    return math.ceil(job.training.epochs)
