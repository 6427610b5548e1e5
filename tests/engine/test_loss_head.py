"""The loss head: Liger's fused linear cross-entropy stand-in gives transformers' loss and
gradients, chunks as the library does, and frees the memory of the logits in the plan."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from service.schemas.spec import PlanSpec
from tests.helpers import TINY_LLAMA, configs_of, model_of, session_of
from workers import engine
from workers.engine.cut_cross_entropy import CutCrossEntropy
from workers.engine.loss_head import (
    IGNORE_INDEX,
    LIGER_LOSS_ONLY,
    LigerLinearCrossEntropy,
    chunk_size,
    install,
)
from workers.engine.roofline import op_flops

VOCAB = 4000


def lm_spec(loss_kernel: str = "standard", **training: Any) -> PlanSpec:
    """A 2-layer Llama whose vocabulary dwarfs its width: the loss head is most of the step."""
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"vocab_size": VOCAB},
            },
            "data": {"kind": "tokens", "seq_len": 128, "vocab_size": VOCAB, "num_samples": 512},
            "training": {
                "optimizer": "adamw",
                "precision": "bf16-mixed",
                "global_batch_size": 64,
                "loss_kernel": loss_kernel,
                **training,
            },
            "device": {"kind": "simulated", "memory_gib": 0.5},
            "search": {"what_if": False, "headroom": 0.0},
        }
    )


def test_chunk_size_is_liger_s() -> None:
    # the library's own example: BT = 4096 * 4, V = 32000, H = 4096 -> inc_factor 8, chunk 2048
    assert chunk_size(4096 * 4, 4096, 32000) == 2048
    assert chunk_size(10, 4096, 32000) == 2  # ceil(10 / 8) = 2, a power of two
    assert chunk_size(3, 64, 32000) == 1  # ceil(3 / 500) = 1
    assert chunk_size(3, 4096, 4096) == 3  # the power of two above 3, but never past the tokens


@pytest.mark.parametrize("with_weight_grad", [True, False])
def test_values_and_gradients_equal_cross_entropy(with_weight_grad: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(100, 16, dtype=torch.float64, requires_grad=with_weight_grad)
    target = torch.randint(0, 100, (37,))
    target[::5] = IGNORE_INDEX
    counted = int((target != IGNORE_INDEX).sum())
    assert chunk_size(37, 16, 100) < 37  # several chunks, the last one short

    loss = LigerLinearCrossEntropy.apply(hidden, weight, target, counted)
    (loss * 3).backward()
    fused = (loss.detach(), hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden @ weight.t(), target, ignore_index=IGNORE_INDEX)
    (reference * 3).backward()
    assert torch.allclose(fused[0].double(), reference.detach(), rtol=1e-6)  # fp32, as Liger's
    assert torch.allclose(fused[1], hidden.grad)
    if with_weight_grad:
        assert torch.allclose(fused[2], weight.grad)
    else:
        assert fused[2] is None


def materialised(spec: PlanSpec, dtype: torch.dtype) -> tuple[Any, Any]:
    """The spec's model on the CPU in `dtype`, small random weights, and a batch of tokens."""
    built = model_of(spec)
    module = built.module.to_empty(device="cpu").to(dtype)
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # `to_empty` leaves buffers (RoPE's inv_freq) as whatever memory held: NaN now and then
    for b in module.buffers():
        if b.is_floating_point():
            b.zero_()
    return built, torch.randint(0, VOCAB, (3, 17))


def test_causal_lm_loss_equals_transformers() -> None:
    """The installed forward gives the model's own loss (labels shifted, last token ignored)."""
    built, x = materialised(lm_spec(), torch.float64)
    module = built.module
    standard = module(input_ids=x, labels=x).loss
    standard.backward()
    head_grad = module.lm_head.weight.grad.clone()
    module.zero_grad()
    install("liger", built)
    fused = module(input_ids=x, labels=x).loss
    fused.backward()
    assert torch.allclose(fused, standard)
    assert torch.allclose(module.lm_head.weight.grad, head_grad)


def test_liger_frees_the_logits_and_plans_a_larger_batch() -> None:
    standard, liger = engine.plan(lm_spec()), engine.plan(lm_spec("liger"))
    assert liger.max_micro_batch_size > 2 * standard.max_micro_batch_size
    # at one micro-batch, the fp32 logits and their gradient are gone from the peak
    batch = standard.max_micro_batch_size
    with session_of(lm_spec()) as s:
        plain = s.probe(batch)
    with session_of(lm_spec("liger")) as s:
        fused = s.probe(batch)
    logits_fp32 = batch * 128 * VOCAB * 4
    assert plain.peak_bytes - fused.peak_bytes > logits_fp32
    assert fused.breakdown.get("temporary", 0) < plain.breakdown["temporary"] / 10


def test_liger_under_lora_keeps_no_head_gradient() -> None:
    with session_of(lm_spec("liger", peft={"method": "lora"})) as s:
        outcome = s.probe(4)
    assert outcome.fits and outcome.breakdown.get("gradients", 0) == 0


def test_loss_kernel_needs_a_causal_lm(small_spec: dict[str, Any]) -> None:
    raw = small_spec | {"training": {**small_spec["training"], "loss_kernel": "liger"}}
    with pytest.raises(engine.SpecError) as caught:
        engine.check(PlanSpec.model_validate(raw))
    assert caught.value.loc == ("training", "loss_kernel")


