"""CUDA's autocast policy, applied to the simulated device's fake CPU tensors.

The simulated step traces on fake CPU tensors (fake CUDA tensors cannot run backward without a
GPU), so `torch.autocast("cpu")` would apply the CPU policy, which differs from CUDA's: on CPU,
softmax, log_softmax, layer_norm, group_norm, exp, sum ... stay in half precision, on CUDA they run
in fp32 and keep fp32 outputs (and a cast copy of their input) for backward. Memory differs by
6-12% on transformer and ConvNeXt blocks.

`cuda_autocast_on_cpu()` replaces, for as long as it is active, every kernel of the AutocastCPU
dispatch key with CUDA's policy: the ops PyTorch registers for AutocastCUDA get the CUDA rule
(the lists below, from aten/src/ATen/autocast_mode.h of the installed torch; a test checks them
against that header and the dispatcher), every other CPU autocast kernel falls through. Casts go
through the dispatcher like the real ones, so autograd sees them and saves what CUDA saves; fp32
leaf weights cast to the low precision are cached until the autocast region exits, as
`cached_cast` does.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Policies of aten/src/ATen/autocast_mode.h (AT_FORALL_* lists; CUDA adds its cuDNN ops).
LOWER_PRECISION_FP = [
    "_convolution.deprecated",
    "_convolution",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "convolution",
    "prelu",
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "einsum",
    "mm",
    "mv",
    "linalg_vecdot",
    "linear",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "linalg_multi_dot",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
    "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention",
    "cudnn_convolution",
    "cudnn_convolution_transpose",
    "_cudnn_rnn",
]
FP32 = [
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
    "group_norm",
    "frobenius_norm.dim",
    "nuclear_norm",
    "nuclear_norm.dim",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "nll_loss2d",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "upsample_nearest1d",
    "_upsample_nearest_exact1d",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "_upsample_bilinear2d_aa",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
]
# fp32 output unless the caller gave a dtype: `dtype=float32` is set, the input is not copied.
FP32_SET_OPT_DTYPE = [
    "prod",
    "prod.dim_int",
    "softmax.int",
    "log_softmax.int",
    "cumprod",
    "cumsum",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "sum",
    "sum.dim_IntList",
]
FP32_APPEND_DTYPE = ["norm.Scalar", "norm.ScalarOpt_dim"]  # redispatched to norm with a dtype
PROMOTE = [
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "vdot",
    "grid_sampler",
    "index_put",
    "tensordot",
    "scatter_add",
]
BANNED = ["binary_cross_entropy"]  # "unsafe to autocast": raises, as on CUDA
# Registered for AutocastCUDA by torch 2.14 outside the header's lists: an eigh-based linalg op,
# which CUDA cannot run in half precision (the CPU policy lists it as fp32 too).
FP32_EXTRA = ["linalg_matrix_sqrth"]

POLICY: dict[str, str] = {
    **dict.fromkeys(LOWER_PRECISION_FP, "lower_precision_fp"),
    **dict.fromkeys(FP32 + FP32_EXTRA, "fp32"),
    **dict.fromkeys(FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype"),
    **dict.fromkeys(FP32_APPEND_DTYPE, "fp32_append_dtype"),
    **dict.fromkeys(PROMOTE, "promote"),
    **dict.fromkeys(BANNED, "banned"),
}
_KEY = torch._C.DispatchKey.AutocastCPU
_EXCLUDE = torch._C.DispatchKeySet(_KEY)
_LOCK = threading.RLock()


def _split(name: str) -> tuple[str, str]:
    base, _, overload = name.partition(".")
    return base, overload or "default"


def _overload(name: str) -> torch._ops.OpOverload | None:
    base, overload = _split(name)
    packet = getattr(torch.ops.aten, base, None)
    return getattr(packet, overload, None) if packet is not None else None


def _eligible(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
    )


class _CastCache:
    """`cached_cast`: fp32 leaf tensors that require grad (weights) are cast to the low precision
    once per autocast region; the copy is reused by every op that reads the weight."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    def cast(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cacheable = (
            value.dtype == torch.float32
            and value.requires_grad
            and value.is_leaf
            and not value._is_view()
        )
        if not cacheable:
            return value.to(dtype)
        entry = self.entries.get(id(value))
        if entry is not None and entry[0]() is value and entry[1].dtype == dtype:
            return entry[1]
        out = value.to(dtype)
        self.entries[id(value)] = (weakref.ref(value), out)
        return out


def _cast_all(value: Any, dtype: torch.dtype, cache: _CastCache | None) -> Any:
    if _eligible(value) and value.dtype != dtype:
        return cache.cast(value, dtype) if cache is not None else value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_all(v, dtype, cache) for v in value)
    if isinstance(value, dict):
        return {k: _cast_all(v, dtype, cache) for k, v in value.items()}
    return value


