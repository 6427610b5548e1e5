"""Accelerate: the YAML of `accelerate config`."""

from __future__ import annotations

from typing import Any

from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers, nodes


def accelerate_config(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """The YAML of `accelerate config` (write it out and `accelerate launch --config_file`);
    accumulation goes to `Accelerator(gradient_accumulation_steps=...)` (the HF Trainer's
    arguments carry it)."""
    machines, _ = nodes(job, numbers)
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": machines,
        "num_processes": numbers.world_size,
        "mixed_precision": {"fp16-mixed": "fp16", "bf16-mixed": "bf16"}.get(job.precision, "no"),
        "machine_rank": 0,
        "use_cpu": False,
        "debug": False,
        "main_training_function": "main",
    }
    if job.strategy == "none" or numbers.world_size == 1:
        return out | {"distributed_type": "NO"}
    if job.strategy == "ddp":
        return out | {"distributed_type": "MULTI_GPU"}
    if job.strategy == "zero1":
        return out | {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {
                "zero_stage": 1,
                "gradient_accumulation_steps": numbers.accumulation_steps,
            },
        }
    return out | {
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_sharding_strategy": job.sharding,
            "fsdp_reshard_after_forward": job.reshards_after_forward,
            "fsdp_offload_params": job.cpu_offload,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_activation_checkpointing": job.gradient_checkpointing,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        },
    }
