"""The `timm` source: any name of `timm.list_models()` (or one timm renamed into a pretrained tag),
built from its definition (never weights: `pretrained=False`, and the spec refuses the keywords
that load files).

timm's models are image classifiers: `num_classes` and `in_chans` follow the data unless the spec
gives them, and the image size is passed where the model takes one (vision transformers size
their position embeddings by it; convolutional networks take any size and refuse the keyword).
Fused attention is timm's own switch: each attention block reads `use_fused_attn()` once, when it
is built, into its `fused_attn` attribute, so the spec's choice is set on those attributes of
this model only (the process-wide switch stays as it is).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn

from service.schemas.spec import DataSpec, TimmModel
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel


@cache
def known(name: str) -> bool:
    """A name of `timm.list_models()`, or one timm has renamed into a pretrained tag since
    (`ssl_resnet18` -> `resnet18.fb_ssl_yfcc100m_ft_in1k`: the same architecture)."""
    import timm  # the optional `vision` extra

    return bool(timm.is_model(name))


def build_timm(model_spec: TimmModel, data: DataSpec) -> BuiltModel:
    import timm  # the optional `vision` extra

    name = model_spec.name
    if not known(name):
        raise SpecError(("model", "name"), f"timm has no model {name!r}")
    if data.kind not in ("image", "tensor"):
        raise SpecError(("data", "kind"), f"{name} takes images; data.kind is {data.kind!r}")
    kwargs: dict[str, Any] = dict(model_spec.kwargs)
    kwargs.setdefault("num_classes", data.num_classes or 1000)
    if data.kind == "image":
        kwargs.setdefault("in_chans", data.channels)
    try:
        model = _create(timm, name, kwargs, data)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise SpecError(("model", "kwargs"), f"{name}: {exc}") from None
    notes = []
    if model_spec.fused_attn is not None:
        switched = _set_fused_attention(model, model_spec.fused_attn)
        notes.append(
            f"fused attention {'on' if model_spec.fused_attn else 'off'} in {switched} blocks"
        )
    return BuiltModel(model, "classification", notes)


def _create(timm: Any, name: str, kwargs: dict[str, Any], data: DataSpec) -> nn.Module:
    """With the data's image size where the model takes one; without it where it does not."""
    if data.kind == "image" and "img_size" not in kwargs:
        try:
            return timm.create_model(
                name, pretrained=False, img_size=(data.height, data.width), **kwargs
            )
        except TypeError:  # a convolutional network: any size, no keyword
            pass
    return timm.create_model(name, pretrained=False, **kwargs)


def _set_fused_attention(model: nn.Module, enable: bool) -> int:
    blocks = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for block in blocks:
        setattr(block, "fused_attn", enable)  # noqa: B010  (nn.Module types its attributes)
    return len(blocks)
