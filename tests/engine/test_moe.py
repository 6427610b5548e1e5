"""Mixture-of-experts models: transformers' MoE architectures trace (the grouped GEMM as CUDA
runs it), their experts are counted, and the plan says how it ran them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from service.schemas.spec import PlanSpec
from tests.helpers import TINY_MOE, assert_exact, configs_of, model_of
from workers import engine
from workers.engine.cuda_kernels import cuda_kernel_rules, grouped_mm_flops
from workers.engine.errors import SpecError
from workers.engine.models.moe import describe
from workers.engine.roofline import op_flops
from workers.engine.tracker import MemoryTracker

BASE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "num_experts_per_tok": 2,
}


def moe_spec(architecture: str, precision: str = "bf16-mixed", **config: Any) -> dict[str, Any]:
    return {
        "model": {
            "source": "transformers",
            "architecture": architecture,
            "config": BASE | TINY_MOE[architecture] | config,
        },
        "data": {"kind": "tokens", "seq_len": 64, "num_samples": 1000},
        "training": {"precision": precision, "global_batch_size": 8},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }


@pytest.mark.parametrize("architecture", sorted(TINY_MOE))
def test_moe_architectures_plan_exactly_under_mixed_precision(architecture: str) -> None:
    """The grouped GEMM under bf16-mixed used to crash the trace (fp32 operands, which the
    meta function refuses and CUDA's fallback accepts)."""
    result = assert_exact(moe_spec(architecture))
    assert result.moe is not None
    assert result.moe.implementation == "grouped_mm"
    assert result.moe.expert_gemm_dtype == "float32"
    assert "moe_experts_in_fp32" in {w.code for w in result.warnings}


def test_bf16_weights_run_the_experts_in_bf16_without_the_warning() -> None:
    result = assert_exact(moe_spec("MixtralForCausalLM", precision="bf16"))
    assert result.moe is not None and result.moe.expert_gemm_dtype == "bfloat16"
    assert "moe_experts_in_fp32" not in {w.code for w in result.warnings}


def test_every_expert_is_held_and_only_top_k_are_active() -> None:
    spec = PlanSpec.model_validate(moe_spec("MixtralForCausalLM"))
    built = model_of(spec)
    layout = describe(built.module)
    assert layout is not None
    hidden, inner, experts = BASE["hidden_size"], BASE["intermediate_size"], 4
    per_layer = experts * (2 * inner * hidden + hidden * inner)  # gate_up_proj + down_proj
    assert layout.moe_layers == 2 and layout.experts == experts
    assert layout.expert_parameters == 2 * per_layer
    total = sum(p.numel() for p in built.module.parameters())
    assert layout.active_parameters == total - 2 * per_layer * (experts - 2) // experts
    # Parameters in the breakdown are every expert's (bf16 weights: 2 bytes each).
    result = engine.plan(PlanSpec.model_validate(moe_spec("MixtralForCausalLM", "bf16")))
    assert result.memory.parameters == pytest.approx(2 * total, rel=0.01)


def test_grouped_mm_output_follows_the_cuda_kernel() -> None:
    """fp32 operands get CUDA's fallback output (rows padded to 16 bytes), bf16 ones the meta
    function's; the values (on real CPU tensors) are the per-group matmuls."""
    a = torch.randn(10, 8)
    b = torch.randn(3, 5, 8).transpose(-2, -1)  # as transformers passes (experts, out, in)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    real = torch._grouped_mm(a, b, offs=offs)
    assert torch.allclose(real, torch.cat([a[:4] @ b[0], a[4:10] @ b[2]]), atol=1e-5)
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_kernel_rules():
        fp32 = torch._grouped_mm(a, b, offs=offs)
        bf16 = torch._grouped_mm(a.bfloat16(), b.bfloat16(), offs=offs)
        with pytest.raises(RuntimeError, match="share a dtype"):
            torch._grouped_mm(a, b.bfloat16(), offs=offs)
    assert fp32.shape == real.shape == bf16.shape and fp32.dtype == torch.float32
    assert fp32.stride() == real.stride() == (8, 1)  # 5 fp32 columns padded to 16 bytes
    assert bf16.stride() == (8, 1)  # the meta function pads bf16 the same way


def test_grouped_mm_flops_are_the_per_group_matmuls() -> None:
    a, b = torch.randn(12, 8), torch.randn(3, 5, 8).transpose(-2, -1)
    offs = torch.tensor([2, 7, 12], dtype=torch.int32)
    with FlopCounterMode(display=False) as counter:
        for start, end, w in zip((0, 2, 7), (2, 7, 12), b, strict=True):
            a[start:end] @ w
    out = torch._grouped_mm(a, b, offs=offs)
    assert grouped_mm_flops(a.shape, b.shape, out.shape) == counter.get_total_flops()
    assert op_flops(torch.ops.aten._grouped_mm.default, (a, b), {"offs": offs}, out) == (
        counter.get_total_flops()
    )
    # weight gradient form: 2-D x 2-D split along the contraction
    grad = torch._grouped_mm(a.t(), torch.randn(12, 8), offs=offs)
    assert grouped_mm_flops(a.t().shape, (12, 8), grad.shape) == 2 * 8 * 12 * 8


def test_memory_does_not_depend_on_the_routing() -> None:
    """grouped_mm runs tokens x top_k rows however they split among the experts: on real
    tensors, routing every token to the same two experts peaks exactly as a balanced one."""
    spec = PlanSpec.model_validate(moe_spec("MixtralForCausalLM", precision="fp32"))
    experts = model_of(spec).module.to_empty(device="cpu").model.layers[0].mlp.experts
    tokens = 96

    def peak(index: torch.Tensor) -> int:
        hidden = torch.randn(tokens, BASE["hidden_size"], requires_grad=True)
        weights = torch.rand(tokens, 2)
        with MemoryTracker() as tracker:
            experts(hidden, index, weights).sum().backward()
        return tracker.peak

    skewed = torch.tensor([[0, 1]] * tokens)
    balanced = torch.stack([torch.arange(tokens) % 4, (torch.arange(tokens) + 1) % 4], dim=1)
    assert peak(skewed) == peak(balanced) > 0


def test_eager_experts_are_refused_at_their_key() -> None:
    spec = PlanSpec.model_validate(moe_spec("MixtralForCausalLM", experts_implementation="eager"))
    with pytest.raises(SpecError) as info:
        model_of(spec)
    assert info.value.loc == ("model", "config", "experts_implementation")


def test_batched_mm_plans_and_warns_that_it_copies_weights() -> None:
    grouped = engine.plan(PlanSpec.model_validate(moe_spec("MixtralForCausalLM")))
    batched = engine.plan(
        PlanSpec.model_validate(moe_spec("MixtralForCausalLM", experts_implementation="batched_mm"))
    )
    assert batched.moe is not None and batched.moe.implementation == "batched_mm"
    assert "moe_batched_mm" in {w.code for w in batched.warnings}
    assert batched.max_micro_batch_size < grouped.max_micro_batch_size


def test_config_lists_of_names_are_accepted_and_bounded() -> None:
    layers = ["full_attention"] * 2
    spec = PlanSpec.model_validate(moe_spec("GptOssForCausalLM", layer_types=layers))
    assert spec.model.config["layer_types"] == layers  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="at most 256 items"):
        PlanSpec.model_validate(moe_spec("GptOssForCausalLM", layer_types=layers * 200))


def test_an_architecture_without_sdpa_defaults_to_eager_as_transformers_does() -> None:
    """gpt-oss's attention sinks have no SDPA path: transformers loads it with eager, and so
    do the trace and the configs (an SDPA default was a 422)."""
    spec = PlanSpec.model_validate(moe_spec("GptOssForCausalLM"))
    assert model_of(spec).module.config._attn_implementation == "eager"
    assert configs_of(spec)["from_pretrained"] == {"attn_implementation": "eager"}
    mixtral = PlanSpec.model_validate(moe_spec("MixtralForCausalLM"))
    assert configs_of(mixtral)["from_pretrained"] == {"attn_implementation": "sdpa"}
