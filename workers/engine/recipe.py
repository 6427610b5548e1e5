"""The training recipe around the batch: per-layer learning rates, the schedule's fit to the
run, early stopping, and the optimizer adjustments the square-root rule implies.

Malladi et al. (2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"): when an
adaptive optimizer's batch grows by k and its learning rate by sqrt(k), the moment decays follow
as beta -> 1 - k(1 - beta) and epsilon as eps / sqrt(k). For k >= 1 / (1 - beta) that would make
beta non-positive: the approximation behind the rule no longer holds, and the plan says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.schemas.spec import BNB_OPTIMIZERS, TrainingSpec, algorithm
from workers.engine.errors import SpecError
from workers.engine.optimizers import bitsandbytes_available

if TYPE_CHECKING:
    from workers.engine import ModelFacts

# PyTorch's defaults, which the spec's adaptive optimizers run with.
DEFAULT_BETAS = {"adam": (0.9, 0.999), "adamw": (0.9, 0.999), "rmsprop": (0.99,)}
DEFAULT_EPS = 1e-8


@dataclass(frozen=True)
class Adjustment:
    """Optimizer hyper-parameters matching the scaled batch (`applies` False: out of range)."""

    k: float
    betas: tuple[float, ...]
    eps: float
    applies: bool

    @property
    def kwargs(self) -> dict[str, object]:
        """Keyword arguments of the torch optimizer (RMSprop names its one decay `alpha`)."""
        if len(self.betas) == 1:
            return {"alpha": self.betas[0], "eps": self.eps}
        return {"betas": self.betas, "eps": self.eps}


def sde_adjustment(optimizer: str, rule: str, k: float) -> Adjustment | None:
    """Betas and epsilon for an adaptive optimizer under the square-root rule (None: not one)."""
    base = algorithm(optimizer)
    if rule != "sqrt" or base not in DEFAULT_BETAS or k == 1:
        return None
    betas = tuple(1 - k * (1 - b) for b in DEFAULT_BETAS[base])
    applies = all(0 < b < 1 for b in betas)
    return Adjustment(k, tuple(round(b, 12) for b in betas), DEFAULT_EPS / math.sqrt(k), applies)


def estimated_total_steps(training: TrainingSpec, num_samples: int) -> tuple[int, int]:
    """Optimizer steps per epoch and in all from the requested global batch: the plan's
    effective batch is never smaller, so its run is never longer than this."""
    per_epoch = math.ceil(num_samples / training.global_batch_size)
    return per_epoch, math.ceil(training.epochs * per_epoch)


def check(training: TrainingSpec, num_samples: int, facts: ModelFacts) -> None:
    """What the schema cannot see: a group prefix that matches no trainable parameter, a
    schedule whose milestones or step size lie past the end of the run, a bitsandbytes optimizer
    on a server without bitsandbytes."""
    _check_groups(training, facts.trainable)
    _check_loss_kernel(training, facts.causal_lm)
    _check_schedule(training, num_samples)
    _check_optimizer(training)


def _check_loss_kernel(training: TrainingSpec, causal_lm: bool) -> None:
    if training.loss_kernel != "standard" and not causal_lm:
        raise SpecError(
            ("training", "loss_kernel"),
            f"loss_kernel {training.loss_kernel!r} fuses a causal LM's output head with its "
            "loss: the model is not a transformers *ForCausalLM (use 'standard')",
        )


def _check_optimizer(training: TrainingSpec) -> None:
    optimizer = training.optimizer
    if optimizer in BNB_OPTIMIZERS and not bitsandbytes_available():
        raise SpecError(
            ("training", "optimizer"),
            f"this server lacks bitsandbytes, which {optimizer} needs (the 'peft' extra)",
        )


def _check_groups(training: TrainingSpec, names: tuple[str, ...]) -> None:
    frozen = training.trainable
    for i, group in enumerate(training.param_groups or ()):
        matched = [n for n in names if n.startswith(group.prefix)]
        if frozen != "all":
            matched = [n for n in matched if not any(n.startswith(f) for f in frozen)]
        if not matched:
            sample = ", ".join(n.rsplit(".", 1)[0] for n in names[:3])
            raise SpecError(
                ("training", "param_groups", i, "prefix"),
                f"{group.prefix!r} matches no trainable parameter (names look like: {sample})",
            )


def _check_schedule(training: TrainingSpec, num_samples: int) -> None:
    schedule = training.schedule
    per_epoch, total = estimated_total_steps(training, num_samples)
    per = per_epoch if schedule.unit == "epochs" else 1
    unit = schedule.unit
    length = f"{total} optimizer steps ({training.epochs:g} epochs of {per_epoch})"
    if schedule.name == "multistep" and schedule.milestones:
        late = [m for m in schedule.milestones if m * per >= total]
        if late:
            raise SpecError(
                ("training", "schedule", "milestones"),
                f"milestones {late} ({unit}) lie past the run: it has {length}",
            )
    if schedule.name == "one_cycle" and schedule.pct_start * total <= 1:
        raise SpecError(
            ("training", "schedule", "pct_start"),
            f"pct_start {schedule.pct_start:g} of a {length} run leaves OneCycleLR no rising "
            "phase (it divides by zero): the run needs more than 1 / pct_start steps",
        )
    if schedule.name == "step" and schedule.step_size and schedule.step_size * per >= total:
        raise SpecError(
            ("training", "schedule", "step_size"),
            f"step_size {schedule.step_size:g} ({unit}) never decays: the run has {length}",
        )


def param_groups(training: TrainingSpec) -> list[tuple[str, float]]:
    """(prefix, lr_scale) in the order the first match is taken."""
    return [(g.prefix, g.lr_scale) for g in training.param_groups or ()]
