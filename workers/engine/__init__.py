"""The profiling engine, usable with no server around it. Its public face (what the API, the CLI
and the worker's child process call; nothing else of the engine is theirs to import):

- `check(spec)`: what submit checks beyond the schema (the model builds on the meta device, LoRA
  targets and param-group prefixes exist, the schedule fits the run, the card and runtime are
  known, a strategy runs on the device kind); raises
  `SpecError` naming the field.
- `plan(spec, on_trial=None)`: the plan (`PlanResult`), reporting each probe as it happens.
- `gpus()`: the simulated device's catalogue.
- `versions()`: what a plan's answer depends on besides its spec (engine, torch, catalogue).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from service.schemas.result import PlanResult, Trial
from service.schemas.spec import PlanSpec
from workers.engine.errors import SpecError

__all__ = ["SpecError", "check", "gpus", "plan", "versions"]

# Bumped whenever the engine answers the same spec differently (a new model of memory, a new
# field in the result): plans made before are then not reused for new submits.
ENGINE_REVISION = 17


def check(spec: PlanSpec) -> None:
    from workers.engine import recipe
    from workers.engine.devices import open_device
    from workers.engine.models import build_model

    if spec.device.kind == "simulated":  # a real device is the worker's to open
        open_device(spec)
    elif spec.training.parallelism.strategy not in (None, "none"):
        raise SpecError(
            ("training", "parallelism", "strategy"),
            "multi-GPU strategies are traced on the simulated device (device.kind "
            "'simulated'); a real device probes one process",
        )
    recipe.check(spec, build_model(spec).module)


def plan(spec: PlanSpec, on_trial: Callable[[Trial], None] | None = None) -> PlanResult:
    from workers.engine.profile import ProfileHooks, run_plan

    return run_plan(spec, ProfileHooks(on_trial=on_trial))


def gpus() -> list[dict[str, Any]]:
    from workers.engine.catalogue import GPU_CATALOGUE

    return [g.as_json() for g in GPU_CATALOGUE.values()]


@cache
def versions() -> dict[str, str]:
    import hashlib
    import json
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        package = version("trainplan")
    except PackageNotFoundError:  # run from a source tree without installing
        package = "0"
    catalogue = json.dumps(gpus(), sort_keys=True).encode()
    return {
        "engine": f"{package}+r{ENGINE_REVISION}",
        "torch": torch.__version__,
        "catalogue": hashlib.sha256(catalogue).hexdigest()[:12],
    }
