"""The cuda device: real steps on the worker's GPU, real `torch.cuda.OutOfMemoryError`.

The peak comes from the caching allocator's own statistics (reset before every trial, caches
emptied), the breakdown from the tracker. `memory_gib` caps the card through the per-process
memory fraction, so a big card can plan for a smaller one.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from workers.engine.catalogue import GIB
from workers.engine.devices.base import (
    ProbeDevice,
    ProbeSession,
    TrialOutcome,
    fill_small_normal,
)
from workers.engine.job import TrainingJob
from workers.engine.models import BuiltModel
from workers.engine.trace import TraceJob
from workers.engine.tracker import MemoryTracker


class CudaUnavailable(RuntimeError):
    pass


class CudaDevice(ProbeDevice):
    backend = "cuda"

    def __init__(self, memory_gib: float | None) -> None:
        if not torch.cuda.is_available():
            raise CudaUnavailable("this worker has no CUDA device; use the simulated device")
        props = torch.cuda.get_device_properties(0)
        self.total_bytes = int(props.total_memory)
        self.memory_bytes = (
            min(self.total_bytes, int(memory_gib * GIB)) if memory_gib else self.total_bytes
        )
        self.name = props.name if not memory_gib else f"{props.name}@{memory_gib:g}GiB"
        self.supports_bf16 = torch.cuda.is_bf16_supported()
        self.supports_tf32 = props.major >= 8
        self.sm = props.major * 10 + props.minor
        free, total = torch.cuda.mem_get_info()
        # What the process lost before any tensor: context, kernels, workspaces (and other users).
        self.overhead_bytes = max(0, total - free - torch.cuda.memory_reserved())

    @contextmanager
    def session(
        self, trace: TraceJob, built: BuiltModel, limit_bytes: int
    ) -> Iterator[ProbeSession]:
        limit = limit_bytes
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, (limit - self.overhead_bytes) / self.total_bytes)
        )
        tracker = MemoryTracker()
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = trace.training.precision == "tf32"
        with tracker:
            session = _CudaSession(self, limit, trace, built, tracker)
            try:
                yield session
            finally:
                session.job = None
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(1.0)
                torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


class _CudaSession(ProbeSession):
    def __init__(
        self,
        device: CudaDevice,
        limit: int,
        trace: TraceJob,
        built: BuiltModel,
        tracker: MemoryTracker,
    ) -> None:
        super().__init__(device, limit)
        self.trace, self.built, self.tracker = trace, built, tracker

    def _probe(self, batch: int) -> TrialOutcome:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            if self.job is None:
                self.job = TrainingJob(
                    self.trace, self.built, "cuda", self.tracker, fake=False, fill=fill_small_normal
                )
            self.tracker.reset_peak()
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.job.iteration(batch)
            torch.cuda.synchronize()
            step = time.perf_counter() - start
        except torch.cuda.OutOfMemoryError as exc:
            peak = torch.cuda.max_memory_reserved() + self.device.overhead_bytes
            if self.job is not None:
                self.job.release()
            gc.collect()
            torch.cuda.empty_cache()
            return TrialOutcome(
                batch,
                False,
                peak,
                0.0,
                reason=f"CUDA out of memory: {exc}"[:300],
                peak_is_lower_bound=True,
            )
        return self._outcome(
            batch,
            torch.cuda.max_memory_allocated(),
            self.tracker.breakdown_at_peak(),
            step,
            reserved=torch.cuda.max_memory_reserved(),
        )
