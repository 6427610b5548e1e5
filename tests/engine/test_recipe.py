"""The training recipe: schedules, per-group rates, early stopping and the square-root rule's
betas. The plan's learning rates are checked step by step against the PyTorch loop and
Lightning running for real, and against the HF Trainer's and DeepSpeed's schedulers built from
the rendered configs and stepped."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from service.schemas.result import PlanResult
from service.schemas.spec import PlanSpec
from tests.helpers import Counting, recipe_scope, run_lightning, run_pytorch_loop, tensor_spec
from workers import engine
from workers.engine.schedule import LINEAR_START, lr_factor

# tensor_spec: 1,000 samples, global batch 256 -> 4 optimizer steps an epoch; 5 epochs -> 20
SCHEDULES: dict[str, dict[str, Any]] = {
    "constant": {"name": "constant", "warmup_steps": 3},
    "linear": {"name": "linear", "warmup_steps": 2, "min_lr_ratio": 0.1},
    "cosine": {"name": "cosine", "warmup_ratio": 0.2},
    "cosine_floor": {"name": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.05},
    "step": {"name": "step", "warmup_steps": 0, "step_size": 6, "gamma": 0.5},
    "step_epochs": {"name": "step", "unit": "epochs", "step_size": 2, "gamma": 0.5},
    "multistep": {"name": "multistep", "warmup_steps": 2, "milestones": [8, 15], "gamma": 0.3},
    "exponential": {"name": "exponential", "warmup_steps": 0, "gamma": 0.9},
    "one_cycle": {"name": "one_cycle", "pct_start": 0.25},
}


# the HF Trainer's own schedulers cover these (linear decays to 0 there, not to a floor)
HF_NATIVE = {"constant", "cosine", "cosine_floor"}


def planned(schedule: dict[str, Any], **training: Any) -> tuple[PlanSpec, PlanResult]:
    spec = tensor_spec(epochs=5, schedule=schedule, **training)
    return spec, engine.plan(spec)


def expected_rates(result: PlanResult) -> list[float]:
    """The plan's rate at every step, from the recipe it renders."""
    scope = recipe_scope(result.configs["recipe"])
    table = scope["SCHEDULE"]
    return [result.learning_rate * lr_factor(t, table) for t in range(result.total_optimizer_steps)]


@pytest.fixture(scope="module", params=list(SCHEDULES))
def plan(request: pytest.FixtureRequest) -> tuple[str, PlanSpec, PlanResult]:
    return request.param, *planned(SCHEDULES[request.param])


def test_points_are_the_schedule_at_those_steps(plan: tuple[str, PlanSpec, PlanResult]) -> None:
    name, _, result = plan
    assert result.schedule is not None and result.total_optimizer_steps == 20
    rates = expected_rates(result)
    labels = [p.label for p in result.schedule.points]
    assert labels == ["start", "warmup_end", "25%", "50%", "75%", "end"]
    for point in result.schedule.points:
        assert point.learning_rate == pytest.approx(rates[point.step]), (name, point)
    if name != "one_cycle":  # one_cycle starts at max_lr / div_factor
        warmup = result.schedule.warmup_steps
        assert rates[0] == (0.0 if warmup else pytest.approx(result.learning_rate))
        if warmup:
            assert rates[warmup] == pytest.approx(result.learning_rate)


def test_closed_forms(plan: tuple[str, PlanSpec, PlanResult]) -> None:
    """Spot values worked by hand from each kind's definition."""
    name, _, result = plan
    r, lr = expected_rates(result), result.learning_rate
    hand = {
        "constant": {1: lr / 3, 2: 2 * lr / 3, 19: lr},
        "linear": {2: lr, 19: lr * (0.1 + 0.9 * (1 - 17 / 18))},
        "cosine": {4: lr, 12: lr * 0.5 * (1 + math.cos(math.pi * 8 / 16))},
        "cosine_floor": {19: lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))},
        "step": {5: lr, 6: lr / 2, 12: lr / 4, 19: lr / 8},
        "step_epochs": {7: lr, 8: lr / 2, 16: lr / 4},  # 2 epochs = 8 optimizer steps
        "multistep": {7: lr, 8: lr * 0.3, 15: lr * 0.09},
        "exponential": {0: lr, 10: lr * 0.9**10},
        "one_cycle": {0: lr / 25, 4: lr},  # peak at pct_start x 20 - 1 = 4
    }[name]
    for step, value in hand.items():
        assert r[step] == pytest.approx(value), (name, step)


