"""The simulated device: the real training step under FakeTensorMode, no memory, no compute.

Tensors are fake CPU tensors carrying CUDA's choices: multi-tensor optimizers, and CUDA's autocast
policy (`autocast_policy`), not the CPU's. The tracker records every allocation and free of the
step; that sequence is replayed through a model of PyTorch's caching allocator (`allocator`),
which decides out-of-memory on reserved memory the way a real GPU does, after the fixed costs of
the card and the software stack (`runtime`: CUDA context, cuBLAS workspaces, NCCL buffers). The
whole step always completes, so a trial over capacity still reports the memory it would have
needed: that exact figure is what lets the search land on the answer in a few trials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import replace
from typing import Any

from torch._subclasses.fake_tensor import FakeTensorMode

from service.schemas.spec import SimulatedDeviceSpec as SimulatedSpec
from workers.engine.allocator import (
    AffineSequence,
    AllocatorConfig,
    CachingAllocator,
    Sequence,
    live_peak,
    replay,
    reserve_needed,
    round_size,
)
from workers.engine.autocast_policy import CudaAutocastPolicy, cuda_autocast_on_cpu
from workers.engine.catalogue import GPU_CATALOGUE, MIB, GpuModel, canonical_name, custom_gpu
from workers.engine.communication import link_gbs
from workers.engine.cuda_kernels import cuda_kernel_rules
from workers.engine.cudnn import nchw_transform_workspace
from workers.engine.depth_fold import (
    LEARN,
    DepthPlan,
    Fold,
    Folding,
    NotFoldable,
    StepTrace,
    fold_cost,
    kinds_of,
)
from workers.engine.devices.base import ProbeDevice, ProbeSession, TrialOutcome
from workers.engine.distributed import World, fake_world, traced_collectives
from workers.engine.errors import SpecError
from workers.engine.job import TrainingJob
from workers.engine.models import BuiltModel
from workers.engine.roofline import LinkGroup, Roofline, StepCost, StepCostMode
from workers.engine.runtime import FixedCosts, Runtime, fixed_costs, parse_version
from workers.engine.trace import TraceJob
from workers.engine.tracker import CATEGORIES, MemoryTracker


class SimulatedDevice(ProbeDevice):
    backend = "simulated"

    def __init__(
        self,
        gpu: GpuModel,
        runtime: Runtime | None = None,
        allocator: AllocatorConfig | None = None,
        *,
        host: bool = False,
        context_bytes: int | None = None,
    ) -> None:
        """`host`: the twin of the `cpu` device (CPU semantics, live tensors against a budget,
        no fixed costs); `context_bytes`: a CUDA context measured on a real card."""
        self.gpu = gpu
        self.name = gpu.name
        self.memory_bytes = gpu.memory_bytes
        self.runtime = runtime or Runtime()
        self.allocator = allocator or AllocatorConfig()
        self.host = host
        self.context_bytes = context_bytes
        self.folds: dict[Any, Any] = {}  # depth folds learned by this device's sessions
        self.overhead_bytes = self.fixed_costs(1).outside_allocator
        self.supports_bf16 = gpu.supports_bf16
        self.supports_tf32 = gpu.supports_tf32

    def fixed_costs(self, world_size: int) -> FixedCosts:
        if self.host:
            return FixedCosts(0, 0, ())
        costs = fixed_costs(self.gpu, self.runtime, world_size)
        if self.context_bytes is not None:
            costs = replace(costs, cuda_context=self.context_bytes)
        return costs

    @classmethod
    def from_spec(cls, spec: SimulatedSpec) -> SimulatedDevice:
        if spec.gpu is not None:
            name = canonical_name(spec.gpu)
            if name not in GPU_CATALOGUE:
                raise SpecError(
                    ("device", "gpu"),
                    f"unknown gpu {spec.gpu!r}; known: {', '.join(GPU_CATALOGUE)}",
                )
            gpu = GPU_CATALOGUE[name]
            if spec.memory_gib is not None:  # a catalogued card with a memory cap
                gpu = custom_gpu(spec.memory_gib, base=gpu)
        else:
            assert spec.memory_gib is not None
            gpu = custom_gpu(spec.memory_gib)
        runtime = Runtime(
            torch=parse_version(spec.runtime.torch),
            cuda=parse_version(spec.runtime.cuda),
            module_loading=spec.runtime.module_loading,
        )
        options = spec.allocator
        config = AllocatorConfig(
            expandable_segments=options.expandable_segments,
            max_split_size=options.max_split_size_mb * MIB if options.max_split_size_mb else None,
            roundup_power2_divisions=options.roundup_power2_divisions,
        )
        return cls(gpu, runtime, config)

    @contextmanager
    def session(
        self, trace: TraceJob, built: BuiltModel, limit_bytes: int
    ) -> Iterator[ProbeSession]:
        limit = limit_bytes
        costs = self.fixed_costs(trace.training.world_size)
        workspace = None if self.host else nchw_transform_workspace(self.gpu.sm)
        autocast = nullcontext() if self.host else cuda_autocast_on_cpu()
        with ExitStack() as stack:
            world = stack.enter_context(
                fake_world(trace.training)
            )  # the mesh: outside the fake mode
            tracker = MemoryTracker(
                fake_scalars=True, workspace=workspace, distributed=world is not None
            )
            if world is not None:
                stack.enter_context(traced_collectives(tracker))
            policy = stack.enter_context(autocast)
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            if not self.host:
                stack.enter_context(cuda_kernel_rules())
            stack.enter_context(tracker)
            job = self._fake_job(trace, built, tracker, policy, world)
            yield _SimulatedSession(self, limit, job, tracker, costs)

    def _fake_job(
        self,
        trace: TraceJob,
        built: BuiltModel,
        tracker: MemoryTracker,
        policy: CudaAutocastPolicy | None,
        world: World | None,
    ) -> TrainingJob:
        """The training step on fake tensors, with this device's runtime and semantics."""
        return TrainingJob(
            trace,
            built,
            "cpu",
            tracker,
            fake=True,
            autocast_policy=policy,
            grads_set_to_none=self.runtime.zero_grad_set_to_none,
            cuda_semantics=not self.host,
            world=world,
        )

    @contextmanager
    def folded_session(
        self, trace: TraceJob, plan: DepthPlan, limit_bytes: int
    ) -> Iterator[ProbeSession]:
        """A session of a job whose model is a stack of identical blocks: each probe traces
        copies with a few blocks and synthesises the stack (`depth_fold`); where the traces
        do not fold, it traces the whole model and says why. Sharded jobs fold per rank."""
        assert not self.host
        workspace = nchw_transform_workspace(self.gpu.sm)
        # Built before the fake mode: a model made under it holds fake meta tensors, which
        # materialising cannot swap.
        depths = range(plan.base, plan.base + LEARN + 1)
        models = {k: plan.shallow(k) for k in depths} | {0: plan.full}
        with ExitStack() as stack:
            world = stack.enter_context(fake_world(trace.training))  # outside the fake mode
            policy = stack.enter_context(cuda_autocast_on_cpu())
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(cuda_kernel_rules())

            def make_job(built: BuiltModel) -> tuple[TrainingJob, MemoryTracker]:
                tracker = MemoryTracker(
                    fake_scalars=True, workspace=workspace, distributed=world is not None
                )
                with recording(tracker):  # each job's tracker records its own tensors only
                    return self._fake_job(trace, built, tracker, policy, world), tracker

            costs = self.fixed_costs(trace.training.world_size)
            yield _FoldedSession(self, limit_bytes, costs, make_job, plan, models, policy)


