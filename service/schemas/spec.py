"""The plan request, strict and bounded (the contract the README and OpenAPI document show).

Every bound here exists so that a hostile or mistaken spec is refused with a 422 naming the field,
instead of hanging a worker or exhausting its memory. Nothing in a spec is ever executed: model
sources name things from allow-lists (torch.nn classes, torchvision names, presets, entry points).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from service.schemas.layers import LAYER_TYPES

Scalar = int | float | bool | str | None
KwargValue = Scalar | list[int] | list[float] | list[str]

MAX_KWARGS = 32
MAX_STR = 128
MAX_LIST = 8
# A transformers config names things per layer (`layer_types`, `mlp_only_layers`): as many
# items as the deepest public model has layers (Llama-3.1-405B: 126).
MAX_CONFIG_LIST = 256
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"

# Keyword arguments that would make a model factory fetch weights over the network.
FORBIDDEN_KWARGS = frozenset(
    {
        "weights",
        "weights_backbone",
        "pretrained",
        "pretrained_backbone",
        "progress",
        "model_dir",
        "file_name",
        "cache_dir",
        # timm.create_model's: a file loaded from disk, a config that points at weights
        "checkpoint_path",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
    }
)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_kwargs(kwargs: dict[str, Any], max_list: int = MAX_LIST) -> dict[str, Any]:
    if len(kwargs) > MAX_KWARGS:
        raise ValueError(f"at most {MAX_KWARGS} keyword arguments")
    for key, value in kwargs.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
            raise ValueError(f"{key!r} is not a keyword argument name")
        if key in FORBIDDEN_KWARGS:
            raise ValueError(f"{key!r} is not accepted: trainplan never downloads weights")
        if isinstance(value, str) and len(value) > MAX_STR:
            raise ValueError(f"{key!r}: strings are at most {MAX_STR} characters")
        if isinstance(value, list) and len(value) > max_list:
            raise ValueError(f"{key!r}: lists are at most {max_list} items")
        if isinstance(value, list) and any(isinstance(v, str) and len(v) > 64 for v in value):
            raise ValueError(f"{key!r}: strings in a list are at most 64 characters")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key!r}: numbers must be finite")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1 << 20:
            raise ValueError(f"{key!r}: integers are bounded by 2**20")
    return kwargs


class LayerSpec(BaseModel):
    """One `torch.nn` layer: `type` from the allow-list, the other keys its keyword arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(description="A torch.nn class name from the allow-list.", examples=["Conv2d"])

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in LAYER_TYPES:
            raise ValueError(
                f"unknown layer type {value!r}; allowed: {', '.join(sorted(LAYER_TYPES))}"
            )
        return value

    @model_validator(mode="after")
    def _check_args(self) -> LayerSpec:
        extra = dict(self.model_extra or {})
        _check_kwargs(extra)
        for key, value in extra.items():
            if not isinstance(value, (int, float, bool, str, list, type(None))):
                raise ValueError(f"{key!r}: only numbers, booleans, strings and lists of numbers")
            if isinstance(value, list) and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"{key!r}: lists hold numbers only")
        allowed = LAYER_TYPES[self.type]
        unknown = set(extra) - allowed
        if unknown:
            raise ValueError(
                f"{self.type} does not take {sorted(unknown)}; it takes {sorted(allowed)}"
            )
        return self

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LayersModel(StrictModel):
    source: Literal["layers"]
    layers: list[LayerSpec] = Field(min_length=1, max_length=256)


class TorchvisionModel(StrictModel):
    source: Literal["torchvision"]
    name: str = Field(pattern=r"^[a-z0-9_]{1,64}$", examples=["resnet50"])
    kwargs: dict[str, KwargValue] = Field(default_factory=dict)

    _kw = field_validator("kwargs")(classmethod(lambda cls, v: _check_kwargs(v)))


class TimmModel(StrictModel):
    """A model of timm's zoo (`timm.create_model(name, pretrained=False, **kwargs)`), built from
    its definition, never weights. `num_classes` and `in_chans` follow the data unless given."""

    source: Literal["timm"]
    name: str = Field(pattern=r"^[a-z0-9_]{1,80}$", examples=["convnext_tiny"])
    kwargs: dict[str, KwargValue] = Field(default_factory=dict)
    fused_attn: bool | None = Field(
        default=None,
        description="timm's fused attention (F.scaled_dot_product_attention in its attention "
        "blocks; timm's `fused_attn` switch, TIMM_FUSED_ATTN). false: the explicit q @ k^T and "
        "softmax kept for backward, as timm ran before 0.9 (its 2022 benchmarks); null: timm's "
        "default (fused).",
    )

    _kw = field_validator("kwargs")(classmethod(lambda cls, v: _check_kwargs(v)))


class TransformersModel(StrictModel):
    source: Literal["transformers"]
    preset: str | None = Field(default=None, pattern=NAME_PATTERN, examples=["llama-3-8b"])
    architecture: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{1,64}$")
    config: dict[str, KwargValue] = Field(default_factory=dict)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = (
        Field(
            default=None,
            description="The attention kernel, as transformers names it (from_pretrained's "
            "attn_implementation); null: config.attn_implementation if given, else transformers' "
            "default (sdpa where the architecture has it, else eager). eager "
            "materialises the scores (batch x heads x T x T) and keeps their softmax for backward; "
            "sdpa and flash_attention_2 keep O(T) statistics (the trace runs SDPA's flash kernel "
            "for both), except that padded or packed rows (data.lengths shorter than the row) give "
            "sdpa a (batch, 1, T, T) mask from transformers, which SDPA's memory-efficient kernel "
            "keeps per layer in the query's dtype; flash_attention_2 runs such rows as varlen "
            "sequences without one. flex_attention (PyTorch's compiled FlexAttention, as "
            "transformers runs it) keeps the same O(T) output and logsumexp and takes padding and "
            "packed documents as a block mask of (T/128)^2 entries, not a square one.",
        )
    )

    @property
    def attention(self) -> str:
        """The kernel the model runs with: this field, the config's key, or sdpa."""
        named = self.config.get("attn_implementation")
        return self.attn_implementation or (named if isinstance(named, str) else "sdpa")

    _cfg = field_validator("config")(
        classmethod(lambda cls, v: _check_kwargs(v, max_list=MAX_CONFIG_LIST))
    )

    @model_validator(mode="after")
    def _preset_or_architecture(self) -> TransformersModel:
        if (self.preset is None) == (self.architecture is None):
            raise ValueError("give exactly one of 'preset' or 'architecture'")
        return self