def test_pytorch_loop_steps_the_plans_rates(plan: tuple[str, PlanSpec, PlanResult]) -> None:
    """The loop steps its scheduler after the optimizer, once per optimizer step."""
    name, spec, result = plan
    scope = run_pytorch_loop(result.configs["pytorch"], spec.data.num_samples)
    seen = [group[0] for group in scope["lrs"]]
    assert seen == pytest.approx(expected_rates(result), rel=1e-9, abs=1e-12), name


def test_lightning_steps_the_plans_rates(plan: tuple[str, PlanSpec, PlanResult]) -> None:
    name, spec, result = plan
    _, rates = run_lightning(result.configs, spec.data.num_samples)
    assert rates == pytest.approx(expected_rates(result), rel=1e-9, abs=1e-12), name


def test_hf_trainer_scheduler_where_it_has_one(
    plan: tuple[str, PlanSpec, PlanResult], tmp_path: Any
) -> None:
    transformers = pytest.importorskip("transformers")
    name, _, result = plan
    hf = dict(result.configs["hf_trainer"])
    if name not in HF_NATIVE:  # the Trainer gets make_scheduler through optimizers=(...)
        assert (hf["lr_scheduler_type"], hf["warmup_steps"]) == ("constant", 0)
        assert "framework_fallback" in {w.code for w in result.warnings}
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **hf
        )
        trainer = transformers.Trainer(model=Counting(), args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    rates = []
    for _ in range(result.total_optimizer_steps):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates == pytest.approx(expected_rates(result), rel=1e-9, abs=1e-12), name


def test_deepspeed_scheduler_where_it_has_one(plan: tuple[str, PlanSpec, PlanResult]) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import lr_schedules

    name, _, result = plan
    block = result.configs["deepspeed"].get("scheduler")
    if block is None:
        assert "framework_fallback" in {w.code for w in result.warnings}, name
        return
    # as DeepSpeed's engine resolves it: its own schedulers first, then torch.optim's by name
    kind = block["type"]
    cls = getattr(lr_schedules, kind, None) or getattr(torch.optim.lr_scheduler, kind)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=result.learning_rate)
    scheduler = cls(optimizer, **block["params"])
    rates = []
    for _ in range(result.total_optimizer_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # torch's LinearLR warm-up starts at 1e-10 x where the plan starts at 0
    assert rates == pytest.approx(expected_rates(result), rel=1e-9, abs=LINEAR_START), name


def test_plateau_cuts_after_patience_and_the_plan_says_upper_bound() -> None:
    schedule = {"name": "plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5}
    spec, result = planned(schedule | {"warmup_steps": 2})
    assert result.schedule is not None and result.schedule.upper_bound
    assert result.configs["lightning"]["plateau"]["monitor"] == "val_loss"
    # a metric that never improves: each epoch's end cuts the rate (patience 0)
    scope = run_pytorch_loop(result.configs["pytorch"], spec.data.num_samples, lambda m: 1.0)
    seen = [g[0] for g in scope["lrs"]]
    lr = result.learning_rate
    assert seen[:4] == pytest.approx([lr * LINEAR_START, lr / 2, lr, lr], rel=1e-6)
    assert seen[4] == pytest.approx(lr)  # the first epoch sets the best: no cut
    assert seen[8] == pytest.approx(lr / 2) and seen[12] == pytest.approx(lr / 4)


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ({"name": "multistep", "milestones": [5, 40]}, "training.schedule.milestones"),
        (
            {"name": "multistep", "milestones": [6], "unit": "epochs"},
            "training.schedule.milestones",
        ),
        ({"name": "step", "step_size": 20}, "training.schedule.step_size"),
        ({"name": "one_cycle", "pct_start": 0.04}, "training.schedule.pct_start"),
        ({"name": "plateau"}, "training.schedule"),
        ({"name": "one_cycle", "warmup_steps": 3}, "training.schedule"),
        ({"name": "cosine", "warmup_steps": 3, "warmup_ratio": 0.1}, "training.schedule"),
        ({"name": "multistep", "milestones": [5, 3]}, "training.schedule"),
    ],
)
def test_bad_schedules_are_422_at_the_field(
    client: Any, schedule: dict[str, Any], field: str
) -> None:
    body = _raw_spec()
    body["training"] |= {"epochs": 5, "schedule": schedule}
    response = client.post("/v1/plans", json=body)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]


