"""cuDNN's transient workspace for convolutions whose tensors are not in the layout its Tensor
Core kernels read.

Tensor Core convolution kernels work on NHWC data; for NCHW tensors "the cuDNN library may use
padding, folding, and NCHW-to-NHWC transformations to call the Tensor Core operations" (cuDNN
Developer Guide, Legacy API, Convolution Functions: Data and Filter Formats), i.e. transposed
copies of the activations live in cuDNN's workspace for the length of the call. PyTorch allocates
that workspace through its caching allocator for each call and frees it after
(aten/src/ATen/native/cudnn/Conv_v7.cpp, Conv_v8.cpp).

Tensor Cores run convolutions in fp16/bf16 from Volta (sm70) on, and in fp32 from Ampere (sm80)
on, where `torch.backends.cudnn.allow_tf32` is True by default. A `channels_last` job needs no
transform. Modelled per call as one transposed copy of the activation operands (input and output
in forward; output gradient and input in backward, whose data and weight gradients run one after
the other); the filter is small beside them and left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_ATEN = torch.ops.aten
_FORWARD = {_ATEN.convolution.default, _ATEN.cudnn_convolution.default}
_BACKWARD = {_ATEN.convolution_backward.default}
LOW = (torch.float16, torch.bfloat16)


def _bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _needs_transform(t: Any, sm: int) -> bool:
    if not isinstance(t, torch.Tensor) or t.dim() not in (4, 5):
        return False
    tensor_cores = (t.dtype in LOW and sm >= 70) or (t.dtype == torch.float32 and sm >= 80)
    layout = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return tensor_cores and not t.is_contiguous(memory_format=layout)


def nchw_transform_workspace(sm: int) -> Callable[[Any, Any, Any], int]:
    """The tracker's `workspace` hook for a card of compute capability `sm` (x10)."""

    def workspace(func: Any, args: Any, out: Any) -> int:
        if func in _FORWARD:
            x = args[0]
            return _bytes(x) + _bytes(out) if _needs_transform(x, sm) else 0
        if func in _BACKWARD:
            grad_out, x = args[0], args[1]
            return _bytes(grad_out) + _bytes(x) if _needs_transform(x, sm) else 0
        return 0

    return workspace
