"""Activation checkpointing: which blocks recompute their activations in backward.

Policies, as torchtitan's `activation_checkpoint` config names them (and transformers' layers
run them):
- `full`: every block is checkpointed: only its input is kept; its forward runs again in
  backward.
- every k-th block (`checkpointing.every: k`, torchtitan's `selective_ac_option = "k"`): one block
  in k is checkpointed, the others keep all their activations: less recompute, more memory.

With `checkpointing.offload` each checkpoint runs under offload hooks (`offload.py`): what it
saves (the block's inputs) waits for backward in pinned host memory.

- op-selective (`checkpointing.selective: "op"`, torchtitan's `selective_ac_option = "op"`): a
  checkpointed block also keeps the outputs of its matmuls and attention kernels (PyTorch's
  `create_selective_checkpoint_contexts` with a policy that says MUST_SAVE for them), and
  backward recomputes only the cheap ops between them. In recomputation PyTorch hands the kept
  outputs back instead of running those ops, so the trace's cost model sees only what really
  runs again.

Every checkpoint runs with a `context_fn` whose recomputation context sets `RECOMPUTING`: the
roofline books those ops apart (`split.recompute_s`, and the bytes of activations recomputed
rather than kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from service.schemas.spec import CheckpointingSpec
from workers.engine.offload import offloading

Hooks = Callable[[], saved_tensors_hooks]

_ATEN = torch.ops.aten
# What an op-selective checkpoint keeps: matmuls (LoRA's and the experts' included) and the
# attention kernels, CUDA's and the trace's CPU stand-in for them.
SAVED_BY_OP_POLICY = {
    _ATEN.mm,
    _ATEN.addmm,
    _ATEN.bmm,
    _ATEN.baddbmm,
    _ATEN._grouped_mm,
    _ATEN._scaled_dot_product_flash_attention,
    _ATEN._scaled_dot_product_efficient_attention,
    _ATEN._scaled_dot_product_cudnn_attention,
    _ATEN._scaled_dot_product_flash_attention_for_cpu,
}


# The same, by name, as the configs render it.
OP_POLICY_KEEPS = tuple(sorted(f"aten.{op.__name__}" for op in SAVED_BY_OP_POLICY))


def _op_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if func._overloadpacket in SAVED_BY_OP_POLICY:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Set while a checkpointed block recomputes its forward in backward: the cost model books those
# ops as recomputation (the step pays them; the breakdown keeps what was saved apart).
RECOMPUTING: ContextVar[bool] = ContextVar("recomputing", default=False)


@contextmanager
def _recomputing() -> Iterator[None]:
    token = RECOMPUTING.set(True)
    try:
        yield
    finally:
        RECOMPUTING.reset(token)


@contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


def block_context() -> tuple[Any, Any]:
    """A checkpoint's `context_fn` (PyTorch enters the second context around recomputation):
    keep the block's input only, and mark its recomputation."""
    return nullcontext(), _recomputing()


def op_selective_context() -> tuple[Any, Any]:
    """A checkpoint's `context_fn` that keeps matmul and attention outputs (and marks the
    recomputation of the rest)."""
    forward, recompute = create_selective_checkpoint_contexts(_op_policy)
    return forward, _both(recompute, _recomputing())


def context_of(policy: CheckpointingSpec) -> Callable[[], tuple[Any, Any]]:
    return op_selective_context if policy.selective == "op" else block_context


class Checkpointed(nn.Module):
    """Recomputes its inner module's activations in backward instead of keeping them."""

    def __init__(
        self,
        inner: nn.Module,
        offload: Hooks | None = None,
        function: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        function = function or partial(checkpoint, context_fn=block_context)
        self.checkpoint = function if offload is None else offloading(function, offload)

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return self.checkpoint(self.inner, *args, use_reentrant=False)


def enable_checkpointing(
    model: nn.Module, policy: CheckpointingSpec, offload: Hooks | None = None
) -> int:
    """Checkpoint the model's blocks under `policy`; the number of blocks checkpointed.
    Hugging Face models have their own switch (per decoder layer); others get ours. `offload`:
    the hooks each checkpoint runs under when the policy offloads (transformers wraps its
    checkpoint function the same way)."""
    offload = offload if policy.offload else None
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is not None and getattr(model, "supports_gradient_checkpointing", False):
        with warnings.catch_warnings():  # renamed in transformers 5; same behaviour
            warnings.simplefilter("ignore", FutureWarning)
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        blocks = _checkpointed_layers(model)
        for index, block in enumerate(blocks):
            setattr(block, "gradient_checkpointing", index % policy.every == 0)  # noqa: B010
            inner = block.__dict__["_gradient_checkpointing_func"]  # set by enable()
            inner = partial(inner, context_fn=context_of(policy))
            if offload is not None:
                inner = offloading(inner, offload)
            block.__dict__["_gradient_checkpointing_func"] = inner
        return sum(1 for index in range(len(blocks)) if index % policy.every == 0)
    return apply_checkpointing(model, policy, offload)


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """transformers' layers that checkpoint themselves (the flag is also set on the base model,
    which holds no activations of its own)."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # the optional `nlp` extra

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_checkpointing(
    model: nn.Module, policy: CheckpointingSpec | None = None, offload: Hooks | None = None
) -> int:
    """Checkpoint every block (or one in `policy.every`) of every `nn.Sequential` (a block: a
    child that has children); for a flat Sequential of plain layers, segments of about sqrt(n)
    layers. Returns the number of checkpointed segments."""
    every = policy.every if policy is not None else 1
    context = context_of(policy) if policy is not None else block_context
    function = partial(checkpoint, context_fn=context)
    count = seen = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential) or isinstance(parent, Checkpointed):
            continue
        children = list(parent.named_children())
        if any(len(list(c.children())) > 0 for _, c in children):
            for name, child in children:
                if len(list(child.children())) > 0 and any(True for _ in child.parameters()):
                    if seen % every == 0:
                        setattr(parent, name, Checkpointed(child, offload, function))
                        count += 1
                    seen += 1
    if count == 0 and seen == 0 and isinstance(model, nn.Sequential):
        layers = list(model.children())
        size = max(1, round(len(layers) ** 0.5))
        segments = [nn.Sequential(*layers[i : i + size]) for i in range(0, len(layers), size)]
        for index in range(len(layers) - 1, -1, -1):
            del model[index]
        for index, segment in enumerate(segments):
            checkpointed = Checkpointed(segment, offload, function)
            model.append(checkpointed if index % every == 0 else segment)
            count += index % every == 0
    return count
