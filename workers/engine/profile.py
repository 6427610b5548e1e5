"""From a spec to a plan: build, probe, search, then the plan arithmetic and its warnings.

This is the library the worker and `trainplan plan --local` both call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.schemas.result import (
    DepthFolding,
    DeviceInfo,
    FitSuggestion,
    LrPoint,
    LrScalingInfo,
    LrSchedule,
    MemoryBreakdown,
    MemoryCategory,
    OptimizerAdjustment,
    ParamGroupRate,
    PlanResult,
    PlanWarning,
    Prediction,
    Risk,
    ScaleOut,
    SequenceLength,
    SequenceLengthCheck,
    StepSplit,
    Throughput,
    Trial,
    WorldSizeCheck,
)
from service.schemas.spec import SHARDED, DataSpec, TrainingSpec
from workers.engine import checkpoint_policy, layout_search, planner, recipe, risk, token_batching
from workers.engine.communication import StepTraffic, exposed, step_traffic
from workers.engine.compiled import CompiledJob
from workers.engine.configs import PlanNumbers, build_configs, configs_with_evaluation
from workers.engine.cudnn import grouped_convolutions
from workers.engine.data import sample_bytes
from workers.engine.depth_fold import Folding
from workers.engine.devices import ProbeDevice, TrialOutcome, open_device, open_session, twin_of
from workers.engine.devices.base import ProbeSession
from workers.engine.devices.simulated import SimulatedDevice
from workers.engine.errors import SpecError
from workers.engine.evaluation import plan_evaluation
from workers.engine.fit_search import changes_text, first_fit
from workers.engine.job import counting_steps
from workers.engine.models import build_model, moe
from workers.engine.plan_warnings import Facts, plan_warnings
from workers.engine.risk import THROUGHPUT_SPREAD
from workers.engine.roofline import StepCost
from workers.engine.scale_out import fewest_gpus
from workers.engine.schedule import Schedule
from workers.engine.schedule import resolve as resolve_schedule
from workers.engine.search import SearchResult, find_max_batch
from workers.engine.sequence_search import longest_sequence, with_seq_len
from workers.engine.what_if import explore

# PCIe 4.0 x16: 31.5 GB/s per direction (PCI-SIG); pinned copies reach about 80% of it.
HOST_TO_DEVICE_BYTES_S = 25e9

OnTrial = Callable[[Trial], None]


@dataclass
class ProfileHooks:
    """What a caller hears while a plan runs. Cancelling is not a hook: the worker kills the
    plan's child process, which no trace in progress can delay."""

    on_trial: OnTrial | None = None


def to_trial(outcome: TrialOutcome, phase: str = "search", scenario: str | None = None) -> Trial:
    return Trial(
        batch_size=outcome.batch_size,
        fits=outcome.fits,
        peak_bytes=outcome.peak_bytes,
        duration_s=round(outcome.duration_s, 6),
        reason=outcome.reason,
        phase=phase,
        scenario=scenario,
    )


class _Recorder:
    """Turns each probe into a `Trial`, reports it through the hooks and keeps the plan's own."""

    def __init__(self, hooks: ProfileHooks) -> None:
        self.hooks = hooks
        self.trials: list[Trial] = []

    def emit(self, trial: Trial) -> None:
        if trial.phase not in ("what_if", "scale_out", "sequence_length", "evaluation"):
            self.trials.append(trial)
        if self.hooks.on_trial is not None:
            self.hooks.on_trial(trial)

    def probe(
        self, session: ProbeSession, phase: str = "search", scenario: str | None = None
    ) -> Callable[[int], TrialOutcome]:
        def probe(batch: int) -> TrialOutcome:
            outcome = session.probe(batch)
            self.emit(to_trial(outcome, phase, scenario))
            return outcome

        return probe


def run_plan(
    job: CompiledJob, hooks: ProfileHooks | None = None, device: ProbeDevice | None = None
) -> PlanResult:
    """Profile the spec's job on its device and return the plan (feasible or not), with the
    what-if neighbours when the job asks for them, and the steps it traced."""
    with counting_steps() as steps:
        result = _run_plan(job, hooks, device)
    result.traced_steps = steps[0]
    return result


