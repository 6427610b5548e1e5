"""Apple's Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`, impl `cce`), as its
Triton kernels allocate it: the loss of `hidden @ head.T` without the logits in memory.

Its kernels cannot run on fake tensors, so two custom ops stand in for them, each allocating what
the kernel's Python wrapper allocates and nothing more (the logits live in on-chip memory, a tile
at a time), with a roofline FLOP formula each (`register_flop_formula`); on real CPU tensors they
compute the values, so a test checks them against transformers' loss. From the library's source
(`cce.py`, `cce_lse_forward.py`, `cce_backward.py`, `utils.py`):

- forward: the valid rows' indices (`_build_flat_valids`: int64, one per target that is not
  -100), the log-sum-exp of every valid row (`lse`, fp32), the target's negated logit
  (`indexed_neg_dot_forward_kernel`, fp32; the loss adds `lse` to it in place), and, since
  gradients follow and `filter_eps` is "auto", the average logit of each vocabulary entry
  (`logit_avg`, fp32, V). `e`, `c`, `lse`, the targets, the valid rows and `logit_avg` are kept
  for backward: no tensor of tokens x vocabulary, before or after.
- backward: the vocabulary sorted by `logit_avg` (`argsort`, then int32), the gradients of the
  hidden states and of the head (`zeros_like`, each only if it needs one: a LoRA model's frozen
  head gets none) and their lock arrays; one kernel recomputes each logit tile and accumulates
  both gradients. Its FLOPs are counted in full: the kernel skips tiles whose softmax is below
  bf16's precision (the paper's gradient filtering), so the time is an upper bound.

The backward asserts bf16 or fp16 hidden states and head weights (`cce_backward_kernel`): with
fp32 master weights the run crashes, so the spec takes this kernel with precision `bf16` only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

IGNORE_INDEX = -100  # cut_cross_entropy.constants
LOW = (torch.float16, torch.bfloat16)


@torch.library.custom_op("trainplan::cce_valid_rows", mutates_args=())
def cce_valid_rows(targets: torch.Tensor, valid: int) -> torch.Tensor:
    """`_build_flat_valids`: the rows whose target is not ignored, as int64 indices."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)


@cce_valid_rows.register_fake
def _(targets: torch.Tensor, valid: int) -> torch.Tensor:
    return targets.new_empty((valid,), dtype=torch.int64)


@torch.library.custom_op("trainplan::cce_lse_forward", mutates_args=())
def cce_lse_forward(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, neg_dot, logit_avg) of the valid rows: the forward kernels' outputs."""
    x, w = e[rows].float(), c.float()
    logits = x @ w.t()
    neg_dot = -(x * w[targets[rows]]).sum(-1)
    return logits.logsumexp(-1), neg_dot, logits.sum(0) / max(len(rows), 1)


@cce_lse_forward.register_fake
def _(
    e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    valid = rows.shape[0]
    per_row = e.new_empty((valid,), dtype=torch.float32)
    return per_row, torch.empty_like(per_row), c.new_empty((c.shape[0],), dtype=torch.float32)


@torch.library.custom_op("trainplan::cce_backward", mutates_args=("de", "dc"))
def cce_backward(
    grad: torch.Tensor,
    e: torch.Tensor,
    c: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    de: torch.Tensor | None,
    dc: torch.Tensor | None,
) -> None:
    """`_cce_backward_kernel`: (softmax - one-hot) x grad / valid rows, into `de` and `dc`."""
    x, w = e[rows].float(), c.float()
    probs = (x @ w.t() - lse[:, None]).exp()
    probs[torch.arange(len(rows)), targets[rows]] -= 1
    probs *= grad.float() / max(len(rows), 1)  # the mean's scale
    if de is not None:
        de.index_add_(0, rows, (probs @ w).to(de.dtype))
    if dc is not None:
        dc.add_((probs.t() @ x).to(dc.dtype))


@cce_backward.register_fake
def _(*args: Any) -> None:
    return None


@register_flop_formula(torch.ops.trainplan.cce_lse_forward)
def _forward_flops(
    e_shape: Any, c_shape: Any, targets_shape: Any, rows_shape: Any, **_: Any
) -> int:
    """Every valid row against every vocabulary entry, once."""
    return 2 * rows_shape[0] * c_shape[0] * c_shape[1]


@register_flop_formula(torch.ops.trainplan.cce_backward)
def _backward_flops(
    grad_shape: Any,
    e_shape: Any,
    c_shape: Any,
    lse_shape: Any,
    targets_shape: Any,
    rows_shape: Any,
    de_shape: Any,
    dc_shape: Any,
    **_: Any,
) -> int:
    """The logits recomputed, then one product per gradient made (no filtering counted)."""
    one = 2 * rows_shape[0] * c_shape[0] * c_shape[1]
    return one * (1 + (de_shape is not None) + (dc_shape is not None))


class CutCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `e @ c.T` against `targets` (-100 ignored), CCE's memory."""

    @staticmethod
    def forward(
        ctx: Any, e: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, counted: int
    ) -> torch.Tensor:
        """`counted`: the targets that are not -100 (the library's `nonzero`, which a fake
        tensor cannot answer, so the caller counts them from the shapes)."""
        rows = torch.ops.trainplan.cce_valid_rows(targets, counted)
        lse, neg_dot, logit_avg = torch.ops.trainplan.cce_lse_forward(e, c, targets, rows)
        loss = neg_dot.add_(lse).mean()
        ctx.save_for_backward(e, c, lse, targets, rows, logit_avg)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        e, c, lse, targets, rows, logit_avg = ctx.saved_tensors
        if e.dtype not in LOW or c.dtype not in LOW:  # cce_backward_kernel's own assertion
            raise AssertionError("Backwards requires embeddings to be bf16 or fp16")
        _vocab_ordering = torch.argsort(logit_avg).to(torch.int32)
        de = torch.zeros_like(e) if ctx.needs_input_grad[0] else None
        dc = torch.zeros_like(c) if ctx.needs_input_grad[1] else None
        blocks_d = math.ceil(c.shape[1] / 64)  # one lock per 128 rows x 64 columns written
        _locks = [
            grad_of.new_zeros((math.ceil(length / 128), blocks_d), dtype=torch.int32)
            for grad_of, length in ((de, rows.shape[0]), (dc, c.shape[0]))
            if grad_of is not None
        ]
        torch.ops.trainplan.cce_backward(grad, e, c, lse, targets, rows, de, dc)
        del _vocab_ordering, _locks
        return de, dc, None, None
