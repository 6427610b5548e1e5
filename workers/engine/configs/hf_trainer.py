"""The Hugging Face Trainer: `TrainingArguments`, and the callbacks early stopping needs."""

from __future__ import annotations

from typing import Any

from workers.engine.configs.deepspeed import deepspeed_config
from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers
from workers.engine.loss_head import LIGER_LOSS_ONLY
from workers.engine.optimizers import OptimizerChoice
from workers.engine.schedule import Schedule


def hf_trainer_arguments(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """Keyword arguments of `transformers.TrainingArguments` (add `output_dir`). HF's `adamw_torch`
    with weight_decay 0 is Adam; its `adafactor` is transformers' own Adafactor."""
    optim, optim_args, weight_decay = _optimizer(job.choice, numbers.optimizer_overrides)
    out: dict[str, Any] = {
        "per_device_train_batch_size": numbers.micro_batch_size,
        "gradient_accumulation_steps": numbers.accumulation_steps,
        "learning_rate": numbers.learning_rate,
        **_schedule(numbers),
        **_betas(numbers.optimizer_overrides),
        **_evaluation(job, numbers),
        "num_train_epochs": job.epochs,
        "max_steps": numbers.total_optimizer_steps,
        "optim": optim,
        "weight_decay": weight_decay,
        "bf16": job.precision in ("bf16-mixed", "bf16"),
        "fp16": job.precision == "fp16-mixed",
        "gradient_checkpointing": job.gradient_checkpointing,
    }
    if job.precision == "tf32":
        out["tf32"] = True
    if job.gradient_checkpointing and (job.checkpoint_every > 1 or job.checkpoint_offload):
        # transformers 5's Trainer: one layer in `every_n_layers`, saved inputs on the host
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if job.checkpoint_every > 1:
            kwargs["every_n_layers"] = job.checkpoint_every
        if job.checkpoint_offload:
            kwargs["offload"] = True
        out["gradient_checkpointing_kwargs"] = kwargs
    if job.loss_kernel == "liger":
        out["use_liger_kernel"] = True
        out["liger_kernel_config"] = dict(LIGER_LOSS_ONLY)
    if optim_args:
        out["optim_args"] = optim_args
    if job.strategy == "zero1":
        out["deepspeed"] = deepspeed_config(job, numbers)
    elif job.sharding is not None:
        options = [job.sharding.lower(), "auto_wrap"]
        if job.cpu_offload:
            options.append("offload")
        out["fsdp"] = " ".join(options)
        out["fsdp_config"] = {"version": 2}
    return out


def with_evaluation(args: dict[str, Any], micro: int, every_steps: int | None) -> dict[str, Any]:
    """The Trainer's arguments with the plan's evaluation: its micro-batch and its cadence
    (checkpoints, where kept for early stopping, follow the same cadence: the Trainer needs
    `save_strategy` to match `eval_strategy` to keep the best model)."""
    out = args | {"per_device_eval_batch_size": micro}
    if every_steps is None:
        return out | {"eval_strategy": "epoch"}
    out |= {"eval_strategy": "steps", "eval_steps": every_steps}
    if "save_strategy" in out:
        out |= {"save_strategy": "steps", "save_steps": every_steps}
    return out


def hf_native_schedule(schedule: Schedule) -> tuple[str, dict[str, Any]] | None:
    """The Trainer's own scheduler equal to the plan's; None where `configs.recipe`'s goes in.
    Per-group rates do not change it: the Trainer builds its scheduler on the optimizer it is
    given (`Trainer(optimizers=(grouped_optimizer, None))`), keeping each group's ratio."""
    return schedule.hf_native


def _schedule(numbers: PlanNumbers) -> dict[str, Any]:
    """The Trainer's own scheduler where it equals the plan's; else a constant rate, to be
    replaced by `Trainer(optimizers=(optimizer, make_scheduler(optimizer)))` from
    `configs.recipe` (a plan warning says so)."""
    schedule = numbers.lr_schedule
    native = hf_native_schedule(schedule)
    if native is None:
        return {"warmup_steps": 0, "lr_scheduler_type": "constant"}
    name, kwargs = native
    out: dict[str, Any] = {"warmup_steps": schedule.warmup, "lr_scheduler_type": name}
    if kwargs:
        out["lr_scheduler_kwargs"] = kwargs
    return out


def _betas(overrides: dict[str, Any]) -> dict[str, Any]:
    if "betas" not in overrides:
        return {}
    beta1, beta2 = overrides["betas"]
    return {"adam_beta1": beta1, "adam_beta2": beta2, "adam_epsilon": overrides["eps"]}


def _evaluation(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """An epoch-end evaluation for early stopping (`configs.hf_callbacks`) and for a plateau
    schedule, which both read `metric_for_best_model`."""
    stopping = job.early_stopping
    schedule = numbers.lr_schedule
    if stopping is None and schedule.name != "plateau":
        return {}
    monitor = stopping.monitor if stopping else schedule.params["monitor"]
    mode = stopping.mode if stopping else schedule.params["mode"]
    out: dict[str, Any] = {
        "eval_strategy": "epoch",
        "metric_for_best_model": monitor,
        "greater_is_better": mode == "max",
    }
    if stopping is not None:  # EarlyStoppingCallback needs the best model kept
        out |= {"save_strategy": "epoch", "load_best_model_at_end": True}
    return out


def hf_callbacks(job: LaunchJob) -> list[dict[str, Any]]:
    """`Trainer(callbacks=[EarlyStoppingCallback(**kwargs)])`."""
    stopping = job.early_stopping
    assert stopping is not None
    return [
        {
            "class": "transformers.EarlyStoppingCallback",
            "kwargs": {
                "early_stopping_patience": stopping.patience,
                "early_stopping_threshold": stopping.min_delta,
            },
        }
    ]


def _optimizer(choice: OptimizerChoice, overrides: dict[str, Any]) -> tuple[str, str | None, float]:
    """The Trainer's `optim`, `optim_args` and weight decay for the plan's optimizer. Its torch
    names other than `adamw_torch_fused` leave the implementation to PyTorch (foreach on CUDA):
    a for_loop plan has no Trainer name of its own."""
    name = choice.name
    weight_decay = float(choice.kwargs.get("weight_decay", 0.0))
    if choice.hf_optim is not None:
        return choice.hf_optim, None, weight_decay
    if name in ("sgd", "sgd_momentum", "nesterov"):
        args = {
            "sgd": None,
            "sgd_momentum": "momentum=0.9",
            "nesterov": "momentum=0.9,nesterov=True",
        }
        return "sgd", args[name], 0.0
    if name in ("adam", "adamw"):  # for_loop: the Trainer's name leaves the kernel to PyTorch
        return "adamw_torch", None, weight_decay
    if name == "rmsprop" and overrides:  # the Trainer reads RMSprop's alpha and eps from here
        return name, f"alpha={overrides['alpha']!r},eps={overrides['eps']!r}", 0.0
    return name, None, 0.0  # rmsprop, adagrad, adafactor have HF names of their own
