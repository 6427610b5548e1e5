"""The `layers` source: an `nn.Sequential` of allow-listed torch.nn layers.

Input sizes a user leaves out (`in_channels`, `in_features`, `num_features`, ...) are read off the
shape flowing into the layer, found by running a meta tensor through the layers built so far.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.schemas.layers import LAYER_TYPES
from service.schemas.spec import DataSpec, LayersModel
from workers.engine.data import sample_input
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel

_SEQUENCE_LAYERS = {"RNN", "LSTM", "GRU"}


class FirstOutput(nn.Module):
    """Keeps the first output of a layer that returns a tuple (RNNs)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention` used as a layer: query, key and value are the input."""

    def __init__(self, inner: nn.MultiheadAttention) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, x, x, need_weights=False)[0]


def _infer(kind: str, kwargs: dict[str, Any], shape: torch.Size, data: DataSpec) -> dict[str, Any]:
    """Fill the input-size keywords the user left out from the incoming shape."""
    kw = dict(kwargs)
    channels = shape[1] if len(shape) > 1 else shape[-1]
    last = shape[-1]
    if kind.startswith(("Conv", "ConvTranspose")):
        kw.setdefault("in_channels", channels)
    elif kind == "Linear":
        kw.setdefault("in_features", last)
    elif kind.startswith(("BatchNorm", "InstanceNorm")):
        kw.setdefault("num_features", channels)
    elif kind == "GroupNorm":
        kw.setdefault("num_channels", channels)
        kw.setdefault("num_groups", _largest_divisor(channels, 32))
    elif kind == "LayerNorm":
        kw.setdefault("normalized_shape", last)
    elif kind == "Embedding":
        vocab = getattr(data, "vocab_size", None) or data.num_classes
        if vocab is not None:
            kw.setdefault("num_embeddings", vocab)
    elif kind in _SEQUENCE_LAYERS:
        kw.setdefault("input_size", last)
        kw.setdefault("batch_first", True)
    elif kind == "TransformerEncoderLayer":
        kw.setdefault("d_model", last)
        kw.setdefault("nhead", _largest_divisor(last, 8))
        kw.setdefault("batch_first", True)
    elif kind == "MultiheadAttention":
        kw.setdefault("embed_dim", last)
        kw.setdefault("num_heads", _largest_divisor(last, 8))
        kw.setdefault("batch_first", True)
    for key in (
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "output_size",
        "normalized_shape",
        "unflattened_size",
        "output_padding",
    ):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return kw


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


def _make(kind: str, kw: dict[str, Any]) -> nn.Module:
    assert kind in LAYER_TYPES  # the schema's allow-list; getattr below can reach nothing else
    layer = getattr(nn, kind)(**kw)
    if kind in _SEQUENCE_LAYERS:
        return FirstOutput(layer)
    if kind == "MultiheadAttention":
        return SelfAttention(layer)
    return layer


def build_layers(model: LayersModel, data: DataSpec) -> BuiltModel:
    x = sample_input(data, batch=2, device="meta")
    modules: list[nn.Module] = []
    for index, layer in enumerate(model.layers):
        loc = ("model", "layers", index)
        # torch checks a layer's arguments and input with whatever exception it likes
        # (AssertionError, ZeroDivisionError, NotImplementedError ...): each is the spec's fault.
        try:
            module = _make(layer.type, _infer(layer.type, layer.kwargs, x.shape, data))
        except MemoryError:
            raise
        except Exception as exc:
            raise SpecError(loc, f"{layer.type}: {exc}") from None
        try:
            with torch.no_grad():
                x = module(x)
        except MemoryError:
            raise
        except Exception as exc:
            raise SpecError(
                loc,
                f"{layer.type} cannot take input of shape {list(x.shape[1:])} (per sample): {exc}",
            ) from None
        if (
            x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            and index + 1 < len(model.layers)
            and layer.type != "Embedding"
        ):
            raise SpecError(loc, f"{layer.type} outputs {x.dtype}, which no layer after it takes")
        modules.append(module)
    _check_head(len(model.layers), data, x)
    family = (
        "lm"
        if data.kind == "tokens" and x.dim() == 3
        else ("regression" if data.target == "regression" else "classification")
    )
    return BuiltModel(nn.Sequential(*modules), family)


def _check_head(layers: int, data: DataSpec, out: torch.Tensor) -> None:
    loc = ("model", "layers", layers - 1)
    per_sample = list(out.shape[1:])
    if data.target == "regression":
        if per_sample != [data.num_outputs]:
            raise SpecError(
                loc,
                f"the model outputs {per_sample} per sample; regression with "
                f"num_outputs={data.num_outputs} needs [{data.num_outputs}]",
            )
        return
    classes = data.num_classes or getattr(data, "vocab_size", None)
    if data.kind == "tokens" and len(per_sample) == 2:
        if classes is not None and per_sample[-1] != classes:
            raise SpecError(
                loc, f"the model predicts {per_sample[-1]} tokens, the vocabulary has {classes}"
            )
        return
    if per_sample != [classes]:
        hint = " (add a Flatten and a Linear head)" if len(per_sample) > 1 else ""
        raise SpecError(
            loc,
            f"the model outputs {per_sample} per sample; classification "
            f"with num_classes={classes} needs [{classes}]{hint}",
        )
