"""CUDA kernels whose fake-tensor (meta) function refuses what the kernel itself accepts.

The simulated step runs on fake CPU tensors, so each op's output comes from its meta function.
For most ops that function checks exactly what the CUDA kernel checks. Where it is stricter, a
training step that runs on a GPU would crash the trace; `cuda_kernel_rules()` answers those ops
the way the CUDA kernel does, and nothing else.

- `aten._grouped_mm` (the grouped GEMM of MoE experts: transformers' `grouped_mm` experts
  implementation, torchtitan's MoE). Its meta function (torch/_meta_registrations.py,
  `_meta_grouped_mm_common`) accepts bf16 (and fp16 with cuBLASLt >= 13.3) only. The CUDA kernel
  (aten/src/ATen/native/cuda/GroupedBlas.cpp, `_grouped_mm_cuda`) takes its CUTLASS fast path for
  bf16 on sm90/sm100 and otherwise `_grouped_mm_fallback`, a loop of `mm_out`/`bmm_out` per group
  into one output made by `create_grouped_gemm_output_tensor` (GroupedMMUtils.h): the output's
  rows padded to 16 bytes. `_grouped_mm` is not autocast-enabled (pytorch/pytorch #174763), and
  transformers casts the input to the weight's dtype (integrations/moe.py, `_grouped_mm`), so
  under bf16-mixed the experts of a model with fp32 master weights run this fp32 fallback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GROUPED_MM = torch.ops.aten._grouped_mm.default
FAST_PATH_DTYPES = (torch.bfloat16,)


def grouped_mm_shape(a_shape: Any, b_shape: Any, groups: int | None) -> list[int]:
    """The output shape of `_grouped_mm` (a 2-D operand is split into groups by `offs`)."""
    a_2d, b_2d = len(a_shape) == 2, len(b_shape) == 2
    if a_2d and b_2d:
        assert groups is not None, "2-D x 2-D grouped_mm needs offs"
        return [groups, a_shape[0], b_shape[1]]
    if a_2d:
        return [a_shape[0], b_shape[-1]]
    if b_2d:
        return [a_shape[1], b_shape[1]]
    return [a_shape[0], a_shape[1], b_shape[-1]]


def grouped_mm_flops(a_shape: Any, b_shape: Any, out_shape: Any) -> int:
    """2 x MACs: every output element sums the contraction dimension once, whichever group
    its row or column falls in (for 2-D x 2-D the contraction itself is split by groups)."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    contraction = a_shape[-1]
    elements = 1
    for size in out_shape:
        elements *= size
    return 2 * elements * contraction


def _fallback_output(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    """`create_grouped_gemm_output_tensor`: last dimension padded to 16 bytes."""
    size = grouped_mm_shape(a.shape, b.shape, None if offs is None else offs.shape[0])
    align = max(1, 16 // a.element_size())
    padded = (size[-1] + align - 1) // align * align
    stride = [padded, 1] if len(size) == 2 else [size[1] * padded, padded, 1]
    return torch.empty_strided(size, stride, dtype=a.dtype, device=a.device)


class CudaKernelRules(TorchDispatchMode):
    """Sits directly above FakeTensorMode: the ops listed in the module docstring get the CUDA
    kernel's output; every other op passes through untouched."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _GROUPED_MM and args[0].dtype not in FAST_PATH_DTYPES:
            a, b = args[0], args[1]
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            if a.dtype != b.dtype or kwargs.get("out_dtype") not in (None, a.dtype):
                raise RuntimeError(
                    f"grouped_mm: operands must share a dtype, got {a.dtype} and {b.dtype}"
                )
            return _fallback_output(a, b, offs)
        return func(*args, **kwargs)


def cuda_kernel_rules() -> CudaKernelRules:
    return CudaKernelRules()
