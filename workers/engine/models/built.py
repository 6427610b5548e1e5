"""What a model source builds: the module on the meta device, its family (which loss the step
computes), the notes the plan passes on, for models that compute their own loss the way they do
it, and for mixture-of-experts models their experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.engine.models.moe import MoeLayout


@dataclass
class BuiltModel:
    module: nn.Module
    family: str = "classification"  # classification | segmentation | lm | regression | hf
    notes: list[str] = field(default_factory=list)
    # (model, inputs, targets, **row tensors) -> loss, for models that compute their own loss
    # (transformers; the row tensors: a padding mask or packed positions, models.hf.row_inputs)
    forward_loss: Callable[..., torch.Tensor] | None = None
    vocab_size: int | None = None
    moe: MoeLayout | None = None  # its mixture-of-experts layers, if any
