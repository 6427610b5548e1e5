"""The loss head of a causal LM, as the kernel the user trains with runs it.

`standard` is transformers' own: the logits of every token (tokens x vocabulary, in the autocast
dtype), upcast to fp32 for the cross-entropy, and their gradient; the trace runs that code as it
is. `liger` is Liger-Kernel's fused linear cross-entropy (what `use_liger_kernel` in the HF Trainer
applies to the loss): its Triton kernel cannot run on fake tensors, so `LigerLinearCrossEntropy`
stands in for it, allocating what the kernel allocates, in the same order, from
`liger_kernel/ops/fused_linear_cross_entropy.py` (`fused_linear_cross_entropy_forward`):

- the tokens are cut into chunks so that a chunk's logits hold about tokens x hidden elements:
  `inc_factor = ceil(V / H)`, `chunk = min(next_power_of_2(ceil(BT / inc_factor)), BT)`;
- before the loop, `grad_input` (like the hidden states), `grad_weight` (like the head's weight,
  only when it trains) and an fp32 loss per token;
- per chunk: the chunk's logits (`input @ weight.T`, in the autocast dtype; one reused buffer
  when the operands already share the output dtype), the cross-entropy and its gradient written
  in place into them, `grad_input`'s rows (`mm(..., out=)` where the dtypes agree, else a
  temporary), and `grad_weight` accumulated in place (`addmm(out_dtype=float32)` for an fp32
  accumulator fed low-precision logits, the input chunk cast to their dtype; fp32 logits take
  the library's fallback, a weight-sized temporary);
- `grad_input` and `grad_weight` are kept for backward, which only scales them in place.

The values are right too (a test compares loss and gradients with transformers' loss on CPU), so
the same class runs on real devices; there its time is PyTorch's chunked matmuls, not Triton's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.cut_cross_entropy import CutCrossEntropy
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel

IGNORE_INDEX = -100  # transformers' and Liger's label for "no loss here"
# Cut Cross-Entropy as the plan models it: `cut_cross_entropy.transformers.cce_patch(model,
# **CCE_PATCH)`, its defaults (the fused loss in training and evaluation, filter_eps "auto").
CCE_PATCH = {"impl": "cce", "reduction": "mean"}
# Liger's kernels as the plan modelled them: the fused linear cross-entropy only (its RoPE, RMSNorm
# and SwiGLU kernels, on by default, change the activations too and are left off). The keys are
# the keyword arguments of liger_kernel's `apply_liger_kernel_to_<model>`.
LIGER_LOSS_ONLY = {
    "fused_linear_cross_entropy": True,
    "cross_entropy": False,
    "rope": False,
    "rms_norm": False,
    "swiglu": False,
}


def chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Liger's chunk: its logits hold about `tokens x hidden` elements (chunk_mem_const 1)."""
    inc_factor = math.ceil(vocab / hidden)
    return min(1 << max(0, math.ceil(tokens / inc_factor) - 1).bit_length(), tokens)


class LigerLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `input @ weight.T` against `target`, gradients made in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, counted: int
    ) -> torch.Tensor:
        """`counted`: the targets that are not IGNORE_INDEX (the kernel's `.item()`, which a fake
        tensor cannot answer, so the caller counts them from the shapes)."""
        tokens, width = hidden.shape
        vocab = weight.shape[0]
        chunk = chunk_size(tokens, width, vocab)
        low = _autocast_dtype()
        # `_can_use_mm_out`: operands of one dtype that autocast would not change
        mm_out = hidden.dtype == weight.dtype and (low is None or hidden.dtype == low)
        grad_input = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss_1d = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        storage = None
        if mm_out:
            storage = torch.empty(chunk, vocab, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            rows = hidden[start:end]
            if storage is not None:
                logits = storage[: end - start]
                torch.mm(rows, weight.t(), out=logits)
            else:
                logits = rows @ weight.t()  # autocast decides the dtype, as in the kernel
            _cross_entropy_in_place(logits, target[start:end], loss_1d[start:end], counted)
            if mm_out and logits.dtype == grad_input.dtype:
                torch.mm(logits, weight, out=grad_input[start:end])
            else:
                grad_input[start:end] = logits @ weight
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, logits, rows)
            del logits, rows
        del storage
        ctx.save_for_backward(grad_input, grad_weight)
        return loss_1d.sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_input, grad_weight = ctx.saved_tensors
        grad_input.mul_(grad_output)  # Liger's element_mul_kernel: in place
        if grad_weight is not None:
            grad_weight.mul_(grad_output)
        return grad_input, grad_weight, None, None


