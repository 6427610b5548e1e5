"""The profiling engine, usable with no server around it. Its public face (what the API, the CLI
and the worker's child process call; nothing else of the engine is theirs to import):

- `check(spec, facts=None)`: what submit checks beyond the schema (the model builds on the meta
  device, LoRA targets and param-group prefixes exist, the schedule fits the run, the card and
  runtime are known, a strategy runs on the device kind); raises `SpecError` naming the field.
- `model_facts(spec)` / `model_key(spec)`: the costly part of `check` (building the model) and
  the key its outcome depends on, so a caller can cache it across specs that share the model.
- `plan(spec, on_trial=None)`: the plan (`PlanResult`), reporting each probe as it happens.
- `gpus()`: the simulated device's catalogue.
- `versions()`: what a plan's answer depends on besides its spec (engine, torch, catalogue).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from service.schemas.result import PlanResult, Trial
from service.schemas.spec import PlanSpec
from workers.engine import recipe
from workers.engine.catalogue import GPU_CATALOGUE
from workers.engine.compiled import compile_job
from workers.engine.context_parallel import check as check_context_parallel
from workers.engine.devices import open_device
from workers.engine.errors import SpecError, Unsupported
from workers.engine.loss_head import is_causal_lm
from workers.engine.models import build_model
from workers.engine.profile import ProfileHooks, run_plan
from workers.engine.sequence_search import check_target
from workers.engine.tensor_parallel import check as check_tensor_parallel
from workers.engine.tensor_parallel import check_sequence_parallel

__all__ = [
    "ModelFacts",
    "SpecError",
    "Unsupported",
    "check",
    "gpus",
    "model_facts",
    "model_key",
    "plan",
    "versions",
]

# Bumped whenever the engine answers the same spec differently (a new model of memory, a new
# field in the result): plans made before are then not reused for new submits.
# 19: training.loss_kernel (Liger's loss head), sequence-length search, fits_with, and no
# causal mask in a transformers trace that a GPU would not build
# 20: MoE models (result.moe), depth folding, the reserve search's width (1/1024 of its
# bound), activation offload (training.checkpointing.offload, the split's offload_s),
# context parallelism, checkpointing auto, causal attention FLOPs at the share computed, and
# sharded optimizer steps costed on the local shards
# 21: padded or packed rows give sdpa and eager transformers' square mask (sdpa_square_mask),
# flex_attention, loss_kernel cut_cross_entropy, the trl_sft and axolotl renderings,
# checkpointing.selective "op", split.recompute_s/_bytes, and weight casts dropped when a
# checkpoint's recomputation leaves autocast; the timm model source
# 22: parallelism.tensor_parallel (traced per rank), split.tensor_parallel_s/_bytes, FSDP's
# traffic under TP; evaluation settings in the trl_sft and axolotl renderings
# 23: metadata ops (prim.device) cost no time and the efficiencies are refitted (every
# plan's throughput moves); launch specs for SkyPilot, Kubeflow's TrainJob and Ray Train
# 24: result.risk (the chance of running out of memory, calibrated), the throughput band from
# the calibration rows' percentiles (band_coverage), prediction.peak_ratio, the default
# search.headroom from the calibrated OOM rate
ENGINE_REVISION = 24


@dataclass(frozen=True)
class ModelFacts:
    """What the checks and the submit's price need of a built model: the names of its
    trainable parameters, its size, its layers that hold weights, and (for a token model) the
    width its embedding gives each token."""

    trainable: tuple[str, ...]
    parameters: int = 0
    weighted_layers: int = 0
    token_width: int | None = None
    causal_lm: bool = False  # a transformers *ForCausalLM: its loss head can be fused


def model_key(spec: PlanSpec) -> str:
    """The parts of a spec the model's build reads: the model, the data (input shape, classes,
    vocabulary) and the adapters. Specs equal in these build the same model."""
    part = spec.model_dump(mode="json", include={"model", "data"})
    part["peft"] = spec.training.model_dump(mode="json", include={"peft"}).get("peft")
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()


def model_facts(spec: PlanSpec) -> ModelFacts:
    """Build the model on the meta device (raising SpecError at the field that breaks it)."""
    module = build_model(spec.model, spec.data, spec.training.peft).module
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    embedding = next((m for m in leaves if isinstance(m, torch.nn.Embedding)), None)
    return ModelFacts(
        trainable=tuple(n for n, p in module.named_parameters() if p.requires_grad),
        parameters=sum(p.numel() for p in module.parameters()),
        weighted_layers=sum(1 for m in leaves if any(True for _ in m.parameters(recurse=False))),
        token_width=embedding.embedding_dim if embedding is not None else None,
        causal_lm=is_causal_lm(module),
    )


def check(spec: PlanSpec, facts: ModelFacts | None = None) -> None:
    job = compile_job(spec)
    if spec.device.kind == "simulated":  # a real device is the worker's to open
        open_device(job)
    else:
        _check_one_process(spec)
    check_target(job)
    check_context_parallel(job)
    check_tensor_parallel(job)
    check_sequence_parallel(job)
    recipe.check(spec.training, spec.data.num_samples, facts or model_facts(spec))


def _check_one_process(spec: PlanSpec) -> None:
    """A real device probes one process: a strategy or a layout is a 422 at its field; it
    measures its peaks, so the simulator's calibrated risk does not set its headroom."""
    if spec.search.max_oom_probability is not None:
        raise SpecError(
            ("search", "max_oom_probability"),
            "the calibrated risk is the simulated device's (device.kind 'simulated'); a real "
            "device measures its peaks: give search.headroom",
        )
    parallelism = spec.training.parallelism
    asked = {
        "strategy": parallelism.strategy not in (None, "none"),
        "layout": parallelism.layout != "fixed",
        "tensor_parallel": parallelism.tensor_parallel > 1,
        "context_parallel": parallelism.context_parallel > 1,
    }
    for field, set_ in asked.items():
        if set_:
            raise SpecError(
                ("training", "parallelism", field),
                "multi-GPU strategies and layouts are traced on the simulated device "
                "(device.kind 'simulated'); a real device probes one process",
            )


def plan(spec: PlanSpec, on_trial: Callable[[Trial], None] | None = None) -> PlanResult:
    return run_plan(compile_job(spec), ProfileHooks(on_trial=on_trial))


def gpus() -> list[dict[str, Any]]:
    return [g.as_json() for g in GPU_CATALOGUE.values()]


@cache
def versions() -> dict[str, str]:
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
