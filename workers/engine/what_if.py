"""What-if: the max micro-batch under the choices a user would try next.

After the plan, the same exact search runs for each neighbouring job: the other precision, gradient
checkpointing toggled, Liger's fused loss head for a causal LM, the next bigger card of the
catalogue, LoRA and the next sharding strategy, and for Adam the fused kernels and 8-bit states.
One request then answers "would bf16 / checkpointing / an H200 / adamw_8bit let me double the
batch?" without a second round trip.
A card that is not in the worker is always simulated; the other changes run on the plan's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.schemas.result import DeviceInfo, Trial, WhatIf, WhatIfChange
from service.schemas.spec import (
    OPTIMIZER_IMPLS,
    SHARDED,
    PeftSpec,
    SimulatedDeviceSpec,
    TrainingSpec,
)
from workers.engine.catalogue import ALIASES, GPU_CATALOGUE, GpuModel
from workers.engine.compiled import CompiledJob
from workers.engine.devices import ProbeDevice, TrialOutcome, open_device, open_session
from workers.engine.devices.base import ProbeSession
from workers.engine.errors import SpecError
from workers.engine.models import build_model
from workers.engine.optimizers import bitsandbytes_available
from workers.engine.search import find_max_batch

Change = WhatIfChange
# The strategy that keeps less per rank than each one.
NEXT_STRATEGY = {"ddp": "zero1", "zero1": "zero2", "zero2": "fsdp"}
# (session, scenario label) -> a probe that records and reports each trial
MakeProbe = Callable[[ProbeSession, str], Callable[[int], TrialOutcome]]


@dataclass(frozen=True)
class Scenario:
    change: Change
    value: str | bool
    job: CompiledJob

    @property
    def label(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return f"{self.change}={value}"


# Adam's fused kernels and 8-bit states are offered where its state is at least this share of
# the card: below it they free too little to buy a sample (a small CNN), and cost a search.
OPTIMIZER_STATE_SHARE = 0.1


def neighbours(job: CompiledJob, device: ProbeDevice, state_share: float = 0.0) -> list[Scenario]:
    """`state_share`: the plan's optimizer state over the card's capacity."""
    training = job.training
    out = [
        with_training(job, "precision", other_precision(training.precision, device)),
        with_training(job, "gradient_checkpointing", not training.gradient_checkpointing),
    ]
    if job.device.kind != "cpu":
        bigger = bigger_gpu(device.memory_bytes, training.precision)
        if bigger is not None:
            card = SimulatedDeviceSpec(kind="simulated", gpu=bigger.name)
            out.append(Scenario("gpu", bigger.name, job.with_device(card)))
    if training.loss_kernel == "standard" and causal_lm(job):
        out.append(with_training(job, "loss_kernel", "liger"))
    out += _scale_neighbours(job)
    if state_share >= OPTIMIZER_STATE_SHARE:
        out += _optimizer_neighbours(job)
    return out


def _optimizer_neighbours(job: CompiledJob) -> list[Scenario]:
    """The fused kernels (no multi-tensor temporary copy of the state) and bitsandbytes' 8-bit
    AdamW, where they apply: what each frees shows as the micro-batch it buys."""
    training = job.training
    out = []
    if training.implementation == "foreach" and "fused" in OPTIMIZER_IMPLS[training.optimizer]:
        out.append(with_training(job, "optimizer_impl", "fused"))
    if (
        training.optimizer in ("adam", "adamw")
        and training.strategy not in SHARDED
        and bitsandbytes_available()
    ):
        eight_bit = TrainingSpec.model_validate(
            training.model_dump() | {"optimizer": "adamw_8bit", "optimizer_impl": None}
        )
        out.append(Scenario("optimizer", "adamw_8bit", job.with_training(eight_bit)))
    return out


def _scale_neighbours(job: CompiledJob) -> list[Scenario]:
    """LoRA for a full fine-tune (QLoRA for a LoRA one), and the next sharding strategy."""
    training = job.training
    out = []
    peft = training.peft
    if peft is None and job.model.source == "transformers":
        out.append(_with_peft(job, PeftSpec(method="lora")))
    elif peft is not None and peft.method == "lora" and training.strategy not in SHARDED:
        out.append(_with_peft(job, peft.model_copy(update={"method": "qlora"})))
    following = NEXT_STRATEGY.get(training.strategy)
    if following is not None and job.device.kind == "simulated":
        parallelism = training.parallelism.model_copy(update={"strategy": following})
        changed = training.model_copy(update={"parallelism": parallelism})
        out.append(Scenario("strategy", following, job.with_training(changed)))
    return out


def causal_lm(job: CompiledJob) -> bool:
    """A transformers *ForCausalLM, told from the spec (the compile step's answer)."""
    return job.launch.causal_lm


def _with_peft(job: CompiledJob, peft: PeftSpec) -> Scenario:
    training = job.training.model_copy(update={"peft": peft})
    return Scenario("peft", peft.method, job.with_training(training))


def other_precision(precision: str, device: ProbeDevice) -> str:
    """fp32 -> mixed (bf16 where the card has it); mixed -> pure bf16 (or fp32 without bf16);
    pure bf16 -> bf16-mixed (fp32 master weights)."""
    if precision == "fp32":
        return "bf16-mixed" if device.supports_bf16 else "fp16-mixed"
    if precision == "bf16":
        return "bf16-mixed"
    return "bf16" if device.supports_bf16 else "fp32"


def bigger_gpu(capacity: int, precision: str) -> GpuModel | None:
    """The smallest catalogued card with at least 5% more memory (bf16-capable if the plan uses
    bf16); between equals, the fastest."""
    needs_bf16 = precision in ("bf16", "bf16-mixed")
    candidates = [
        g
        for name, g in GPU_CATALOGUE.items()
        if name not in ALIASES
        and g.memory_bytes > capacity * 1.05
        and (g.supports_bf16 or not needs_bf16)
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda g: (g.memory_bytes, -g.tflops(precision)))


def with_training(job: CompiledJob, field: Change, value: str | bool) -> Scenario:
    # validated again: a changed field can make the spec's other choices inconsistent
    changed = job.training.model_dump() | {field: value}
    if field == "gradient_checkpointing" and not value:  # nothing checkpointed to offload
        changed["checkpointing"] = changed["checkpointing"] | {"offload": False}
    training = TrainingSpec.model_validate(changed)
    return Scenario(field, value, job.with_training(training))


def explore(
    job: CompiledJob,
    device: ProbeDevice,
    make_probe: MakeProbe,
    to_trial: Callable[[TrialOutcome, str], Trial],
    state_share: float = 0.0,
) -> list[WhatIf]:
    """Run the exact search for each neighbour; a neighbour that cannot be built or traced is
    skipped."""
    out = []
    for scenario in neighbours(job, device, state_share):
        changed = scenario.job
        target = open_device(changed) if scenario.change == "gpu" else device
        try:
            built = build_model(changed.model, changed.data, changed.peft)
        except SpecError:
            continue
        try:
            with open_session(target, changed, built) as session:
                search = find_max_batch(
                    make_probe(session, scenario.label),
                    session.limit_bytes,
                    job.search.max_batch_size,
                    session.predict_fits,
                )
        except SpecError:  # the neighbour cannot be traced (Unsupported): the plan still stands
            continue
        best = search.outcome_at(search.max_batch) if search.max_batch else search.trials[0]
        assert best is not None
        out.append(
            WhatIf(
                change=scenario.change,
                value=scenario.value,
                device=DeviceInfo(
                    backend=target.backend,
                    name=target.name,
                    memory_bytes=target.memory_bytes,
                ),
                feasible=search.max_batch > 0,
                max_micro_batch_size=search.max_batch,
                peak_bytes=best.peak_bytes,
                search_bound_reached=search.bound_reached,
                trials=[to_trial(o, scenario.label) for o in search.trials],
            )
        )
    return out
