"""Lightning: the Trainer's arguments and what `configure_optimizers` returns."""

from __future__ import annotations

import math
from typing import Any

from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers, nodes, optimizer_kwargs

LIGHTNING_PRECISION = {
    "fp32": "32-true",
    "tf32": "32-true",  # plus torch.set_float32_matmul_precision("high")
    "fp16-mixed": "16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-true",
}


def lightning_settings(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """`trainer` is `lightning.pytorch.Trainer(**trainer)` (with `callbacks` built from their
    class paths); the rest goes to your DataLoader and `configure_optimizers`, which builds the
    optimizer over `configs.recipe`'s `param_groups(self)` and returns
    `{"scheduler": make_scheduler(optimizer), **lr_scheduler}` (plus `make_plateau`'s, per epoch,
    with `monitor`). Lightning steps at the end of an epoch even with a partial accumulation
    window, as the plan's `optimizer_steps_per_epoch` assumes."""
    machines, per_node = nodes(job, numbers)
    schedule = numbers.lr_schedule
    out: dict[str, Any] = {
        **({"float32_matmul_precision": "high"} if job.precision == "tf32" else {}),
        "trainer": {
            "accumulate_grad_batches": numbers.accumulation_steps,
            "precision": LIGHTNING_PRECISION[job.precision],
            "devices": per_node,
            "num_nodes": machines,
            "strategy": _strategy(job),
            "max_epochs": math.ceil(job.epochs),
            "max_steps": numbers.total_optimizer_steps,
        },
        "batch_size": numbers.micro_batch_size,
        "learning_rate": numbers.learning_rate,
        "warmup_steps": numbers.warmup_steps,
        "optimizer": job.choice.path,
        "optimizer_kwargs": optimizer_kwargs(job, numbers),
        "lr_scheduler": {"interval": "step", "frequency": 1},
        "gradient_checkpointing": job.gradient_checkpointing,
    }
    if schedule.name == "plateau":
        out["plateau"] = {"monitor": schedule.params["monitor"], "interval": "epoch"}
    if job.early_stopping is not None:
        out["callbacks"] = [
            {
                "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                "init_args": job.early_stopping.model_dump(),
            }
        ]
    return out


def _strategy(job: LaunchJob) -> Any:
    """A strategy name Lightning's registry knows, or FSDPStrategy's arguments."""
    if job.strategy in ("none", "ddp"):
        return "ddp" if job.strategy == "ddp" else "auto"
    if job.strategy == "zero1":
        return "deepspeed_stage_1"
    if job.tensor_parallel > 1:  # the user's LightningModule.configure_model applies the plan
        return {
            "class": "lightning.pytorch.strategies.ModelParallelStrategy",
            "data_parallel_size": job.world_size // (job.tensor_parallel * job.context_parallel),
            "tensor_parallel_size": job.tensor_parallel,
            "configure_model": "configs.pytorch's tensor-parallel plan, then fully_shard "
            "over the device mesh's data_parallel dimension",
        }
    return {
        "class": "lightning.pytorch.strategies.FSDPStrategy",
        "sharding_strategy": job.sharding,
        "cpu_offload": job.cpu_offload,
        "auto_wrap_policy": "transformer blocks (model._no_split_modules)",
    }
