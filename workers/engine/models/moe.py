"""Mixture-of-experts layers in a built model: how many experts, how many a token uses, and
which of the model's parameters are experts.

transformers (v5) stores a layer's experts as one module (`MixtralExperts`, `Qwen3MoeExperts`,
`GptOssExperts` ...) holding 3-D parameters whose first dimension is the expert
(`gate_up_proj`: experts x 2*intermediate x hidden). The router picks `num_experts_per_tok`
of them per token. What a plan needs from that:

- parameters, gradients and optimizer state hold every expert (they are all trained), while a
  token's compute passes through `top_k` of them: the *active* parameters per token;
- the experts' implementation decides memory. `grouped_mm` (transformers' default) sorts the
  (token, expert) pairs by expert and runs one grouped GEMM over all `tokens x top_k` rows, so
  its activations are the same for any routing: dropless, no capacity factor. `batched_mm`
  gathers one weight matrix per pair (tokens x top_k copies of an expert's weights: memory
  grows with the batch). `eager` loops over the experts with data-dependent shapes (`nonzero`),
  which a trace on fake tensors cannot follow.
- `_grouped_mm` is not autocast-enabled and transformers casts its input to the weights' dtype,
  so with fp32 master weights (fp16-/bf16-mixed) the expert GEMMs run in fp32 (see
  `workers/engine/cuda_kernels.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from service.schemas.result import MixtureOfExperts, PlanWarning

TRACEABLE = ("grouped_mm", "batched_mm")


@dataclass(frozen=True)
class MoeLayout:
    moe_layers: int
    experts: int
    experts_per_token: int
    implementation: str
    expert_parameters: int
    parameters: int

    @property
    def active_parameters(self) -> int:
        """Parameters one token's forward passes through: all but the unused experts'."""
        unused = self.expert_parameters * (self.experts - self.experts_per_token) // self.experts
        return self.parameters - unused


def _experts(layer: nn.Module) -> int:
    count = getattr(layer, "num_experts", 0)
    return count if isinstance(count, int) else 0


def expert_modules(module: nn.Module) -> list[nn.Module]:
    """transformers' experts containers: a `num_experts` attribute and 3-D parameters whose
    first dimension counts the experts."""
    found = []
    for sub in module.modules():
        count = getattr(sub, "num_experts", None)
        if not isinstance(count, int) or not type(sub).__name__.endswith("Experts"):
            continue
        own = list(sub.parameters(recurse=False))
        if own and all(p.dim() >= 2 and p.shape[0] == count for p in own):
            found.append(sub)
    return found


def describe(module: nn.Module) -> MoeLayout | None:
    """The model's MoE layout, or None for a dense model."""
    layers = expert_modules(module)
    if not layers:
        return None
    config = getattr(module, "config", None)
    experts = max(_experts(layer) for layer in layers)
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0) or experts
    implementation = str(getattr(config, "_experts_implementation", None) or "eager")
    return MoeLayout(
        moe_layers=len(layers),
        experts=experts,
        experts_per_token=top_k,
        implementation=implementation,
        expert_parameters=sum(p.numel() for layer in layers for p in layer.parameters()),
        parameters=sum(p.numel() for p in module.parameters()),
    )


def report(layout: MoeLayout, precision: str) -> MixtureOfExperts:
    """The layout as the plan states it; the expert GEMMs run in the weights' dtype."""
    return MixtureOfExperts(
        moe_layers=layout.moe_layers,
        experts=layout.experts,
        experts_per_token=layout.experts_per_token,
        implementation=layout.implementation,  # checked at build: one of TRACEABLE
        expert_parameters=layout.expert_parameters,
        active_parameters=layout.active_parameters,
        expert_gemm_dtype="bfloat16" if precision == "bf16" else "float32",
    )


def warnings(layout: MoeLayout, precision: str) -> list[PlanWarning]:
    """Mixed precision keeps fp32 weights, so the experts' GEMMs (most of an MoE step's
    FLOPs) run in fp32 while the rest of the model runs in half precision."""
    out = []
    if precision in ("fp16-mixed", "bf16-mixed"):
        out.append(
            PlanWarning(
                code="moe_experts_in_fp32",
                message=(
                    f"Under {precision} the {layout.moe_layers} MoE layers' expert GEMMs run in "
                    "fp32: torch's grouped GEMM is not autocast-enabled (pytorch/pytorch "
                    "#174763) and transformers casts its input to the fp32 master weights. "
                    "The plan's time counts them at the card's fp32 rate; precision 'bf16' "
                    "(bf16 weights, as MoE models are usually trained) runs them on Tensor "
                    "Cores."
                ),
            )
        )
    if layout.implementation == "batched_mm":
        out.append(
            PlanWarning(
                code="moe_batched_mm",
                message=(
                    "experts_implementation 'batched_mm' gathers a copy of an expert's weights "
                    f"for every (token, expert) pair ({layout.experts_per_token} per token), "
                    "so its memory grows with the batch far faster than 'grouped_mm' "
                    "(transformers' default)."
                ),
            )
        )
    return out
