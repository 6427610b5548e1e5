"""What every device offers the search: a session that probes one micro-batch at a time."""

from __future__ import annotations

import gc
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from service.schemas.spec import PlanSpec
from workers.engine.job import TrainingJob
from workers.engine.models import BuiltModel
from workers.engine.tracker import CATEGORIES, MemoryBudgetExceeded


def fill_small_normal(t: torch.Tensor) -> None:
    """Real devices initialise weights like a fresh model: no NaNs or denormals skew timing."""
    if t.is_floating_point():
        t.normal_(0.0, 0.02)
    else:
        t.zero_()


@dataclass
class TrialOutcome:
    batch_size: int
    fits: bool
    peak_bytes: int  # tensors + device overhead; a lower bound when `peak_is_lower_bound`
    duration_s: float
    breakdown: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    peak_is_lower_bound: bool = False
    step_time_s: float | None = None  # measured time of the iteration (real devices)


class ProbeSession(ABC):
    """A job materialised on a device; `probe(b)` runs one steady-state iteration at batch b."""

    def __init__(self, device: ProbeDevice, limit_bytes: int) -> None:
        self.device = device
        self.limit_bytes = limit_bytes
        self.job: TrainingJob | None = None

    def probe(self, batch: int) -> TrialOutcome:
        start = time.perf_counter()
        outcome = self._probe(batch)
        outcome.duration_s = time.perf_counter() - start
        return outcome

    @abstractmethod
    def _probe(self, batch: int) -> TrialOutcome: ...

    def count_flops(self, batch: int) -> int | None:
        """FLOPs of one iteration, where the device estimates speed instead of measuring it."""
        return None

    def _outcome(
        self, batch: int, tensor_peak: int, breakdown: dict[str, int], step_time: float | None
    ) -> TrialOutcome:
        overhead = self.device.overhead_bytes
        peak = tensor_peak + overhead
        parts = {k: breakdown.get(k, 0) for k in CATEGORIES}
        # Bytes the allocator saw but no tensor output showed (kernel workspaces) are temporary.
        parts["temporary"] += max(0, tensor_peak - sum(parts.values()))
        parts["overhead"] = overhead
        fits = peak <= self.limit_bytes
        reason = (
            None
            if fits
            else (
                f"peak {peak} bytes is over the {self.limit_bytes}-byte "
                f"limit (capacity less headroom)"
            )
        )
        return TrialOutcome(batch, fits, peak, 0.0, parts, reason, step_time_s=step_time)

    def _budget_failure(self, batch: int, exc: MemoryBudgetExceeded) -> TrialOutcome:
        if self.job is not None:
            self.job.release()
        gc.collect()
        return TrialOutcome(
            batch,
            False,
            exc.live + self.device.overhead_bytes,
            0.0,
            reason=str(exc),
            peak_is_lower_bound=True,
        )


class ProbeDevice(ABC):
    backend: str
    name: str
    memory_bytes: int
    overhead_bytes: int = 0
    supports_bf16: bool = True
    bandwidth_gbs: float | None = None

    def tflops(self, precision: str) -> float | None:
        """Dense peak TFLOP/s for the precision, where known (the catalogue's cards)."""
        return None

    def limit_bytes(self, headroom: float) -> int:
        return int(self.memory_bytes * (1.0 - headroom))

    @abstractmethod
    @contextmanager
    def session(self, spec: PlanSpec, built: BuiltModel) -> Iterator[ProbeSession]: ...