class RegisteredModel(StrictModel):
    source: Literal["registered"]
    name: str = Field(pattern=NAME_PATTERN)
    kwargs: dict[str, KwargValue] = Field(default_factory=dict)

    _kw = field_validator("kwargs")(classmethod(lambda cls, v: _check_kwargs(v)))


ModelSpec = Annotated[
    LayersModel | TorchvisionModel | TimmModel | TransformersModel | RegisteredModel,
    Field(discriminator="source"),
]

MAX_SAMPLE_ELEMENTS = 1 << 26  # one sample: at most 64 Mi elements (8192x8192 RGB is 201M: refused)


class _DataBase(StrictModel):
    num_samples: int = Field(default=1, ge=1, le=10**12, description="Samples in one epoch.")
    target: Literal["classification", "regression"] = "classification"
    num_classes: int | None = Field(default=None, ge=1, le=1 << 20)
    num_outputs: int = Field(default=1, ge=1, le=1 << 16, description="Regression outputs.")


class ImageData(_DataBase):
    kind: Literal["image"]
    channels: Literal[1, 3, 4] = Field(description="1 grayscale, 3 RGB, 4 RGBA/RGB-D.")
    height: int = Field(ge=1, le=8192)
    width: int = Field(ge=1, le=8192)
    layout: Literal["channels_first", "channels_last"] = "channels_first"

    @model_validator(mode="after")
    def _bounded(self) -> ImageData:
        if self.channels * self.height * self.width > MAX_SAMPLE_ELEMENTS:
            raise ValueError("one image is larger than 64 Mi elements")
        return self

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)


class LengthBin(StrictModel):
    up_to: int = Field(ge=1, description="The bin's longest sample, in tokens.")
    count: int = Field(ge=0, le=10**12)


# A percentile as a JSON object key: "0" to "100".
Percentile = Annotated[str, Field(pattern=r"^(100|[1-9]?[0-9])$")]


class TokenLengths(StrictModel):
    """How long the samples are, in tokens: percentiles (the lengths at some percentiles, 100
    the longest sample; straight lines between them) or a histogram (bins of lengths up to a
    bound, with counts; uniform within a bin). Exactly one of the two."""

    percentiles: dict[Percentile, Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        min_length=2,
        max_length=101,
        description="Percentile -> length in tokens; must include 100 (the longest).",
        examples=[{"50": 350, "90": 1400, "99": 3900, "100": 8192}],
    )
    histogram: list[LengthBin] | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Bins with increasing bounds: the count of samples longer than the previous "
        "bound and at most this one.",
        examples=[[{"up_to": 512, "count": 6000}, {"up_to": 8192, "count": 500}]],
    )

    @model_validator(mode="after")
    def _one_shape(self) -> TokenLengths:
        if (self.percentiles is None) == (self.histogram is None):
            raise ValueError("give exactly one of percentiles and histogram")
        if self.percentiles is not None:
            points = self.points()
            if points[-1][0] != 100:
                raise ValueError("percentiles must include 100 (the longest sample)")
            if any(b[1] < a[1] for a, b in itertools.pairwise(points)):
                raise ValueError("lengths must not fall as the percentile rises")
        if self.histogram is not None:
            bounds = [b.up_to for b in self.histogram]
            if any(b <= a for a, b in itertools.pairwise(bounds)):
                raise ValueError("histogram bounds must increase")
            if sum(b.count for b in self.histogram) == 0:
                raise ValueError("the histogram counts no sample")
        return self

    def points(self) -> list[tuple[int, int]]:
        """The percentiles as (percentile, length), in order."""
        return sorted((int(k), v) for k, v in (self.percentiles or {}).items())

    @property
    def longest(self) -> int:
        if self.percentiles is not None:
            return self.percentiles["100"]
        assert self.histogram is not None
        return max(b.up_to for b in self.histogram if b.count > 0)

    @property
    def shortest(self) -> int:
        """The shortest sample's length (a histogram's first filled bin starts where the bin
        before it ends)."""
        if self.percentiles is not None:
            return min(self.percentiles.values())
        assert self.histogram is not None
        lower = 1
        for b in self.histogram:
            if b.count > 0:
                return lower
            lower = b.up_to
        return lower