def _run_plan(
    job: CompiledJob, hooks: ProfileHooks | None, device: ProbeDevice | None
) -> PlanResult:
    recorder = _Recorder(hooks or ProfileHooks())
    device = device or open_device(job)
    job, batching = token_batching.prepare(job)
    sequence = None
    if job.search.target == "sequence_length":
        sequence = _longest_sequence(job, device, recorder)
        if sequence.max_seq_len:
            job = with_seq_len(job, sequence.max_seq_len)
    scale_out: list[ScaleOut] = []
    if job.training.auto_world_size:
        answer = _scale_out(job, device, recorder, job.training.parallelism.strategy or "fsdp")
        scale_out.append(answer)
        if answer.world_size is not None:
            job = job.with_world(answer.strategy, answer.world_size)
    if job.training.parallelism.layout == "auto":
        job, result, layouts = layout_search.choose(
            job,
            lambda changed, label: _plan_policy(changed, device, _Labelled(recorder, label, None)),
        )
        result.layouts = layouts
    else:
        job, result = _plan_policy(job, device, recorder)
    if not result.feasible and not scale_out and isinstance(device, SimulatedDevice):
        strategy = job.training.strategy
        scale_out.append(
            _scale_out(job, device, recorder, strategy if strategy in SHARDED else "fsdp")
        )
    result.scale_out = scale_out
    result.sequence_length = sequence
    if result.feasible and job.training.evaluation is not None:
        _add_evaluation(result, job, device, recorder)
    if batching is not None and result.feasible:
        result.token_batching = token_batching.report(batching, result)
    if not result.feasible and job.search.what_if:
        result.fits_with = _first_fit(job, device, recorder)
        if result.fits_with is not None:
            result.suggestions.insert(0, _fit_text(result.fits_with))
    if job.search.what_if:
        result.what_if = explore(
            job,
            device,
            lambda session, label: recorder.probe(session, "what_if", label),
            lambda outcome, label: to_trial(outcome, "what_if", label),
            result.memory.optimizer_state / result.memory.capacity,
        )
    return result


def _plan_policy(
    job: CompiledJob, device: ProbeDevice, recorder: _Recorder
) -> tuple[CompiledJob, PlanResult]:
    """The job's plan, under the checkpointing policy `checkpointing.auto` chooses where it
    asks for one, and the job as planned."""
    if not job.training.checkpointing.auto:
        return job, _plan(job, device, recorder)
    policy, result, choice = checkpoint_policy.choose(
        job, lambda changed, label: _plan(changed, device, _Labelled(recorder, label, None))
    )
    result.checkpointing = choice
    return policy.on(job), result


def _scale_out(
    job: CompiledJob, device: ProbeDevice, recorder: _Recorder, strategy: str
) -> ScaleOut:
    """The fewest GPUs for `strategy`, each world size checked reported as a trial."""

    def report(size: int, outcome: TrialOutcome) -> None:
        recorder.emit(to_trial(outcome, "scale_out", f"{strategy}@world_size={size}"))

    answer = fewest_gpus(job, device, strategy, on_probe=report)
    return ScaleOut(
        strategy=strategy,
        world_size=answer.world_size,
        checked=[
            WorldSizeCheck(world_size=size, fits=o.fits, peak_bytes=o.peak_bytes)
            for size, o in sorted(answer.checked.items())
        ],
    )


def _add_evaluation(
    result: PlanResult, job: CompiledJob, device: ProbeDevice, recorder: _Recorder
) -> None:
    """The evaluation's micro-batch, and its time in time-to-train."""
    evaluation = plan_evaluation(
        job,
        device,
        lambda session: recorder.probe(session, "evaluation"),
        result.total_optimizer_steps,
    )
    result.evaluation = evaluation
    if evaluation is not None and evaluation.max_micro_batch_size < result.micro_batch_size:
        result.warnings.append(
            PlanWarning(
                code="evaluation_batch_smaller",
                message=f"evaluation fits at most {evaluation.max_micro_batch_size} samples a "
                f"micro-batch, fewer than training's {result.micro_batch_size} (its logits are "
                "made in full: no fused loss kernel in eval mode); set "
                "per_device_eval_batch_size as the configs do, or the first evaluation runs "
                "out of memory",
            )
        )
    spec = job.training.evaluation
    if evaluation is not None and evaluation.micro_batch_size:
        result.configs = configs_with_evaluation(
            result.configs,
            evaluation.micro_batch_size,
            spec.every_steps if spec is not None else None,
        )
    if evaluation is not None and evaluation.total_time_s and result.throughput is not None:
        t = result.throughput
        result.throughput = t.model_copy(
            update={"total_time_s": t.total_time_s + evaluation.total_time_s}
        )


