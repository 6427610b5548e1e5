"""training.evaluation: a forward-only micro-batch of its own, exact, and its time in the run."""

from __future__ import annotations

import math
from typing import Any

import pytest

from service.schemas.spec import PlanSpec
from tests.helpers import mlp_spec, session_of
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session


def eval_spec(**evaluation: Any) -> PlanSpec:
    raw = mlp_spec(
        "adam", memory_gib=0.5, epochs=3, evaluation={"num_samples": 50_000, **evaluation}
    )
    raw["search"]["max_batch_size"] = 1 << 20
    return PlanSpec.model_validate(raw)


def as_evaluation(spec: PlanSpec) -> Any:
    job = compile_job(spec)
    return open_session(open_device(job), job.for_evaluation())


def test_the_evaluation_micro_batch_is_exact_and_larger() -> None:
    spec = eval_spec()
    result = engine.plan(spec)
    evaluation = result.evaluation
    assert evaluation is not None
    best = evaluation.max_micro_batch_size
    # nothing kept for backward: far more samples fit than in a training step
    assert best > 2 * result.max_micro_batch_size
    with as_evaluation(spec) as session:
        assert session.probe(best).fits and not session.probe(best + 1).fits
    assert evaluation.micro_batch_size == 1 << (best.bit_length() - 1)
    assert evaluation.iterations == math.ceil(50_000 / evaluation.micro_batch_size)
    assert evaluation.evaluations == 3  # once an epoch
    # its probes stream apart from the plan's own
    assert all(t.phase != "evaluation" for t in result.trials)


def test_its_time_is_in_time_to_train() -> None:
    with_eval = engine.plan(eval_spec(every_steps=100))
    raw = eval_spec().model_dump(mode="json")
    raw["training"]["evaluation"] = None
    without = engine.plan(PlanSpec.model_validate(raw))
    evaluation = with_eval.evaluation
    assert evaluation is not None and evaluation.total_time_s is not None
    assert evaluation.evaluations == with_eval.total_optimizer_steps // 100
    assert with_eval.throughput is not None and without.throughput is not None
    assert with_eval.throughput.total_time_s == pytest.approx(
        without.throughput.total_time_s + evaluation.total_time_s
    )
    assert evaluation.total_time_s == pytest.approx(
        evaluation.step_time_s * evaluation.iterations * evaluation.evaluations
    )


def test_the_trainer_evaluates_with_the_plan_s_batch() -> None:
    transformers = pytest.importorskip("transformers")
    result = engine.plan(eval_spec(every_steps=100))
    assert result.evaluation is not None
    hf = result.configs["hf_trainer"]
    assert hf["per_device_eval_batch_size"] == result.evaluation.micro_batch_size
    args = transformers.TrainingArguments(output_dir="/tmp/trainplan-eval", use_cpu=True, **hf)
    assert args.eval_strategy == "steps" and args.eval_steps == 100


def test_an_evaluation_step_keeps_nothing_for_backward() -> None:
    """The same batch, traced as a training step and as an evaluation step."""
    spec = eval_spec()
    with session_of(spec) as session:
        training = session.probe(4096)
    with as_evaluation(spec) as session:
        evaluation = session.probe(4096)
    assert evaluation.peak_bytes < training.peak_bytes
    training, evaluation = training.breakdown, evaluation.breakdown
    assert training.get("gradients", 0) > 0 and evaluation.get("gradients", 0) == 0
    assert evaluation["optimizer_state"] == training["optimizer_state"]