class TokensData(_DataBase):
    kind: Literal["tokens"]
    seq_len: int = Field(
        ge=1,
        le=131072,
        description="Tokens per sample as the model sees them: the padded or packed row length "
        "(samples longer are truncated to it).",
    )
    vocab_size: int | None = Field(default=None, ge=2, le=1 << 22)
    lengths: TokenLengths | None = Field(
        default=None,
        description="The real samples' lengths (none: every sample is seq_len tokens long).",
    )
    batching: Literal["pad_to_max", "pad_to_longest", "packed"] = Field(
        default="pad_to_max",
        description="pad_to_max: every sample padded to seq_len. pad_to_longest: each batch "
        "padded to its longest sample (memory planned for a batch holding the longest; time "
        "at the expected padded length). packed: samples concatenated into rows of seq_len "
        "tokens, document boundaries kept (padding-free / varlen attention); micro_batch_size "
        "counts rows, global_batch_size still counts samples.",
    )

    @field_validator("lengths")
    @classmethod
    def _within_seq_len(cls, lengths: TokenLengths | None, info: ValidationInfo) -> Any:
        seq_len = info.data.get("seq_len")
        if lengths is not None and seq_len is not None and lengths.longest > seq_len:
            raise ValueError(
                f"the longest sample ({lengths.longest} tokens) is longer than seq_len "
                f"{seq_len}: raise seq_len, or truncate the samples and say so here"
            )
        return lengths

    @field_validator("batching")
    @classmethod
    def _lengths_for_batching(cls, batching: str, info: ValidationInfo) -> Any:
        # only when lengths validated and are absent: a bad `lengths` has its own error
        if batching != "pad_to_max" and "lengths" in info.data and info.data["lengths"] is None:
            raise ValueError(f"batching {batching!r} needs data.lengths (how long the samples are)")
        return batching


class TensorData(_DataBase):
    kind: Literal["tensor"]
    # The item bounds are in the published schema, so the schema says what is valid.
    shape: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(
        min_length=1, max_length=4, description="One sample's shape."
    )

    @field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise ValueError("one sample is larger than 64 Mi elements")
        return shape


DataSpec = Annotated[ImageData | TokensData | TensorData, Field(discriminator="kind")]

Optimizer = Literal[
    "sgd",
    "sgd_momentum",
    "nesterov",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    "adafactor",
    # bitsandbytes': 8-bit block-wise states and/or paged (unified-memory) states; Lion
    "adamw_8bit",
    "paged_adamw",
    "paged_adamw_8bit",
    "lion",
    "lion_8bit",
    "paged_lion",
    "paged_lion_8bit",
]
# How a torch.optim optimizer runs: multi-tensor (`foreach`), `fused` or per-parameter
# (`for_loop`) kernels; each allocates different temporaries.
OptimizerImpl = Literal["foreach", "fused", "for_loop"]
# bitsandbytes' optimizers: (the algorithm, its state: 32bit | 8bit, paged or not)
BNB_OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw_8bit": ("adamw", "8bit"),
    "paged_adamw": ("adamw", "paged_32bit"),
    "paged_adamw_8bit": ("adamw", "paged_8bit"),
    "lion": ("lion", "32bit"),
    "lion_8bit": ("lion", "8bit"),
    "paged_lion": ("lion", "paged_32bit"),
    "paged_lion_8bit": ("lion", "paged_8bit"),
}
_TORCH: tuple[OptimizerImpl, ...] = ("foreach", "fused", "for_loop")
_UNFUSED: tuple[OptimizerImpl, ...] = ("foreach", "for_loop")  # no fused kernel in torch
# The kernels each torch optimizer has; the first is what PyTorch picks on CUDA (foreach since
# torch 2.0 wherever it exists; fused is opt-in).
OPTIMIZER_IMPLS: dict[str, tuple[OptimizerImpl, ...]] = {
    "sgd": _TORCH,
    "sgd_momentum": _TORCH,
    "nesterov": _TORCH,
    "adam": _TORCH,
    "adamw": _TORCH,
    "rmsprop": _UNFUSED,
    "adagrad": _TORCH,
    "adafactor": _UNFUSED,
}


def algorithm(optimizer: str) -> str:
    """The update rule an optimizer name runs (a bitsandbytes name: its base algorithm)."""
    return BNB_OPTIMIZERS[optimizer][0] if optimizer in BNB_OPTIMIZERS else optimizer


# fp32 follows PyTorch's defaults (cuDNN convolutions in TF32 on Ampere and later, matmuls not);
# tf32 also runs matmuls in TF32 (`torch.backends.cuda.matmul.allow_tf32 = True`).
Precision = Literal["fp32", "tf32", "fp16-mixed", "bf16-mixed", "bf16"]
LrScaling = Literal["linear", "sqrt", "none", "auto"]


def _dotted_names(value: Any, most: int, what: str) -> Any:
    """A list of 1..most dotted module or parameter names (a literal such as 'all' passes)."""
    if isinstance(value, list):
        if not 1 <= len(value) <= most:
            raise ValueError(f"between 1 and {most} of them (each a {what})")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.]{1,128}", name):
                raise ValueError(f"{name!r} is not a {what}")
    return value


Strategy = Literal["none", "ddp", "fsdp", "hybrid_shard", "zero1", "zero2", "zero3"]
SHARDED: frozenset[str] = frozenset({"fsdp", "hybrid_shard", "zero2", "zero3"})


