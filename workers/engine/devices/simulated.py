"""The simulated device: the real training step under FakeTensorMode, no memory, no compute.

Tensors are fake CPU tensors carrying CUDA's choices (multi-tensor optimizers, autocast to the
mixed-precision dtype); the tracker counts their storages as the CUDA caching allocator would
(512-byte blocks), and the card's fixed overhead (context, workspaces) is added on top. The whole
step always completes, so a trial over capacity still reports the peak it would have reached:
that exact figure is what lets the search land on the answer in a few trials.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from service.schemas.spec import PlanSpec
from service.schemas.spec import SimulatedDevice as SimulatedSpec
from workers.engine.catalogue import ALIASES, GPU_CATALOGUE, GpuModel, custom_gpu
from workers.engine.devices.base import ProbeDevice, ProbeSession, TrialOutcome
from workers.engine.job import TrainingJob
from workers.engine.models import BuiltModel
from workers.engine.tracker import MemoryTracker


class SimulatedDevice(ProbeDevice):
    backend = "simulated"

    def __init__(self, gpu: GpuModel) -> None:
        self.gpu = gpu
        self.name = gpu.name
        self.memory_bytes = gpu.memory_bytes
        self.overhead_bytes = gpu.overhead_bytes
        self.supports_bf16 = gpu.supports_bf16
        self.bandwidth_gbs = gpu.bandwidth_gbs

    def tflops(self, precision: str) -> float | None:
        return self.gpu.tflops(precision)

    @classmethod
    def from_spec(cls, spec: SimulatedSpec) -> SimulatedDevice:
        if spec.gpu is not None:
            gpu = GPU_CATALOGUE[ALIASES.get(spec.gpu, spec.gpu)]
            if spec.memory_gib is not None:  # a catalogued card with a memory cap
                capped = custom_gpu(spec.memory_gib)
                gpu = GpuModel(
                    f"{gpu.name}@{spec.memory_gib:g}GiB",
                    capped.memory_bytes,
                    gpu.tflops_fp32,
                    gpu.tflops_fp16,
                    gpu.tflops_bf16,
                    gpu.bandwidth_gbs,
                    gpu.overhead_bytes,
                    gpu.architecture,
                )
            return cls(gpu)
        assert spec.memory_gib is not None
        return cls(custom_gpu(spec.memory_gib))

    @contextmanager
    def session(self, spec: PlanSpec, built: BuiltModel) -> Iterator[ProbeSession]:
        limit = self.limit_bytes(spec.search.headroom)
        tracker = MemoryTracker(fake_scalars=True)
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            job = TrainingJob(spec, built, "cpu", tracker, fake=True)
            yield _SimulatedSession(self, limit, job, tracker)


class _SimulatedSession(ProbeSession):
    def __init__(
        self, device: SimulatedDevice, limit: int, job: TrainingJob, tracker: MemoryTracker
    ) -> None:
        super().__init__(device, limit)
        self.job = job
        self.tracker = tracker

    def _probe(self, batch: int) -> TrialOutcome:
        assert self.job is not None
        self.tracker.reset_peak()
        self.job.iteration(batch)  # tracing time says nothing about the GPU's speed
        return self._outcome(batch, self.tracker.peak, self.tracker.breakdown_at_peak(), None)

    def count_flops(self, batch: int) -> int:
        """FLOPs of one iteration (forward + backward), counted by PyTorch's FlopCounterMode
        on the same fake step: matmuls and convolutions, the work tensor cores do."""
        assert self.job is not None
        with FlopCounterMode(display=False) as counter:
            self.job.iteration(batch)
        return int(counter.get_total_flops())
