"""The spec compiled once into the job the engine plans: the compile step.

`compile_job(spec)` is the one place in the engine past the facade that reads a whole `PlanSpec`.
What it resolves (the optimizer and its implementation, the strategy and world size, the slice a
device traces, the slice the launch configs render) every stage then takes from the job, each
reading only its own slice. The what-ifs and the scale-out answer derive changed jobs from it
(`with_training`, `with_device`, `with_world`), each compiled again, so a derived job is as
consistent as the first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from service.schemas.spec import (
    DataSpec,
    DeviceSpec,
    ModelSpec,
    PeftSpec,
    PlanSpec,
    SearchSpec,
    TrainingSpec,
)
from workers.engine.catalogue import canonical_name
from workers.engine.configs.job import LaunchJob, launch_job
from workers.engine.models.hf import row_layout
from workers.engine.optimizers import OptimizerChoice, choose
from workers.engine.risk import PEAK_SPREAD
from workers.engine.trace import RowLayout, TraceJob


@dataclass(frozen=True)
class CompiledJob:
    """One plan's job: the contract's slices as validated, and what the engine resolved from
    them once."""

    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    device: DeviceSpec
    search: SearchSpec
    optimizer: OptimizerChoice  # the optimizer's path and implementation, resolved
    trace: TraceJob  # what a device traces: training settings, data shape, headroom
    launch: LaunchJob  # what the framework configs render beside the plan's numbers

    @property
    def peft(self) -> PeftSpec | None:
        return self.training.peft

    @property
    def strategy(self) -> str:
        return self.training.strategy

    @property
    def world_size(self) -> int:
        return self.training.world_size

    def for_evaluation(self) -> CompiledJob:
        """The same job stepping through evaluation: forward only, no gradients."""
        return replace(self, trace=replace(self.trace, evaluating=True))

    def with_training(self, training: TrainingSpec) -> CompiledJob:
        return _compile(self.model, self.data, training, self.device, self.search)

    def with_data(self, data: DataSpec) -> CompiledJob:
        return _compile(self.model, data, self.training, self.device, self.search)

    def with_device(self, device: DeviceSpec) -> CompiledJob:
        return _compile(self.model, self.data, self.training, device, self.search)

    def with_world(self, strategy: str, world_size: int) -> CompiledJob:
        """The same job under `strategy` on `world_size` ranks."""
        parallelism = self.training.parallelism.model_copy(
            update={"strategy": strategy, "world_size": world_size}
        )
        return self.with_training(
            self.training.model_copy(update={"parallelism": parallelism, "world_size": world_size})
        )


def compile_job(spec: PlanSpec) -> CompiledJob:
    return _compile(spec.model, spec.data, spec.training, spec.device, spec.search)


def _compile(
    model: ModelSpec,
    data: DataSpec,
    training: TrainingSpec,
    device: DeviceSpec,
    search: SearchSpec,
) -> CompiledJob:
    if search.max_oom_probability is not None:  # a risk asked for: the headroom that gives it
        headroom = PEAK_SPREAD.headroom_for(search.max_oom_probability)
        search = search.model_copy(update={"headroom": headroom})
    gpu = getattr(device, "gpu", None)  # the simulated card: what the launch specs ask for
    launch = launch_job(model, data, training, canonical_name(gpu) if gpu else None)
    attention = launch.attn_implementation  # transformers models only
    rows: RowLayout = "whole" if attention is None else row_layout(attention, data)
    return CompiledJob(
        model=model,
        data=data,
        training=training,
        device=device,
        search=search,
        optimizer=choose(training),
        trace=TraceJob(training=training, data=data, headroom=search.headroom, rows=rows),
        launch=launch,
    )
