"""The plain PyTorch loop: a complete program rendered from `templates/pytorch_loop.py.j2`, run
for real by the tests (one process, and DDP and FSDP on gloo)."""

from __future__ import annotations

from functools import cache

import jinja2

from workers.engine.checkpointing import OP_POLICY_KEEPS
from workers.engine.configs.job import LaunchJob
from workers.engine.configs.numbers import (
    AUTOCAST_DTYPE,
    PlanNumbers,
    optimizer_kwargs,
    peft_settings,
)
from workers.engine.loss_head import CCE_PATCH, LIGER_LOSS_ONLY
from workers.engine.recipe_source import recipe_source


@cache
def _template() -> jinja2.Template:
    """Python, not HTML: nothing is escaped; values go in through `pyrepr` (their repr)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("workers.engine.configs", "templates"),
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pyrepr"] = repr
    return env.get_template("pytorch_loop.py.j2")


def pytorch_loop(job: LaunchJob, numbers: PlanNumbers) -> str:
    """A complete training loop with accumulation (loss / k, step every k, and at an epoch's end).
    A causal LM on token data collates its samples as planned (padded, or packed into rows).
    It expects `model`, `train_dataset` and, for non-Hugging Face models, `loss_fn`; with early
    stopping or a plateau schedule also `evaluate(model)`, returning the monitored metric."""
    ddp = numbers.world_size > 1
    evaluates = job.early_stopping is not None or numbers.plateau
    return _template().render(
        n=numbers,
        job=job,
        ddp=ddp,
        evaluates=evaluates,
        expected=_expected_names(job.hf, evaluates),
        recipe=recipe_source(numbers.lr_schedule, numbers.learning_rate, job.param_groups),
        peft=peft_settings(job) if job.peft is not None else None,
        per_node=min(job.gpus_per_node, job.world_size),
        mp_policy=_mixed_precision_policy(job.precision),
        opt_args="".join(f", {k}={v!r}" for k, v in optimizer_kwargs(job, numbers).items()),
        micro_step=_micro_step(job, ddp),
        better=_better(job),
        liger=LIGER_LOSS_ONLY,
        cce=CCE_PATCH,
        keeps=OP_POLICY_KEEPS,
        rows=job.tokens if job.causal_lm else None,
    )


def _expected_names(hf: bool, evaluates: bool) -> str:
    names = ["`model`", "`train_dataset`"]
    names += [] if hf else ["`loss_fn`"]
    names += ["`evaluate(model)` (the monitored metric)"] if evaluates else []
    return ", ".join(names[:-1]) + " and " + names[-1]


def _mixed_precision_policy(precision: str) -> str:
    low = AUTOCAST_DTYPE.get(precision)
    if low is None:
        return "MixedPrecisionPolicy()"
    return f"MixedPrecisionPolicy(param_dtype=torch.{low}, reduce_dtype=torch.float32)"


def _micro_step(job: LaunchJob, ddp: bool) -> list[str]:
    """Forward (under autocast), loss / ACCUMULATION, backward; gradients synchronised only on
    the micro-batch that steps (FSDP: reduce-scatter; DDP: all-reduce outside no_sync)."""
    forward = (
        "loss = model(**batch).loss / ACCUMULATION"
        if job.hf
        else "loss = loss_fn(model(inputs), targets) / ACCUMULATION"
    )
    dtype = AUTOCAST_DTYPE.get(job.precision)
    lines = (
        [f"with torch.autocast(DEVICE, dtype=torch.{dtype}):", f"    {forward}"]
        if dtype
        else [forward]
    )
    lines.append(
        "scaler.scale(loss).backward()" if job.precision == "fp16-mixed" else "loss.backward()"
    )
    if job.sharded:
        return ["model.set_requires_gradient_sync(stepping)", *lines]
    if ddp:
        return [
            "with model.no_sync() if not stepping else contextlib.nullcontext():",
            *("    " + line for line in lines),
        ]
    return lines


def _better(job: LaunchJob) -> str:
    stopping = job.early_stopping
    if stopping is None:
        return ""
    if stopping.mode == "min":
        return f"metric < best - {stopping.min_delta!r}"
    return f"metric > best + {stopping.min_delta!r}"