def _autocast_dtype() -> torch.dtype | None:
    """The dtype autocast gives matmuls here (the trace runs CPU autocast under CUDA's rules)."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    return None


def _cross_entropy_in_place(
    logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, counted: int
) -> None:
    """What `liger_cross_entropy_kernel` does to a chunk: the loss per row into `loss`, and the
    logits overwritten by the gradient of the mean loss (softmax - one-hot) / count. Row
    statistics only: no tensor of the logits' size is made."""
    valid = target != IGNORE_INDEX
    safe = target.clamp(min=0).unsqueeze(1)
    peak = logits.amax(dim=1, keepdim=True)
    picked = logits.gather(1, safe).float()
    logits.sub_(peak).exp_()
    total = logits.sum(dim=1, keepdim=True, dtype=torch.float32)
    loss.copy_((total.log() + peak.float() - picked).squeeze(1) * valid / counted)
    logits.div_(total.to(logits.dtype))
    logits.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=logits.dtype))
    logits.mul_((valid.unsqueeze(1) / counted).to(logits.dtype))


def _accumulate_weight_grad(
    grad_weight: torch.Tensor, grad_logits: torch.Tensor, rows: torch.Tensor
) -> None:
    if grad_logits.dtype in (torch.float16, torch.bfloat16):
        rows = rows.to(grad_logits.dtype)  # the kernel aligns the input chunk to the logits
        if grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.t(), rows)
            return
        if grad_weight.dtype == torch.float32:
            try:  # addmm(out_dtype=float32, out=grad_weight): accumulated in place
                torch.addmm(
                    grad_weight, grad_logits.t(), rows, out_dtype=torch.float32, out=grad_weight
                )
                return
            except NotImplementedError:  # a real CPU tensor: CUDA-only overload, same values
                grad_weight += (grad_logits.t() @ rows).float()
                return
    # the library's fallback (fp32 logits): a weight-sized temporary each chunk
    grad_weight += torch.mm(grad_logits.t(), rows).float()


def fused_forward(
    self: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    kernel: str,
    **rows: torch.Tensor,
) -> Any:
    """A causal LM's forward with its head fused into the loss, as Liger's `lce_forward` and Cut
    Cross-Entropy's `cce_forward` patch it: the decoder's last hidden states and the head's
    weight go to the kernel and no logits are made (labels padded with -100 and shifted by one,
    hidden states flattened with a view). Installed as the model's `forward`, so wrappers
    (peft, FSDP's hooks) run around it as around the libraries' patches. Liger fuses only in
    training (evaluation makes the logits); CCE in both (`train_only` off by default). `rows`:
    the collator's padding mask or packed positions, passed on."""
    if not self.training and kernel == "liger":
        return type(self).forward(self, input_ids=input_ids, labels=labels, **rows)
    hidden = self.base_model(input_ids=input_ids, **rows).last_hidden_state
    head = self.get_output_embeddings()
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    batch, seq = labels.shape
    width = hidden.shape[-1]
    loss = FUSED[kernel](
        hidden.view(-1, width), head.weight, shifted.view(-1), batch * max(seq - 1, 1)
    )
    # a ModelOutput (a dict), as the libraries return: DDP finds the loss in it to hook its sync
    from transformers.modeling_outputs import CausalLMOutputWithPast  # the optional `nlp` extra

    return CausalLMOutputWithPast(loss=loss)


# loss_kernel -> its autograd function (hidden, weight, targets, counted targets) -> mean loss
FUSED: dict[str, Callable[..., torch.Tensor]] = {
    "liger": LigerLinearCrossEntropy.apply,
    "cut_cross_entropy": CutCrossEntropy.apply,
}


def _unwrap(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper (`unwrap_peft_model`), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_causal_lm(module: nn.Module) -> bool:
    base = _unwrap(module)
    return type(base).__name__.endswith("ForCausalLM") and callable(
        getattr(base, "get_output_embeddings", None)
    )


def install(kernel: str, built: BuiltModel) -> None:
    """Run the model's loss head with `kernel` (standard: leave the model as transformers
    made it), or raise SpecError at `training.loss_kernel` if the model has no such head."""
    if kernel == "standard":
        return
    if built.forward_loss is None or not is_causal_lm(built.module):
        raise SpecError(
            ("training", "loss_kernel"),
            f"loss_kernel {kernel!r} fuses a causal LM's output head with its loss: the model "
            "is not a transformers *ForCausalLM",
        )
    base = _unwrap(built.module)
    base.forward = MethodType(partial(fused_forward, kernel=kernel), base)