@contextmanager
def recording(tracker: MemoryTracker) -> Iterator[None]:
    """The tracker active for one job's work (and, for one rank of a sharded job, seeing its
    collectives' buffers), when several jobs share a session."""
    with tracker, traced_collectives(tracker) if tracker.distributed else nullcontext():
        yield


class _SimulatedSession(ProbeSession):
    def __init__(
        self,
        device: SimulatedDevice,
        limit: int,
        job: TrainingJob,
        tracker: MemoryTracker,
        costs: FixedCosts,
    ) -> None:
        super().__init__(device, limit)
        self.job = job
        self.tracker = tracker
        self.costs = costs
        self.config = device.allocator
        self.host = device.host
        self._sequences: dict[int, Sequence] = {}
        self._costs: dict[int, StepCost] = {}  # the roofline of each batch costed so far
        self._cost_wanted: set[int] = set()  # batches whose next probe also costs the step
        self._model: tuple[tuple[int, ...], AffineSequence | None] | None = None
        self.records_own_steps = False  # its tracker is active for the whole session
        # The allocator may reserve what the card offers less the context and NCCL's buffers.
        self.allocator_limit = limit - costs.outside_allocator

    def _probe(self, batch: int) -> TrialOutcome:
        assert self.job is not None
        tracker = self.tracker
        tracker.reset_peak()
        with self._recording():
            if batch in self._cost_wanted:  # one trace for the memory and the step's roofline
                with self._costing() as mode:
                    self.job.iteration(batch)
                self._costs[batch] = mode.cost
            else:  # costing every op slows a trace by a fifth: only where it will be asked for
                self.job.iteration(batch)  # tracing time says nothing about the GPU's speed
        sequence = sequence_of(StepTrace.of(tracker), self.costs.workspaces)
        if self.host:  # the cpu device's rule: live tensors against the budget
            self._sequences[batch] = sequence
            return self._outcome(batch, tracker.peak, tracker.breakdown_at_peak(), None)
        return self._replayed(batch, sequence, tracker.peak, tracker.breakdown_at_peak())

    def _replayed(
        self, batch: int, sequence: Sequence, live_peak: int, breakdown: dict[str, int]
    ) -> TrialOutcome:
        """The trial of a step's allocation sequence: replayed under the card's limit, and
        the reserve it needs under pressure."""
        self._sequences[batch] = sequence
        persistent, events, lazy = sequence
        at_limit = replay(persistent, events, self.allocator_limit, self.config, lazy=lazy)
        need, _ = reserve_needed(persistent, events, self.config, lazy, fitted=at_limit)
        return self._replayed_outcome(batch, at_limit, need, live_peak, breakdown)

    def predict_fits(self, batch: int) -> bool | None:
        """Whether `batch` would fit, without tracing it: the allocation sequence of a step is
        the same at every batch with sizes affine in the batch, so two traced sequences give
        any other; the allocator is then replayed on it (milliseconds, where a trace takes
        seconds). None until two probed sequences of the same shape exist."""
        model = self._sequence_model()
        if model is None:
            return None
        persistent, events, lazy = model.at(batch)
        if self.host:
            return live_peak(persistent, events, lazy) <= self.limit_bytes
        return replay(persistent, events, self.allocator_limit, self.config, lazy=lazy).oom is None

    def _sequence_model(self) -> AffineSequence | None:
        """The fit on the largest pair of probed batches whose sequences share a shape; cached
        until another batch is probed (a search asks for dozens of predictions in between)."""
        batches = tuple(sorted(self._sequences, reverse=True))
        if self._model is not None and self._model[0] == batches:
            return self._model[1]
        found = None
        for index, high in enumerate(batches):
            for low in batches[index + 1 :]:
                found = AffineSequence.fit(low, self._sequences[low], high, self._sequences[high])
                if found is not None:
                    break
            if found is not None:
                break
        self._model = (batches, found)
        return found

    def _replayed_outcome(
        self,
        batch: int,
        at_limit: CachingAllocator,
        need: int,
        live_peak: int,
        breakdown: dict[str, int],
    ) -> TrialOutcome:
        """Fits: the replay under the card's limit never failed a segment. The peak reported is
        the reserve the step needs under pressure (+ overhead), which is what grows with the
        batch; with room to spare the allocator caches more than that."""
        costs = self.costs
        parts = dict.fromkeys(CATEGORIES, 0) | breakdown
        cublas = sum(round_size(w) for w in costs.workspaces)
        allocated = live_peak + cublas
        fits = at_limit.oom is None
        reserved = max(need, allocated)
        if fits:
            reserved = min(reserved, self.allocator_limit)
        else:
            reserved = max(reserved, self.allocator_limit + 1)
        parts |= {
            "workspace": parts["workspace"] + cublas,
            "overhead": costs.outside_allocator,
            "cuda_context": costs.cuda_context,
            "nccl_buffers": costs.nccl_buffers,
        }
        peak = reserved + costs.outside_allocator
        reason = None if fits else f"caching allocator out of memory: {at_limit.oom}"
        shown = max(at_limit.peak_reserved, allocated) if fits else peak - costs.outside_allocator
        return TrialOutcome(
            batch,
            fits,
            peak,
            0.0,
            parts,
            reason,
            allocated_bytes=allocated + costs.outside_allocator,
            reserved_bytes=shown + costs.outside_allocator,
        )

    def want_cost(self, batch: int) -> None:
        self._cost_wanted.add(batch)

    def step_cost(self, batch: int) -> StepCost:
        """Roofline cost of one iteration on the card, from the ops of the same fake step: the
        probe's own trace where `want_cost` asked for it before the probe (a trace is the slow
        part of a plan)."""
        if batch not in self._costs:
            assert self.job is not None
            with self._recording(), self._costing() as mode:
                self.job.iteration(batch)
            self._costs[batch] = mode.cost
        return self._costs[batch]

    def _recording(self) -> AbstractContextManager[Any]:
        return recording(self.tracker) if self.records_own_steps else nullcontext()

    def _costing(
        self, job: TrainingJob | None = None, tracker: MemoryTracker | None = None
    ) -> StepCostMode:
        job, tracker = job or self.job, tracker or self.tracker
        assert job is not None and tracker is not None
        device = self.device
        assert isinstance(device, SimulatedDevice)
        roofline = Roofline(device.gpu, job.precision, device.runtime.matmul_tf32_default)
        return StepCostMode(
            roofline,
            lambda: tracker.phase,
            offload=job.activation_offload,
            groups=_link_groups(job, device.gpu),
            tracker=tracker,
        )


