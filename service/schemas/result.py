"""The plan result: what a succeeded plan answers (the response contract of the README's API
section and the OpenAPI document)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class DeviceInfo(BaseModel):
    backend: Literal["simulated", "cpu", "cuda"]
    name: str
    memory_bytes: int = Field(description="Capacity the search plans against (before headroom).")


class LrScalingInfo(BaseModel):
    rule: Literal["linear", "sqrt", "none"]
    base_lr: float
    base_batch_size: int = Field(description="The reference batch base_lr belongs to.")
    base_batch_size_from: Literal["spec", "global_batch_size"] = Field(
        default="spec",
        description="Where the reference came from: the spec's base_batch_size, or (none given) "
        "the global batch asked for.",
    )
    factor: float
    warmup_steps: int = Field(description="Suggested linear warm-up, in optimizer steps (0: none).")


class MemoryCategory(StrEnum):
    """Where the bytes of a training step live: the tracker attributes every allocation to one
    of these, and the breakdown, the CLI and the benches read them from here."""

    PARAMETERS = "parameters"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    INPUT_BATCH = "input_batch"
    ACTIVATIONS = "activations"
    TEMPORARY = "temporary"  # backward and optimizer intermediates
    WORKSPACE = "workspace"  # library workspaces: cuBLAS/cuBLASLt, cuDNN layout transforms
    # Sharded and parameter-efficient plans (FSDPMemTracker's `_FSDPRefType` names the same).
    GATHERED_PARAMETERS = "gathered_parameters"  # FSDP's unsharded copies during compute
    COMMUNICATION = "communication"  # all-gather outputs, reduce-scatter inputs, DDP buckets
    ADAPTER_PARAMETERS = "adapter_parameters"  # LoRA's A and B (the base stays `parameters`)

    @classmethod
    def tensors(cls) -> tuple[MemoryCategory, ...]:
        """The categories of tensors a dispatch-mode tracker (or MemTracker) sees."""
        return tuple(c for c in cls if c is not cls.WORKSPACE)


class MemoryBreakdown(BaseModel):
    """Bytes at the peak of one steady-state training iteration; the parts add up to `peak`
    (allocated). `reserved` is what the caching allocator holds at its peak plus the overhead:
    what `nvidia-smi` shows and what out-of-memory is decided on against `capacity`."""

    # The lines that add up to `peak`.
    PARTS: ClassVar[tuple[str, ...]] = (*MemoryCategory, "overhead")

    parameters: int
    gradients: int
    optimizer_state: int
    input_batch: int
    activations: int
    temporary: int
    workspace: int = Field(default=0, description="cuBLAS/cuBLASLt workspaces (allocator).")
    gathered_parameters: int = Field(
        default=0, description="FSDP: parameters all-gathered for the blocks computing now."
    )
    communication: int = Field(
        default=0, description="All-gather / reduce-scatter buffers, DDP's gradient buckets."
    )
    adapter_parameters: int = Field(default=0, description="LoRA's A and B matrices.")
    overhead: int = Field(description="Outside the allocator: CUDA context, NCCL buffers.")
    cuda_context: int = Field(default=0, description="Part of `overhead`.")
    nccl_buffers: int = Field(default=0, description="Part of `overhead` (world_size > 1).")
    peak: int = Field(description="Allocated peak plus overhead: the sum of the parts.")
    reserved: int | None = Field(
        default=None, description="Reserved peak plus overhead (null where not known)."
    )
    allocator_cached: int | None = Field(
        default=None,
        description="reserved - peak: rounding, unsplit blocks, cached free segments.",
    )
    capacity: int
    host_offloaded: int = Field(
        default=0,
        description="Host memory per rank (FSDP CPU offload: sharded parameters, gradients, "
        "optimizer state; a paged optimizer's states in unified memory; activation offload's "
        "pinned copies at the end of forward); not part of `peak`.",
    )


class StepSplit(BaseModel):
    """Where an estimated optimizer step's time goes (seconds)."""

    compute_s: float = Field(description="Matmuls and convolutions (Tensor Cores / cuBLAS).")
    memory_bound_s: float = Field(description="Normalisations, activations, pointwise ops.")
    recompute_s: float = Field(
        default=0.0,
        description="Gradient checkpointing: the checkpointed blocks' forwards run again in "
        "backward (matmuls and pointwise ops alike; with checkpointing.selective 'op' only the "
        "ops between the kept matmul and attention outputs). Not in compute_s or "
        "memory_bound_s; added to the step.",
    )
    recompute_bytes: float = Field(
        default=0.0,
        description="Bytes of activations recomputed per step rather than kept (the memory "
        "breakdown's activations are the ones kept).",
    )
    optimizer_s: float = Field(description="The optimizer's kernels, once per step.")
    input_s: float = Field(
        description="Host-to-device copy of the batch; overlapped with compute, not added."
    )
    communication_s: float = Field(
        default=0.0,
        description="Collectives per step (ring all-reduce / all-gather / reduce-scatter over "
        "the card's links); overlapped with compute, only the excess is added.",
    )
    communication_bytes: float = Field(default=0.0, description="Through each rank's link.")
    offload_s: float = Field(
        default=0.0,
        description="Activation offload's copies to pinned host memory (forward) and back "
        "(backward) over the card's host link (PCIe); on the compute stream, so added.",
    )
    offload_bytes: float = Field(default=0.0, description="Both ways, per step.")
    context_parallel_s: float = Field(
        default=0.0,
        description="Context parallelism's ring: keys and values all-gathered over the cp "
        "group's link in forward (and recompute), gathered again and their gradients "
        "exchanged in backward; attention waits for them, so added.",
    )
    context_parallel_bytes: float = Field(default=0.0, description="Through each rank's link.")
    tensor_parallel_s: float = Field(
        default=0.0,
        description="Tensor parallelism's all-reduces over the tp group's link: after each "
        "rowwise layer in forward (and recompute) and after each colwise layer's input "
        "gradient in backward; the next layer waits for them, so added.",
    )
    tensor_parallel_bytes: float = Field(default=0.0, description="Through each rank's link.")