def _longest_sequence(job: CompiledJob, device: ProbeDevice, recorder: _Recorder) -> SequenceLength:
    """The longest sequence at the search's micro-batch, each length checked reported as a
    trial."""

    def report(seq_len: int, outcome: TrialOutcome) -> None:
        recorder.emit(to_trial(outcome, "sequence_length", f"seq_len={seq_len}"))

    answer = longest_sequence(job, device, on_probe=report)
    return SequenceLength(
        micro_batch_size=answer.micro_batch,
        granularity=answer.granularity,
        max_seq_len=answer.max_seq_len,
        bound_reached=answer.bound_reached,
        checked=[
            SequenceLengthCheck(seq_len=length, fits=o.fits, peak_bytes=o.peak_bytes)
            for length, o in sorted(answer.checked.items())
        ],
    )


class _Labelled(_Recorder):
    """A sub-plan's recorder: its own trials, each reported to the caller's hooks as a probe
    of the scenario `label` (in `phase`; None: the trial's own, as for a checkpointing policy
    tried, whose probes are the plan's search)."""

    def __init__(self, parent: _Recorder, label: str, phase: str | None = "what_if") -> None:
        super().__init__(ProfileHooks())
        self.parent, self.label, self.phase = parent, label, phase

    def emit(self, trial: Trial) -> None:
        self.trials.append(trial)
        update: dict[str, Any] = {"scenario": self.label}
        if self.phase is not None:
            update["phase"] = self.phase
        self.parent.emit(trial.model_copy(update=update))


def _first_fit(job: CompiledJob, device: ProbeDevice, recorder: _Recorder) -> FitSuggestion | None:
    def plan(changed: CompiledJob, target: ProbeDevice, label: str) -> PlanResult:
        return _plan(changed, target, _Labelled(recorder, label))

    return first_fit(job, device, plan)


def _fit_text(fit: FitSuggestion) -> str:
    changes = changes_text(fit.changes)
    gpus = f"{fit.world_size} x {fit.device.name}" if fit.world_size > 1 else fit.device.name
    return (
        f"fits with {changes}: max micro-batch {fit.max_micro_batch_size} on {gpus}"
        f" (micro-batch {fit.micro_batch_size} x {fit.accumulation_steps} accumulation)"
    )


@dataclass(frozen=True)
class Twin:
    """A real device's simulated twin: its answer, its probes and what they cost."""

    max_batch: int
    trials: list[TrialOutcome]
    wall_s: float


def simulate_twin(job: CompiledJob, device: ProbeDevice) -> Twin | None:
    """The simulated twin's search for a real device (`search.seed_from_simulation`)."""
    twin = twin_of(device)
    if twin is None or not job.search.seed_from_simulation:
        return None
    start = time.perf_counter()
    with open_session(twin, job) as session:
        search = find_max_batch(
            session.probe, session.limit_bytes, job.search.max_batch_size, session.predict_fits
        )
    return Twin(search.max_batch, search.trials, time.perf_counter() - start)


@dataclass
class Measured:
    """What the probes found for one job on one device: the inputs of the plan arithmetic."""

    search: SearchResult
    trials: list[Trial]
    notes: list[str]
    has_batchnorm: bool = False
    grouped_convolutions: int = 0  # grouped, not depthwise: cuDNN's layouts matter (cudnn.py)
    counts: tuple[int, int] = (0, 0)  # parameters, trainable parameters
    batches: planner.BatchPlan | None = None
    at_micro: TrialOutcome | None = None
    cost: StepCost | None = None
    host_bytes: int = 0
    folding: Folding | None = None  # how the session traced a stack of blocks, if it folded


