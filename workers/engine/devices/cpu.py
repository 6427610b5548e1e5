"""The cpu device: real tensors, real steps, real timing, under a memory budget.

The same tracker that models the CUDA allocator enforces the budget: the probe stops with an
out-of-memory the moment live tensors pass it, the way a GPU would.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
from workers.engine.tracker import MemoryBudgetExceeded, MemoryTracker


class CpuDevice(ProbeDevice):
    backend = "cpu"

    def __init__(self, memory_gib: float) -> None:
        self.name = f"cpu-budget-{memory_gib:g}GiB"
        self.memory_bytes = int(memory_gib * GIB)

    @contextmanager
    def session(
        self, trace: TraceJob, built: BuiltModel, limit_bytes: int
    ) -> Iterator[ProbeSession]:
        limit = limit_bytes
        tracker = MemoryTracker(raise_above=limit)
        with tracker:
            session = _CpuSession(self, limit, trace, built, tracker)
            try:
                yield session
            finally:
                session.job = None
                gc.collect()


class _CpuSession(ProbeSession):
    def __init__(
        self,
        device: CpuDevice,
        limit: int,
        trace: TraceJob,
        built: BuiltModel,
        tracker: MemoryTracker,
    ) -> None:
        super().__init__(device, limit)
        self.trace, self.built, self.tracker = trace, built, tracker
        self.setup_error: MemoryBudgetExceeded | None = None

    def _ensure_job(self) -> TrainingJob | None:
        if self.job is None and self.setup_error is None:
            try:
                self.job = TrainingJob(
                    self.trace, self.built, "cpu", self.tracker, fake=False, fill=fill_small_normal
                )
            except MemoryBudgetExceeded as exc:
                self.setup_error = exc
                gc.collect()
        return self.job

    def _probe(self, batch: int) -> TrialOutcome:
        job = self._ensure_job()
        if job is None:
            assert self.setup_error is not None
            return self._budget_failure(batch, self.setup_error)
        self.tracker.reset_peak()
        try:
            start = time.perf_counter()
            job.iteration(batch)
            step = time.perf_counter() - start
        except MemoryBudgetExceeded as exc:
            return self._budget_failure(batch, exc)
        return self._outcome(batch, self.tracker.peak, self.tracker.breakdown_at_peak(), step)
