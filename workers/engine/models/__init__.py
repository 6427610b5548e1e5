"""Model sources: turn the `model` part of a spec into an `nn.Module` on the meta device.

Building on the meta device costs no memory and no init compute, so even an 8B-parameter model is
built in a moment; a device then materialises it (fake, real CPU or CUDA tensors).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from service.schemas.spec import DataSpec, ModelSpec, PeftSpec
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel
from workers.engine.models.hf import build_transformers
from workers.engine.models.layers import build_layers
from workers.engine.models.registered import build_registered
from workers.engine.models.timm_zoo import build_timm
from workers.engine.models.vision import build_torchvision
from workers.engine.peft import apply_peft

__all__ = ["BuiltModel", "build_model"]


def build_model(model: ModelSpec, data: DataSpec, peft: PeftSpec | None = None) -> BuiltModel:
    """Build the model on the meta device (with LoRA adapters when `peft` asks for them), or
    raise SpecError naming the field. Each source's builder takes its own slices: the model's
    spec and the data's."""
    built = _build_base(model, data)
    if peft is not None:
        with torch.device("meta"):
            built.module = apply_peft(built.module, peft, built.family)
    return built


def _build_base(model: ModelSpec, data: DataSpec) -> BuiltModel:
    try:
        with torch.device("meta"):
            return _build(model, data)
    except NotImplementedError:
        pass
    except RuntimeError as exc:
        if "meta" not in str(exc):
            raise
    # Some constructors compute with small tensors (RegNet's widths): keep those real and send
    # only the large allocations (the weights) to the meta device.
    with LargeTensorsToMeta():
        return _build(model, data)


class LargeTensorsToMeta(TorchFunctionMode):
    """Factory calls without a device make tensors on `meta` when they are large."""

    FACTORIES = frozenset(
        {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}
    )
    THRESHOLD = 1 << 16

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            dims = (
                args[0]
                if args and isinstance(args[0], (tuple, list, torch.Size))
                else [a for a in args if isinstance(a, int)]
            )
            if math.prod(int(d) for d in dims) > self.THRESHOLD:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _build(model: ModelSpec, data: DataSpec) -> BuiltModel:
    if model.source == "layers":
        return build_layers(model, data)
    if model.source == "torchvision":
        return build_torchvision(model, data)
    if model.source == "timm":
        return build_timm(model, data)
    if model.source == "transformers":
        return build_transformers(model, data)
    if model.source == "registered":
        return build_registered(model, data)
    raise SpecError(
        ("model", "source"), f"the {model.source!r} source is not available on this worker"
    )