def _plan(job: CompiledJob, device: ProbeDevice, recorder: _Recorder) -> PlanResult:
    twin = simulate_twin(job, device)
    built = build_model(job.model, job.data, job.peft)
    with open_session(device, job, built) as session:
        search = find_max_batch(
            recorder.probe(session),
            session.limit_bytes,
            job.search.max_batch_size,
            session.predict_fits,
            seed=twin.max_batch if twin else None,
        )
        measured = Measured(search, recorder.trials, built.notes)
        measured.has_batchnorm = session.has_batchnorm()
        measured.grouped_convolutions = grouped_convolutions(built.module)
        measured.counts = session.parameter_count()
        measured.host_bytes = session.host_bytes()
        if search.max_batch > 0:
            measured.batches = batches = planner.choose_batches(
                search.max_batch,
                job.training.global_batch_size,
                job.training.data_parallel_size,
                job.search.micro_batch,
            )
            _check_defined(job.training, search, batches.micro_batch_size)
            at_micro = search.outcome_at(batches.micro_batch_size)
            if at_micro is None:  # the breakdown is reported at the chosen micro-batch
                session.want_cost(batches.micro_batch_size)  # one trace for both
                at_micro = session.probe(batches.micro_batch_size)
                recorder.emit(to_trial(at_micro, phase="breakdown"))
            measured.at_micro = at_micro
            measured.cost = session.step_cost(batches.micro_batch_size)
        measured.folding = session.folding  # after the last probe: a fold may fail late
    if measured.batches is None:
        result = _infeasible(job, device, measured)
    else:
        result = _feasible(job, device, measured)
    result.prediction = _prediction(twin, search)
    if measured.folding is not None:
        result.depth_folding = _folding_out(measured.folding)
    if built.moe is not None:
        result.moe = moe.report(built.moe, job.training.precision)
        result.warnings += moe.warnings(built.moe, job.training.precision)
    return result


def _folding_out(folding: Folding) -> DepthFolding:
    return DepthFolding(
        layers=folding.depth,
        folded=folding.folded,
        traced_depths=list(folding.traced_depths),
        reason=folding.reason,
    )


def _check_defined(training: TrainingSpec, search: SearchResult, micro: int) -> None:
    """The chosen micro-batch must be one where training is defined (BatchNorm: 2 and up)."""
    if micro >= search.min_batch:
        return
    raise SpecError(
        ("training", "global_batch_size"),
        f"global_batch_size {training.global_batch_size} on {training.world_size} GPU(s) gives "
        f"micro-batches of {micro}, where training is undefined ({search.undefined_reason}): "
        f"each GPU needs at least {search.min_batch} samples a step",
    )


def undefined_batch_warning(search: SearchResult) -> list[PlanWarning]:
    if search.min_batch == 1:
        return []
    return [
        PlanWarning(
            code="micro_batch_floor",
            message=f"training is undefined below a micro-batch of {search.min_batch} "
            f"({search.undefined_reason}): the search started at {search.min_batch}",
        )
    ]


def _prediction(twin: Twin | None, search: SearchResult) -> Prediction | None:
    if twin is None:
        return None
    predicted, real = twin.max_batch, search.max_batch
    error = (predicted - real) / real if real else float(predicted > 0)
    at_real = search.outcome_at(real) if real else None
    simulated = risk.simulated_peak_at(twin.trials, real) if at_real is not None else None
    return Prediction(
        predicted_max_micro_batch_size=predicted,
        real_max_micro_batch_size=real,
        relative_error=error,
        peak_ratio=at_real.peak_bytes / simulated if at_real is not None and simulated else None,
        simulated_trials=len(twin.trials),
        simulated_wall_s=round(twin.wall_s, 3),
    )


def _device_info(device: ProbeDevice) -> DeviceInfo:
    return DeviceInfo(
        backend=device.backend,
        name=device.name,
        memory_bytes=device.memory_bytes,
    )


def _memory(outcome: TrialOutcome, capacity: int, host: int = 0) -> MemoryBreakdown:
    parts = outcome.breakdown
    allocated = outcome.allocated_bytes
    reserved = outcome.reserved_bytes
    return MemoryBreakdown(
        **{category: parts.get(category, 0) for category in MemoryCategory},
        overhead=parts.get("overhead", 0),
        host_offloaded=host,
        cuda_context=parts.get("cuda_context", parts.get("overhead", 0)),
        nccl_buffers=parts.get("nccl_buffers", 0),
        peak=allocated if allocated is not None else outcome.peak_bytes,
        reserved=reserved,
        allocator_cached=None if reserved is None or allocated is None else reserved - allocated,
        capacity=capacity,
    )


