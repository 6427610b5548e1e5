"""Model sources: turn the `model` part of a spec into an `nn.Module` on the meta device.

Building on the meta device costs no memory and no init compute, so even an 8B-parameter model is
built in a moment; a device then materialises it (fake, real CPU or CUDA tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from service.schemas.spec import PlanSpec
from workers.engine.errors import SpecError


@dataclass
class BuiltModel:
    module: nn.Module
    family: str = "classification"  # classification | segmentation | lm | regression
    notes: list[str] = field(default_factory=list)


def build_model(spec: PlanSpec) -> BuiltModel:
    """Build the spec's model on the meta device, or raise SpecError naming the field."""
    source = spec.model.source
    with torch.device("meta"):
        if source == "layers":
            from workers.engine.models.layers import build_layers

            return build_layers(spec)
        if source == "torchvision":
            from workers.engine.models.vision import build_torchvision

            return build_torchvision(spec)
        if source == "registered":
            from workers.engine.models.registered import build_registered

            return build_registered(spec)
    raise SpecError(("model", "source"), f"the {source!r} source is not available on this worker")
