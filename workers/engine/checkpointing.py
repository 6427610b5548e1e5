"""Activation checkpointing: which blocks recompute their activations in backward.

Policies, as torchtitan's `activation_checkpoint` config names them (and transformers' layers
run them):
- `full`: every block is checkpointed: only its input is kept; its forward runs again in
  backward.
- every k-th block (`checkpointing.every: k`, torchtitan's `selective_ac_option = "k"`): one block
  in k is checkpointed, the others keep all their activations: less recompute, more memory.

With `checkpointing.offload` each checkpoint runs under offload hooks (`offload.py`): what it
saves (the block's inputs) waits for backward in pinned host memory.

torchtitan's op-selective policy (`selective_ac_option = "op"`, through PyTorch's
`create_selective_checkpoint_contexts`) is not offered yet: its recomputation must replay the
forward's ops in the same order, and the trace's stand-in for CUDA's autocast caches weight
casts differently in forward and in recomputation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from service.schemas.spec import CheckpointingSpec
from workers.engine.offload import offloading

Hooks = Callable[[], saved_tensors_hooks]


class Checkpointed(nn.Module):
    """Recomputes its inner module's activations in backward instead of keeping them."""

    def __init__(self, inner: nn.Module, offload: Hooks | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.checkpoint = checkpoint if offload is None else offloading(checkpoint, offload)

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
            if offload is not None:
                inner = block.__dict__["_gradient_checkpointing_func"]  # set by enable()
                block.__dict__["_gradient_checkpointing_func"] = offloading(inner, offload)
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
    count = seen = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential) or isinstance(parent, Checkpointed):
            continue
        children = list(parent.named_children())
        if any(len(list(c.children())) > 0 for _, c in children):
            for name, child in children:
                if len(list(child.children())) > 0 and any(True for _ in child.parameters()):
                    if seen % every == 0:
                        setattr(parent, name, Checkpointed(child, offload))
                        count += 1
                    seen += 1
    if count == 0 and seen == 0 and isinstance(model, nn.Sequential):
        layers = list(model.children())
        size = max(1, round(len(layers) ** 0.5))
        segments = [nn.Sequential(*layers[i : i + size]) for i in range(0, len(layers), size)]
        for index in range(len(layers) - 1, -1, -1):
            del model[index]
        for index, segment in enumerate(segments):
            model.append(Checkpointed(segment, offload) if index % every == 0 else segment)
            count += index % every == 0
    return count
