"""The figures of a feasible plan every framework needs, and what follows from them alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from workers.engine.configs.job import LaunchJob
from workers.engine.schedule import Schedule

# The mixed precisions' lower dtype, as rendered code names it (autocast, FSDP's param_dtype).
AUTOCAST_DTYPE = {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}


@dataclass(frozen=True)
class PlanNumbers:
    """The figures of a feasible plan that every framework needs."""

    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    learning_rate: float
    warmup_steps: int
    total_optimizer_steps: int
    schedule: Schedule | None = None  # None: warm-up, then constant
    # the optimizer's hyper-parameters for the scaled batch (Malladi et al.'s betas and eps)
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)
    model_parallel: int = 1  # ranks that share each sample (context x tensor parallelism)

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.data_parallel

    @property
    def lr_schedule(self) -> Schedule:
        if self.schedule is not None:
            return self.schedule
        return Schedule("constant", self.warmup_steps, max(1, self.total_optimizer_steps))

    @property
    def plateau(self) -> bool:
        return self.lr_schedule.name == "plateau"


def optimizer_kwargs(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """The optimizer's keyword arguments as the plan runs it: its implementation's flags and
    hyper-parameters, with the scaled batch's betas and eps."""
    return {**job.choice.kwargs, **numbers.optimizer_overrides}


def nodes(job: LaunchJob, numbers: PlanNumbers) -> tuple[int, int]:
    """(nodes, GPUs per node) of the plan's world."""
    per_node = min(job.gpus_per_node, numbers.world_size)
    return math.ceil(numbers.world_size / per_node), per_node


def peft_settings(job: LaunchJob) -> dict[str, Any]:
    """`peft.LoraConfig(**lora_config)`; for QLoRA also
    `transformers.BitsAndBytesConfig(**bnb_config)` to load the base model with."""
    peft = job.peft
    assert peft is not None
    lora = {
        "r": peft.r,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "target_modules": peft.target_modules,
        "task_type": "CAUSAL_LM" if job.hf else None,
    }
    out: dict[str, Any] = {"lora_config": lora}
    if peft.method == "qlora":
        out["bnb_config"] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
    return out