class Throughput(BaseModel):
    samples_per_second: float
    step_time_s: float = Field(description="One optimizer step (all accumulation micro-steps).")
    epoch_time_s: float
    total_time_s: float = 0.0
    measured: bool = Field(description="False: a roofline estimate, not a timed step.")
    flops_per_sample: float | None = None
    split: StepSplit | None = None
    samples_per_second_band: tuple[float, float] | None = Field(
        default=None,
        description="Low and high samples/s: the estimate times the 10th and 90th percentiles "
        "of measured / estimated samples/s on the calibration rows.",
    )
    band_coverage: float | None = Field(
        default=None,
        description="Share of calibration rows whose measurement falls in such a band, out of "
        "family (each model family judged by the band the others give).",
    )


class RiskPoint(BaseModel):
    micro_batch: int
    oom_probability: float


class Risk(BaseModel):
    """How likely the simulated plan is to be wrong on the real card, from the simulator's
    errors on published GPU measurements (ln(real / simulated peak) fitted as a normal)."""

    headroom: float = Field(
        description="The headroom the search kept (search.headroom, or the one that gives "
        "search.max_oom_probability)."
    )
    oom_probability: float = Field(
        description="Chance that the recommended micro-batch runs out of memory on the card."
    )
    max_micro_batch_oom_probability: float = Field(
        description="The same at the largest micro-batch the search found."
    )
    peak_fraction: float = Field(
        description="Simulated peak at the recommended micro-batch over the card's capacity."
    )
    headroom_for_one_percent: float = Field(
        description="The search.headroom below which a plan at its limit runs out of memory "
        "more than 1% of the time."
    )
    log_ratio_mean: float = Field(description="mu of ln(real / simulated peak).")
    log_ratio_sd: float = Field(description="sigma of ln(real / simulated peak).")
    calibration: str = Field(description="The measurements the distribution was fitted on.")
    by_micro_batch: list[RiskPoint] = Field(
        default_factory=list,
        description="The chance at each micro-batch the search probed, in order: the price of "
        "a bigger batch in risk.",
    )