def test_configs_apply_the_loss_kernel_only() -> None:
    transformers = pytest.importorskip("transformers")
    configs = configs_of(lm_spec("liger"))
    hf = configs["hf_trainer"]
    assert hf["use_liger_kernel"] is True and hf["liger_kernel_config"] == LIGER_LOSS_ONLY
    args = transformers.TrainingArguments(output_dir="/tmp/trainplan-liger", use_cpu=True, **hf)
    assert args.use_liger_kernel and args.liger_kernel_config["fused_linear_cross_entropy"]
    assert "_apply_liger_kernel_to_instance(model=model" in configs["pytorch"]
    compile(configs["pytorch"], "train.py", "exec")
    plain = configs_of(lm_spec())
    assert "use_liger_kernel" not in plain["hf_trainer"] and "liger" not in plain["pytorch"]


def test_evaluation_makes_the_logits_the_fused_training_step_does_not() -> None:
    """Liger fuses the loss in training only: evaluation (model.eval()) makes the logits, so
    its micro-batch is smaller than training's, and the plan says so."""
    raw = lm_spec("liger").model_dump(mode="json")
    raw["training"]["evaluation"] = {"num_samples": 256}
    result = engine.plan(PlanSpec.model_validate(raw))
    assert result.evaluation is not None
    assert result.evaluation.max_micro_batch_size < result.micro_batch_size
    assert "evaluation_batch_smaller" in {w.code for w in result.warnings}
    assert result.configs["hf_trainer"]["per_device_eval_batch_size"] == (
        result.evaluation.micro_batch_size
    )


# -- Cut Cross-Entropy -------------------------------------------------------------------------


def test_cut_cross_entropy_values_and_gradients_equal_cross_entropy() -> None:
    """On real CPU tensors the stand-in's ops compute the kernel's values (bf16, as it needs)."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16).bfloat16().requires_grad_()
    weight = torch.randn(100, 16).bfloat16().requires_grad_()
    target = torch.randint(0, 100, (37,))
    target[::5] = IGNORE_INDEX
    counted = int((target != IGNORE_INDEX).sum())
    loss = CutCrossEntropy.apply(hidden, weight, target, counted)
    (loss * 3).backward()
    reference_in = (
        hidden.detach().float().requires_grad_(),
        weight.detach().float().requires_grad_(),
    )
    reference = F.cross_entropy(
        reference_in[0] @ reference_in[1].t(), target, ignore_index=IGNORE_INDEX
    )
    (reference * 3).backward()
    assert torch.allclose(loss.detach(), reference.detach(), rtol=1e-5)
    assert torch.allclose(hidden.grad.float(), reference_in[0].grad, atol=2e-3, rtol=2e-2)
    assert torch.allclose(weight.grad.float(), reference_in[1].grad, atol=2e-3, rtol=2e-2)


def test_cut_cross_entropy_refuses_fp32_weights_as_the_kernel_does() -> None:
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = CutCrossEntropy.apply(hidden, torch.randn(10, 8), torch.randint(0, 10, (4,)), 4)
    with pytest.raises(AssertionError, match="bf16 or fp16"):
        loss.backward()
    with pytest.raises(ValueError, match="precision 'bf16'"):
        lm_spec("cut_cross_entropy")  # bf16-mixed keeps fp32 master weights


def test_cut_cross_entropy_keeps_less_than_liger_and_counts_its_flops() -> None:
    """No logits at all, not even a chunk of them (Liger's chunks hold about tokens x hidden
    elements); both end with the same two gradients, so neither peak is above Liger's."""
    batch = 8
    peaks, temporaries = {}, {}
    for kernel in ("standard", "liger", "cut_cross_entropy"):
        with session_of(lm_spec(kernel, precision="bf16")) as s:
            outcome = s.probe(batch)
        peaks[kernel], temporaries[kernel] = outcome.peak_bytes, outcome.breakdown["temporary"]
    assert peaks["cut_cross_entropy"] <= peaks["liger"] < peaks["standard"]
    assert temporaries["cut_cross_entropy"] <= temporaries["liger"]
    tokens, vocab, width = batch * 127, VOCAB, TINY_LLAMA["hidden_size"]
    rows = torch.empty(tokens, dtype=torch.int64)
    e, c = torch.empty(batch * 128, width), torch.empty(vocab, width)
    forward = op_flops(torch.ops.trainplan.cce_lse_forward.default, (e, c, rows, rows), {}, None)
    assert forward == 2 * tokens * vocab * width
    backward = op_flops(
        torch.ops.trainplan.cce_backward.default, (e, e, c, rows, rows, rows, e, None), {}, None
    )
    assert backward == 2 * forward  # the logits again, and the hidden states' gradient only


def test_cut_cross_entropy_causal_lm_loss_equals_transformers() -> None:
    built, x = materialised(lm_spec("cut_cross_entropy", precision="bf16"), torch.bfloat16)
    module = built.module
    standard = module(input_ids=x, labels=x).loss
    install("cut_cross_entropy", built)
    fused = module(input_ids=x, labels=x).loss
    assert torch.allclose(fused.float(), standard.float(), rtol=1e-2)
    fused.backward()
    assert module.lm_head.weight.grad is not None


def test_configs_apply_cut_cross_entropy() -> None:
    configs = configs_of(lm_spec("cut_cross_entropy", precision="bf16"))
    assert configs["cut_cross_entropy"]["cce_patch"] == {"impl": "cce", "reduction": "mean"}
    assert "model = cce_patch(model, **{'impl': 'cce', 'reduction': 'mean'})" in configs["pytorch"]
    compile(configs["pytorch"], "train.py", "exec")
    axolotl = configs["axolotl"]
    assert axolotl["cut_cross_entropy"] is True
    assert axolotl["plugins"] == ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]
