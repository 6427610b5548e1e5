"""Launch settings that carry a plan into the frameworks people train with, one module each.

One source of truth, `PlanNumbers`, feeds all the renderings (a plain PyTorch loop, Lightning, the
Hugging Face Trainer, DeepSpeed, Accelerate, TRL's SFTTrainer, Axolotl), so they cannot disagree
with each other or with the plan: micro-batch x accumulation x world_size = the effective global
batch, the scaled learning rate and its schedule (`configs.recipe`, the very functions the plan's
rates come from), the optimizer and its implementation, per-group rates, early stopping. The
compile step reads the spec once, into a `LaunchJob`; each rendering takes that and the numbers.
Each is checked against the library's own code in `tests/engine/test_configs.py`,
`tests/engine/test_fine_tuning.py` and `tests/engine/test_recipe.py`.
"""

from __future__ import annotations

from typing import Any

from workers.engine.checkpointing import OP_POLICY_KEEPS
from workers.engine.configs.accelerate import accelerate_config
from workers.engine.configs.deepspeed import deepspeed_config, deepspeed_takes_recipe
from workers.engine.configs.fine_tuning import axolotl_with_evaluation, fine_tuning_configs
from workers.engine.configs.hf_trainer import (
    hf_callbacks,
    hf_native_schedule,
    hf_trainer_arguments,
    with_evaluation,
)
from workers.engine.configs.job import LaunchJob, launch_job
from workers.engine.configs.launch import launch_specs
from workers.engine.configs.lightning import lightning_settings
from workers.engine.configs.numbers import PlanNumbers, peft_settings
from workers.engine.configs.pytorch_loop import pytorch_loop
from workers.engine.loss_head import CCE_PATCH
from workers.engine.recipe_source import recipe_source

__all__ = [
    "LaunchJob",
    "PlanNumbers",
    "build_configs",
    "configs_with_evaluation",
    "deepspeed_takes_recipe",
    "hf_native_schedule",
    "launch_job",
]


def configs_with_evaluation(
    configs: dict[str, Any], micro: int, every_steps: int | None
) -> dict[str, Any]:
    """The renderings that evaluate (the HF Trainer and TRL's SFTConfig, which is the Trainer's
    arguments and more, and Axolotl) with the plan's evaluation micro-batch and cadence: the
    evaluation's micro-batch is found after the renderings are built."""
    out = dict(configs)
    for key in ("hf_trainer", "trl_sft"):
        if key in out:
            out[key] = with_evaluation(out[key], micro, every_steps)
    if "axolotl" in out:
        out["axolotl"] = axolotl_with_evaluation(out["axolotl"], micro, every_steps)
    return out


def build_configs(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """Every rendering of a feasible plan, keyed as `result.configs` carries them."""
    trainer = hf_trainer_arguments(job, numbers)  # also what TRL and Axolotl build on
    loop = pytorch_loop(job, numbers)
    out: dict[str, Any] = {
        "recipe": recipe_source(numbers.lr_schedule, numbers.learning_rate, job.param_groups),
        "pytorch": loop,
        "lightning": lightning_settings(job, numbers),
        "hf_trainer": trainer,
        "deepspeed": deepspeed_config(job, numbers),
        "accelerate": accelerate_config(job, numbers),
        "launch": launch_specs(job, numbers, loop),
        **fine_tuning_configs(job, numbers, trainer),
    }
    if job.hf and job.attn_implementation is not None:
        # what the plan traced: load the model with the same attention kernel
        out["from_pretrained"] = {"attn_implementation": job.attn_implementation}
    if job.gradient_checkpointing and (
        job.checkpoint_every > 1 or job.checkpoint_selective == "op"
    ):
        out["checkpointing"] = checkpointing_settings(job)
    if job.context_parallel > 1 or job.tensor_parallel > 1:
        out["parallelism"] = layout_settings(job)
    if job.context_parallel > 1:  # the name this rendering had before tensor parallelism
        out["context_parallel"] = out["parallelism"]
    if job.loss_kernel == "cut_cross_entropy":
        # no Trainer flag: patch the model before Trainer / SFTTrainer(model=...) takes it
        out["cut_cross_entropy"] = {
            "package": "cut-cross-entropy",
            "cce_patch": dict(CCE_PATCH),
        }
    if job.timm is not None:
        out["timm"] = job.timm
    if job.peft is not None:
        out["peft"] = peft_settings(job)
    if job.early_stopping is not None:
        out["hf_callbacks"] = hf_callbacks(job)
    return out


def checkpointing_settings(job: LaunchJob) -> dict[str, Any]:
    """torchtitan's activation-checkpoint options for the plan's policy (the Trainer's are
    gradient_checkpointing_kwargs.every_n_layers; an op policy's `context_fn` is code, which the
    PyTorch loop renders)."""
    option = "op" if job.checkpoint_selective == "op" else str(job.checkpoint_every)
    out: dict[str, Any] = {
        "every": job.checkpoint_every,
        "selective": job.checkpoint_selective,
        "torchtitan": {
            "activation_checkpoint": {"mode": "selective", "selective_ac_option": option}
        },
    }
    if job.checkpoint_selective == "op":
        out["keeps"] = list(OP_POLICY_KEEPS)
    return out


def layout_settings(job: LaunchJob) -> dict[str, Any]:
    """The layout the plan traced, as torchtitan's config and Accelerate's `ParallelismConfig`
    (the HF Trainer's `parallelism_config`) spell it: FSDP over world / (cp x tp) ranks, the
    sequence over cp (keys and values all-gathered: the rotate method traced), each block's
    linear layers over tp. torchtitan's Llama plan also splits the embeddings and the output
    head by TP and runs sequence parallelism (norms on a 1/tp of the tokens): both hold less
    than the plan traced, so the plan's per-rank peak is an upper bound there; loss parallelism
    is off as traced (whole logits)."""
    cp, tp = job.context_parallel, job.tensor_parallel
    shard = job.world_size // (cp * tp)
    titan: dict[str, Any] = {"data_parallel_shard_degree": shard}
    accelerate: dict[str, Any] = {"dp_shard_size": shard}
    if cp > 1:
        titan |= {"context_parallel_degree": cp, "context_parallel_rotate_method": "allgather"}
        accelerate |= {
            "cp_size": cp,
            "cp_backend": "torch",
            "cp_handler": {"cp_comm_strategy": "allgather"},
        }
    if tp > 1:
        titan |= {"tensor_parallel_degree": tp, "disable_loss_parallel": True}
        accelerate |= {"tp_size": tp}
    return {
        "torchtitan": {"parallelism": titan},
        "accelerate": {"parallelism_config": accelerate},
    }
