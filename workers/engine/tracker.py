"""Live-bytes tracker that sees every tensor storage a training step creates and frees.

A `TorchDispatchMode` that sits above FakeTensorMode (simulated device) or above real tensors (cpu,
cuda). Each storage an op returns for the first time is an allocation, rounded the way the CUDA
caching allocator rounds blocks; a weakref on the storage notices the free. The tracker keeps
only counters and one record per allocation, so it stays lean on an 8B-parameter model: categories
are resolved once at the end, from the live set at the peak (found by sequence number, not by
copying the live set at every new peak).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from service.schemas.result import MemoryCategory

_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
# The buffer argument of the collectives FSDP runs: the all-gather output (its gathered
# parameters before the copy-out) and the reduce-scatter input (unsharded gradients).
_COLLECTIVE_BUFFERS = {
    torch.ops.c10d._allgather_base_.default: 0,
    torch.ops.c10d._reduce_scatter_base_.default: 1,
}
BLOCK_ROUNDING = 512  # the CUDA caching allocator rounds every block up to 512 bytes

CATEGORIES: tuple[str, ...] = tuple(MemoryCategory)
# Where an allocation lands when nothing more specific is known about it.
PHASE_CATEGORY = {
    "parameters": "parameters",
    "input": "input_batch",
    "forward": "activations",
    "backward": "temporary",
    "optimizer": "temporary",
    "other": "temporary",
    "communication": "communication",
}


class MemoryBudgetExceeded(RuntimeError):
    """Raised by a tracker with `raise_above` set: a real-tensor probe ran out of its budget."""

    def __init__(self, live: int, budget: int) -> None:
        super().__init__(f"live tensors reached {live} bytes, over the budget of {budget} bytes")
        self.live = live
        self.budget = budget


@cache
def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor  # 0.6 s to import: asked only once it matters

    return DTensor


def round_block(nbytes: int) -> int:
    return -(-nbytes // BLOCK_ROUNDING) * BLOCK_ROUNDING if nbytes else 0


@dataclass(slots=True)
class Allocation:
    nbytes: int  # rounded to the allocator's 512-byte blocks
    phase: str
    alloc_seq: int
    free_seq: int = -1
    category: str | None = None
    requested: int = 0  # the storage's own size, as the caching allocator is asked for it

    def live_at(self, seq: int) -> bool:
        return self.alloc_seq <= seq and (self.free_seq < 0 or self.free_seq > seq)

    @property
    def resolved_category(self) -> str:
        return self.category or PHASE_CATEGORY[self.phase]


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes; `phase` tags new allocations; `mark` names known tensors."""

    def __init__(
        self,
        raise_above: int | None = None,
        fake_scalars: bool = False,
        workspace: Callable[[Any, Any, Any], int] | None = None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        # One rank of a multi-GPU job (`distributed.py`): DTensors, collectives, resizes.
        self.distributed = distributed
        # Bytes a library kernel takes for the length of one op beyond its outputs (cuDNN's
        # layout transforms): `workspace(func, args, out)`, allocated after the outputs and
        # freed when the op returns.
        self.workspace = workspace
        # Under FakeTensorMode a tensor has no value: code that reads one (Adafactor's
        # `p.norm().item()`) gets 1.0, which changes no shape and so no memory.
        self.fake_scalars = fake_scalars
        self.phase = "other"
        self.raise_above = raise_above
        self.live = 0
        self.peak = 0
        self._peak_seq = 0
        self._seq = 0
        self._window_start = 0
        self._by_storage: dict[int, Allocation] = {}
        self._refs: dict[int, weakref.ref[Any]] = {}
        self._records: list[Allocation] = []
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run here make no memory on a real device (DTensor's sharding propagation runs
        the op at full shapes on fake tensors to learn the output's metadata)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    @property
    def is_paused(self) -> bool:
        """Inside `paused()`: what runs now is not the step's (the roofline skips it too)."""
        return self._paused

    def defers_to_dtensor(self, types: Any) -> bool:
        """One rank of a sharded job lets DTensor run an op on DTensors first: it comes back
        with the ops on the local shards, the bytes and the work a rank has (the roofline asks
        the same)."""
        return self.distributed and any(issubclass(t, _dtensor_type()) for t in types)

    def resized(self, storage: Any, nbytes: int, category: str | None = None) -> None:
        """`UntypedStorage.resize_`: FSDP frees a gathered parameter with `resize_(0)` and gathers
        it again into the same storage, which no op's output reveals."""
        self._free(id(storage))
        if nbytes > 0:
            self._record_storage(storage, nbytes, category)

    # -- recording -------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self._paused:
            return func(*args, **(kwargs or {}))
        if self.defers_to_dtensor(types):
            return NotImplemented
        if self.distributed:
            if func is _WAIT_TENSOR and self.fake_scalars:
                # A collective's result under a fake group is its input; fake `wait_tensor`
                # would return a copy that a real wait never makes.
                return args[0]
            if func in _COLLECTIVE_BUFFERS:
                self.mark([args[_COLLECTIVE_BUFFERS[func]]], "communication")
        if self.fake_scalars and func is _LOCAL_SCALAR:
            return 1.0 if args[0].is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        self._record_outputs(out)
        if self.workspace is not None:
            self._transient(self.workspace(func, args, out))
        return out

    def _transient(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        alloc = Allocation(
            round_block(nbytes), self.phase, self._seq + 1, category="workspace", requested=nbytes
        )
        self._seq += 2
        alloc.free_seq = self._seq
        self._records.append(alloc)
        if self.live + alloc.nbytes > self.peak:
            self.peak = self.live + alloc.nbytes
            self._peak_seq = alloc.alloc_seq

    def _record_outputs(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._record(out)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._record(item)
                elif isinstance(item, (tuple, list)):
                    self._record_outputs(item)

    def _record(self, tensor: torch.Tensor, category: str | None = None) -> Allocation | None:
        storage = tensor.untyped_storage()
        alloc = self._by_storage.get(id(storage))
        if alloc is not None:
            return alloc
        return self._record_storage(storage, storage.nbytes(), category)

    def _record_storage(self, storage: Any, size: int, category: str | None) -> Allocation:
        key = id(storage)
        nbytes = round_block(size)
        self._seq += 1
        alloc = Allocation(nbytes, self.phase, self._seq, category=category, requested=size)
        self._by_storage[key] = alloc
        self._refs[key] = weakref.ref(storage, partial(self._on_storage_freed, key))
        self._records.append(alloc)
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self._peak_seq = self._seq
        if self.raise_above is not None and self.live > self.raise_above:
            raise MemoryBudgetExceeded(self.live, self.raise_above)
        return alloc

    def _on_storage_freed(self, key: int, _ref: object) -> None:
        self._free(key)

    def _free(self, key: int) -> None:
        alloc = self._by_storage.pop(key, None)
        self._refs.pop(key, None)
        if alloc is None:
            return
        self._seq += 1
        alloc.free_seq = self._seq
        self.live -= alloc.nbytes

    # -- naming ----------------------------------------------------------------------------
    def mark(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        """Name the category of tensors the tracker already saw (gradients, optimizer state)."""
        for tensor in tensors:
            if tensor is None:
                continue
            alloc = self._by_storage.get(id(tensor.untyped_storage()))
            if alloc is not None:
                alloc.category = category

    def exclude(self, tensors: Iterable[torch.Tensor | None]) -> int:
        """Stop counting tensors that live in host memory on a real GPU run (the optimizers'
        scalar `step` counters, what FSDP offloads), though the trace made them on the traced
        device. Returns the bytes moved to the host."""
        moved = 0
        for tensor in tensors:
            if tensor is None:
                continue
            alloc = self._by_storage.get(id(tensor.untyped_storage()))
            if alloc is not None and alloc.nbytes:
                self.live -= alloc.nbytes
                moved += alloc.requested
                alloc.nbytes = alloc.requested = 0
        return moved

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    # -- reading ---------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new measurement window: the peak restarts from what is live now."""
        self.peak = self.live
        self._peak_seq = self._seq
        self._window_start = self._seq
        self._records = [a for a in self._records if a.free_seq < 0]

    def window(self) -> tuple[list[Allocation], list[tuple[Allocation, bool]]]:
        """The measurement window: what was live when it began (parameters, optimizer state,
        kept gradients, what the previous step left), in the order it was made; then every
        allocation (True) and free (False) in it, in order, the frees of what was live
        included. Empty storages are left out."""
        kept: list[Allocation] = []
        timed: list[tuple[int, int, bool]] = []
        for key, alloc in enumerate(self._records):
            if not alloc.requested:
                continue
            if alloc.alloc_seq <= self._window_start:
                kept.append(alloc)
            else:
                timed.append((alloc.alloc_seq, key, True))
            if alloc.free_seq >= 0:
                timed.append((alloc.free_seq, key, False))
        timed.sort()
        return kept, [(self._records[key], made) for _, key, made in timed]

    def breakdown_at_peak(self) -> dict[str, int]:
        parts = dict.fromkeys(CATEGORIES, 0)
        for alloc in self._records:
            if alloc.live_at(self._peak_seq):
                parts[alloc.resolved_category] += alloc.nbytes
        return parts
