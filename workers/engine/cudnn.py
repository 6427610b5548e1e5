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


# Before cuDNN 8.5 (the torch < 1.13 wheels: 1.11 ships 8.2, 1.12 8.3.2) many channels_last
# grouped convolutions ran cuDNN's direct kernels (`conv2d_grouped_direct_kernel`,
# `wgrad2d_grouped_direct_kernel`; pytorch/pytorch#34977) rather than Tensor Core ones:
# "generally unusable for quite a range of group sizes", NFNet and RegNet above all, which keep
# a fixed group width (pytorch/pytorch#70954, AMP on an RTX 3090); grouped convolution was
# "optimized once after the 8500 version" (pytorch/pytorch#95604). timm's RTX 3090 benchmark
# shows it: NHWC ran 0.30-0.56x of NCHW for RegNetY, NFNet and ResNeSt, while ResNeXt (32
# groups) ran faster in NHWC. Which shapes fall to the direct kernels is cuDNN's heuristic, not
# a rule the roofline can state: plans warn rather than cost it.
GROUPED_NHWC_FIXED = (1, 13)


def grouped_convolutions(module: torch.nn.Module) -> int:
    """Convolutions with groups that are not depthwise (1 < groups < input channels)."""
    return sum(
        1
        for m in module.modules()
        if isinstance(m, torch.nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels
    )
