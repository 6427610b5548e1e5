"""Step time from a per-op roofline over the simulated step's trace.

Every aten op of one iteration is costed on the target card: its FLOPs against the peak of the
math it runs in, its bytes moved (tensor inputs read, outputs written) against the memory
bandwidth; the op takes the longer of the two (the roofline). Ops fall into classes whose
achievable fraction of the peak differs: matmuls (cuBLAS), convolutions (cuDNN), and everything
else, which is memory-bound (normalisations, activations, pointwise, the optimizer's foreach
kernels). The fractions are the calibrated constants of `EFFICIENCY`; the peaks are the card's.

FLOPs: PyTorch's `torch.utils.flop_counter` formulas for matmuls and attention, with three mends:
the MoE experts' grouped GEMM (`_grouped_mm`, which the counter does not know) is counted,
convolutions are counted here (torch 2.14's `conv_backward_flop` counts the weight gradient of a
grouped convolution without dividing by the groups: x C for a depthwise one), and the CPU flash
attention kernel that a fake CPU trace runs is counted like CUDA's.

Math modes follow PyTorch's defaults: fp16/bf16 on Tensor Cores; fp32 convolutions in TF32 on
Ampere and later (`torch.backends.cudnn.allow_tf32` defaults to True); fp32 matmuls in full fp32
unless the precision is `tf32` (or the stack predates torch 1.12, when matmul TF32 was on).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from workers.engine.catalogue import GPU_CATALOGUE, GpuModel, host_link_bytes_s
from workers.engine.checkpointing import RECOMPUTING
from workers.engine.cuda_kernels import grouped_mm_flops
from workers.engine.offload import OffloadLedger
from workers.engine.tracker import MemoryTracker

_ATEN = torch.ops.aten
CONV = {_ATEN.convolution, _ATEN._convolution, _ATEN.cudnn_convolution, _ATEN.convolution_backward}
GROUPED_MM = _ATEN._grouped_mm  # MoE experts: not in torch 2.14's flop_registry
CPU_FLASH = _ATEN._scaled_dot_product_flash_attention_for_cpu
CPU_FLASH_BACKWARD = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward
# flash kernels -> (where is_causal sits in their arguments, backward?): the CPU kernel is the
# trace's stand-in for CUDA's; CUDA's runs under context parallelism's ring
FLASH = {
    CPU_FLASH: (4, False),
    CPU_FLASH_BACKWARD: (7, True),
    _ATEN._scaled_dot_product_flash_attention: (4, False),
    _ATEN._scaled_dot_product_flash_attention_backward: (11, True),
}
LOW = (torch.float16, torch.bfloat16)
# Ops that move no data: allocation, metadata, host reads.
NO_TRAFFIC = {
    _ATEN.empty,
    _ATEN.empty_strided,
    _ATEN.empty_like,
    _ATEN.detach,
    _ATEN._local_scalar_dense,
    _ATEN.set_,
    _ATEN.resize_,
    _ATEN.lift_fresh,
    torch.ops._c10d_functional.wait_tensor,  # a sync: the collective moved the bytes
    # Metadata: `tensor.device` on a fake tensor dispatches `prim.device` (Python code, ours
    # and the libraries', asks it of nearly every tensor); no kernel runs on a real GPU. It was
    # costed as reading the whole tensor: over half the bytes of a small Llama's step.
    torch.ops.prim.device,
    torch.ops.profiler._record_function_enter_new,
    torch.ops.profiler._record_function_exit,
}

# Achievable fraction of the card's ceiling per op class: matmul and conv against the measured
# GEMM maximum of the card (`GpuModel.matmul_tflops`, or its datasheet peak where none was
# measured, scaled by MEASURED_OVER_DATASHEET), memory-bound ops against the datasheet bandwidth.
# Calibrated together on bench/data/published.json by bench/fidelity.py --published
# --fit (least squares in log space over all 10 cases at once, never one case at a time; each
# capped at 1). Matmul sits at the cap: cuBLAS reaches the measured GEMM maximum. Memory-bound
# kernels reach 0.484 of the datasheet bandwidth in eager training steps: one figure for what
# a per-kernel launch floor would explain better (thousands of small elementwise kernels a step;
# not modelled yet, issue 29). Until session 14 this read 1.0, fitted while `prim.device`
# queries were costed as reading their tensors (about half the bytes counted): the fit had
# absorbed that artifact.
EFFICIENCY = {"matmul": 1.0, "conv": 0.736, "memory": 0.484}


def _median_ratio(index: int, datasheet: Callable[[GpuModel], float | None]) -> float:
    ratios = [
        measured / peak
        for gpu in GPU_CATALOGUE.values()
        if (measured := gpu.matmul_tflops[index]) and (peak := datasheet(gpu))
    ]
    return statistics.median(ratios)


# Measured / datasheet GEMM peak, for a card with no measurement: the median over the cards with
# both (derived from the catalogue); TF32 from the one card measured (H100 SXM 402 of 494.5).
MEASURED_OVER_DATASHEET = {
    "fp32": _median_ratio(0, lambda g: g.tflops_fp32),
    "tf32": 402 / 494.5,
    "low": _median_ratio(1, lambda g: g.tflops_fp16),
}


@dataclass(frozen=True, slots=True)
class OpCost:
    bucket: str  # matmul | conv | memory | optimizer
    kind: str  # matmul | conv | memory: which efficiency applies
    flops: int
    nbytes: int
    ceiling: float  # FLOP/s the op's math reaches at best on the card (0: memory-bound op)
    name: str = ""  # the aten op (what lines two traces' ops up: depth folding)


@dataclass
class StepCost:
    """One iteration's ops costed on a card; `seconds()` splits its time the way the plan
    reports it, for the given efficiencies (the calibrated ones by default)."""

    bandwidth: float  # bytes/s, datasheet
    ops: list[OpCost] = field(default_factory=list)
    # Activation offload: bytes copied to pinned host memory in forward (and the same back in
    # backward), over the card's host link; both copies run on the compute stream.
    offloaded: int = 0
    host_bandwidth: float = 0.0  # bytes/s one way
    # Bytes through this rank's link in the collectives of a model-parallel group, by the
    # group's bucket: "ring" (context parallelism: keys and values gathered, their gradients
    # exchanged; not overlapped with attention) and "tensor_parallel" (the all-reduces after
    # split layers; on the critical path). Data-parallel traffic is `communication.py`'s.
    link_bytes: dict[str, int] = field(default_factory=dict)
    link_bandwidth: dict[str, float] = field(default_factory=dict)  # bytes/s, by bucket
    # Checkpointing: bytes of the activations checkpointed blocks make again in backward (the
    # outputs of the ops they recompute), rather than keep from forward.
    recomputed: int = 0

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops)

    @property
    def ring_bytes(self) -> int:
        return self.link_bytes.get("ring", 0)

    @property
    def tensor_parallel_bytes(self) -> int:
        return self.link_bytes.get("tensor_parallel", 0)

    def seconds(self, efficiency: dict[str, float] | None = None) -> dict[str, float]:
        eff = efficiency or EFFICIENCY
        bandwidth = self.bandwidth * eff["memory"]
        out = {"matmul": 0.0, "conv": 0.0, "memory": 0.0, "optimizer": 0.0, "recompute": 0.0}
        for op in self.ops:
            memory = op.nbytes / bandwidth
            compute = op.flops / (op.ceiling * eff[op.kind]) if op.flops and op.ceiling else 0.0
            out[op.bucket] += max(compute, memory)
        out["offload"] = 2 * self.offloaded / self.host_bandwidth if self.offloaded else 0.0
        for bucket in LINK_BUCKETS:
            sent = self.link_bytes.get(bucket, 0)
            out[bucket] = sent / self.link_bandwidth[bucket] if sent else 0.0
        return out

    def total_s(self, efficiency: dict[str, float] | None = None) -> float:
        return sum(self.seconds(efficiency).values())


LINK_BUCKETS = ("ring", "tensor_parallel")


@dataclass(frozen=True)
class LinkGroup:
    """A model-parallel process group whose collectives the step's cost counts as link time."""

    name: str  # the process group's name: the last argument of its functional collectives
    bucket: str  # one of LINK_BUCKETS
    ranks: int
    bandwidth: float  # bytes/s of the group's slowest link


