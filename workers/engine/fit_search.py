"""What would fit: when a micro-batch of one does not, the changes a user would make, in order.

The ladder runs from what costs nothing to what costs the most: mixed precision (faster, not
slower), Liger's fused loss head for a causal LM, Adam's fused kernels, gradient checkpointing
(about a third more compute), its saved inputs offloaded to the host (PCIe copies), 8-bit
optimizer state, LoRA then QLoRA (a different training job), then bigger cards. Where that
ladder does not fit a causal LM, a second one splits the sequence over 2 then 4 GPUs (context
parallelism under fsdp: more GPUs per sample) with what composes with it (the same kernels and
checkpointing, LoRA), then bigger cards. Changes accumulate: each rung is planned on top of the
ones before (one that does not apply on top of them is passed over), and the first combination
whose plan is feasible is kept; then each change it can do without is dropped, the costliest
first (a bigger card may make the earlier changes unnecessary). The answer carries its exact max
micro-batch, its GPUs and its throughput. More GPUs for more samples are the scale-out answer
beside it (`result.scale_out`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.schemas.result import FitSuggestion, PlanResult
from service.schemas.spec import (
    OPTIMIZER_IMPLS,
    SHARDED,
    PeftSpec,
    SimulatedDeviceSpec,
    TrainingSpec,
)
from workers.engine.compiled import CompiledJob
from workers.engine.context_parallel import check as check_context_parallel
from workers.engine.devices import ProbeDevice, open_device
from workers.engine.errors import SpecError
from workers.engine.optimizers import bitsandbytes_available
from workers.engine.what_if import Change, bigger_gpu, causal_lm, other_precision, with_training

# (job, device) -> the job's plan on the device; its probes reported under `label`
PlanFn = Callable[[CompiledJob, ProbeDevice, str], PlanResult]
MAX_CARDS = 3  # bigger cards tried, each the next one up the catalogue
CONTEXT_PARALLEL = (2, 4)  # ranks a sequence is split over, tried in turn


@dataclass(frozen=True)
class Rung:
    """One change: `apply` makes it on a job (None where it does not apply to that job)."""

    change: str
    value: str | bool | int
    apply: Callable[[CompiledJob], CompiledJob | None]


def first_fit(job: CompiledJob, device: ProbeDevice, plan: PlanFn) -> FitSuggestion | None:
    """Climb the one-GPU ladder, then (for a causal LM) the one that splits the sequence over
    more GPUs, until the plan is feasible; then drop each change it can do without, the
    costliest first: a small set of changes that fits (None: neither ladder does)."""
    for rungs in (_ladder(job, device), _split_ladder(job, device)):
        found = _fit(job, device, rungs, plan)
        if found is not None:
            return found
    return None


def _fit(
    job: CompiledJob, device: ProbeDevice, rungs: list[Rung], plan: PlanFn
) -> FitSuggestion | None:
    for top in range(1, len(rungs) + 1):
        found = _try(job, device, rungs[:top], plan, climbing=True)
        if found is not None:
            break
    else:
        return None
    kept = rungs[:top]
    for rung in reversed(rungs[: top - 1]):  # the last rung made it fit: keep it
        fewer = [r for r in kept if r is not rung]
        lighter = _try(job, device, fewer, plan)
        if lighter is not None:
            kept, found = fewer, lighter
    return found


def _try(
    job: CompiledJob, device: ProbeDevice, rungs: list[Rung], plan: PlanFn, climbing: bool = False
) -> FitSuggestion | None:
    """The plan of `job` with `rungs` applied in order, if it is feasible. `climbing`: the
    last rung is the one added, so a combination it does not change is not planned again."""
    changes: dict[str, str | bool | int] = {}
    for index, rung in enumerate(rungs):
        changed = rung.apply(job)
        if changed is None:  # not on top of the changes before it
            if climbing and index == len(rungs) - 1:
                return None
            continue
        job = changed
        changes[rung.change] = rung.value
    if not changes:
        return None
    target = open_device(job) if "gpu" in changes else device
    label = "fit:" + changes_text(changes, ",")
    try:
        result = plan(job, target, label)
    except SpecError:  # a combination the engine refuses (say, a model peft cannot wrap)
        return None
    if not result.feasible:
        return None
    throughput = result.throughput
    return FitSuggestion(
        changes=changes,
        device=result.device,
        world_size=result.world_size,
        max_micro_batch_size=result.max_micro_batch_size,
        micro_batch_size=result.micro_batch_size,
        accumulation_steps=result.accumulation_steps,
        samples_per_second=throughput.samples_per_second if throughput else None,
    )


def changes_text(changes: dict[str, str | bool | int], separator: str = ", ") -> str:
    """`field=value` for each change, booleans as the spec writes them."""
    text = (str(v).lower() if isinstance(v, bool) else str(v) for v in changes.values())
    return separator.join(f"{k}={v}" for k, v in zip(changes, text, strict=True))


def _training(field: Change, value: str | bool) -> Callable[[CompiledJob], CompiledJob]:
    return lambda job: with_training(job, field, value).job


def _on_card(card: str) -> Callable[[CompiledJob], CompiledJob]:
    spec = SimulatedDeviceSpec(kind="simulated", gpu=card)
    return lambda job: job.with_device(spec)


def _ladder(job: CompiledJob, device: ProbeDevice) -> list[Rung]:
    """The changes that apply to this job, cheapest first."""
    return _changes(job, device) + _state_and_adapters(job) + _cards(job, device)


def _split_ladder(job: CompiledJob, device: ProbeDevice) -> list[Rung]:
    """The changes of a job whose sequence is split over 2, then 4 GPUs: what composes with
    fsdp (LoRA; not 8-bit state nor QLoRA, which are not sharded), then bigger cards. Empty
    where context parallelism does not apply."""
    t = job.training
    if not causal_lm(job) or t.strategy not in ("none", "fsdp") or t.auto_world_size:
        return []
    lora = [r for r in _state_and_adapters(job) if r.value == "lora"]
    split = [Rung("parallelism.context_parallel", n, _split_sequence(n)) for n in CONTEXT_PARALLEL]
    return _changes(job, device) + lora + split + _cards(job, device)


def _changes(job: CompiledJob, device: ProbeDevice) -> list[Rung]:
    """Kernels, precision and checkpointing: the same job, less memory."""
    t = job.training
    rungs: list[Rung] = []
    if t.precision == "fp32":
        precision = other_precision("fp32", device)
        rungs.append(Rung("precision", precision, _training("precision", precision)))
    if t.loss_kernel == "standard" and causal_lm(job):
        rungs.append(Rung("loss_kernel", "liger", _training("loss_kernel", "liger")))
    if t.implementation == "foreach" and "fused" in OPTIMIZER_IMPLS[t.optimizer]:
        rungs.append(Rung("optimizer_impl", "fused", _training("optimizer_impl", "fused")))
    if not t.gradient_checkpointing:
        rungs.append(
            Rung("gradient_checkpointing", True, _training("gradient_checkpointing", True))
        )
    if not t.checkpointing.offload:
        rungs.append(Rung("checkpointing.offload", True, _offloaded))
    return rungs


def _state_and_adapters(job: CompiledJob) -> list[Rung]:
    """8-bit optimizer state, then adapters: less state, or a different training job."""
    t = job.training
    rungs: list[Rung] = []
    if t.optimizer in ("adam", "adamw") and t.strategy not in SHARDED and bitsandbytes_available():
        rungs.append(Rung("optimizer", "adamw_8bit", _eight_bit))
    if job.model.source == "transformers" and (t.peft is None or t.peft.method == "lora"):
        if t.peft is None:
            rungs.append(Rung("peft", "lora", lambda j: _with_peft(j, "lora")))
        if t.strategy not in SHARDED:
            rungs.append(Rung("peft", "qlora", lambda j: _with_peft(j, "qlora")))
    return rungs


def _cards(job: CompiledJob, device: ProbeDevice) -> list[Rung]:
    """Up to three bigger cards, each the next one up the catalogue."""
    t = job.training
    rungs: list[Rung] = []
    if job.device.kind != "cpu":
        capacity = device.memory_bytes
        for _ in range(MAX_CARDS):
            card = bigger_gpu(capacity, t.precision)
            if card is None:
                break
            rungs.append(Rung("gpu", card.name, _on_card(card.name)))
            capacity = card.memory_bytes
    return rungs


def _offloaded(job: CompiledJob) -> CompiledJob | None:
    """The checkpoints' saved inputs on the host: only on top of checkpointing."""
    t = job.training
    if not t.gradient_checkpointing:
        return None
    policy = t.checkpointing.model_copy(update={"offload": True})
    return job.with_training(t.model_copy(update={"checkpointing": policy}))


