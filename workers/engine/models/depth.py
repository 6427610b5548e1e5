"""A transformers model's stack of blocks: how deep it is, whether its blocks are the same,
and the same model with fewer of them (what depth folding traces).

A stack folds only when every block of the *full* model is the same block: the same module
classes and parameter shapes, and the same per-layer settings (attention type, sliding window,
dense or MoE ...). Traces of 2-5 blocks cannot see a layer that differs at depth 40 (DeepSeek's
`first_k_dense_replace`, an alternating `layer_types`), so this check runs on the full model
(built on the meta device, it costs nothing) before anything is folded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from service.schemas.spec import TransformersModel
from workers.engine.models.hf import resolve

DEPTH_KEY = "num_hidden_layers"
# Per-layer lists in a config: truncated with the stack when every entry is the same.
SCALARS = (int, float, str, bool, type(None))


def stack_of(module: nn.Module, depth: int) -> nn.ModuleList | None:
    """The model's block stack: the ModuleList with one entry per layer."""
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) == depth:
            return sub
    return None


def _settings(block: nn.Module) -> tuple[Any, ...]:
    """What makes a block the block it is: its modules' classes and scalar settings (less
    their own index), its parameters' and buffers' names, shapes and dtypes."""
    parts: list[Any] = []
    for name, sub in block.named_modules():
        own = {
            k: v
            for k, v in vars(sub).items()
            if not k.startswith("_") and "idx" not in k and k != "training"
            if isinstance(v, SCALARS)
        }
        parts.append((name, type(sub).__name__, tuple(sorted(own.items()))))
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        parts.append((name, tuple(tensor.shape), tensor.dtype))
    return tuple(parts)


def uniform_depth(model: TransformersModel, module: nn.Module) -> int | None:
    """The depth of the model's stack if all its blocks are the same, else None."""
    _, config = resolve(model)
    depth = config.get(DEPTH_KEY)
    if not isinstance(depth, int):
        return None
    stack = stack_of(module, depth)
    if stack is None:
        return None
    first = _settings(stack[0])
    if any(_settings(block) != first for block in list(stack)[1:]):
        return None
    return depth


def with_depth(model: TransformersModel, depth: int, blocks: int) -> TransformersModel:
    """The same model with `blocks` blocks (per-layer config lists cut to match)."""
    _, config = resolve(model)
    changed: dict[str, Any] = {DEPTH_KEY: blocks}
    for key, value in config.items():
        if isinstance(value, list) and len(value) == depth:
            changed[key] = value[:blocks]
    return model.model_copy(update={"config": dict(model.config) | changed})