# Ring algorithms (NCCL's for large messages): bytes each rank sends per byte of the output
RING_SHARE: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather_into_tensor": lambda n: (n - 1) / n,
    "reduce_scatter_tensor": lambda n: float(n - 1),  # the output is 1/n of the input
    "all_to_all_single": lambda n: (n - 1) / n,
}


def link_bytes(opname: str, out: Any, group: LinkGroup) -> int:
    """Bytes a rank sends through its link in one collective of `group`. Context
    parallelism's ring keeps its own count ((n-1)/n of each output: gathered keys and values and
    the gradients exchanged for them)."""
    n = group.ranks
    if group.bucket == "ring":
        return _nbytes(out) * (n - 1) // n
    share = RING_SHARE.get(opname.removesuffix("_"), lambda n: (n - 1) / n)
    return int(_nbytes(out) * share(n))


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def conv_flops(x_shape: Any, w_shape: Any, out_shape: Any, transposed: bool) -> int:
    """2 x MACs of a (grouped) convolution: each output element sums Cin/groups x kernel
    products; for a transposed one each input element scatters over Cout/groups x kernel."""
    kernel = math.prod(w_shape[2:])
    if transposed:
        return 2 * math.prod(x_shape) * w_shape[1] * kernel
    return 2 * math.prod(out_shape) * w_shape[1] * kernel


