"""The learning-rate schedule: one closed form the plan's figures come from and every config runs.

Steps are optimizer steps (one per accumulation window), counted from 0; `lr_factor(step)` is the
multiplier of the plan's (scaled) learning rate for that step. Warm-up is linear from 0, as the
Hugging Face Trainer's: step / warmup. Then the decay: `linear` and `cosine` run from the
end of warm-up to the last step (down to `floor`); `step` and `multistep` count from step 0 (a
milestone means the same step with or without warm-up); `exponential` decays from the end of
warm-up; `one_cycle` is PyTorch's OneCycleLR (its own warm-up, `pct_start`). `plateau` is flat
here: its cuts depend on a validation metric, so the plan's figures are an upper bound.

The functions below are rendered verbatim into the configs (`SOURCE`), so the PyTorch loop,
Lightning and the fall-backs for the HF Trainer and DeepSpeed run the very code the plan uses.
"""

from __future__ import annotations

import bisect
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from service.schemas.spec import ScheduleSpec


def lr_factor(step: int, schedule: dict[str, Any]) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    name, warmup, total = schedule["name"], schedule["warmup"], schedule["total"]
    if name == "one_cycle":
        return one_cycle(step, total, schedule)
    if step < warmup:
        return step / warmup
    floor = schedule.get("floor", 0.0)
    decay = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay)
    if name == "linear":
        return floor + (1 - floor) * (1 - progress)
    if name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "step":
        return float(schedule["gamma"] ** (step // schedule["step_size"]))
    if name == "multistep":
        return float(schedule["gamma"] ** bisect.bisect_right(schedule["milestones"], step))
    if name == "exponential":
        return float(schedule["gamma"] ** (step - warmup))
    return 1.0  # constant, and plateau before any cut


def one_cycle(step: int, total: int, schedule: dict[str, Any]) -> float:
    """PyTorch's OneCycleLR (two phases, cosine annealing) relative to its max_lr."""
    initial = 1 / schedule["div_factor"]
    least = initial / schedule["final_div_factor"]
    peak_step = float(schedule["pct_start"] * total) - 1
    if step <= peak_step:
        start, end, pct = initial, 1.0, step / peak_step
    else:
        start, end, pct = 1.0, least, (step - peak_step) / (total - 1 - peak_step)
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


IMPORTS = "import bisect\nimport math\nfrom typing import Any\n"
SOURCE = "\n\n".join(inspect.getsource(f) for f in (lr_factor, one_cycle))

LINEAR_START = 1e-10  # torch's LinearLR needs a start factor above 0
NATIVE_HF = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass(frozen=True)
class Schedule:
    """A spec's schedule resolved against the run: steps, not epochs."""

    name: str
    warmup: int
    total: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> dict[str, Any]:
        """The argument `lr_factor` takes (rendered as a literal into the configs)."""
        return {"name": self.name, "warmup": self.warmup, "total": self.total, **self.params}

    def factor(self, step: int) -> float:
        return lr_factor(step, self.table)

    @property
    def warmup_end(self) -> int:
        if self.name == "one_cycle":
            return max(0, math.ceil(self.params["pct_start"] * self.total) - 1)
        return self.warmup

    def points(self) -> list[tuple[str, int]]:
        """The steps a person checks: start, end of warm-up, quarters, the last step."""
        last = max(0, self.total - 1)
        marks = [("start", 0), ("warmup_end", min(self.warmup_end, last))]
        marks += [(f"{p}%", round(last * p / 100)) for p in (25, 50, 75)]
        return [*marks, ("end", last)]

    @property
    def hf_native(self) -> tuple[str, dict[str, Any]] | None:
        """The HF Trainer's `lr_scheduler_type` and kwargs that equal this schedule, if any."""
        floor = self.params.get("floor", 0.0)
        if self.name == "cosine" and floor:
            return "cosine_with_min_lr", {"min_lr_rate": floor}
        if self.name in NATIVE_HF and not floor:
            return NATIVE_HF[self.name], {}
        if self.name == "plateau" and not self.warmup:
            return "reduce_lr_on_plateau", self.plateau_kwargs
        return None

    @property
    def plateau_kwargs(self) -> dict[str, Any]:
        p = self.params
        return {"mode": p["mode"], "factor": p["factor"], "patience": p["patience"]}

    def deepspeed_native(self, peak: float) -> dict[str, Any] | None:
        """A DeepSpeed `scheduler` block equal to this schedule, if any (None for a constant
        rate without warm-up too: none is needed). DeepSpeed resolves torch.optim's schedulers
        by name; its own warm-up schedulers start one step later than this one (their first
        step keeps `warmup_min_lr`), so a warm-up is torch's LinearLR from a start factor of
        1e-10 (PyTorch requires more than 0), and a warm-up followed by a decay, which needs
        two chained schedulers, goes to `deepspeed.initialize(lr_scheduler=...)`."""
        p = self.params
        if self.name == "one_cycle":
            return {
                "type": "OneCycleLR",
                "params": {"max_lr": peak, "total_steps": self.total, **p},
            }
        if self.name == "constant" and self.warmup:
            warmup = {"start_factor": LINEAR_START, "end_factor": 1.0, "total_iters": self.warmup}
            return {"type": "LinearLR", "params": warmup}
        if self.warmup:
            return None
        blocks = {
            "step": ("StepLR", ("step_size", "gamma")),
            "multistep": ("MultiStepLR", ("milestones", "gamma")),
            "exponential": ("ExponentialLR", ("gamma",)),
        }
        if self.name not in blocks:
            return None
        name, keys = blocks[self.name]
        return {"type": name, "params": {k: p[k] for k in keys}}


def resolve(
    spec: ScheduleSpec, suggested_warmup: int, steps_per_epoch: int, total: int
) -> Schedule:
    """Warm-up: the spec's (steps or a fraction of the run), else the planner's suggestion;
    epoch-denominated step sizes and milestones become optimizer steps."""
    if spec.warmup_steps is not None:
        warmup = spec.warmup_steps
    elif spec.warmup_ratio is not None:
        warmup = math.ceil(spec.warmup_ratio * total)
    else:
        warmup = suggested_warmup
    warmup = min(warmup, max(0, total - 1))
    per = steps_per_epoch if spec.unit == "epochs" else 1
    params: dict[str, Any] = {}
    if spec.name in ("linear", "cosine"):
        params["floor"] = spec.min_lr_ratio
    elif spec.name == "step" and spec.step_size is not None:
        params |= {"step_size": max(1, round(spec.step_size * per)), "gamma": spec.gamma}
    elif spec.name == "multistep" and spec.milestones is not None:
        params |= {"milestones": [round(m * per) for m in spec.milestones], "gamma": spec.gamma}
    elif spec.name == "exponential":
        params["gamma"] = spec.gamma ** (1 / per)
    elif spec.name == "plateau":
        params |= {
            "mode": spec.mode,
            "factor": spec.factor,
            "patience": spec.patience,
            "monitor": spec.monitor,
        }
    elif spec.name == "one_cycle":
        warmup = 0
        params |= {
            "pct_start": spec.pct_start,
            "div_factor": spec.div_factor,
            "final_div_factor": spec.final_div_factor,
        }
    return Schedule(spec.name, warmup, max(1, total), params)