class ParallelismSpec(StrictModel):
    """How the job spreads over `world_size` GPUs. Each strategy is traced with the real wrapper
    under a fake process group, as rank 0 (the worst rank) sees it: ddp `DistributedDataParallel`;
    zero1 DDP + `ZeroRedundancyOptimizer`; fsdp/zero3 `fully_shard`; zero2 `fully_shard` without
    resharding after forward (FSDP's SHARD_GRAD_OP, PyTorch's ZeRO-2); hybrid_shard
    `fully_shard` on a (nodes, gpus_per_node) mesh: sharded within a node, replicated across."""

    strategy: Strategy | None = Field(
        default=None, description="null: ddp when world_size > 1, else none."
    )
    world_size: int | Literal["auto"] | None = Field(
        default=None,
        description="GPUs in all (same as training.world_size); 'auto': the fewest that fit.",
    )
    gpus_per_node: int = Field(default=8, ge=1, le=64)
    cpu_offload: bool = Field(
        default=False,
        description="fsdp/zero3/hybrid_shard: sharded parameters, gradients and optimizer state "
        "live in host memory (FSDP's CPUOffloadPolicy); the optimizer steps on the CPU.",
    )
    reshard_after_forward: bool = Field(
        default=True, description="fsdp/hybrid_shard: free gathered parameters after forward."
    )
    bucket_cap_mb: float = Field(
        default=25, gt=0, le=4096, description="DDP's gradient bucket size (MiB)."
    )
    context_parallel: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Ranks one sequence is split over (context parallelism, ring attention as "
        "torch.distributed.tensor.experimental.context_parallel runs it, head-tail load "
        "balanced): each rank holds seq_len / N tokens of every sample and all-gathers the "
        "others' keys and values per layer. Composed with fsdp as torchtitan composes them: "
        "parameters sharded over all world_size ranks, world_size / N data-parallel groups. "
        "Needs strategy fsdp, a world_size that is a multiple of N, and seq_len a multiple "
        "of 2N.",
    )

    tensor_parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks each transformer block's linear layers are split over (tensor "
        "parallelism, DTensor's parallelize_module with the colwise/rowwise plan transformers "
        "ships for the architecture: q/k/v and the MLP's up projections by output features, "
        "the attention's output and the MLP's down projection by input features, an "
        "all-reduce after each). Composed with fsdp on one mesh as torchtitan composes them "
        "(dp_shard x cp x tp): FSDP shards each TP shard over world_size / N ranks. The "
        "embeddings and the output head are sharded by FSDP only. Needs strategy fsdp, a fixed "
        "world_size that is a multiple of N x context_parallel, and attention and key/value "
        "heads that N divides.",
    )

    sequence_parallel: bool = Field(
        default=False,
        description="With tensor_parallel: torchtitan's sequence parallelism. Between the "
        "split layers the residual stream and the norms hold 1/N of the tokens on each rank; "
        "the attention and the MLP all-gather their input and their last layer "
        "reduce-scatters its output (the same bytes as the all-reduces they replace). Needs "
        "seq_len a multiple of N; not with context_parallel.",
    )
    loss_parallel: bool = Field(
        default=False,
        description="With tensor_parallel and the model's own loss (loss_kernel 'standard'): "
        "torchtitan's loss parallelism, the output head split by vocabulary and the "
        "cross-entropy computed on each rank's share of the logits. Off: the head stays "
        "whole on every TP rank (sharded by FSDP only), which holds and computes more.",
    )
    layout: Literal["fixed", "auto"] = Field(
        default="fixed",
        description="'auto': search the tensor- and context-parallel degrees for the fixed "
        "world_size (FSDP over the rest; sequence parallelism with tensor parallelism on "
        "token data) and plan the layout with the shortest time to train; every layout "
        "planned is reported in result.layouts. Needs strategy fsdp (or unset), "
        "context_parallel and tensor_parallel left at 1.",
    )

    @field_validator("world_size")
    @classmethod
    def _world(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= 1 << 16:
            raise ValueError("world_size is between 1 and 65536")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ParallelismSpec:
        if self.cpu_offload and self.strategy not in ("fsdp", "zero3", "hybrid_shard"):
            raise ValueError(
                f"cpu_offload needs a strategy that shards parameters (fsdp, zero3, "
                f"hybrid_shard), not {self.strategy!r}"
            )
        if not self.reshard_after_forward and self.strategy not in ("fsdp", "hybrid_shard"):
            raise ValueError("reshard_after_forward applies to fsdp and hybrid_shard")
        if self.layout == "auto":
            if self.strategy not in (None, "fsdp"):
                raise ValueError(
                    f"layout 'auto' composes with strategy fsdp, not {self.strategy!r}"
                )
            if self.world_size == "auto":
                raise ValueError("layout 'auto' needs a fixed world_size, not 'auto'")
            if self.context_parallel > 1 or self.tensor_parallel > 1:
                raise ValueError(
                    "layout 'auto' searches context_parallel and tensor_parallel: leave both at 1"
                )
        if self.context_parallel > 1 and self.strategy != "fsdp":
            raise ValueError(
                "context_parallel composes with strategy 'fsdp' (parameters sharded over the "
                f"data and context ranks together, as torchtitan does), not {self.strategy!r}"
            )
        if self.context_parallel > 1 and self.world_size == "auto":
            raise ValueError("context_parallel needs a fixed world_size, not 'auto'")
        if self.tensor_parallel > 1 and self.strategy != "fsdp":
            raise ValueError(
                "tensor_parallel composes with strategy 'fsdp' (each tensor-parallel shard "
                f"sharded over the data ranks, as torchtitan does), not {self.strategy!r}"
            )
        if self.loss_parallel and self.tensor_parallel == 1:
            raise ValueError("loss_parallel splits the head over tensor_parallel ranks")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("sequence_parallel splits the sequence over tensor_parallel ranks")
        if self.sequence_parallel and self.context_parallel > 1:
            raise ValueError("sequence_parallel with context_parallel is not traced")
        if self.tensor_parallel > 1 and self.world_size == "auto":
            raise ValueError("tensor_parallel needs a fixed world_size, not 'auto'")
        return self

    def resolved(self, world_size: int) -> Strategy:
        """The strategy a plan traces: an unset one is DDP as soon as there are two ranks."""
        if self.strategy is not None:
            return self.strategy
        if self.layout == "auto" and world_size > 1:
            return "fsdp"
        return "ddp" if world_size > 1 else "none"


class PeftSpec(StrictModel):
    """Parameter-efficient fine-tuning with Hugging Face `peft`: LoRA adapters on the target
    modules, the base frozen; QLoRA also stores the base in 4-bit NF4 (bitsandbytes)."""

    method: Literal["lora", "qlora"]
    r: int = Field(default=16, ge=1, le=4096)
    alpha: int = Field(default=32, ge=1, le=1 << 16)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear", description="Module-name suffixes, or 'all-linear'."
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return _dotted_names(value, 64, "module name")


ScheduleName = Literal[
    "constant", "linear", "cosine", "step", "multistep", "exponential", "plateau", "one_cycle"
]
MetricName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]{1,64}$", examples=["val_loss"])]


