"""Plan arithmetic: micro-batch choice, accumulation, LR scaling, epochs. Pure functions, no torch.

micro x accumulation x world_size = effective global batch, as close to the requested global batch
as the choice allows (exact with `divisor` when world_size divides it). The learning rate follows
Goyal et al. (2017): linear for SGD with a gradual warm-up when the factor is large; the
square-root rule for adaptive optimizers (Adam family), whose updates are normalised per
coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.schemas.spec import algorithm

ADAPTIVE = frozenset({"adam", "adamw", "rmsprop", "adagrad", "adafactor", "lion"})
WARMUP_EPOCHS = 5  # Goyal et al.: 5 epochs of linear warm-up for large-batch SGD
WARMUP_MAX_FRACTION = 0.1  # never more than a tenth of the whole run


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    accumulation_steps: int
    effective_global_batch_size: int


@dataclass(frozen=True)
class LrPlan:
    rule: str
    factor: float
    learning_rate: float
    warmup_steps: int


@dataclass(frozen=True)
class EpochPlan:
    iterations_per_epoch: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int


def per_rank_batch(global_batch: int, world_size: int) -> int:
    return math.ceil(global_batch / world_size)


def choose_batches(max_micro: int, global_batch: int, world_size: int, mode: str) -> BatchPlan:
    """Pick the micro-batch (<= max_micro) and the accumulation steps for the global batch."""
    if max_micro < 1:
        raise ValueError("max_micro must be at least 1")
    per_rank = per_rank_batch(global_batch, world_size)
    cap = min(max_micro, per_rank)
    if mode == "max":
        micro = cap
    elif mode == "power_of_two":
        micro = 1 << (cap.bit_length() - 1)
    elif mode == "divisor":
        micro = max(d for d in _divisors(per_rank) if d <= cap)
    else:
        raise ValueError(f"unknown micro_batch mode {mode!r}")
    accumulation = math.ceil(per_rank / micro)
    return BatchPlan(micro, accumulation, micro * accumulation * world_size)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in small]


def resolve_rule(rule: str, optimizer: str) -> str:
    if rule != "auto":
        return rule
    return "sqrt" if algorithm(optimizer) in ADAPTIVE else "linear"


def scale_lr(
    base_lr: float,
    base_batch: int,
    effective_batch: int,
    rule: str,
    optimizer: str,
    steps_per_epoch: int,
    total_steps: int,
) -> LrPlan:
    resolved = resolve_rule(rule, optimizer)
    ratio = effective_batch / base_batch
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[resolved]
    warmup = 0
    if factor > 1.0:
        warmup = min(WARMUP_EPOCHS * steps_per_epoch, math.ceil(WARMUP_MAX_FRACTION * total_steps))
    return LrPlan(resolved, factor, base_lr * factor, warmup)


def epoch_arithmetic(
    num_samples: int, micro: int, world_size: int, global_batch: int, epochs: float
) -> EpochPlan:
    iterations = math.ceil(num_samples / (micro * world_size))
    steps = math.ceil(num_samples / global_batch)
    return EpochPlan(iterations, steps, math.ceil(epochs * steps))
