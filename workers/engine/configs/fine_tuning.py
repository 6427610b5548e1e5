"""The fine-tuning frameworks that batch token data themselves: TRL's `SFTTrainer` and Axolotl.

Both take the plan's numbers and its rows: padded to `seq_len` (`pad_to_max`), padded to each
batch's longest sample (`pad_to_longest`), or samples packed into rows with their document
boundaries kept (`packed`). Each rendering says what the plan traced, or is left out where the
framework would run something else:

- TRL (`trl.SFTConfig(**configs["trl_sft"])`, trl 1.x `trainer/sft_config.py`): the Trainer's
  arguments plus `max_length`, `packing`, `packing_strategy`, `padding_free` and
  `pad_to_multiple_of`. TRL keeps document boundaries in packed rows only padding-free (its
  `bfd` strategy turns it on), flattening a micro-batch into one row that FlashAttention reads
  as varlen sequences; TRL documents padding-free for FlashAttention, and with `sdpa`
  transformers would build one square mask over the whole flattened micro-batch. So packed
  rows get a TRL config only with `flash_attention_2` (or `flex_attention`, whose block mask
  of the flattened row is small).
- Axolotl (YAML, keys of `axolotl/utils/schemas/config.py`, `training.py`, `peft.py`; the
  Liger keys of its `LigerPlugin`): `sequence_len`, `sample_packing`, `pad_to_sequence_len`,
  the attention switch, precision, checkpointing, LoRA, Liger's loss, FSDP 2 or DeepSpeed and
  the context-parallel size. Axolotl's multipack rows are the plan's packed rows: with flash
  attention it joins them into one varlen row (the same tokens), with `sdp_attention` it keeps
  rows of `sequence_len` with a block-diagonal mask each, as traced.
"""

from __future__ import annotations

from typing import Any

from workers.engine.configs.deepspeed import deepspeed_config
from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import PlanNumbers

# transformers' attn_implementation -> Axolotl's switch for it
AXOLOTL_ATTENTION = {
    "sdpa": "sdp_attention",
    "flash_attention_2": "flash_attention",
    "flex_attention": "flex_attention",
    "eager": "eager_attention",
}
# What reads a flattened padding-free row as separate documents without a square mask:
# FlashAttention's varlen kernel, and FlexAttention's block mask.
VARLEN_ATTENTION = ("flash_attention_2", "flex_attention")
# The Liger kernels the plan models: the fused linear cross-entropy alone (Axolotl's LigerPlugin
# keys; its RoPE, RMSNorm and GLU kernels change the activations and stay off).
AXOLOTL_LIGER_LOSS_ONLY = {
    "plugins": ["axolotl.integrations.liger.LigerPlugin"],
    "liger_fused_linear_cross_entropy": True,
    "liger_cross_entropy": False,
    "liger_rope": False,
    "liger_rms_norm": False,
    "liger_layer_norm": False,
    "liger_glu_activation": False,
}

AXOLOTL_CUT_CROSS_ENTROPY = {
    "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
    "cut_cross_entropy": True,
}


def fine_tuning_configs(
    job: LaunchJob, numbers: PlanNumbers, trainer: dict[str, Any]
) -> dict[str, Any]:
    """`trl_sft` and `axolotl` for a transformers causal LM on token data, where each runs the
    plan's rows; `trainer`: the HF Trainer's arguments for the plan (`hf_trainer_arguments`),
    which both build on."""
    if not job.causal_lm or job.tokens is None:
        return {}
    out: dict[str, Any] = {"axolotl": axolotl_config(job, numbers, trainer)}
    trl = trl_sft_config(job, trainer)
    if trl is not None:
        out["trl_sft"] = trl
    return out


def trl_sft_config(job: LaunchJob, trainer: dict[str, Any]) -> dict[str, Any] | None:
    """Keyword arguments of `trl.SFTConfig` (add `output_dir`); None for packed rows with sdpa or
    eager (see the module's docstring)."""
    rows = job.tokens
    assert rows is not None
    out = trainer | {"max_length": rows.seq_len}
    if rows.batching == "packed":
        if job.attn_implementation not in VARLEN_ATTENTION:
            return None
        return out | {"packing": True, "packing_strategy": "bfd", "padding_free": True}
    # TRL's collator pads each batch to its longest sample; a multiple of seq_len pads to it
    pad_to = rows.seq_len if rows.batching == "pad_to_max" else None
    return out | {"packing": False, "padding_free": False, "pad_to_multiple_of": pad_to}


