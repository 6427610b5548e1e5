"""The `torchvision` source: any name of `torchvision.models.list_models()`, never with weights.

Classification and segmentation families train on image batches directly. Families whose training
forward needs structured targets (detection) or several inputs (optical flow) are refused with a
clear error rather than planned wrongly.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn

from service.schemas.spec import DataSpec, TorchvisionModel
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel

SUPPORTED_FAMILIES = ("classification", "segmentation", "video")


@cache
def families() -> dict[str, str]:
    """Model name -> family, from torchvision's own registry."""
    import torchvision.models as tvm  # the optional `vision` extra; 1.3 s to import

    table: dict[str, str] = {}
    for family, module in (
        ("detection", tvm.detection),
        ("segmentation", tvm.segmentation),
        ("video", tvm.video),
        ("optical_flow", tvm.optical_flow),
        ("quantization", tvm.quantization),
    ):
        for name in tvm.list_models(module=module):
            table[name] = family
    for name in tvm.list_models():
        table.setdefault(name, "classification")
    return table


# A Conv2d's geometry, copied as it is (torch types them as tuples of any length).
CONV_SHAPE = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def build_torchvision(model_spec: TorchvisionModel, data: DataSpec) -> BuiltModel:
    import torchvision.models as tvm  # the optional `vision` extra; 1.3 s to import

    name = model_spec.name
    family = families().get(name)
    if family is None:
        raise SpecError(("model", "name"), f"torchvision has no model {name!r}")
    if family not in SUPPORTED_FAMILIES:
        raise SpecError(
            ("model", "name"),
            f"{name} is a {family} model; trainplan plans "
            f"{', '.join(SUPPORTED_FAMILIES)} models from torchvision",
        )
    if data.kind not in ("image", "tensor"):
        raise SpecError(("data", "kind"), f"{name} takes images; data.kind is {data.kind!r}")
    kwargs: dict[str, Any] = dict(model_spec.kwargs)
    if data.num_classes is not None:
        kwargs.setdefault("num_classes", data.num_classes)
    if family == "segmentation":
        kwargs.setdefault("weights_backbone", None)
    try:
        model = tvm.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(("model", "kwargs"), f"{name}: {exc}") from None
    notes = []
    channels = getattr(data, "channels", 3)
    if data.kind == "image" and channels != 3 and _adapt_stem(model, channels):
        notes.append(f"first convolution adapted from 3 to {channels} input channels")
    return BuiltModel(
        model, "segmentation" if family == "segmentation" else "classification", notes
    )


def _adapt_stem(model: nn.Module, channels: int) -> bool:
    """Replace the first 3-channel convolution with one for `channels` (grayscale fine-tuning)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(
                        channels,
                        child.out_channels,
                        bias=child.bias is not None,
                        **{key: getattr(child, key) for key in CONV_SHAPE},
                    ),
                )
                return True
    return False