def _widest(low: torch.dtype, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype:
    """`promote_type`: the autocast dtype promoted with every eligible argument's dtype."""
    widest = low
    stack: list[Any] = [*args, *kwargs.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif _eligible(value):
            widest = torch.promote_types(widest, value.dtype)
    return widest


class CudaAutocastPolicy:
    """Kernels for the AutocastCPU key that do what the AutocastCUDA ones do."""

    def __init__(self) -> None:
        self.cache = _CastCache()
        self._caches: dict[int, _CastCache] = {}

    @contextmanager
    def own_cache(self, owner: object) -> Iterator[None]:
        """Several jobs under one policy (depth folding) each keep their own weight casts, as
        each would in its own process: an autocast region one job ends clears that job's casts,
        not another's."""
        previous = self.cache
        self.cache = self._caches.setdefault(id(owner), _CastCache())
        try:
            yield
        finally:
            self.cache = previous

    def kernel(self, op: torch._ops.OpOverload, policy: str) -> Any:
        schema_args = [a.name for a in op._schema.arguments]
        has_dtype = "dtype" in schema_args

        def run(_keyset: Any, *args: Any, **kwargs: Any) -> Any:
            low = torch.get_autocast_dtype("cpu")
            if policy == "lower_precision_fp":
                args, kwargs = _cast_all(args, low, self.cache), _cast_all(kwargs, low, self.cache)
            elif policy == "fp32":
                args, kwargs = (
                    _cast_all(args, torch.float32, None),
                    _cast_all(kwargs, torch.float32, None),
                )
            elif policy == "fp32_set_opt_dtype" and has_dtype:
                index = schema_args.index("dtype")
                given = kwargs.get("dtype", args[index] if len(args) > index else None)
                if given is None and _eligible(args[0]):
                    kwargs = {**kwargs, "dtype": torch.float32}
                    args = args[:index]
            elif policy == "fp32_append_dtype":
                with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
                    return _norm_in_fp32(*args, **kwargs)
            elif policy == "promote":
                widest = _widest(low, args, kwargs)
                args, kwargs = _cast_all(args, widest, None), _cast_all(kwargs, widest, None)
            elif policy == "banned":
                raise RuntimeError(
                    f"{op.name()} is unsafe to autocast (CUDA autocast raises here): "
                    "use binary_cross_entropy_with_logits"
                )
            with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
                return op(*args, **kwargs)

        return run


def _norm_in_fp32(x: torch.Tensor, p: Any = 2, dim: Any = None, keepdim: bool = False) -> Any:
    """`fp32_append_dtype`: norm redispatched with `dtype` (fp32 for an eligible input)."""
    dtype = torch.float32 if _eligible(x) else x.dtype
    if dim is None:
        return torch.ops.aten.norm.ScalarOpt_dtype(x, p, dtype=dtype)
    return torch.ops.aten.norm.dtype(x, p, dim, keepdim, dtype=dtype)


def cpu_autocast_ops() -> list[str]:
    """aten ops with an AutocastCPU kernel in this build (the CPU policy being replaced)."""
    return _ops_with_kernel("AutocastCPU")


def cuda_autocast_ops() -> list[str]:
    """aten ops with an AutocastCUDA kernel in this build: the ops the CUDA policy covers."""
    return _ops_with_kernel("AutocastCUDA")


def _ops_with_kernel(key: str) -> list[str]:
    return sorted(
        name.removeprefix("aten::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    )


@contextmanager
def cuda_autocast_on_cpu() -> Iterator[CudaAutocastPolicy]:
    """Within: CPU autocast follows CUDA's policy. Registrations are undone on exit, so the real
    `cpu` device keeps PyTorch's CPU policy. Not re-entrant across threads (one at a time)."""
    policy = CudaAutocastPolicy()
    with _LOCK, warnings.catch_warnings():
        # Registering over PyTorch's CPU kernels warns once per op; that override is the point.
        warnings.simplefilter("ignore", UserWarning)
        library = torch.library.Library("aten", "IMPL")
        try:
            for name in sorted(set(cpu_autocast_ops()) | set(POLICY)):
                op = _overload(name)
                if op is None:
                    continue
                rule = POLICY.get(name)
                if rule is None:
                    library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
                else:
                    library.impl(name, policy.kernel(op, rule), "AutocastCPU", with_keyset=True)
            with _clearing_on_exit(policy):
                yield policy
        finally:
            library._destroy()


@contextmanager
def _clearing_on_exit(policy: CudaAutocastPolicy) -> Iterator[None]:
    """`torch.autocast.__exit__` clears the cast cache when the outermost region ends
    (`autocast_decrement_nesting() == 0`), whoever entered it: the training step's own region,
    and a checkpoint's recomputation in backward, which re-enters autocast per block. The
    stand-in's cache goes with it, so a block's recomputed weight casts are freed when its
    recomputation ends, and the next forward casts the weights again, as on CUDA."""
    clear = torch.clear_autocast_cache

    def clear_both() -> None:
        policy.cache.entries.clear()
        clear()

    torch.clear_autocast_cache = clear_both
    try:
        yield
    finally:
        torch.clear_autocast_cache = clear


@contextmanager
def autocast_region(policy: CudaAutocastPolicy, dtype: torch.dtype) -> Iterator[None]:
    """`torch.autocast` as CUDA would run it; the weight-cast cache lives as long as the region."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        policy.cache.entries.clear()