class Trial(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    batch_size: int
    fits: bool
    peak_bytes: int
    duration_s: float
    reason: str | None = None
    phase: Literal[
        "search", "breakdown", "what_if", "scale_out", "sequence_length", "evaluation"
    ] = "search"
    scenario: str | None = Field(
        default=None, description="The what-if neighbour this probe belongs to, if any."
    )


class PolicyCheck(BaseModel):
    """One checkpointing policy the plan tried (`training.checkpointing.auto`)."""

    policy: str = Field(examples=["every 2"])
    feasible: bool
    max_micro_batch_size: int
    recompute_s_per_sample: float | None = Field(
        default=None,
        description="Its plan's recomputation (throughput.split.recompute_s) per sample of "
        "the global batch; null where the plan has no throughput.",
    )


class CheckpointingChoice(BaseModel):
    """The policy `training.checkpointing.auto` chose, and why: the least recompute whose max
    micro-batch reaches `needed`."""

    policy: str = Field(description="none, op, every k, full or full+offload.")
    gradient_checkpointing: bool
    every: int
    offload: bool
    selective: str = Field(default="block", description="checkpointing.selective: block or op.")
    needed: int = Field(description="The max micro-batch the choice had to reach.")
    checked: list[PolicyCheck]


class LayoutCheck(BaseModel):
    """One layout `parallelism.layout: auto` planned (its exact search)."""

    tensor_parallel: int
    context_parallel: int
    data_parallel: int = Field(description="world_size / (tensor_parallel x context_parallel).")
    feasible: bool
    max_micro_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    peak_bytes: int = Field(description="Per rank, at the layout's micro-batch.")
    samples_per_second: float | None = None
    step_time_s: float | None = None
    total_time_s: float | None = Field(default=None, description="Time to train: the ranking.")
    tensor_parallel_s: float = 0.0
    context_parallel_s: float = 0.0
    communication_s: float = Field(default=0.0, description="FSDP's collectives per step.")


class LayoutChoice(BaseModel):
    """The layout `parallelism.layout: auto` chose: the shortest time to train of the layouts
    planned, ranked in `checked` (feasible first, then by time)."""

    tensor_parallel: int
    context_parallel: int
    data_parallel: int
    checked: list[LayoutCheck]
    skipped: list[str] = Field(
        default_factory=list,
        description="Layouts not planned and why: each either cannot be traced (heads, the "
        "sequence, the attention) or cannot be faster than one planned (see the README).",
    )


class EvaluationPlan(BaseModel):
    """The evaluation's own micro-batch (forward only) and what it adds to time-to-train."""

    max_micro_batch_size: int
    micro_batch_size: int = Field(description="per_device_eval_batch_size.")
    peak_bytes: int = Field(description="At the evaluation's micro-batch.")
    iterations: int = Field(description="Micro-batches in one evaluation, per rank.")
    evaluations: int = Field(description="Evaluations in the run.")
    step_time_s: float | None = None
    time_per_evaluation_s: float | None = None
    total_time_s: float | None = Field(
        default=None, description="All evaluations; included in throughput.total_time_s."
    )


class DepthFolding(BaseModel):
    """How the plan traced a stack of identical blocks (search.depth_folding)."""

    layers: int = Field(description="Blocks in the model's stack.")
    folded: bool = Field(
        description="true: the stack's steps were synthesised from models with "
        "traced_depths blocks; false: the whole model was traced (see reason)."
    )
    traced_depths: list[int] = Field(default_factory=list)
    reason: str | None = Field(default=None, description="Why the stack did not fold.")


class MixtureOfExperts(BaseModel):
    """A mixture-of-experts model's experts, as the plan traced them."""

    moe_layers: int
    experts: int = Field(description="Experts per MoE layer.")
    experts_per_token: int = Field(description="The router's top k.")
    implementation: Literal["grouped_mm", "batched_mm"] = Field(
        description="transformers' experts_implementation traced. grouped_mm: one grouped GEMM "
        "over every (token, expert) pair; batched_mm: a copy of an expert's weights per pair."
    )
    expert_parameters: int = Field(
        description="Parameters in the experts (all trained: gradients and optimizer state "
        "hold every expert)."
    )
    active_parameters: int = Field(
        description="Parameters a token's forward passes through: the model less the experts "
        "it is not routed to."
    )
    expert_gemm_dtype: Literal["float32", "bfloat16"] = Field(
        description="The dtype the experts' GEMMs run in: float32 whenever the weights are "
        "(torch's grouped GEMM is not autocast-enabled; its fp32 path has no Tensor Cores)."
    )
    routing: Literal["dropless"] = Field(
        default="dropless",
        description="Every token reaches its top k experts (no capacity factor, no dropped "
        "tokens). On one device the memory is the same for any routing: the grouped GEMM's "
        "rows are tokens x experts_per_token however they split among the experts.",
    )


class TokenBatching(BaseModel):
    """How the token data's real lengths are batched (data.lengths, data.batching), at the
    plan's micro-batch."""

    batching: Literal["pad_to_max", "pad_to_longest", "packed"]
    batch_unit: Literal["samples", "rows"] = Field(
        description="What micro_batch_size, accumulation and the global batches of the plan "
        "count: samples, or for packed data rows of seq_len tokens."
    )
    mean_length: float
    longest: int
    traced_length: int = Field(
        description="The rows' length in the trace: seq_len, or for pad_to_longest the "
        "longest sample (a batch may hold it)."
    )
    samples_per_micro_batch: float = Field(description="On average, for packed rows.")
    tokens_per_micro_batch: float = Field(
        description="Tokens computed per micro-batch, padding included (pad_to_longest: at the "
        "expected padded length of a batch)."
    )
    real_tokens_per_micro_batch: float
    padding_fraction: float = Field(description="Of the tokens computed, the share of padding.")
    padding_fraction_pad_to_max: float = Field(
        description="The same share had every sample been padded to seq_len."
    )
    global_batch_samples: int = Field(description="The global batch the spec asked for.")
    effective_global_batch_samples: float = Field(
        description="Samples per optimizer step the plan's batches hold (on average, packed)."
    )
    global_batch_tokens: int = Field(
        description="The global batch asked for, in real tokens (at the mean length)."
    )
    effective_global_batch_tokens: int = Field(
        description="Real tokens per optimizer step the plan's batches hold, on average."
    )


class SequenceLengthCheck(BaseModel):
    seq_len: int
    fits: bool
    peak_bytes: int


class SequenceLength(BaseModel):
    """The longest sequence that fits (search.target 'sequence_length'), exact to a granule:
    `max_seq_len` fits and `max_seq_len + granularity` does not, both probed (unless
    `max_seq_len` is the spec's own data.seq_len: `bound_reached`)."""

    micro_batch_size: int
    granularity: int
    max_seq_len: int = Field(description="0: not even one granule fits.")
    bound_reached: bool = False
    checked: list[SequenceLengthCheck] = Field(default_factory=list)


class FitSuggestion(BaseModel):
    """The changes that make an infeasible job fit, tried cumulatively from the cheapest (mixed
    precision, the fused loss head, fused optimizer kernels, checkpointing, checkpoints
    offloaded to the host, 8-bit state, LoRA then QLoRA, the sequence over 2 then 4 GPUs
    (context parallelism), bigger cards), and the plan they give."""

    changes: dict[str, str | bool | int] = Field(
        description="Spec fields (training.* or gpu) and the values that fit.",
        examples=[{"loss_kernel": "liger", "gradient_checkpointing": True}],
    )
    device: DeviceInfo
    world_size: int = Field(default=1, description="GPUs of the plan that fits.")
    max_micro_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    samples_per_second: float | None = None


# The spec fields a what-if changes (gpu: the simulated card).
WhatIfChange = Literal[
    "precision",
    "gradient_checkpointing",
    "gpu",
    "peft",
    "strategy",
    "optimizer_impl",
    "optimizer",
    "loss_kernel",
]


class WhatIf(BaseModel):
    """The exact max micro-batch under one neighbouring choice of the spec."""

    change: WhatIfChange
    value: str | bool
    device: DeviceInfo
    feasible: bool
    max_micro_batch_size: int
    peak_bytes: int = Field(description="Peak at the max micro-batch (at 1 when infeasible).")
    search_bound_reached: bool = False
    trials: list[Trial]


class Prediction(BaseModel):
    """A real device's plan beside what its simulated twin predicted: the simulator's fidelity,
    case by case (aggregated by `GET /v1/fidelity`)."""

    predicted_max_micro_batch_size: int
    real_max_micro_batch_size: int
    relative_error: float = Field(description="(predicted - real) / real; > 0: over-predicted.")
    peak_ratio: float | None = Field(
        default=None,
        description="Real peak over the simulated one at the real answer (the twin's probes "
        "interpolated in batch): one draw of the error plans' `risk` is fitted on.",
    )
    simulated_trials: int
    simulated_wall_s: float


class WorldSizeCheck(BaseModel):
    world_size: int
    fits: bool
    peak_bytes: int = Field(description="Per rank, at a micro-batch of one.")


class ScaleOut(BaseModel):
    strategy: str
    world_size: int | None = Field(description="Fewest GPUs that fit; null: none up to 65536.")
    checked: list[WorldSizeCheck]


class PlanWarning(BaseModel):
    code: str
    message: str


class LrPoint(BaseModel):
    label: str = Field(examples=["warmup_end"])
    step: int = Field(description="Optimizer step (0-based).")
    learning_rate: float


class LrSchedule(BaseModel):
    """The schedule over the run, in optimizer steps, as every config renders it."""

    name: str
    warmup_steps: int
    total_steps: int
    points: list[LrPoint] = Field(description="Start, end of warm-up, 25/50/75%, last step.")
    upper_bound: bool = Field(
        default=False,
        description="plateau: its cuts depend on the validation metric; these are the rates "
        "before any cut.",
    )


class ParamGroupRate(BaseModel):
    prefix: str | None = Field(description="null: every parameter no group's prefix matches.")
    lr_scale: float
    learning_rate: float = Field(description="Peak rate of the group (after batch scaling).")


class OptimizerAdjustment(BaseModel):
    """Malladi et al. (2022): the square-root rule's matching betas and epsilon."""

    batch_factor: float = Field(description="k: effective batch / base batch.")
    betas: list[float] = Field(description="1 - k (1 - beta) (RMSprop: its alpha).")
    eps: float = Field(description="eps / sqrt(k).")
    applied: bool = Field(description="False: a beta would leave (0, 1); the rule fails here.")


class PlanResult(BaseModel):
    feasible: bool = True
    device: DeviceInfo
    max_micro_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    global_batch_size: int
    effective_global_batch_size: int
    learning_rate: float
    lr_scaling: LrScalingInfo
    iterations_per_epoch: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    total_steps_upper_bound: bool = Field(
        default=False, description="Early stopping may end the run before total_optimizer_steps."
    )
    schedule: LrSchedule | None = None
    param_groups: list[ParamGroupRate] = Field(default_factory=list)
    optimizer: str | None = Field(default=None, description="The optimizer class traced.")
    optimizer_impl: str | None = Field(default=None, description="Its implementation traced.")
    optimizer_adjustment: OptimizerAdjustment | None = None
    memory: MemoryBreakdown
    throughput: Throughput | None = None
    risk: Risk | None = Field(
        default=None,
        description="Simulated devices, feasible plans: the chance of running out of memory.",
    )
    trials: list[Trial]
    search_bound_reached: bool = False
    warnings: list[PlanWarning] = Field(default_factory=list)
    suggestions: list[str] = Field(default_factory=list)
    configs: dict[str, Any] = Field(default_factory=dict)
    what_if: list[WhatIf] = Field(
        default_factory=list,
        description="Max micro-batch: other precision, checkpointing toggled, bigger card; "
        "LoRA (or QLoRA) and the next sharding strategy where they apply.",
    )
    model_summary: dict[str, Any] = Field(default_factory=dict)
    prediction: Prediction | None = Field(
        default=None, description="Real devices: the simulated answer beside the real one."
    )
    world_size: int = 1
    strategy: str = Field(default="none", description="The parallelism strategy traced.")
    scale_out: list[ScaleOut] = Field(
        default_factory=list,
        description="The fewest GPUs per strategy (world_size 'auto', or a job that does not "
        "fit): each the smallest world size where a micro-batch of one fits per rank.",
    )
    fits_with: FitSuggestion | None = Field(
        default=None,
        description="An infeasible plan (with search.what_if): the first combination of "
        "changes, cheapest first, whose plan is feasible; more GPUs are in scale_out.",
    )
    checkpointing: CheckpointingChoice | None = Field(
        default=None, description="training.checkpointing.auto: the policy chosen and those tried."
    )
    layouts: LayoutChoice | None = Field(
        default=None,
        description="parallelism.layout 'auto': the layout chosen and those planned, ranked.",
    )
    traced_steps: int | None = Field(
        default=None,
        description="Training steps traced (run, on a real device) to make this plan, its "
        "what-ifs and searches included: the plan's cost.",
    )
    evaluation: EvaluationPlan | None = Field(
        default=None, description="training.evaluation: its micro-batch and its time."
    )
    depth_folding: DepthFolding | None = Field(
        default=None,
        description="Models with a stack of identical blocks: whether the plan folded it.",
    )
    moe: MixtureOfExperts | None = Field(
        default=None, description="Mixture-of-experts models: their experts, as traced."
    )
    token_batching: TokenBatching | None = Field(
        default=None,
        description="Token data with data.lengths: padding or packing at the plan's batches.",
    )
    sequence_length: SequenceLength | None = Field(
        default=None,
        description="search.target 'sequence_length': the longest seq_len that fits; the rest "
        "of the plan is made at that length.",
    )