def op_flops(func: Any, args: Any, kwargs: Any, out: Any) -> int:
    packet = func._overloadpacket
    if packet is _ATEN.convolution_backward:
        grad_out, x, w = args[0], args[1], args[2]
        transposed, mask = args[7], args[10]
        one = conv_flops(x.shape, w.shape, grad_out.shape, transposed)
        return one * (int(mask[0]) + int(mask[1]))
    if packet in CONV:
        x, w, transposed = args[0], args[1], args[6] if len(args) > 6 else False
        return conv_flops(x.shape, w.shape, out.shape, bool(transposed))
    if packet is GROUPED_MM:
        return grouped_mm_flops(args[0].shape, args[1].shape, out.shape)
    if packet in FLASH:
        return attention_flops(packet, args, kwargs or {})
    counter = flop_registry.get(packet)
    if counter is None:
        return 0
    shapes = [a.shape if isinstance(a, torch.Tensor) else a for a in args]
    return int(counter(*shapes, **(kwargs or {}), out_val=out))


def attention_flops(packet: Any, args: Any, kwargs: dict[str, Any]) -> int:
    """A flash-attention kernel's FLOPs: PyTorch's count for the whole score matrix, times
    the share a causal kernel computes. FlashAttention skips the tiles above the diagonal (its
    causal speed-up, FlashAttention-2 section 3.1); PyTorch's flop counter does not, which
    made a causal LM's attention twice its cost (and a context-parallel ring's chunks, some
    not causal, look cheaper than one call over the sequence)."""
    causal_at, backward = FLASH[packet]
    if backward:
        grad_out, q, k, v = args[:4]
        flops = sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
    else:
        q, k, v = args[:3]
        flops = sdpa_flop_count(q.shape, k.shape, v.shape)
    causal = args[causal_at] if len(args) > causal_at else kwargs.get("is_causal", False)
    return int(flops * causal_share(q.shape[-2], k.shape[-2])) if causal else int(flops)


def causal_share(s_q: int, s_k: int) -> float:
    """The share of a (s_q, s_k) score matrix under PyTorch's causal mask (top-left aligned:
    query i sees keys 0..i)."""
    diagonal = min(s_q, s_k)
    seen = diagonal * (diagonal + 1) // 2 + (s_q - diagonal) * s_k  # rows past it see all
    return seen / (s_q * s_k)


def op_class(func: Any) -> str:
    packet = func._overloadpacket
    if packet in CONV:
        return "conv"
    if packet in flop_registry or packet is GROUPED_MM or packet in FLASH:
        return "matmul"
    return "memory"


