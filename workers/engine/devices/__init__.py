"""Devices behind one interface: `open_device(job)` gives a `ProbeDevice` whose `session` probes
micro-batches of one job. `simulated` traces on fake tensors, `cpu` and `cuda` run for real."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import replace

from service.schemas.spec import SHARDED
from workers.engine.catalogue import GIB, custom_gpu
from workers.engine.compiled import CompiledJob
from workers.engine.depth_fold import BASE, SHARDED_BASE, DepthPlan
from workers.engine.devices.base import ProbeDevice, ProbeSession, TrialOutcome
from workers.engine.devices.cpu import CpuDevice
from workers.engine.devices.cuda import CudaDevice
from workers.engine.devices.simulated import SimulatedDevice
from workers.engine.errors import SpecError
from workers.engine.models import BuiltModel, build_model
from workers.engine.models.depth import uniform_depth, with_depth


def open_device(job: CompiledJob) -> ProbeDevice:
    device = _open(job)
    if job.training.precision == "tf32" and not device.supports_tf32:
        raise SpecError(
            ("training", "precision"),
            f"tf32 needs Tensor Cores with TF32 (Ampere or later); {device.name} has none: "
            "use fp32 or a mixed precision",
        )
    return device


def _open(job: CompiledJob) -> ProbeDevice:
    device = job.device
    if device.kind == "simulated":
        return SimulatedDevice.from_spec(device)
    if device.kind == "cpu":
        return CpuDevice(device.memory_gib)
    return CudaDevice(device.memory_gib)


__all__ = ["ProbeDevice", "TrialOutcome", "open_device", "open_session"]


def twin_of(device: ProbeDevice) -> ProbeDevice | None:
    """The simulated device that predicts a real one: the cpu device's rules (CPU semantics,
    live tensors against the budget) or a card of the cuda device's memory with its measured
    context. None for a simulated device: it is its own prediction."""
    if device.backend == "simulated":
        return None
    gpu = custom_gpu(device.memory_bytes / GIB)
    if device.backend == "cpu":
        return SimulatedDevice(gpu, host=True)
    gpu = replace(gpu, sm=getattr(device, "sm", gpu.sm))  # cuBLAS workspaces follow the arch
    return SimulatedDevice(gpu, context_bytes=device.overhead_bytes)


def open_session(
    device: ProbeDevice, job: CompiledJob, built: BuiltModel | None = None
) -> AbstractContextManager[ProbeSession]:
    """A session of the job's training step on `device`: the trace's slice, the model built
    (unless given) and the byte limit its headroom leaves."""
    model = built or build_model(job.model, job.data, job.peft)
    limit = device.limit_bytes(job.trace.headroom)
    plan = _depth_plan(device, job, model)
    if plan is not None:
        assert isinstance(device, SimulatedDevice)
        return device.folded_session(job.trace, plan, limit)
    return device.session(job.trace, model, limit)


FOLD_FROM_DEPTH = 8  # learning a fold traces 2+3+4+5 blocks: worth it from 8 blocks up
# DDP's gradient buckets (25 MB) cut across blocks, so its steps do not repeat per block.
FOLDED_STRATEGIES = {"none": BASE} | dict.fromkeys(SHARDED, SHARDED_BASE)


def _depth_plan(device: ProbeDevice, job: CompiledJob, built: BuiltModel) -> DepthPlan | None:
    """Fold the model's depth when it is a transformers stack of identical blocks traced on
    the simulated device (`search.depth_folding`)."""
    model = job.model
    if (
        not job.search.depth_folding
        or not isinstance(device, SimulatedDevice)
        or device.host
        or job.training.strategy not in FOLDED_STRATEGIES
        or model.source != "transformers"
    ):
        return None
    depth = uniform_depth(model, built.module)
    if depth is None or depth < FOLD_FROM_DEPTH:
        return None

    def shallow(blocks: int) -> BuiltModel:
        return build_model(with_depth(model, depth, blocks), job.data, job.peft)

    key = f"{model.model_dump_json()} {job.peft}"
    return DepthPlan(depth, built, shallow, FOLDED_STRATEGIES[job.training.strategy], key)