class ScheduleSpec(StrictModel):
    """Warm-up, then the decay. Counted in optimizer steps (one per accumulation window), so
    accumulation and world size change it correctly; `unit: epochs` gives `step_size`,
    `milestones` and `gamma` per epoch instead."""

    name: ScheduleName = "constant"
    warmup_steps: int | None = Field(
        default=None, ge=0, le=1 << 30, description="null (and no ratio): the plan's suggestion."
    )
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    unit: Literal["steps", "epochs"] = "steps"
    min_lr_ratio: float = Field(default=0.0, ge=0, lt=1, description="linear/cosine floor.")
    step_size: float | None = Field(default=None, gt=0, le=1 << 30)
    milestones: list[float] | None = Field(default=None, min_length=1, max_length=64)
    gamma: float = Field(default=0.1, gt=0, le=1)
    monitor: MetricName | None = Field(default=None, description="plateau: the metric.")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(default=10, ge=0, le=100_000, description="plateau: epochs.")
    factor: float = Field(default=0.1, gt=0, lt=1, description="plateau: the cut.")
    pct_start: float = Field(default=0.3, gt=0, lt=1, description="one_cycle: rising part.")
    div_factor: float = Field(default=25.0, ge=1, le=1e6)
    final_div_factor: float = Field(default=1e4, ge=1, le=1e9)

    @model_validator(mode="after")
    def _complete(self) -> ScheduleSpec:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        needs = {"step": "step_size", "multistep": "milestones", "plateau": "monitor"}
        if self.name in needs and getattr(self, needs[self.name]) is None:
            raise ValueError(f"a {self.name} schedule needs {needs[self.name]}")
        if self.milestones is not None and any(
            b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)
        ):
            raise ValueError("milestones must increase")
        if self.name == "one_cycle" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError("one_cycle warms up over pct_start: leave warmup unset")
        return self


class EarlyStoppingSpec(StrictModel):
    """Stop when the monitored validation metric stops improving (checked once per epoch)."""

    monitor: MetricName
    mode: Literal["min", "max"] = "min"
    patience: int = Field(default=3, ge=1, le=100_000, description="Epochs without improvement.")
    min_delta: float = Field(default=0.0, ge=0, le=1e9)


class CheckpointingSpec(StrictModel):
    """Which blocks checkpoint (with gradient_checkpointing on): torchtitan's activation
    checkpoint options, run through transformers' layers or our block wrapper. A checkpointed
    block keeps only its input and runs its forward again in backward."""

    every: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Checkpoint one block in this many (1: every block, 'full'); the others "
        "keep all their activations (torchtitan's selective_ac_option = 'k').",
    )
    offload: bool = Field(
        default=False,
        description="Hold what each checkpointed block saves (its inputs) in pinned host memory "
        "instead of on the GPU: transformers' activation_checkpointing_kwargs {offload: true}, "
        "torch.autograd.graph.save_on_cpu(pin_memory=True) around every checkpoint. Frees about "
        "layers x tokens x hidden x 2 bytes of GPU memory; the device-to-host copy in forward "
        "and the copy back in backward run on the compute stream and add to the step. Needs "
        "gradient_checkpointing.",
    )
    selective: Literal["block", "op"] = Field(
        default="block",
        description="What a checkpointed block keeps. block: its input only, its whole forward "
        "runs again in backward. op: also the outputs of its matmuls and attention, so backward "
        "recomputes only the cheap ops between them (norms, activations, rotary embeddings, "
        "residual adds): torch.utils.checkpoint's selective checkpointing "
        "(create_selective_checkpoint_contexts), torchtitan's selective_ac_option 'op'. More "
        "memory than block, far less recompute. Not with offload.",
    )
    auto: bool = Field(
        default=False,
        description="Let the plan choose: of none, op-selective, one block in 4, one in 2, "
        "every block, and every block offloaded (least recompute first), the first whose max "
        "micro-batch reaches the global batch per data-parallel rank with no accumulation; "
        "where none does, the first that fits at all (accumulation reaches the batch; "
        "BatchNorm models need 16). gradient_checkpointing, every, selective and offload are "
        "then the plan's choice (result.checkpointing).",
    )


class EvaluationSpec(StrictModel):
    """Evaluation during training: forward only, no gradients, `model.eval()`, with a
    micro-batch of its own (larger than training's: nothing is kept for backward)."""

    num_samples: int = Field(ge=1, le=10**12, description="Samples in one evaluation.")
    every_steps: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="Evaluate every this many optimizer steps; null: once per epoch.",
    )


class ParamGroup(StrictModel):
    """Parameters whose names start with `prefix` train at `lr_scale` x the plan's rate."""

    prefix: str = Field(pattern=r"^[A-Za-z0-9_.]{1,128}$", examples=["backbone."])
    lr_scale: float = Field(gt=0, le=1000)