class Roofline:
    """Per-op time on one card for one precision and software stack."""

    def __init__(self, gpu: GpuModel, precision: str, matmul_tf32: bool = False) -> None:
        self.gpu = gpu
        self.precision = precision
        self.matmul_tf32 = matmul_tf32 or precision == "tf32"
        self.bandwidth = gpu.bandwidth_gbs * 1e9
        self.host_bandwidth = host_link_bytes_s(gpu)

    def math_mode(self, kind: str, dtype: torch.dtype) -> str:
        if dtype in LOW:
            return "bf16" if dtype == torch.bfloat16 else "fp16"
        tf32 = self.gpu.supports_tf32 and (kind == "conv" or self.matmul_tf32)
        return "tf32" if tf32 else "fp32"

    def ceiling(self, kind: str, dtype: torch.dtype) -> float:
        """FLOP/s of the op's math mode: the card's measured GEMM maximum (or its datasheet
        peak scaled by MEASURED_OVER_DATASHEET where none was measured)."""
        mode = self.math_mode(kind, dtype)
        gpu = self.gpu
        measured = dict(zip(("fp32", "fp16", "bf16"), gpu.matmul_tflops, strict=True))
        datasheet = {
            "fp32": gpu.tflops_fp32,
            "tf32": gpu.tflops_tf32 or gpu.tflops_fp32,
            "fp16": gpu.tflops_fp16,
            "bf16": gpu.tflops_bf16 or gpu.tflops_fp32,
        }[mode]
        ceiling = measured.get(mode)
        if ceiling is None:
            ratio = MEASURED_OVER_DATASHEET["low" if mode in ("fp16", "bf16") else mode]
            ceiling = datasheet * ratio
        return ceiling * 1e12


class StepCostMode(TorchDispatchMode):
    """Costs every op of the traced step (it runs under FakeTensorMode: nothing executes)."""

    def __init__(
        self,
        roofline: Roofline,
        phase: Callable[[], str],
        *,
        offload: OffloadLedger | None = None,
        groups: tuple[LinkGroup, ...] = (),
        tracker: MemoryTracker | None = None,
    ) -> None:
        super().__init__()
        self.roofline = roofline
        self.phase = phase
        # The step's tracker says what is not the step's work: DTensor's sharding propagation
        # (ops at full shapes, to learn their outputs' metadata; the tracker is paused there)
        # and ops on DTensors (DTensor runs them on this rank's local tensors)
        self.tracker = tracker
        self.offload = offload  # the job's activation offload, read when the step is done
        # context and tensor parallelism's groups, by name
        self.groups = {group.name: group for group in groups}
        self.cost = StepCost(
            roofline.bandwidth,
            host_bandwidth=roofline.host_bandwidth,
            link_bandwidth={group.bucket: group.bandwidth for group in groups},
        )

    def _group_of(self, func: Any, args: Any) -> LinkGroup | None:
        """The model-parallel group a collective runs on (its name is the last argument)."""
        if not self.groups or func.namespace != "_c10d_functional" or not args:
            return None
        last = args[-1]
        return self.groups.get(last) if isinstance(last, str) else None

    def __exit__(self, *exc: Any) -> None:
        if self.offload is not None:
            self.cost.offloaded = self.offload.to_host
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        tracker = self.tracker
        if tracker is not None and tracker.is_paused:
            return func(*args, **(kwargs or {}))
        if tracker is not None and tracker.defers_to_dtensor(types):
            return NotImplemented  # a sharded optimizer's step, context parallelism's ring
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._overloadpacket in NO_TRAFFIC:
            return out
        group = self._group_of(func, args)
        if group is not None:  # through the link, not through HBM's roofline
            sent = link_bytes(func._opname, out, group)
            links = self.cost.link_bytes
            links[group.bucket] = links.get(group.bucket, 0) + sent
            return out
        kind = op_class(func)
        flops = op_flops(func, args, kwargs, out) if kind != "memory" else 0
        nbytes = _nbytes(args) + _nbytes(list((kwargs or {}).values())) + _nbytes(out)
        dtype = next(
            (a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()),
            torch.float32,
        )
        bucket = "optimizer" if self.phase() == "optimizer" else kind
        if RECOMPUTING.get():  # a checkpointed block's forward, again in backward
            bucket = "recompute"
            self.cost.recomputed += _nbytes(out)
        ceiling = self.roofline.ceiling(kind, dtype) if flops else 0.0
        self.cost.ops.append(OpCost(bucket, kind, flops, nbytes, ceiling, func._opname))
        return out
