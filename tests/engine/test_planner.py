"""Plan arithmetic: property tests over the whole input space, plus DESIGN.md's worked example."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers import engine
from workers.engine import planner

micro_caps = st.integers(1, 5000)
globals_ = st.integers(1, 1 << 20)
worlds = st.integers(1, 512)
modes = st.sampled_from(["power_of_two", "max", "divisor"])


@given(max_micro=micro_caps, global_batch=globals_, world=worlds, mode=modes)
def test_micro_times_accumulation_times_world_covers_the_global_batch(
    max_micro: int, global_batch: int, world: int, mode: str
) -> None:
    plan = planner.choose_batches(max_micro, global_batch, world, mode)
    per_rank = math.ceil(global_batch / world)
    assert 1 <= plan.micro_batch_size <= max_micro
    assert plan.micro_batch_size <= per_rank
    assert plan.effective_global_batch_size == (
        plan.micro_batch_size * plan.accumulation_steps * world
    )
    assert plan.effective_global_batch_size >= global_batch
    # the fewest accumulation steps for this micro-batch
    assert (plan.accumulation_steps - 1) * plan.micro_batch_size < per_rank
    if mode == "power_of_two":
        assert plan.micro_batch_size & (plan.micro_batch_size - 1) == 0
        assert plan.micro_batch_size * 2 > min(max_micro, per_rank)
    if mode == "max":
        assert plan.micro_batch_size == min(max_micro, per_rank)
    if mode == "divisor":
        assert per_rank % plan.micro_batch_size == 0
        if global_batch % world == 0:
            assert plan.effective_global_batch_size == global_batch


@given(
    num_samples=st.integers(1, 10**9),
    micro=st.integers(1, 4096),
    world=worlds,
    global_batch=globals_,
    epochs=st.floats(0.01, 1000),
)
def test_epoch_arithmetic(
    num_samples: int, micro: int, world: int, global_batch: int, epochs: float
) -> None:
    plan = planner.epoch_arithmetic(num_samples, micro, world, global_batch, epochs)
    assert plan.iterations_per_epoch * micro * world >= num_samples
    assert (plan.iterations_per_epoch - 1) * micro * world < num_samples
    assert plan.optimizer_steps_per_epoch == math.ceil(num_samples / global_batch)
    assert plan.total_optimizer_steps == math.ceil(epochs * plan.optimizer_steps_per_epoch)


@given(
    base_lr=st.floats(1e-6, 10),
    base=st.integers(1, 4096),
    eff=st.integers(1, 1 << 20),
    opt=st.sampled_from(
        ["sgd", "sgd_momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adafactor"]
    ),
    rule=st.sampled_from(["linear", "sqrt", "none", "auto"]),
)
def test_lr_rules(base_lr: float, base: int, eff: int, opt: str, rule: str) -> None:
    lr = planner.scale_lr(base_lr, base, eff, rule, opt, 100, 1000)
    ratio = eff / base
    expected_rule = rule if rule != "auto" else ("sqrt" if opt in planner.ADAPTIVE else "linear")
    assert lr.rule == expected_rule
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[expected_rule]
    assert lr.factor == pytest.approx(factor)
    assert lr.learning_rate == pytest.approx(base_lr * factor)
    assert (lr.warmup_steps > 0) == (factor > 1)
    assert lr.warmup_steps <= 5 * 100  # at most 5 epochs of 100 steps
    assert lr.warmup_steps <= math.ceil(0.1 * 1000)


def test_design_example() -> None:
    """DESIGN.md: max 347, global 1024 -> 256 x 4, lr 0.4, 5005 / 1252 / 112680, warm-up 6260."""
    batches = planner.choose_batches(347, 1024, 1, "power_of_two")
    assert (batches.micro_batch_size, batches.accumulation_steps) == (256, 4)
    epochs = planner.epoch_arithmetic(1281167, 256, 1, 1024, 90)
    assert (
        epochs.iterations_per_epoch,
        epochs.optimizer_steps_per_epoch,
        epochs.total_optimizer_steps,
    ) == (5005, 1252, 112680)
    lr = planner.scale_lr(0.1, 256, 1024, "linear", "sgd_momentum", 1252, 112680)
    assert lr.learning_rate == pytest.approx(0.4) and lr.factor == 4.0
    assert lr.warmup_steps == 6260


def test_divisor_gives_exact_global_batch() -> None:
    plan = planner.choose_batches(347, 1000, 1, "divisor")
    assert plan.micro_batch_size == 250 and plan.accumulation_steps == 4
    assert plan.effective_global_batch_size == 1000
    plan = planner.choose_batches(347, 1000, 1, "power_of_two")
    assert plan.effective_global_batch_size == 1024  # 256 x 4: the power of two overshoots


def _adamw_at_64(**training: object) -> object:
    from tests.helpers import tensor_spec

    spec = tensor_spec(optimizer="adamw", base_lr=3e-4, global_batch_size=64, **training)
    if "base_batch_size" not in training:  # tensor_spec names one; this plan must not
        spec = spec.model_copy(
            update={"training": spec.training.model_copy(update={"base_batch_size": None})}
        )
    return engine.plan(spec)


def test_the_rate_given_without_a_reference_batch_is_the_rate_at_the_batch_asked() -> None:
    """AdamW at 3e-4 for a global batch of 64 trained at 1.5e-4: the default reference batch was
    256 and the square-root rule halved the rate nobody asked to scale."""
    result = _adamw_at_64()
    assert result.learning_rate == pytest.approx(3e-4)
    assert result.lr_scaling.base_batch_size == 64
    assert result.lr_scaling.base_batch_size_from == "global_batch_size"
    assert (result.lr_scaling.rule, result.lr_scaling.factor) == ("sqrt", 1.0)


def test_a_named_reference_batch_still_scales_the_rate() -> None:
    result = _adamw_at_64(base_batch_size=256)
    assert result.learning_rate == pytest.approx(1.5e-4)
    assert result.lr_scaling.base_batch_size_from == "spec"