def _split_sequence(n: int) -> Callable[[CompiledJob], CompiledJob | None]:
    """Each sample's sequence over n ranks (fsdp with context parallelism), n times the GPUs
    of one sequence group before."""

    def apply(job: CompiledJob) -> CompiledJob | None:
        t = job.training
        world = t.world_size // t.parallelism.context_parallel * n
        parallelism = t.parallelism.model_dump() | {
            "strategy": "fsdp",
            "context_parallel": n,
            "world_size": world,
        }
        try:
            training = TrainingSpec.model_validate(
                t.model_dump() | {"world_size": world, "parallelism": parallelism}
            )
            changed = job.with_training(training)
            check_context_parallel(changed)
        except (ValueError, SpecError):  # the spec refuses it (QLoRA is not sharded) or the ring
            return None
        return changed

    return apply


def _eight_bit(job: CompiledJob) -> CompiledJob | None:
    t = job.training
    if t.optimizer not in ("adam", "adamw"):
        return None
    return job.with_training(
        t.model_validate(t.model_dump() | {"optimizer": "adamw_8bit", "optimizer_impl": None})
    )


def _with_peft(job: CompiledJob, method: str) -> CompiledJob:
    peft = job.training.peft or PeftSpec(method="lora")
    return job.with_training(
        job.training.model_copy(update={"peft": peft.model_copy(update={"method": method})})
    )
