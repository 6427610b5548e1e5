"""What a plan warns about: one small rule per warning, each given the same facts.

A rule returns its warning or None; `plan_warnings` runs them all in order. A new warning is a new
function added to `RULES`, not another branch in a long function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.schemas.result import PlanWarning
from workers.engine import planner
from workers.engine.compiled import CompiledJob
from workers.engine.configs import deepspeed_takes_recipe, hf_native_schedule
from workers.engine.cudnn import GROUPED_NHWC_FIXED
from workers.engine.devices import ProbeDevice
from workers.engine.recipe import Adjustment
from workers.engine.schedule import Schedule
from workers.engine.search import SearchResult

BATCHNORM_MIN = 16  # BatchNorm's statistics need a real batch of 16-32


@dataclass(frozen=True)
class Facts:
    job: CompiledJob
    device: ProbeDevice
    search: SearchResult
    batches: planner.BatchPlan
    lr: planner.LrPlan
    has_batchnorm: bool
    schedule: Schedule | None = None
    adjustment: Adjustment | None = None
    grouped_convolutions: int = 0  # grouped, not depthwise (cudnn.grouped_convolutions)


Rule = Callable[[Facts], PlanWarning | None]


def batchnorm_small_micro_batch(facts: Facts) -> PlanWarning | None:
    micro, world = facts.batches.micro_batch_size, facts.job.training.world_size
    if not facts.has_batchnorm or micro >= BATCHNORM_MIN:
        return None
    sync = micro * world
    hint = (
        f"SyncBatchNorm would normalise over {sync} samples across the {world} ranks"
        if sync >= BATCHNORM_MIN
        else "GroupNorm does not depend on the batch"
    )
    return PlanWarning(
        code="batchnorm_small_micro_batch",
        message=(
            f"BatchNorm normalises over the micro-batch of {micro} (< {BATCHNORM_MIN}); "
            f"gradient accumulation does not enlarge it. Use GroupNorm or SyncBatchNorm: {hint}; "
            f"or free memory (mixed precision, checkpointing) for a larger micro-batch."
        ),
    )


def global_batch_adjusted(facts: Facts) -> PlanWarning | None:
    b, training = facts.batches, facts.job.training
    if b.effective_global_batch_size == training.global_batch_size:
        return None
    return PlanWarning(
        code="global_batch_adjusted",
        message=(
            f"{b.micro_batch_size} x {b.accumulation_steps} x {training.data_parallel_size} "
            f"= {b.effective_global_batch_size}, not the requested "
            f"{training.global_batch_size}; micro_batch='divisor' finds an exact split "
            f"when world_size divides the global batch."
        ),
    )


def global_batch_exceeds_dataset(facts: Facts) -> PlanWarning | None:
    effective, samples = facts.batches.effective_global_batch_size, facts.job.data.num_samples
    if effective <= samples:
        return None
    return PlanWarning(
        code="global_batch_exceeds_dataset",
        message=(
            f"the global batch {effective} is larger than the {samples} samples of an epoch: "
            f"every step sees the whole data set."
        ),
    )


def bf16_unsupported(facts: Facts) -> PlanWarning | None:
    if facts.job.training.precision not in ("bf16", "bf16-mixed") or facts.device.supports_bf16:
        return None
    return PlanWarning(
        code="bf16_unsupported",
        message=f"{facts.device.name} has no bfloat16 support; use fp16-mixed (with a GradScaler).",
    )


def large_lr_factor(facts: Facts) -> PlanWarning | None:
    if facts.lr.rule != "linear" or facts.lr.factor <= 32:
        return None
    return PlanWarning(
        code="large_lr_factor",
        message=(
            f"the linear rule scales the learning rate by {facts.lr.factor:g}; beyond about 8k "
            f"samples per batch it breaks down (Goyal et al.): consider LARS/LAMB."
        ),
    )


def search_bound_reached(facts: Facts) -> PlanWarning | None:
    if not facts.search.bound_reached:
        return None
    return PlanWarning(
        code="search_bound_reached",
        message=(
            f"the largest micro-batch allowed ({facts.job.search.max_batch_size}) fits; the real "
            f"maximum may be larger (raise search.max_batch_size)."
        ),
    )


def deepspeed_layout(facts: Facts) -> PlanWarning | None:
    strategy = facts.job.training.strategy
    if strategy not in ("zero2", "zero3"):
        return None
    return PlanWarning(
        code="deepspeed_layout",
        message=(
            f"{strategy} is traced as PyTorch's FSDP2 runs it (fp32 shards, bf16 gathers); "
            f"DeepSpeed's own engine also keeps fp16 parameter copies (about 2 bytes per "
            f"parameter more per rank for ZeRO-2): plan with more headroom if you run the "
            f"rendered DeepSpeed config."
        ),
    )


def heavy_accumulation(facts: Facts) -> PlanWarning | None:
    b = facts.batches
    if b.micro_batch_size != 1 or b.accumulation_steps <= 64:
        return None
    return PlanWarning(
        code="heavy_accumulation",
        message=(
            f"{b.accumulation_steps} accumulation steps of one sample each: the step is slow; "
            f"mixed precision or checkpointing would allow a larger micro-batch."
        ),
    )


def early_stopping_upper_bound(facts: Facts) -> PlanWarning | None:
    stopping = facts.job.training.early_stopping
    if stopping is None:
        return None
    return PlanWarning(
        code="early_stopping_upper_bound",
        message=(
            f"early stopping on {stopping.monitor!r} (patience {stopping.patience} epochs) may "
            "end the run sooner: total_optimizer_steps and the throughput's time are upper "
            "bounds, and the schedule's later points may never be reached"
        ),
    )


def paged_optimizer_state(facts: Facts) -> PlanWarning | None:
    if not facts.job.optimizer.paged:
        return None
    return PlanWarning(
        code="paged_optimizer_state",
        message=(
            "paged optimizer states live in CUDA unified memory (memory.host_offloaded): they "
            "stay on the GPU while it has room and move to the host under pressure, each "
            "round trip over PCIe; the peak here leaves them out"
        ),
    )


def framework_fallback(facts: Facts) -> PlanWarning | None:
    """Where the HF Trainer's or DeepSpeed's own settings cannot express the recipe."""
    if facts.schedule is None:
        return None
    missing = []
    groups = bool(facts.job.training.param_groups)
    if hf_native_schedule(facts.schedule) is None:
        missing.append(
            "the HF Trainer (pass Trainer(optimizers=(optimizer, scheduler)) built with "
            "configs.recipe's param_groups and make_scheduler)"
        )
    elif groups:
        missing.append(
            "the HF Trainer's arguments (pass Trainer(optimizers=(optimizer, None)) with the "
            "optimizer built over configs.recipe's param_groups: the Trainer builds the "
            f"arguments' {facts.schedule.name} schedule on it)"
        )
    if deepspeed_takes_recipe(groups, facts.schedule, facts.lr.learning_rate):
        missing.append("DeepSpeed (pass them to deepspeed.initialize(optimizer=, lr_scheduler=))")
    if not missing:
        return None
    what = "per-group learning rates" if groups else f"a {facts.schedule.name} schedule"
    if facts.schedule.warmup and not groups:
        what += " after warm-up"
    return PlanWarning(
        code="framework_fallback",
        message=f"{what}: no setting of its own in " + " or ".join(missing),
    )


def sde_rule_out_of_range(facts: Facts) -> PlanWarning | None:
    a = facts.adjustment
    if a is None or a.applies:
        return None
    return PlanWarning(
        code="sde_rule_out_of_range",
        message=(
            f"the square-root rule's matching betas (Malladi et al., 2022) would be "
            f"{[round(b, 4) for b in a.betas]} at a batch factor of {a.k:g}: outside (0, 1), "
            "so the rule's approximation does not hold here and the betas stay at their "
            "defaults; consider a smaller factor or re-tuning the learning rate"
        ),
    )


def sdpa_square_mask(facts: Facts) -> PlanWarning | None:
    """Padded or packed rows with SDPA: the square mask the trace made (`models.hf.row_layout`)."""
    job = facts.job
    attention = job.launch.attn_implementation
    if job.trace.rows == "whole" or attention != "sdpa" or job.data.kind != "tokens":
        return None
    micro, length = facts.batches.micro_batch_size, job.data.seq_len
    width = 4 if job.training.precision in ("fp32", "tf32") else 2
    per_layer = micro * length * length * width
    return PlanWarning(
        code="sdpa_square_mask",
        message=(
            f"{job.data.batching} rows with attn_implementation sdpa: transformers builds a "
            f"({micro}, 1, {length}, {length}) attention mask ({job.trace.rows} rows), so SDPA "
            f"runs its memory-efficient kernel with the mask in the query's dtype, a copy per "
            f"layer ({per_layer / 2**20:.0f} MiB each, kept for backward unless the layer is "
            f"checkpointed; this plan counts them). flash_attention_2 runs the rows as varlen "
            f"sequences with no mask: more micro-batch for the same memory."
        ),
    )


def channels_last_grouped_convolutions(facts: Facts) -> PlanWarning | None:
    """cuDNN before 8.5 ran many channels_last grouped convolutions on slow direct kernels."""
    runtime = getattr(facts.device, "runtime", None)
    data = facts.job.data
    if (
        runtime is None
        or runtime.torch >= GROUPED_NHWC_FIXED
        or facts.grouped_convolutions == 0
        or getattr(data, "layout", None) != "channels_last"
    ):
        return None
    return PlanWarning(
        code="channels_last_grouped_convolutions",
        message=f"{facts.grouped_convolutions} grouped convolutions in channels_last on torch "
        f"{runtime.torch[0]}.{runtime.torch[1]} (cuDNN before 8.5): cuDNN ran many such shapes "
        "on direct kernels, not Tensor Cores (pytorch/pytorch#70954); on timm's RTX 3090 "
        "benchmark RegNetY, NFNet and ResNeSt trained 2-3x slower in NHWC than NCHW, and the "
        "estimate was 1.8-4.4x too fast for them. The memory plan holds; for the time, prefer "
        "channels_first on this stack, or torch 1.13 or later",
    )


RULES: tuple[Rule, ...] = (
    batchnorm_small_micro_batch,
    global_batch_adjusted,
    global_batch_exceeds_dataset,
    bf16_unsupported,
    large_lr_factor,
    search_bound_reached,
    deepspeed_layout,
    heavy_accumulation,
    early_stopping_upper_bound,
    paged_optimizer_state,
    framework_fallback,
    sde_rule_out_of_range,
    sdpa_square_mask,
    channels_last_grouped_convolutions,
)


def plan_warnings(facts: Facts) -> list[PlanWarning]:
    return [warning for rule in RULES if (warning := rule(facts)) is not None]