def _feasible(job: CompiledJob, device: ProbeDevice, measured: Measured) -> PlanResult:
    search, batches, at_micro = measured.search, measured.batches, measured.at_micro
    assert batches is not None and at_micro is not None
    training, data = job.training, job.data
    epochs = planner.epoch_arithmetic(
        data.num_samples,
        batches.micro_batch_size,
        training.data_parallel_size,
        batches.effective_global_batch_size,
        training.epochs,
    )
    lr = planner.scale_lr(
        training.base_lr,
        training.reference_batch_size,
        batches.effective_global_batch_size,
        training.lr_scaling,
        training.optimizer,
        epochs.optimizer_steps_per_epoch,
        epochs.total_optimizer_steps,
    )
    schedule, adjustment = _recipe(job.training, lr, batches, epochs)
    warnings = plan_warnings(
        Facts(
            job,
            device,
            search,
            batches,
            lr,
            measured.has_batchnorm,
            schedule,
            adjustment,
            measured.grouped_convolutions,
        )
    )
    throughput = _measured_throughput(job.training, batches, epochs, at_micro)
    if throughput is None and measured.cost is not None:
        traffic = _traffic(job.training, device, measured.counts, batches.accumulation_steps)
        throughput = estimate_throughput(
            job.training, job.data, batches, epochs, measured.cost, traffic
        )
    warnings += [PlanWarning(code="model_adapted", message=n) for n in measured.notes]
    warnings += undefined_batch_warning(measured.search)
    numbers = PlanNumbers(
        micro_batch_size=batches.micro_batch_size,
        accumulation_steps=batches.accumulation_steps,
        world_size=training.world_size,
        learning_rate=lr.learning_rate,
        warmup_steps=schedule.warmup,
        total_optimizer_steps=epochs.total_optimizer_steps,
        schedule=schedule,
        optimizer_overrides=adjustment.kwargs if adjustment and adjustment.applies else {},
        model_parallel=training.model_parallel_size,
    )
    choice = job.optimizer
    offloaded = measured.cost.offloaded if measured.cost is not None else 0
    return PlanResult(
        feasible=True,
        device=_device_info(device),
        max_micro_batch_size=search.max_batch,
        micro_batch_size=batches.micro_batch_size,
        accumulation_steps=batches.accumulation_steps,
        global_batch_size=training.global_batch_size,
        effective_global_batch_size=batches.effective_global_batch_size,
        learning_rate=lr.learning_rate,
        lr_scaling=LrScalingInfo(
            rule=lr.rule,
            base_lr=training.base_lr,
            base_batch_size=training.reference_batch_size,
            base_batch_size_from="spec" if training.base_batch_size else "global_batch_size",
            factor=lr.factor,
            warmup_steps=schedule.warmup,
        ),
        iterations_per_epoch=epochs.iterations_per_epoch,
        optimizer_steps_per_epoch=epochs.optimizer_steps_per_epoch,
        total_optimizer_steps=epochs.total_optimizer_steps,
        total_steps_upper_bound=training.early_stopping is not None,
        schedule=_schedule_out(schedule, lr.learning_rate),
        param_groups=_group_rates(job.training, lr.learning_rate),
        optimizer=choice.path,
        optimizer_impl=choice.impl,
        optimizer_adjustment=_adjustment_out(adjustment),
        memory=_memory(at_micro, device.memory_bytes, measured.host_bytes + offloaded),
        throughput=throughput,
        risk=_risk(device, search, at_micro, job.search.headroom),
        trials=measured.trials,
        search_bound_reached=search.bound_reached,
        warnings=warnings,
        model_summary={
            "parameters": measured.counts[0],
            "trainable_parameters": measured.counts[1],
        },
        world_size=training.world_size,
        strategy=training.strategy,
        configs=build_configs(job.launch, numbers),
    )


def _risk(
    device: ProbeDevice, search: SearchResult, at_micro: TrialOutcome, headroom: float
) -> Risk | None:
    """Simulated devices only: on a real one the answer ran."""
    if device.backend != "simulated":
        return None
    return risk.assess(
        [*search.trials, at_micro],
        at_micro.batch_size,
        search.max_batch,
        device.memory_bytes,
        headroom,
    )


