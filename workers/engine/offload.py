"""Activation offload: what checkpointed blocks save, held in pinned host memory.

transformers 5 (`activation_checkpointing_enable(offload=True)`, the Trainer's
`activation_checkpointing_kwargs={"offload": True}`) runs every checkpoint under
`torch.autograd.graph.save_on_cpu(pin_memory=True)`. What the checkpoint saves for backward
(through its outer saved-tensor hooks: the block's positional tensor inputs) is copied into a
new pinned host tensor of the same size in forward (`packed.copy_(tensor, non_blocking=True)`)
and the autograd graph keeps only that copy, so the device tensor is freed once the forward no
longer uses it; backward copies each back (`tensor.to(device, non_blocking=True)`: a new
contiguous device tensor) for the block's recomputation. The ops inside a checkpoint save
through the checkpoint's own hooks, so nothing else moves. Both copies run on the compute
stream (transformers' docstring), so the step pays them in full.

The trace runs on CPU fake tensors, where `save_on_cpu` would copy nothing. `HostOffload` is its
stand-in with the CUDA path's memory (torch/autograd/graph.py, `save_on_cpu`): packing keeps
the tensor's size and dtype and counts its bytes on the host; unpacking makes a fresh tensor of
that size, which the tracker sees as the device allocation the copy back makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import save_on_cpu, saved_tensors_hooks


@dataclass
class OffloadLedger:
    """Bytes through the host link in one step, and the host memory they occupy."""

    on_host: int = 0  # pinned bytes held now
    to_host: int = 0  # copied device -> host this step
    to_device: int = 0  # copied host -> device this step

    def new_step(self) -> None:
        self.to_host = self.to_device = 0


class _Packed:
    """A saved tensor's host copy: its size and dtype; the bytes leave the ledger when it
    goes (the autograd graph drops it after backward unpacks it, or with the graph)."""

    __slots__ = ("device", "dtype", "ledger", "nbytes", "size")

    def __init__(self, tensor: torch.Tensor, ledger: OffloadLedger) -> None:
        self.size = tensor.size()
        self.dtype = tensor.dtype
        self.device = tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self.ledger = ledger
        ledger.on_host += self.nbytes
        ledger.to_host += self.nbytes

    def __del__(self) -> None:
        self.ledger.on_host -= self.nbytes


class HostOffload(saved_tensors_hooks):
    """`save_on_cpu(pin_memory=True)` as a CUDA device runs it, on the trace's fake tensors."""

    def __init__(self, ledger: OffloadLedger) -> None:
        def pack(tensor: torch.Tensor) -> _Packed:
            return _Packed(tensor, ledger)

        def unpack(packed: _Packed) -> torch.Tensor:
            ledger.to_device += packed.nbytes
            return torch.empty(packed.size, dtype=packed.dtype, device=packed.device)

        super().__init__(pack, unpack)


def offloading(
    checkpoint: Callable[..., Any], hooks: Callable[[], saved_tensors_hooks]
) -> Callable[..., Any]:
    """`checkpoint` run under fresh offload hooks, as transformers' `checkpoint_func` does."""

    def checkpoint_offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with hooks():
            return checkpoint(function, *args, **kwargs)

    return checkpoint_offloaded


def offload_hooks(fake: bool, ledger: OffloadLedger) -> Callable[[], saved_tensors_hooks]:
    """The hooks a job's checkpoints offload through: the stand-in on a trace, PyTorch's own
    `save_on_cpu` on a real device (pinned where the device is a GPU)."""
    if fake:
        return lambda: HostOffload(ledger)
    return lambda: save_on_cpu(pin_memory=torch.cuda.is_available())
