"""What every device offers the search: a session that probes one micro-batch at a time."""

from __future__ import annotations

import gc
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from workers.engine.depth_fold import Folding
from workers.engine.errors import SpecError
from workers.engine.failures import classify
from workers.engine.job import TrainingJob
from workers.engine.models import BuiltModel
from workers.engine.roofline import StepCost
from workers.engine.trace import TraceJob
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
    # What the fit is decided on: the reserve the step needs from the allocator (where it is
    # known, else its allocated peak) plus the device's overhead; a lower bound when
    # `peak_is_lower_bound`. It grows smoothly with the batch: the search extrapolates on it.
    peak_bytes: int
    duration_s: float
    breakdown: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    peak_is_lower_bound: bool = False
    step_time_s: float | None = None  # measured time of the iteration (real devices)
    # Peaks of allocated and of reserved bytes (what nvidia-smi shows), plus overhead, where known.
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None


class ProbeSession(ABC):
    """A job materialised on a device; `probe(b)` runs one steady-state iteration at batch b."""

    def __init__(self, device: ProbeDevice, limit_bytes: int) -> None:
        self.device = device
        self.limit_bytes = limit_bytes
        self.job: TrainingJob | None = None
        self.folding: Folding | None = None  # a stack of blocks folded (or why not)

    def probe(self, batch: int) -> TrialOutcome:
        """One trial. A trace that fails for any reason but memory raises the engine's own
        error (`failures.classify`): BatchUndefined, or Unsupported naming the layer and op."""
        start = time.perf_counter()
        try:
            outcome = self._probe(batch)
        except (SpecError, MemoryError):
            raise
        except Exception as exc:
            model = self.job.model if self.job is not None else None
            precision = self.job.precision if self.job is not None else "?"
            architecture = type(model).__name__ if model is not None else "the model"
            raise classify(exc, batch, model, precision, architecture) from exc
        outcome.duration_s = time.perf_counter() - start
        return outcome

    @abstractmethod
    def _probe(self, batch: int) -> TrialOutcome: ...

    def want_cost(self, batch: int) -> None:
        """The step's cost at `batch` will be asked for: a device that estimates it may take it
        from the next probe of that batch instead of tracing the step again (real devices
        measure the step's time in the probe itself: nothing to do)."""
        return None

    def predict_fits(self, batch: int) -> bool | None:
        """A cheap prediction of `probe(batch).fits` from the probes made so far, where the
        device can make one (None: it cannot, or not yet)."""
        return None

    def step_cost(self, batch: int) -> StepCost | None:
        """The roofline cost of one iteration, where the device estimates speed instead of
        measuring it."""
        return None

    # -- facts of the traced model -------------------------------------------------------
    def parameter_count(self) -> tuple[int, int]:
        """(parameters, trainable parameters) of the model as materialised."""
        return self.job.parameter_count() if self.job is not None else (0, 0)

    def has_batchnorm(self) -> bool:
        return self.job.has_batchnorm() if self.job is not None else False

    def host_bytes(self) -> int:
        """What CPU offload or paged optimizer states keep in host memory."""
        return self.job.host_bytes if self.job is not None else 0

    def _outcome(
        self,
        batch: int,
        tensor_peak: int,
        breakdown: dict[str, int],
        step_time: float | None,
        reserved: int | None = None,
    ) -> TrialOutcome:
        """A measured trial: `tensor_peak` allocated bytes, `reserved` by the allocator."""
        overhead = self.device.overhead_bytes
        peak = (reserved if reserved is not None else tensor_peak) + overhead
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
        return TrialOutcome(
            batch,
            fits,
            peak,
            0.0,
            parts,
            reason,
            step_time_s=step_time,
            allocated_bytes=tensor_peak + overhead,
            reserved_bytes=None if reserved is None else reserved + overhead,
        )

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
    overhead_bytes: int = 0  # held outside the tensors' allocator: CUDA context, NCCL
    supports_bf16: bool = True
    supports_tf32: bool = True

    def limit_bytes(self, headroom: float) -> int:
        return int(self.memory_bytes * (1.0 - headroom))

    @abstractmethod
    @contextmanager
    def session(
        self, trace: TraceJob, built: BuiltModel, limit_bytes: int
    ) -> Iterator[ProbeSession]:
        """Materialise the job on this device; probes fit under `limit_bytes`."""