def _recipe(
    training: TrainingSpec,
    lr: planner.LrPlan,
    batches: planner.BatchPlan,
    epochs: planner.EpochPlan,
) -> tuple[Schedule, recipe.Adjustment | None]:
    """The schedule in this run's optimizer steps, and the square-root rule's betas."""
    schedule = resolve_schedule(
        training.schedule,
        lr.warmup_steps,
        epochs.optimizer_steps_per_epoch,
        epochs.total_optimizer_steps,
    )
    k = batches.effective_global_batch_size / training.reference_batch_size
    return schedule, recipe.sde_adjustment(training.optimizer, lr.rule, k)


def _schedule_out(schedule: Schedule, peak: float) -> LrSchedule:
    return LrSchedule(
        name=schedule.name,
        warmup_steps=schedule.warmup_end,
        total_steps=schedule.total,
        points=[
            LrPoint(label=label, step=step, learning_rate=peak * schedule.factor(step))
            for label, step in schedule.points()
        ],
        upper_bound=schedule.name == "plateau",
    )


def _group_rates(training: TrainingSpec, peak: float) -> list[ParamGroupRate]:
    groups = recipe.param_groups(training)
    if not groups:
        return []
    rest = ParamGroupRate(prefix=None, lr_scale=1.0, learning_rate=peak)
    return [
        *(ParamGroupRate(prefix=p, lr_scale=s, learning_rate=peak * s) for p, s in groups),
        rest,
    ]


def _adjustment_out(adjustment: recipe.Adjustment | None) -> OptimizerAdjustment | None:
    if adjustment is None:
        return None
    return OptimizerAdjustment(
        batch_factor=adjustment.k,
        betas=list(adjustment.betas),
        eps=adjustment.eps,
        applied=adjustment.applies,
    )


def _measured_throughput(
    training: TrainingSpec,
    batches: planner.BatchPlan,
    epochs: planner.EpochPlan,
    at_micro: TrialOutcome,
) -> Throughput | None:
    """Real devices time the probe at the chosen micro-batch; one step is `accumulation` of them.
    A single probe includes first-touch costs, so this is an upper bound on step time."""
    if at_micro.step_time_s is None:
        return None
    step = at_micro.step_time_s * batches.accumulation_steps
    return _throughput(training.data_parallel_size, batches, epochs, step, measured=True)


def _throughput(
    world_size: int,
    batches: planner.BatchPlan,
    epochs: planner.EpochPlan,
    step: float,
    **extra: Any,
) -> Throughput:
    """Samples per second and times per epoch and run, from the time of one optimizer step."""
    samples = batches.micro_batch_size * batches.accumulation_steps * world_size
    return Throughput(
        samples_per_second=samples / step,
        step_time_s=step,
        epoch_time_s=step * epochs.optimizer_steps_per_epoch,
        total_time_s=step * epochs.total_optimizer_steps,
        **extra,
    )


def _traffic(
    training: TrainingSpec, device: ProbeDevice, counts: tuple[int, int], accumulation: int
) -> StepTraffic | None:
    if not isinstance(device, SimulatedDevice):
        return None
    return step_traffic(
        training.strategy,
        device.gpu,
        training.world_size,
        training.parallelism.gpus_per_node,
        trainable=counts[1],
        parameters=counts[0],
        precision=training.precision,
        accumulation=accumulation,
        reshards_after_forward=training.reshards_after_forward,
        tensor_parallel=training.parallelism.tensor_parallel,
    )