def _link_groups(job: TrainingJob, gpu: GpuModel) -> tuple[LinkGroup, ...]:
    """Context and tensor parallelism's groups as the roofline needs them: each one's name
    (what its collectives carry), its ranks and their link (NVLink within a node, the network
    across)."""
    world = job.world
    if world is None:
        return ()
    out = []
    cp, tp = world.context_parallel, world.tensor_parallel
    # (bucket, ranks, the consecutive ranks the group spans: tp innermost, cp strided by it)
    for bucket, ranks, span, mesh in (
        ("ring", cp, cp * tp, world.cp_mesh),
        ("tensor_parallel", tp, tp, world.tp_mesh),
    ):
        if ranks > 1:
            link = link_gbs(gpu, span, world.gpus_per_node) * 1e9
            out.append(LinkGroup(mesh.get_group().group_name, bucket, ranks, link))
    return tuple(out)


class _FoldedSession(_SimulatedSession):
    """Probes a stack of `plan.depth` identical blocks from models with 2 to 5 of them.

    The first probe traces 2, 3, 4 and 5 blocks and learns the fold (which must rebuild 5
    blocks exactly); each later probe traces 2 and 3 blocks at its micro-batch, checks them
    against the fold and synthesises the stack. The allocator then replays the synthesised
    sequence as it would a traced one. Any failure of the fold makes the session trace the whole
    model from then on (`folding` says why)."""

    def __init__(
        self,
        device: SimulatedDevice,
        limit: int,
        costs: FixedCosts,
        make_job: Callable[[BuiltModel], tuple[TrainingJob, MemoryTracker]],
        plan: DepthPlan,
        models: dict[int, BuiltModel],
        policy: CudaAutocastPolicy,
    ) -> None:
        self.make_job = make_job
        self.policy = policy  # shared by the jobs: each traces with its own weight-cast cache
        self.plan = plan
        self.models = models  # by blocks; 0: the whole model
        self.jobs: dict[int, tuple[TrainingJob, MemoryTracker]] = {}
        # by model, base and the shape of the step (`kinds_of`): the device's, so a plan's
        # sessions share them
        self.folds: dict[Any, Fold] = device.folds
        self.own_folds: list[Fold] = []  # checked or learned by this session
        self.whole: _SimulatedSession | None = None
        self.folding = Folding(plan.depth, folded=True)
        self.history: list[int] = []  # the batches of every step run so far, in order
        self.ran: dict[int, int] = {}  # by blocks: how much of the history that job has run
        self.base = plan.base
        job, tracker = self._job(self.base)
        super().__init__(device, limit, job, tracker, costs)

    # -- the session's interface ----------------------------------------------------------
    def _probe(self, batch: int) -> TrialOutcome:
        step = None if self.whole is not None else self._folded_step(batch)
        self.history.append(batch)
        if step is None:
            assert self.whole is not None
            outcome = self.whole._probe(batch)
            self._sequences[batch] = self.whole._sequences[batch]
            if batch in self.whole._costs:
                self._costs[batch] = self.whole._costs[batch]
            return outcome
        return self._replayed(batch, sequence_of(step, self.costs.workspaces), *step.peak())

    def step_cost(self, batch: int) -> StepCost:
        if batch not in self._costs:
            if self.whole is None:
                self._cost_wanted.add(batch)
                self._folded_step(batch)
            if self.whole is not None and batch not in self._costs:
                self._costs[batch] = self.whole.step_cost(batch)
            self.history.append(batch)
        return self._costs[batch]

    def parameter_count(self) -> tuple[int, int]:
        if self.whole is not None:
            return self.whole.parameter_count()
        one, two = (self._job(k)[0].parameter_count() for k in (self.base, self.base + 1))
        return self._deepened(one[0], two[0]), self._deepened(one[1], two[1])

    def host_bytes(self) -> int:
        if self.whole is not None:
            return self.whole.host_bytes()
        one, two = (self._job(k)[0].host_bytes for k in (self.base, self.base + 1))
        return self._deepened(one, two)

    def _deepened(self, base: int, next_depth: int) -> int:
        """A count that each block adds to equally, at the stack's depth."""
        return base + (self.plan.depth - self.base) * (next_depth - base)

    # -- folding ---------------------------------------------------------------------------
    def _job(self, blocks: int) -> tuple[TrainingJob, MemoryTracker]:
        if blocks not in self.jobs:
            self.jobs[blocks] = self.make_job(self.models[blocks])
        return self.jobs[blocks]

    def _trace(self, blocks: int, batch: int, cost: bool) -> tuple[StepTrace, StepCost | None]:
        job, tracker = self._job(blocks)
        ran = self.ran.setdefault(blocks, 0)
        with recording(tracker), self.policy.own_cache(job):
            # A job that sat out earlier probes first runs their steps: what a step leaves,
            # the next one frees, so every depth must have the session's history.
            for earlier in self.history[ran:]:
                job.iteration(earlier)
        self.ran[blocks] = len(self.history) + 1
        tracker.reset_peak()
        with recording(tracker), self.policy.own_cache(job):
            if not cost:
                job.iteration(batch)
                return StepTrace.of(tracker), None
            with self._costing(job, tracker) as mode:
                job.iteration(batch)
        return StepTrace.of(tracker), mode.cost

    def _folded_step(self, batch: int) -> StepTrace | None:
        """The stack's step at `batch`, synthesised; None where the fold fails. A fold is
        learned once per shape of step (batch 1 often runs a few ops fewer than the rest) and
        shared by the plan's other sessions of the same model (scale-out sizes, what-ifs on
        other cards), each of which checks it on its own traces before using it."""
        costing, base = batch in self._cost_wanted, self.base
        traced = {k: self._trace(k, batch, costing) for k in (base, base + 1)}
        steps = {k: step for k, (step, _) in traced.items()}
        try:
            key = (self.plan.key, base, kinds_of(steps[base]))
            fold = self._checked(self.folds.get(key), steps)
            more = [base + 2] if costing else []
            if fold is None:
                more = [base + 2, base + 3]
            for k in more:
                traced[k] = self._trace(k, batch, costing and k == base + 2)
                steps[k] = traced[k][0]
            if fold is None:
                fold = self.folds[key] = Fold.learn(steps, base)
                self.own_folds.append(fold)
            if costing:
                costs = {k: cost for k, (_, cost) in traced.items() if cost is not None}
                self._costs[batch] = fold_cost(costs, base, self.plan.depth)
            stack = fold.synthesize(steps[base], self.plan.depth)
        except NotFoldable as exc:
            self._trace_whole(str(exc))
            return None
        self.folding = Folding(self.plan.depth, folded=True, traced_depths=tuple(sorted(self.jobs)))
        return stack

    def _checked(self, fold: Fold | None, steps: dict[int, StepTrace]) -> Fold | None:
        """The fold if it rebuilds this session's next depth; a fold another session learned
        that does not is learned again here, one of this session's own is a failure."""
        if fold is None:
            return None
        try:
            fold.resized(steps[self.base], steps[self.base + 1])
        except NotFoldable:
            if any(mine is fold for mine in self.own_folds):
                raise
            return None
        if not any(mine is fold for mine in self.own_folds):
            self.own_folds.append(fold)
        return fold

    def _trace_whole(self, reason: str) -> None:
        self.folding = Folding(self.plan.depth, folded=False, reason=reason)
        job, tracker = self.make_job(self.models[0])
        device = self.device
        assert isinstance(device, SimulatedDevice)
        whole = _SimulatedSession(device, self.limit_bytes, job, tracker, self.costs)
        whole.records_own_steps = True  # no session-long tracker here: it records each step
        whole._cost_wanted = self._cost_wanted
        # The whole model catches up on the steps a session without folding would have run
        # (what one step leaves, the next one frees: its state must be the same).
        for batch in self.history:
            tracker.reset_peak()
            with recording(tracker):
                job.iteration(batch)
        self.whole = whole
        self.job = job


def sequence_of(step: StepTrace, workspaces: tuple[int, ...] | list[int]) -> Sequence:
    """What the allocator sees from the process start, for a traced or synthesised step:
    workspaces and what was live first, then the step's events (keyed by their index); the
    first iteration creates the optimizer state at its step and (before torch 2.0) the
    gradients in its backward, where a real run creates them (`lazy`)."""
    events: list[tuple[int, int]] = []
    created_at: dict[str, int] = {}
    phases = {"backward": "gradients", "optimizer": "optimizer_state"}
    for index, event in enumerate(step.events):
        if event[0] == "a":
            category = phases.get(event[3])
            if category is not None and category not in created_at:
                created_at[category] = len(events)
            events.append((index, event[1]))
        elif event[1] >= 0:  # a persistent entry freed mid-step stays reserved, as traced
            events.append((event[1], -1))
    persistent = list(workspaces)
    lazy: dict[int, list[int]] = {}
    for category, nbytes in step.persistent:
        if category in phases.values():
            lazy.setdefault(created_at.get(category, len(events)), []).append(nbytes)
        else:
            persistent.append(nbytes)
    return persistent, events, lazy
