"""What a failed trace was doing: the layer it was in and the op it called, read off the
traceback (the innermost frame whose `self` is an `nn.Module`, and one whose `self` is a torch
op), so an engine failure is a problem naming what is unsupported, not a library's message."""

from __future__ import annotations

import logging
from types import TracebackType

import torch
from torch import nn

from workers.engine.errors import BatchUndefined, Unsupported

BATCHNORM_ONE_VALUE = "Expected more than 1 value per channel when training"

# FakeTensorMode logs a traceback at ERROR for every op whose meta kernel raises, before the
# exception reaches us; the engine reports that failure itself (`classify`), in one line.
logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)


def _frames(tb: TracebackType | None) -> list[object]:
    selves = []
    while tb is not None:
        selves.append(tb.tb_frame.f_locals.get("self"))
        tb = tb.tb_next
    return selves


def failing_layer(exc: BaseException, model: nn.Module | None) -> str | None:
    """`Class (path.in.model)` of the innermost module running when `exc` was raised."""
    modules = [s for s in _frames(exc.__traceback__) if isinstance(s, nn.Module)]
    if not modules:
        return None
    inner = modules[-1]
    names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    path = names.get(id(inner))
    return f"{type(inner).__name__} ({path})" if path else type(inner).__name__


def failing_op(exc: BaseException) -> str | None:
    """The torch op (`aten._grouped_mm.default`) being run when `exc` was raised."""
    ops = [s for s in _frames(exc.__traceback__) if isinstance(s, torch._ops.OpOverload)]
    return str(ops[-1]) if ops else None


def classify(
    exc: Exception, batch: int, model: nn.Module | None, precision: str, architecture: str
) -> Exception:
    """The engine's own error for a trace that raised `exc` at `batch`."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, ValueError) and BATCHNORM_ONE_VALUE in str(exc):
        return BatchUndefined(batch, first_line)
    layer, op = failing_layer(exc, model), failing_op(exc)
    where = " in ".join(x for x in (op and f"op {op}", layer and f"layer {layer}") if x)
    what = where or "its training step"
    message = (
        f"{architecture} cannot be traced at {precision}: {what} failed "
        f"({type(exc).__name__}: {first_line}). trainplan does not support this "
        "layer or op on this precision yet; another precision or model may plan."
    )
    return Unsupported(("model",), message, what)