def _auto_world_size(data: dict[str, Any]) -> dict[str, Any]:
    """`training.world_size: "auto"` is `training.parallelism.world_size: "auto"`."""
    parallelism = data.get("parallelism") or {}
    if not isinstance(parallelism, dict):
        return data
    if parallelism.get("world_size", "auto") != "auto":
        raise ValueError(
            f"world_size 'auto' and parallelism.world_size {parallelism['world_size']} differ"
        )
    rest = {k: v for k, v in data.items() if k != "world_size"}
    return {**rest, "parallelism": {**parallelism, "world_size": "auto"}}


LossKernel = Literal["standard", "liger", "cut_cross_entropy"]


class TrainingSpec(StrictModel):
    optimizer: Optimizer = "adamw"
    optimizer_impl: OptimizerImpl | None = Field(
        default=None,
        description="How a torch.optim optimizer runs (its temporaries differ); null: what "
        "PyTorch picks on CUDA (foreach). bitsandbytes' optimizers have kernels of their own.",
    )
    precision: Precision = Field(
        default="fp32",
        description="fp32; tf32 matmuls; fp16-mixed and bf16-mixed (autocast, fp32 weights, "
        "a GradScaler for fp16); bf16 (weights and optimizer state in bf16).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in backward instead of keeping them (HF models: "
        "per block; layer lists: segments of about sqrt(n) layers).",
    )
    loss_kernel: LossKernel = Field(
        default="standard",
        description="How a causal LM's output head and loss run. standard: transformers' own "
        "(the logits of every token in the autocast dtype, upcast to fp32 for the loss, and "
        "their gradient). liger: Liger-Kernel's fused linear cross-entropy (the HF Trainer's "
        "use_liger_kernel, loss head only): logits in chunks of about tokens x hidden elements, "
        "gradients made in forward. cut_cross_entropy: Apple's Cut Cross-Entropy (impl cce, "
        "Axolotl's CutCrossEntropyPlugin): no logits in memory at all, a log-sum-exp per token "
        "kept, the logits recomputed tile by tile in backward; its backward takes bf16/fp16 "
        "weights only, so it needs precision bf16. Only for transformers *ForCausalLM models.",
    )
    global_batch_size: int = Field(
        default=256,
        ge=1,
        le=1 << 24,
        description="Samples per optimizer step over all GPUs: micro-batch x accumulation x "
        "world size reaches it (or the nearest above, reported as effective_global_batch_size). "
        "In tokens with batch_unit 'tokens'.",
    )
    batch_unit: Literal["samples", "tokens"] = Field(
        default="samples",
        description="What global_batch_size and base_batch_size count. tokens (token data): "
        "real tokens per step, turned into samples (rows of seq_len when packed) by the mean "
        "sample length (data.lengths; else seq_len); the plan's batches are in those units.",
    )
    base_lr: float = Field(
        default=1e-3, gt=0, le=100, description="The learning rate at base_batch_size."
    )
    base_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1 << 24,
        description="The batch base_lr was tuned for; the scaling rule moves the rate from it "
        "to the effective global batch. null: base_lr is meant for global_batch_size as asked "
        "(the rate moves only where the plan's effective batch differs from it).",
    )
    lr_scaling: LrScaling = Field(
        default="auto",
        description="How the rate moves with the batch: linear (SGD-style), sqrt (adaptive "
        "optimizers), none; auto: sqrt for Adam-family optimizers, linear for the rest.",
    )
    epochs: float = Field(
        default=1, gt=0, le=100_000, description="Passes over data.num_samples (fractions allowed)."
    )
    world_size: Annotated[
        int,
        # "auto" never reaches the field (the validator below moves it into parallelism), but
        # clients may send it, so the schema says so.
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": 1, "maximum": 1 << 16},
                    {"const": "auto"},
                ],
                "title": "World Size",
                "description": "GPUs in all (same as parallelism.world_size); 'auto' here "
                "means parallelism.world_size 'auto': the fewest GPUs that fit.",
            }
        ),
    ] = Field(default=1, ge=1, le=1 << 16)
    trainable: Literal["all"] | list[str] = Field(
        default="all",
        description="'all', or the parameter-name prefixes to FREEZE (no gradient, no state).",
    )
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    peft: PeftSpec | None = None
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    param_groups: list[ParamGroup] | None = Field(
        default=None,
        max_length=64,
        description="Per-layer learning rates by parameter-name prefix (first match wins); the "
        "rest train at the plan's rate. Frozen prefixes (`trainable`) stay frozen.",
    )
    early_stopping: EarlyStoppingSpec | None = None
    evaluation: EvaluationSpec | None = None
    checkpointing: CheckpointingSpec = Field(
        default_factory=CheckpointingSpec,
        description="With gradient_checkpointing: which blocks.",
    )

    @field_validator("trainable")
    @classmethod
    def _prefixes(cls, value: Any) -> Any:
        return _dotted_names(value, 256, "parameter-name prefix")

    @field_validator("checkpointing")
    @classmethod
    def _offload_checkpoints(cls, value: CheckpointingSpec, info: ValidationInfo) -> Any:
        if value.offload and not value.auto and not info.data.get("gradient_checkpointing"):
            raise ValueError(
                "offload holds the checkpointed blocks' saved inputs on the host: it needs "
                "gradient_checkpointing true"
            )
        if value.selective == "op" and value.offload:
            raise ValueError(
                "selective 'op' keeps matmul outputs in the checkpoint's own cache, which "
                "offload's hooks do not move: choose one of them"
            )
        return value

    @field_validator("loss_kernel")
    @classmethod
    def _cce_in_bf16(cls, value: str, info: ValidationInfo) -> Any:
        precision = info.data.get("precision")
        if value == "cut_cross_entropy" and precision is not None and precision != "bf16":
            raise ValueError(
                "Cut Cross-Entropy's backward takes bf16 or fp16 hidden states and head weights "
                f"only (cce_backward_kernel asserts it); precision {precision!r} keeps the head "
                "in fp32: use precision 'bf16'"
            )
        return value

    @field_validator("optimizer_impl")
    @classmethod
    def _impl_exists(cls, value: OptimizerImpl | None, info: ValidationInfo) -> Any:
        optimizer = info.data.get("optimizer")
        if value is None or optimizer is None:
            return value
        if optimizer in BNB_OPTIMIZERS:
            raise ValueError(
                f"{optimizer} runs bitsandbytes' own kernels: optimizer_impl is for torch.optim's"
            )
        if value not in OPTIMIZER_IMPLS[optimizer]:
            options = ", ".join(OPTIMIZER_IMPLS[optimizer])
            raise ValueError(f"{optimizer} has no {value!r} implementation (it has: {options})")
        return value

    @property
    def implementation(self) -> str:
        """How the optimizer runs on a GPU: the spec's kernels or PyTorch's CUDA default; for a
        bitsandbytes optimizer its state (32bit, 8bit, paged_32bit, paged_8bit)."""
        if self.optimizer in BNB_OPTIMIZERS:
            return BNB_OPTIMIZERS[self.optimizer][1]
        return self.optimizer_impl or OPTIMIZER_IMPLS[self.optimizer][0]

    @model_validator(mode="before")
    @classmethod
    def _one_world_size(cls, data: Any) -> Any:
        """`parallelism.world_size` and `world_size` are one number; the top-level one is kept
        (the field plans always had), the nested one is where the strategy is described."""
        if not isinstance(data, dict):
            return data
        if data.get("world_size") == "auto":  # "the fewest GPUs that fit", said at the top
            data = _auto_world_size(data)
        parallelism = data.get("parallelism")
        asked = (
            parallelism.get("world_size")
            if isinstance(parallelism, dict)
            else getattr(parallelism, "world_size", None)
        )
        if isinstance(asked, int) and not isinstance(asked, bool) and 1 <= asked <= 1 << 16:
            given = data.get("world_size")
            if given not in (None, 1, asked):  # 1 is the default a dumped spec carries
                raise ValueError(f"world_size {given} and parallelism.world_size {asked} differ")
            data = {**data, "world_size": asked}
        return data

    @property
    def reference_batch_size(self) -> int:
        """The batch `base_lr` belongs to: the one named, else the global batch asked for."""
        return self.base_batch_size or self.global_batch_size

    @property
    def strategy(self) -> Strategy:
        return self.parallelism.resolved(self.world_size)

    @property
    def reshards_after_forward(self) -> bool:
        """FSDP frees gathered parameters after forward: not under zero2 (SHARD_GRAD_OP), nor
        where the spec keeps them."""
        return self.parallelism.reshard_after_forward and self.strategy != "zero2"

    @property
    def auto_world_size(self) -> bool:
        return self.parallelism.world_size == "auto"

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different samples: the world less context and tensor parallelism's
        groups (the ranks of one group share each sample: its sequence, or its layers)."""
        return self.world_size // self.model_parallel_size

    @property
    def model_parallel_size(self) -> int:
        """Ranks that work on the same samples: context x tensor parallelism."""
        return self.parallelism.context_parallel * self.parallelism.tensor_parallel

    @model_validator(mode="after")
    def _world_fits(self) -> TrainingSpec:
        if self.optimizer in BNB_OPTIMIZERS and self.strategy in SHARDED:
            raise ValueError(
                f"optimizer {self.optimizer!r} (bitsandbytes) with parallelism.strategy "
                f"{self.strategy!r} is not planned: its state is not sharded; use ddp or none"
            )
        if self.peft is not None and self.peft.method == "qlora" and self.strategy in SHARDED:
            raise ValueError(
                f"qlora with parallelism.strategy {self.strategy!r} is not planned: sharding "
                "4-bit weights needs bnb_4bit_quant_storage, which this planner does not trace"
            )
        per_node = self.parallelism.gpus_per_node
        if (
            self.strategy == "hybrid_shard"
            and self.world_size > per_node
            and self.world_size % per_node
        ):
            raise ValueError(
                f"hybrid_shard needs whole nodes: world_size {self.world_size} is not a "
                f"multiple of parallelism.gpus_per_node {per_node}"
            )
        cp, tp = self.parallelism.context_parallel, self.parallelism.tensor_parallel
        if cp > 1 and self.world_size % cp:
            raise ValueError(
                f"parallelism.context_parallel {cp} must divide world_size {self.world_size}"
            )
        if tp > 1 and self.world_size % (cp * tp):
            raise ValueError(
                f"parallelism.tensor_parallel {tp} x context_parallel {cp} must divide "
                f"world_size {self.world_size}"
            )
        if self.global_batch_size < self.data_parallel_size:
            raise ValueError("global_batch_size must be at least world_size (one sample per rank)")
        return self


class CudaDeviceSpec(StrictModel):
    kind: Literal["cuda"]
    memory_gib: float | None = Field(
        default=None, gt=0, le=4096, description="Plan for a smaller card than the worker's."
    )


VERSION_PATTERN = r"^[0-9]{1,2}\.[0-9]{1,3}$"


class RuntimeSpec(StrictModel):
    """The software stack the plan is for: it sets the CUDA context's size and PyTorch's
    defaults (lazy kernel loading since torch 1.13 with CUDA 11.7; zero_grad frees gradients
    since 2.0; matmul TF32 in 1.7-1.11)."""

    torch: str = Field(default="2.14", pattern=VERSION_PATTERN, examples=["1.12"])
    cuda: str = Field(default="13.0", pattern=VERSION_PATTERN, examples=["11.3"])
    module_loading: Literal["lazy", "eager"] | None = Field(
        default=None, description="CUDA_MODULE_LOADING; null: the stack's default."
    )


class AllocatorSpec(StrictModel):
    """PYTORCH_ALLOC_CONF options of the caching allocator the plan simulates."""

    expandable_segments: bool = False
    max_split_size_mb: int | None = Field(default=None, ge=20, le=1 << 20)
    roundup_power2_divisions: int = Field(default=0, ge=0, le=64)

    @field_validator("roundup_power2_divisions")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value > 1 and value & (value - 1):
            raise ValueError("must be 0, 1 or a power of two")
        return value


class SimulatedDeviceSpec(StrictModel):
    kind: Literal["simulated"]
    gpu: str | None = Field(default=None, pattern=NAME_PATTERN, examples=["A100-80GB"])
    memory_gib: float | None = Field(default=None, gt=0, le=4096)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    allocator: AllocatorSpec = Field(default_factory=AllocatorSpec)

    @model_validator(mode="after")
    def _gpu_or_memory(self) -> SimulatedDeviceSpec:
        if self.gpu is None and self.memory_gib is None:
            raise ValueError("give 'gpu' (see GET /v1/gpus) or 'memory_gib'")
        return self  # the name is the engine's to know: an unknown card is its 422 at device.gpu


class CpuDeviceSpec(StrictModel):
    kind: Literal["cpu"]
    memory_gib: float = Field(default=2.0, gt=0, le=64, description="Memory budget of the probe.")


DeviceSpec = Annotated[
    CudaDeviceSpec | SimulatedDeviceSpec | CpuDeviceSpec, Field(discriminator="kind")
]


class SearchSpec(StrictModel):
    max_batch_size: int = Field(default=65536, ge=1, le=1 << 20)
    headroom: float = Field(
        default=0.09,
        ge=0,
        le=0.5,
        description="Fraction of device memory kept free. The default is the smallest at which "
        "plans of the calibration set (timm's and published GPU measurements) run out of memory "
        "at most 1% of the time: the simulator's peak is on average 2% under the real one.",
    )
    max_oom_probability: float | None = Field(
        default=None,
        gt=0,
        lt=0.5,
        description="Instead of a headroom: the chance, at most, that the largest micro-batch "
        "runs out of memory on the real card, by the simulator's calibrated error (result.risk); "
        "the plan keeps the headroom that gives it (1e-3: about 11%), and `headroom` is not "
        "read. Simulated devices only.",
    )
    micro_batch: Literal["power_of_two", "max", "divisor"] = "power_of_two"
    seed_from_simulation: bool = Field(
        default=True,
        description="On a real device (cuda, cpu), first search its simulated twin and confirm "
        "that answer: two real trials where the simulation is right.",
    )
    what_if: bool = Field(
        default=True,
        description="Also search the neighbouring choices (other precision, checkpointing "
        "toggled, the next bigger card): about three more searches.",
    )
    depth_folding: bool = Field(
        default=True,
        description="For a transformers model whose blocks are all the same, on one simulated "
        "GPU: trace copies of the model with 2 to 5 blocks and synthesise the whole stack's "
        "allocations (checked to rebuild 5 blocks exactly; the same answer as a full trace, "
        "in a fraction of the time). false: trace every block.",
    )
    target: Literal["micro_batch", "sequence_length"] = Field(
        default="micro_batch",
        description="micro_batch: the largest micro-batch at data.seq_len. sequence_length "
        "(token data): first the longest seq_len, a multiple of sequence_granularity up to "
        "data.seq_len, at which sequence_micro_batch fits (that length fits and one granule "
        "more does not, both probed); then the plan at that length.",
    )
    sequence_granularity: int = Field(
        default=128,
        ge=1,
        le=1 << 16,
        description="The step of the sequence-length search, in tokens.",
    )
    sequence_micro_batch: int = Field(
        default=1,
        ge=1,
        le=1 << 16,
        description="The micro-batch the longest sequence must fit (target sequence_length).",
    )


class PlanSpec(StrictModel):
    """Everything a plan depends on; its canonical JSON is hashed into `spec_hash`."""

    model: ModelSpec
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    device: DeviceSpec = Field(
        default_factory=lambda: SimulatedDeviceSpec(kind="simulated", gpu="A100-80GB")
    )
    search: SearchSpec = Field(default_factory=SearchSpec)
    refresh: bool = Field(default=False, description="Plan again even if this spec has a plan.")
    callback_url: str | None = Field(
        default=None,
        max_length=2048,
        description="An http(s) URL the service POSTs the plan's summary to when it ends "
        "(succeeded, failed or cancelled), signed with the tenant's secret "
        "(Trainplan-Signature: t=<unix>,v1=HMAC-SHA256(secret, '<t>.<body>')), retried with "
        "backoff. Not part of the spec's identity: a submit of a planned spec reuses the plan "
        "and still gets its callback. Private and link-local targets are refused unless the "
        "operator allows them.",
    )

    @model_validator(mode="after")
    def _compatible(self) -> PlanSpec:
        kind = self.data.kind
        if self.model.source == "layers" and kind == "tokens":
            first = self.model.layers[0].type
            if first != "Embedding":
                raise ValueError("token data needs a layers model that starts with Embedding")
        if (
            self.data.target == "classification"
            and self.data.num_classes is None
            and kind != "tokens"
        ):
            raise ValueError("data.num_classes is required for classification")
        return self

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"refresh", "callback_url"})

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()
