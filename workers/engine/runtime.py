"""The fixed costs of a CUDA process before its first tensor, by software stack and card.

Three things take GPU memory that no tensor of the model accounts for:

- the CUDA context with the kernel images it loads (outside PyTorch's allocator). Since CUDA 11.7
  and PyTorch 1.13, PyTorch sets `CUDA_MODULE_LOADING=LAZY`, which loads kernels on first use:
  PyTorch PR #86509 measured 287,047,680 B used after one 6.4 MB tensor with lazy loading and
  666,632,192 B eager, i.e. about 254 and 616 MiB once that tensor's 20 MiB segment is taken off.
  Older stacks load every kernel eagerly and their binaries are larger: "more than 1000 MB before
  CUDA 11.7" (pytorch/pytorch #107667), 1343 MiB measured with `torch.ones` on a V100 under
  torch 1.10 (Hugging Face `perf_train_gpu_one`).
- the cuBLAS and cuBLASLt workspaces (inside the allocator, so they count in `memory_reserved`):
  one per (handle, stream), and handles are per thread (aten/src/ATen/cuda/CublasHandlePool.cpp,
  DeviceThreadHandles.h), so a training step that runs matmuls in forward (the caller's thread)
  and in backward (autograd's device thread) holds two of each. Default `CUBLAS_WORKSPACE_CONFIG`
  `:4096:2:16:8` = 8,519,680 B, `:4096:8` = 32 MiB on sm90; cuBLASLt `CUBLASLT_WORKSPACE_SIZE`
  1024 KiB (docs/source/cuda_environment_variables.rst).
- NCCL's buffers when the job is distributed (outside the allocator; NCCL allocates them itself):
  544 MB for a 2-GPU and 688 MB for a larger communicator measured on 4x A100 (NVIDIA/nccl #964).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.catalogue import MIB, GpuModel

CURRENT_TORCH = (2, 14)
CURRENT_CUDA = (13, 0)
CONTEXT_LAZY = 287_047_680 - 20 * MIB  # PR #86509, less the probe tensor's segment
CONTEXT_EAGER = 666_632_192 - 20 * MIB
CONTEXT_LEGACY = 1343 * MIB  # torch <= 1.12 or CUDA < 11.7: eager loading of larger binaries
CUBLAS_WORKSPACE = 4096 * 1024 * 2 + 16 * 1024 * 8  # :4096:2:16:8
CUBLAS_WORKSPACE_SM90 = 4096 * 1024 * 8  # :4096:8
CUBLASLT_WORKSPACE = 1024 * 1024
MATMUL_THREADS = 2  # forward on the caller's thread, backward on autograd's device thread
NCCL_PAIR = 544 * 1000 * 1000
NCCL_GROUP = 688 * 1000 * 1000


def parse_version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class Runtime:
    """The software stack a plan is for (default: this engine's own)."""

    torch: tuple[int, int] = CURRENT_TORCH
    cuda: tuple[int, int] = CURRENT_CUDA
    module_loading: str | None = None  # "lazy" | "eager"; None: the stack's default

    @property
    def lazy_loading(self) -> bool:
        if self.module_loading is not None:
            return self.module_loading == "lazy"
        return self.torch >= (1, 13) and self.cuda >= (11, 7)

    @property
    def zero_grad_set_to_none(self) -> bool:
        """`Optimizer.zero_grad()` frees gradients since torch 2.0 (set_to_none=True); before,
        it zeroed them in place, so they stay allocated through the next forward."""
        return self.torch >= (2, 0)

    @property
    def matmul_tf32_default(self) -> bool:
        """`torch.backends.cuda.matmul.allow_tf32` defaulted to True from 1.7 to 1.11."""
        return (1, 7) <= self.torch < (1, 12)


@dataclass(frozen=True)
class FixedCosts:
    cuda_context: int
    nccl_buffers: int
    workspaces: tuple[int, ...]  # requests made through the caching allocator, kept for good

    @property
    def outside_allocator(self) -> int:
        return self.cuda_context + self.nccl_buffers


def fixed_costs(gpu: GpuModel, runtime: Runtime, world_size: int = 1) -> FixedCosts:
    if runtime.lazy_loading:
        context = CONTEXT_LAZY
    elif runtime.torch >= (1, 13) and runtime.cuda >= (11, 7):
        context = CONTEXT_EAGER
    else:
        context = CONTEXT_LEGACY
    nccl = 0 if world_size == 1 else NCCL_PAIR if world_size == 2 else NCCL_GROUP
    cublas = CUBLAS_WORKSPACE_SM90 if gpu.sm >= 90 else CUBLAS_WORKSPACE
    workspaces = (cublas, CUBLASLT_WORKSPACE) * MATMUL_THREADS
    return FixedCosts(context, nccl, workspaces)