def _raw_spec() -> dict[str, Any]:
    return tensor_spec().model_dump(mode="json", exclude_defaults=True)


def test_param_groups_set_each_groups_rate() -> None:
    groups = [{"prefix": "0.", "lr_scale": 0.1}]
    spec, result = planned({"name": "cosine", "warmup_steps": 2}, param_groups=groups)
    lr = result.learning_rate
    assert [(g.prefix, g.learning_rate) for g in result.param_groups] == [
        ("0.", pytest.approx(lr * 0.1)),
        (None, pytest.approx(lr)),
    ]
    # the loop on a model with the spec's parameter names: group 0 is "0.", the rest "2."
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    scope = run_pytorch_loop(result.configs["pytorch"], spec.data.num_samples, model=model)
    expected = expected_rates(result)
    assert [g[1] for g in scope["lrs"]] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert [g[0] for g in scope["lrs"]] == pytest.approx(
        [0.1 * e for e in expected], rel=1e-9, abs=1e-12
    )
    assert "optimizer" not in result.configs["deepspeed"]  # a client optimizer carries groups
    assert "framework_fallback" in {w.code for w in result.warnings}


def test_per_group_rates_keep_the_hf_trainers_schedule(tmp_path: Any) -> None:
    """The arguments said `constant` with no warm-up when the plan had per-group rates, so anyone
    copying only `TrainingArguments` trained on the wrong schedule. The Trainer builds its own
    scheduler on an optimizer passed as `optimizers=(grouped, None)`: each group follows the
    plan's cosine with its warm-up, at its own scale."""
    transformers = pytest.importorskip("transformers")
    groups = [{"prefix": "net.0.", "lr_scale": 0.1}]
    _, result = planned({"name": "cosine", "warmup_steps": 4}, param_groups=groups)
    hf = dict(result.configs["hf_trainer"])
    assert (hf["lr_scheduler_type"], hf["warmup_steps"]) == ("cosine", 4)
    model = Counting()
    scope = recipe_scope(result.configs["recipe"])
    grouped = torch.optim.AdamW(scope["param_groups"](model), lr=result.learning_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **hf
        )
        trainer = transformers.Trainer(model=model, args=args, optimizers=(grouped, None))
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    seen = []
    for _ in range(result.total_optimizer_steps):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    expected = expected_rates(result)
    assert [s[0] for s in seen] == pytest.approx([0.1 * e for e in expected], abs=1e-12)
    assert [s[1] for s in seen] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    warning = next(w for w in result.warnings if w.code == "framework_fallback")
    assert "optimizers=(optimizer, None)" in warning.message


@pytest.mark.parametrize(
    ("groups", "trainable"),
    [
        ([{"prefix": "backbone.", "lr_scale": 0.1}], "all"),
        ([{"prefix": "0.", "lr_scale": 2}], ["0."]),
    ],
)
def test_a_group_matching_no_trainable_parameter_is_a_422(
    client: Any, groups: list[dict[str, Any]], trainable: Any
) -> None:
    body = _raw_spec()
    body["training"] |= {"param_groups": groups, "trainable": trainable}
    response = client.post("/v1/plans", json=body)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["training.param_groups.0.prefix"]


