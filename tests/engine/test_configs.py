"""A plan's launch configs: consistent with the plan, and accepted by each framework's own code.

The PyTorch loop and Lightning run for real on the CPU (a tiny model, the plan's own numbers) and
must take exactly the plan's optimizer steps with the plan's batch; the HF Trainer and DeepSpeed
configs go through those libraries' own argument validation.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from service.schemas.spec import BNB_OPTIMIZERS, PlanSpec
from tests.helpers import (
    Mpu,
    deepspeed_config_module,
    run_lightning,
    run_pytorch_loop,
    tensor_spec,
)
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.configs import PlanNumbers, build_configs
from workers.engine.optimizers import TORCH_OPTIMIZERS

OPTIMIZERS = list(TORCH_OPTIMIZERS)
PRECISIONS = ["fp32", "tf32", "fp16-mixed", "bf16-mixed", "bf16"]


@pytest.fixture(scope="module")
def planned() -> tuple[PlanSpec, Any]:
    spec = tensor_spec()
    return spec, engine.plan(spec)


def numbers(world_size: int = 1) -> PlanNumbers:
    return PlanNumbers(
        micro_batch_size=32,
        accumulation_steps=8,
        world_size=world_size,
        learning_rate=0.4,
        warmup_steps=3,
        total_optimizer_steps=8,
    )


def test_configs_agree_with_the_plan_and_each_other(planned: tuple[PlanSpec, Any]) -> None:
    _, result = planned
    micro, k = result.micro_batch_size, result.accumulation_steps
    assert (micro, k) == (32, 8)  # bound 48 -> power of two 32; 256 / 32
    configs = result.configs
    assert set(configs) == {
        "recipe",
        "pytorch",
        "lightning",
        "hf_trainer",
        "deepspeed",
        "accelerate",
        "launch",
    }
    lightning, hf, ds = configs["lightning"], configs["hf_trainer"], configs["deepspeed"]
    env = configs["launch"]["env"]
    assert (env["MICRO_BATCH_SIZE"], env["GRAD_ACCUM_STEPS"]) == (str(micro), str(k))
    assert lightning["batch_size"] == hf["per_device_train_batch_size"] == micro
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert lightning["trainer"]["accumulate_grad_batches"] == k
    assert hf["gradient_accumulation_steps"] == ds["gradient_accumulation_steps"] == k
    assert ds["train_batch_size"] == result.effective_global_batch_size == 256
    assert lightning["learning_rate"] == hf["learning_rate"] == result.learning_rate
    assert ds["optimizer"]["params"]["lr"] == result.learning_rate
    warmup = result.lr_scaling.warmup_steps
    assert lightning["warmup_steps"] == hf["warmup_steps"] == warmup
    assert ds["scheduler"]["type"] == "LinearLR"  # warm-up, then constant
    assert ds["scheduler"]["params"]["total_iters"] == warmup
    assert lightning["trainer"]["max_steps"] == hf["max_steps"] == result.total_optimizer_steps
    assert f"ACCUMULATION = {k}" in configs["pytorch"]
    assert f"MICRO_BATCH = {micro}" in configs["pytorch"]


def test_infeasible_plan_has_no_configs() -> None:
    spec = tensor_spec()
    spec = spec.model_copy(update={"device": spec.device.model_copy(update={"memory_gib": 0.01})})
    result = engine.plan(spec)
    assert not result.feasible
    assert result.configs == {}


def test_pytorch_loop_runs_the_plans_steps_with_the_plans_batch(
    planned: tuple[PlanSpec, Any],
) -> None:
    spec, result = planned
    scope = run_pytorch_loop(result.configs["pytorch"], spec.data.num_samples)
    steps = scope["steps"]
    assert len(steps) == result.total_optimizer_steps == 8  # ceil(1000 / 256) x 2 epochs
    per_epoch = result.optimizer_steps_per_epoch
    # full windows see the global batch; the last window of an epoch sees the remainder
    assert steps[: per_epoch - 1] == [256] * (per_epoch - 1)
    assert sum(steps[:per_epoch]) == spec.data.num_samples
    assert scope["optimizer"].param_groups[0]["lr"] == pytest.approx(result.learning_rate)
    assert scope["optimizer"].param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", ["adamw", "nesterov", "adafactor"])
def test_pytorch_loop_runs_for_each_precision(precision: str, optimizer: str) -> None:
    spec = tensor_spec(precision=precision, optimizer=optimizer)
    code = build_configs(compile_job(spec).launch, numbers())["pytorch"]
    scope = run_pytorch_loop(code, 300)
    assert len(scope["steps"]) == 8
    name, _ = TORCH_OPTIMIZERS[optimizer]
    assert type(scope["optimizer"]).__name__ == name
    assert ("scaler" in scope) == (precision == "fp16-mixed")
    if precision == "bf16":
        assert next(scope["model"].parameters()).dtype == torch.bfloat16


def test_pytorch_loop_for_ddp_and_transformers_compiles() -> None:
    spec = tensor_spec()
    code = build_configs(compile_job(spec).launch, numbers(world_size=4))["pytorch"]
    compile(code, "<plan>", "exec")
    assert "DistributedSampler" in code and "model.no_sync()" in code
    assert "torchrun --nproc_per_node=4" in code
    hf = PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": "gpt2"},
            "data": {"kind": "tokens", "seq_len": 128, "num_samples": 1000},
            "training": {"gradient_checkpointing": True},
        }
    )
    code = build_configs(compile_job(hf).launch, numbers())["pytorch"]
    compile(code, "<plan>", "exec")
    assert "model(**batch).loss" in code and "gradient_checkpointing_enable()" in code


def test_lightning_trainer_takes_the_plans_steps(planned: tuple[PlanSpec, Any]) -> None:
    spec, result = planned
    trainer, rates = run_lightning(result.configs, spec.data.num_samples)
    assert trainer.global_step == len(rates) == result.total_optimizer_steps
    assert trainer.accumulate_grad_batches == result.accumulation_steps


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lightning_accepts_every_precision(precision: str) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    cfg = build_configs(compile_job(tensor_spec(precision=precision)).launch, numbers())[
        "lightning"
    ]
    trainer = pl.Trainer(**cfg["trainer"], accelerator="cpu", logger=False)
    assert trainer.accumulate_grad_batches == 8
    assert trainer.max_steps == 8


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_hf_trainer_arguments_are_valid(tmp_path: Any, optimizer: str, precision: str) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg = build_configs(
        compile_job(tensor_spec(optimizer=optimizer, precision=precision)).launch, numbers()
    )
    hf = dict(cfg["hf_trainer"])
    # TrainingArguments refuses tf32 without an Ampere GPU: check the flag, validate the rest.
    assert hf.pop("tf32", False) == (precision == "tf32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing's new name in v5
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", **hf
        )
    assert args.train_batch_size * args.gradient_accumulation_steps == 256
    assert args.get_warmup_steps(args.max_steps) == 3
    # the Trainer's own optimizer factory turns the arguments into the planned optimizer
    trainer = transformers.Trainer(model=nn.Linear(16, 4), args=args)
    opt = trainer.create_optimizer()
    name, kwargs = TORCH_OPTIMIZERS[optimizer]
    inner = getattr(opt, "optimizer", opt)
    if optimizer == "adafactor":
        assert type(inner).__name__ == "Adafactor"
    elif optimizer in BNB_OPTIMIZERS:  # the Trainer's bitsandbytes classes take optim_bits
        assert type(inner).__name__ == ("Lion" if "lion" in optimizer else "AdamW")
        assert inner.args.optim_bits == (8 if "8bit" in optimizer else 32)
    else:
        assert type(inner).__name__ == ("AdamW" if optimizer == "adam" else name)
    group = inner.param_groups[0]
    assert group["lr"] == pytest.approx(0.4)
    for key, value in kwargs.items():
        assert group[key] == value


@pytest.mark.parametrize("world", [1, 4])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_config_is_valid(
    monkeypatch: pytest.MonkeyPatch, world: int, optimizer: str, precision: str
) -> None:
    config_module = deepspeed_config_module(monkeypatch)
    cfg = build_configs(
        compile_job(tensor_spec(optimizer=optimizer, precision=precision)).launch, numbers(world)
    )
    ds = config_module.DeepSpeedConfig(cfg["deepspeed"], mpu=Mpu(world))
    assert ds.train_batch_size == 32 * 8 * world
    assert ds.train_micro_batch_size_per_gpu == 32
    assert ds.gradient_accumulation_steps == 8
    # names outside DeepSpeed's own optimizers must resolve to a torch.optim class
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if optimizer in BNB_OPTIMIZERS:  # it goes to deepspeed.initialize(optimizer=...)
        assert ds.optimizer_name is None
    elif ds.optimizer_name not in DEEPSPEED_OPTIMIZERS:
        assert hasattr(torch.optim, ds.optimizer_name)


def test_deepspeed_rejects_a_batch_that_does_not_multiply_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check the config relies on is DeepSpeed's own: proof the validation is live."""
    config_module = deepspeed_config_module(monkeypatch)
    cfg = build_configs(compile_job(tensor_spec()).launch, numbers(4))["deepspeed"]
    with pytest.raises(AssertionError, match="train_batch_size"):
        config_module.DeepSpeedConfig(cfg, mpu=Mpu(2))
