"""The slice of a spec the framework renderings read, resolved once: each rendering takes this
and the plan's numbers, never the whole spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.schemas.spec import (
    DataSpec,
    EarlyStoppingSpec,
    ModelSpec,
    PeftSpec,
    TimmModel,
    TrainingSpec,
    TransformersModel,
)
from workers.engine.models.hf import attention_of, hf_config, is_causal_lm_spec
from workers.engine.optimizers import OptimizerChoice, choose
from workers.engine.recipe import param_groups

# FSDP's sharding strategies by the names Lightning, the HF Trainer and Accelerate take.
FSDP_SHARDING = {
    "fsdp": "FULL_SHARD",
    "zero3": "FULL_SHARD",
    "zero2": "SHARD_GRAD_OP",
    "hybrid_shard": "HYBRID_SHARD",
}


def timm_settings(model: TimmModel, data: DataSpec) -> dict[str, Any]:
    """`timm.create_model(**create_model)`, as the plan built it: no weights, classes and
    channels from the data; `img_size` for the models that take one (vision transformers size
    their position embeddings by it; convolutional networks refuse the keyword); `fused_attn`
    set on the attention blocks' attribute of that name where the spec chose it."""
    create: dict[str, Any] = {"model_name": model.name, "pretrained": False}
    create["num_classes"] = data.num_classes or 1000
    if data.kind == "image":
        create["in_chans"] = data.channels
    create |= dict(model.kwargs)
    out: dict[str, Any] = {"create_model": create}
    if data.kind == "image":
        out["img_size"] = [data.height, data.width]
    if model.fused_attn is not None:
        out["fused_attn"] = model.fused_attn
    return out


@dataclass(frozen=True)
class TokenRows:
    """Token data as a collator makes rows of it."""

    seq_len: int
    batching: str  # pad_to_max | pad_to_longest | packed (data.batching)


@dataclass(frozen=True)
class LaunchJob:
    """What a launch config says beside the plan's numbers: the model's kind, the precision,
    the strategy and its options, the resolved optimizer, the recipe's extras."""

    hf: bool  # a transformers model: batches are dicts and the model computes its own loss
    source: str
    precision: str
    strategy: str  # resolved: none, ddp, zero1, zero2, zero3, fsdp, hybrid_shard
    world_size: int
    gpus_per_node: int
    gpu: str | None  # the simulated card's catalogue name (None: a real device, or memory only)
    cpu_offload: bool
    sharding: str | None  # FSDP's strategy name; None where the strategy does not shard
    reshards_after_forward: bool
    gradient_checkpointing: bool
    checkpoint_every: int  # one block in this many checkpointed
    checkpoint_offload: bool  # the checkpoints' saved inputs in pinned host memory
    checkpoint_selective: str  # block | op: what a checkpointed block keeps
    context_parallel: int  # ranks one sequence is split over
    tensor_parallel: int  # ranks each block's linear layers are split over
    sequence_parallel: bool  # with tensor_parallel: norms and the stream split on the sequence
    tp_plan: dict[str, str]  # transformers' block plan (path -> colwise | rowwise); {} without TP
    loss_kernel: str  # standard | liger | cut_cross_entropy
    attn_implementation: str | None  # transformers models: from_pretrained's kwarg
    causal_lm: bool  # a transformers *ForCausalLM: what TRL's SFTTrainer and Axolotl train
    tokens: TokenRows | None  # token data: the rows' length and how samples fill them
    timm: dict[str, Any] | None  # a timm model: how to create it (configs.timm_settings)
    channels_last: bool
    epochs: float
    choice: OptimizerChoice
    peft: PeftSpec | None
    early_stopping: EarlyStoppingSpec | None
    param_groups: list[tuple[str, float]]  # (prefix, lr scale), as the recipe renders them
    has_param_groups: bool

    @property
    def sharded(self) -> bool:
        return self.sharding is not None


def launch_job(
    model: ModelSpec, data: DataSpec, training: TrainingSpec, gpu: str | None = None
) -> LaunchJob:
    strategy = training.strategy
    sharding = FSDP_SHARDING.get(strategy)
    if strategy == "fsdp" and not training.parallelism.reshard_after_forward:
        sharding = "SHARD_GRAD_OP"  # fsdp that keeps parameters gathered is ZeRO-2
    return LaunchJob(
        hf=model.source == "transformers",
        source=model.source,
        precision=training.precision,
        strategy=strategy,
        world_size=training.world_size,
        gpus_per_node=training.parallelism.gpus_per_node,
        gpu=gpu,
        cpu_offload=training.parallelism.cpu_offload,
        sharding=sharding,
        reshards_after_forward=training.reshards_after_forward,
        gradient_checkpointing=training.gradient_checkpointing,
        checkpoint_every=training.checkpointing.every,
        checkpoint_offload=training.checkpointing.offload,
        checkpoint_selective=training.checkpointing.selective,
        context_parallel=training.parallelism.context_parallel,
        tensor_parallel=training.parallelism.tensor_parallel,
        sequence_parallel=training.parallelism.sequence_parallel,
        tp_plan=_tp_plan(model, data, training),
        loss_kernel=training.loss_kernel,
        attn_implementation=attention_of(model) if model.source == "transformers" else None,
        causal_lm=model.source == "transformers" and is_causal_lm_spec(model),
        tokens=TokenRows(data.seq_len, data.batching) if data.kind == "tokens" else None,
        timm=timm_settings(model, data) if model.source == "timm" else None,
        channels_last=getattr(data, "layout", None) == "channels_last",
        epochs=training.epochs,
        choice=choose(training),
        peft=training.peft,
        early_stopping=training.early_stopping,
        param_groups=param_groups(training),
        has_param_groups=bool(training.param_groups),
    )


def _tp_plan(model: ModelSpec, data: DataSpec, training: TrainingSpec) -> dict[str, str]:
    """The block plan the trace applies, for the loop to apply the same (a cheap config build)."""
    if training.parallelism.tensor_parallel == 1 or not isinstance(model, TransformersModel):
        return {}
    from workers.engine.tensor_parallel import STYLES, block_plan

    plan = block_plan(hf_config(model, data))
    return {path: style for path, style in plan.items() if style in STYLES}