def axolotl_config(job: LaunchJob, numbers: PlanNumbers, trainer: dict[str, Any]) -> dict[str, Any]:
    """Axolotl's YAML keys for the plan (add `base_model`, `datasets`, `output_dir`)."""
    rows = job.tokens
    assert rows is not None
    out: dict[str, Any] = {
        "sequence_len": rows.seq_len,
        "sample_packing": rows.batching == "packed",
        # packed bins are padded to sequence_len too (Axolotl's advice), as the traced rows are
        "pad_to_sequence_len": rows.batching != "pad_to_longest",
        "micro_batch_size": numbers.micro_batch_size,
        "gradient_accumulation_steps": numbers.accumulation_steps,
        "num_epochs": job.epochs,
        "max_steps": numbers.total_optimizer_steps,
        "learning_rate": numbers.learning_rate,
        "lr_scheduler": trainer["lr_scheduler_type"],
        "warmup_steps": trainer["warmup_steps"],
        "optimizer": trainer["optim"],
        "weight_decay": trainer["weight_decay"],
        **_precision(job.precision),
        AXOLOTL_ATTENTION[job.attn_implementation or "sdpa"]: True,
        "gradient_checkpointing": job.gradient_checkpointing,
    }
    for key in ("lr_scheduler_kwargs", "optim_args", "gradient_checkpointing_kwargs"):
        if key in trainer:
            out[key] = trainer[key]
    if job.peft is not None:
        out |= _lora(job)
    if job.loss_kernel == "liger":
        out |= AXOLOTL_LIGER_LOSS_ONLY
    elif job.loss_kernel == "cut_cross_entropy":
        out |= AXOLOTL_CUT_CROSS_ENTROPY
    return out | _layout(job, numbers)


def axolotl_with_evaluation(
    config: dict[str, Any], micro: int, every_steps: int | None
) -> dict[str, Any]:
    """Axolotl's keys for the plan's evaluation: its micro-batch (`eval_batch_size`, which
    Axolotl passes as the Trainer's `per_device_eval_batch_size`) and its cadence (`eval_steps`,
    else `evals_per_epoch: 1`)."""
    out = config | {"eval_batch_size": micro}
    if every_steps is None:
        return out | {"evals_per_epoch": 1}
    return out | {"eval_steps": every_steps}


def _precision(precision: str) -> dict[str, Any]:
    """bf16/fp16 are Axolotl's mixed precision (AMP); `bfloat16` loads the weights in bf16."""
    return {
        "fp32": {"bf16": False},
        "tf32": {"bf16": False, "tf32": True},
        "bf16-mixed": {"bf16": True},
        "fp16-mixed": {"bf16": False, "fp16": True},
        "bf16": {"bf16": False, "bfloat16": True},
    }[precision]


def _lora(job: LaunchJob) -> dict[str, Any]:
    peft = job.peft
    assert peft is not None
    out: dict[str, Any] = {
        "adapter": peft.method,
        "lora_r": peft.r,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "lora_target_modules": peft.target_modules,
    }
    if peft.method == "qlora":
        out["load_in_4bit"] = True
    return out


def _layout(job: LaunchJob, numbers: PlanNumbers) -> dict[str, Any]:
    """FSDP 2 (fsdp_version 2, as the plan traces `fully_shard`), or DeepSpeed's ZeRO-1 config;
    the sequence split over `context_parallel_size` ranks, the blocks over
    `tensor_parallel_size`; hybrid sharding as Axolotl's dp_shard / dp_replicate sizes."""
    out: dict[str, Any] = {}
    if job.strategy == "zero1":
        out["deepspeed"] = deepspeed_config(job, numbers)
    elif job.sharded:
        out["fsdp_version"] = 2
        out["fsdp_config"] = {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": job.reshards_after_forward,
            "offload_params": job.cpu_offload,
        }
        if job.strategy == "hybrid_shard":
            per_node = min(job.gpus_per_node, numbers.world_size)
            out["dp_shard_size"] = per_node
            out["dp_replicate_size"] = numbers.world_size // per_node
    if job.context_parallel > 1:
        out["context_parallel_size"] = job.context_parallel
    if job.tensor_parallel > 1:
        out["tensor_parallel_size"] = job.tensor_parallel
        out["dp_shard_size"] = numbers.world_size // (job.context_parallel * job.tensor_parallel)
    return out