def estimate_throughput(
    training: TrainingSpec,
    data: DataSpec,
    batches: planner.BatchPlan,
    epochs: planner.EpochPlan,
    cost: StepCost,
    traffic: StepTraffic | None = None,
) -> Throughput:
    """Roofline time of the micro-step, times the accumulation steps; the optimizer's kernels run
    once per optimizer step. The host-to-device copy of the batch is reported but taken as
    overlapped with compute (a DataLoader with pinned memory and non_blocking copies);
    collectives overlap compute too, and only what exceeds it adds to the step."""
    k = batches.accumulation_steps
    seconds = cost.seconds()
    compute = (seconds["matmul"] + seconds["conv"]) * k
    memory_bound = seconds["memory"] * k
    optimizer = seconds["optimizer"]
    comm = traffic.seconds if traffic is not None else 0.0
    recompute = seconds["recompute"] * k  # checkpointed blocks' forwards, again in backward
    offload = seconds["offload"] * k  # on the compute stream: not overlapped
    ring = seconds["ring"] * k  # attention waits for the gathered keys and values
    tensor_parallel = seconds["tensor_parallel"] * k  # the next layer waits for the all-reduce
    step = compute + memory_bound + recompute + optimizer + offload + ring + tensor_parallel
    step += exposed(comm, compute + memory_bound + recompute)
    input_bytes = sample_bytes(data) * batches.micro_batch_size
    estimate = _throughput(
        training.data_parallel_size,
        batches,
        epochs,
        step,
        measured=False,
        flops_per_sample=cost.flops / batches.micro_batch_size,
        split=StepSplit(
            compute_s=compute,
            memory_bound_s=memory_bound,
            recompute_s=recompute,
            recompute_bytes=cost.recomputed * k,
            optimizer_s=optimizer,
            input_s=input_bytes * k / HOST_TO_DEVICE_BYTES_S,
            communication_s=comm,
            communication_bytes=traffic.bytes_per_rank if traffic is not None else 0.0,
            offload_s=offload,
            offload_bytes=2 * cost.offloaded * k,
            context_parallel_s=ring,
            context_parallel_bytes=cost.ring_bytes * k,
            tensor_parallel_s=tensor_parallel,
            tensor_parallel_bytes=cost.tensor_parallel_bytes * k,
        ),
    )
    return estimate.model_copy(
        update={
            "samples_per_second_band": THROUGHPUT_SPREAD.band(estimate.samples_per_second),
            "band_coverage": THROUGHPUT_SPREAD.coverage,
        }
    )


def suggestions_for(training: TrainingSpec) -> list[str]:
    out = []
    if training.precision == "fp32":
        out.append(
            "precision 'bf16-mixed' (or 'fp16-mixed' on cards without bf16) roughly "
            "halves the activations"
        )
    if not training.gradient_checkpointing:
        out.append("gradient_checkpointing trades recomputation for most of the activations")
    if training.optimizer in ("adam", "adamw"):
        out.append("optimizer 'adafactor' or 'sgd_momentum' keeps less optimizer state than Adam")
        if training.implementation == "foreach":
            out.append(
                "optimizer_impl 'fused' drops the multi-tensor kernels' temporary copy of the "
                "state; optimizer 'adamw_8bit' (bitsandbytes) keeps it at about 1 byte per element"
            )
    if training.trainable == "all":
        out.append(
            "freeze parameters (training.trainable prefixes) to drop their gradients and "
            "optimizer state"
        )
    out.append("a card with more memory (see GET /v1/gpus)")
    return out


def _infeasible(job: CompiledJob, device: ProbeDevice, measured: Measured) -> PlanResult:
    search, trials, notes = measured.search, measured.trials, measured.notes
    first = search.trials[0]
    lr_rule = planner.resolve_rule(job.training.lr_scaling, job.training.optimizer)
    choice = job.optimizer
    return PlanResult(
        feasible=False,
        device=_device_info(device),
        max_micro_batch_size=0,
        micro_batch_size=0,
        accumulation_steps=0,
        global_batch_size=job.training.global_batch_size,
        effective_global_batch_size=0,
        learning_rate=job.training.base_lr,
        lr_scaling=LrScalingInfo(
            rule=lr_rule,
            base_lr=job.training.base_lr,
            base_batch_size=job.training.reference_batch_size,
            base_batch_size_from="spec" if job.training.base_batch_size else "global_batch_size",
            factor=1.0,
            warmup_steps=0,
        ),
        iterations_per_epoch=0,
        optimizer_steps_per_epoch=0,
        total_optimizer_steps=0,
        optimizer=choice.path,
        optimizer_impl=choice.impl,
        memory=_memory(first, device.memory_bytes, measured.host_bytes),
        trials=trials,
        world_size=job.training.world_size,
        strategy=job.training.strategy,
        warnings=[
            PlanWarning(
                code="infeasible",
                message=(f"even a micro-batch of 1 does not fit on {device.name}: {first.reason}"),
            )
        ]
        + [PlanWarning(code="model_adapted", message=n) for n in notes],
        suggestions=suggestions_for(job.training),
    )