def test_early_stopping_stops_the_loop_and_bounds_the_plan(tmp_path: Any) -> None:
    stopping = {"monitor": "val_loss", "mode": "min", "patience": 2, "min_delta": 0.01}
    spec, result = planned({"name": "constant"}, early_stopping=stopping)
    assert result.total_steps_upper_bound
    assert "early_stopping_upper_bound" in {w.code for w in result.warnings}
    # 1.0, then 0.5 (better), then 0.499 and 0.6 (not better by min_delta): stops after epoch 4
    metrics = iter([1.0, 0.5, 0.499, 0.6, 0.1])
    scope = run_pytorch_loop(
        result.configs["pytorch"], spec.data.num_samples, lambda m: next(metrics)
    )
    assert len(scope["steps"]) == 4 * 4 < result.total_optimizer_steps
    # Lightning's callback and the Trainer's take the rendered arguments
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    (lightning,) = result.configs["lightning"]["callbacks"]
    assert callbacks.EarlyStopping(**lightning["init_args"]).patience == 2
    transformers = pytest.importorskip("transformers")
    (hf,) = result.configs["hf_callbacks"]
    callback = transformers.EarlyStoppingCallback(**hf["kwargs"])
    assert callback.early_stopping_patience == 2
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", **result.configs["hf_trainer"]
    )
    assert args.load_best_model_at_end and args.metric_for_best_model == "val_loss"
    assert not args.greater_is_better


def test_square_root_rule_gives_the_matching_betas_and_eps(tmp_path: Any) -> None:
    """k = 1024 / 256 = 4: beta1 0.9 -> 0.6, beta2 0.999 -> 0.996, eps 1e-8 -> 5e-9."""
    spec = tensor_spec(optimizer="adamw", global_batch_size=1024, base_batch_size=256)
    result = engine.plan(spec)
    adjustment = result.optimizer_adjustment
    assert adjustment is not None and adjustment.applied and adjustment.batch_factor == 4
    assert adjustment.betas == pytest.approx([0.6, 0.996])
    assert adjustment.eps == pytest.approx(5e-9)
    hf = result.configs["hf_trainer"]
    assert (hf["adam_beta1"], hf["adam_beta2"], hf["adam_epsilon"]) == pytest.approx(
        (0.6, 0.996, 5e-9)
    )
    assert result.configs["deepspeed"]["optimizer"]["params"]["betas"] == pytest.approx(
        (0.6, 0.996)
    )
    scope = run_pytorch_loop(result.configs["pytorch"], spec.data.num_samples)
    assert scope["optimizer"].param_groups[0]["betas"] == pytest.approx((0.6, 0.996))


def test_square_root_rule_out_of_range_is_said_not_applied() -> None:
    spec = tensor_spec(optimizer="adam", global_batch_size=4096, base_batch_size=256)
    result = engine.plan(spec)
    assert result.optimizer_adjustment is not None and not result.optimizer_adjustment.applied
    assert "sde_rule_out_of_range" in {w.code for w in result.warnings}
    assert "adam_beta1" not in result.configs["hf_trainer"]
    assert engine.plan(tensor_spec(optimizer="sgd_momentum")).optimizer_adjustment is None


def test_the_fine_tune_example_validates_and_builds() -> None:
    """The OpenAPI example that shows the recipe fields is a spec the engine accepts."""
    from service.schemas.examples import PLAN_EXAMPLES
    from workers import engine

    spec = PlanSpec.model_validate(PLAN_EXAMPLES["fine_tune"]["value"])
    engine.check(spec)
    assert spec.training.param_groups and spec.training.param_groups[0].prefix == "fc."


def test_rmsprop_gets_its_alpha_and_eps_through_the_trainers_optim_args(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    spec = tensor_spec(optimizer="rmsprop", global_batch_size=1024, base_batch_size=256)
    result = engine.plan(spec)
    assert result.optimizer_adjustment is not None
    assert result.optimizer_adjustment.betas == pytest.approx([0.96])  # 1 - 4 x (1 - 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **result.configs["hf_trainer"]
        )
        optimizer = transformers.Trainer(model=Counting(), args=args).create_optimizer()
    group = getattr(optimizer, "optimizer", optimizer).param_groups[0]
    assert (group["alpha"], group["eps"]) == pytest.approx((0.96, 5e-9))
