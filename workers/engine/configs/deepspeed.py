"""DeepSpeed: the JSON `deepspeed.initialize` reads."""

from __future__ import annotations

from typing import Any

from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers, optimizer_kwargs
from workers.engine.schedule import Schedule

ZERO_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "hybrid_shard": 3}


def deepspeed_config(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """A DeepSpeed JSON: DeepSpeed asserts train_batch_size = micro x accumulation x world size.
    Optimizer names outside DeepSpeed's own set resolve to the torch.optim class of that name."""
    return {
        "train_batch_size": numbers.global_batch_size,
        "train_micro_batch_size_per_gpu": numbers.micro_batch_size,
        "gradient_accumulation_steps": numbers.accumulation_steps,
        **_optimizer(job, numbers),
        **_scheduler(numbers),
        "bf16": {"enabled": job.precision in ("bf16-mixed", "bf16")},
        "fp16": {"enabled": job.precision == "fp16-mixed"},
        "zero_optimization": _zero(job),
    }


def deepspeed_takes_recipe(has_param_groups: bool, schedule: Schedule, peak: float) -> bool:
    """Whether DeepSpeed gets the recipe's scheduler (and per-group optimizer) through
    `deepspeed.initialize`: no block of its own equals the schedule (a constant rate needs
    none), or per-group rates, which its optimizer block cannot hold."""
    plain = schedule.name == "constant" and not schedule.warmup
    no_block = schedule.deepspeed_native(peak) is None and not plain
    return no_block or has_param_groups


def _optimizer(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """DeepSpeed's own optimizer block (its fused Adam for Adam and AdamW: the implementation
    flags are PyTorch's and stay out); none for bitsandbytes or per-group rates: that optimizer
    is passed to `deepspeed.initialize(optimizer=...)` as the PyTorch loop builds it."""
    choice = job.choice
    if choice.bitsandbytes or job.has_param_groups:
        return {}
    params = {"lr": numbers.learning_rate}
    kwargs = optimizer_kwargs(job, numbers)
    params |= {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    if choice.cls == "Adam":
        params["adam_w_mode"] = False  # DeepSpeed's "Adam" is AdamW unless told otherwise
    return {"optimizer": {"type": choice.cls, "params": params}}


def _scheduler(numbers: PlanNumbers) -> dict[str, Any]:
    """A scheduler block where DeepSpeed's equals the plan's (see `Schedule.deepspeed_native`);
    none for a constant rate, or where `make_scheduler` goes to `deepspeed.initialize`."""
    native = numbers.lr_schedule.deepspeed_native(numbers.learning_rate)
    return {} if native is None else {"scheduler": native}


def _zero(job: LaunchJob) -> dict[str, Any]:
    """ZeRO's stage for the strategy (fsdp's equivalent is stage 3), with CPU offload."""
    stage = ZERO_STAGE.get(job.strategy, 0)
    out: dict[str, Any] = {"stage": stage}
    if stage and job.cpu_offload:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        out["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3 and job.strategy == "hybrid_shard":
        out["zero_hpz_partition_size"] = job.gpus_per_node
    return out
