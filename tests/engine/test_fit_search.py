"""When nothing fits: the plan answers a small set of changes that does, each change needed,
with the exact max micro-batch a plan of the changed spec finds."""

from __future__ import annotations

from typing import Any

from service.schemas.examples import TINY_LLAMA
from service.schemas.spec import PlanSpec
from workers import engine


def long_lm(memory_gib: float, what_if: bool = True, **training: Any) -> PlanSpec:
    """A 2-layer Llama at 2048 tokens whose fp32 logits alone overflow the card."""
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"vocab_size": 4000, "max_position_embeddings": 4096},
            },
            "data": {"kind": "tokens", "seq_len": 2048, "vocab_size": 4000, "num_samples": 512},
            "training": {"optimizer": "adamw", "global_batch_size": 8, **training},
            "device": {"kind": "simulated", "memory_gib": memory_gib},
            "search": {"headroom": 0.0, "what_if": what_if},
        }
    )


def test_an_infeasible_plan_answers_the_changes_that_fit() -> None:
    result = engine.plan(long_lm(0.29))
    assert not result.feasible
    fit = result.fits_with
    assert fit is not None
    wanted = {"precision": "bf16-mixed", "loss_kernel": "liger", "gradient_checkpointing": True}
    assert fit.changes == wanted
    assert result.suggestions[0].startswith(
        "fits with precision=bf16-mixed, loss_kernel=liger, gradient_checkpointing=true"
    )
    # the answer is the plan of the changed spec, which a user can submit as it is
    changed = engine.plan(long_lm(0.29, what_if=False, **fit.changes))
    assert changed.feasible and changed.max_micro_batch_size == fit.max_micro_batch_size
    assert (changed.micro_batch_size, changed.accumulation_steps) == (
        fit.micro_batch_size,
        fit.accumulation_steps,
    )
    # each change is needed: without any one of them it does not fit
    for dropped in wanted:
        fewer = {k: v for k, v in wanted.items() if k != dropped}
        assert not engine.plan(long_lm(0.29, what_if=False, **fewer)).feasible, dropped


def test_changes_are_dropped_when_a_later_one_does_the_job() -> None:
    fit = engine.plan(long_lm(0.31)).fits_with
    assert fit is not None and fit.changes == {"loss_kernel": "liger"}


def test_no_search_without_what_if_or_when_the_plan_fits() -> None:
    assert engine.plan(long_lm(0.32, what_if=False)).fits_with is None
    assert engine.plan(long_lm(2.0, what_if=False)).fits_with is None


def test_the_sequence_split_rung_adds_gpus_as_context_parallelism() -> None:
    from workers.engine.compiled import compile_job
    from workers.engine.fit_search import _split_sequence

    job = compile_job(long_lm(0.29, what_if=False))
    split = _split_sequence(2)(job)
    assert split is not None
    parallelism = split.training.parallelism
    assert (split.training.world_size, parallelism.strategy, parallelism.context_parallel) == (
        2,
        "fsdp",
        2,
    )
    wider = _split_sequence(4)(split)  # the next rung replaces the split, it does not stack
    assert wider is not None and wider.training.world_size == 4
    qlora = compile_job(long_lm(0.29, what_if=False, peft={"method": "qlora"}))
    assert _split_sequence(2)(qlora) is None  # QLoRA is not sharded: the rung passes


def test_the_ladder_reaches_context_parallelism_and_drops_what_it_does_not_need() -> None:
    """The ladder's search on a plan function that fits only with the sequence split (the
    real rungs, a stand-in for the planner's verdict): the answer is that one change, on
    two GPUs, after every cheaper rung was tried."""
    from tests.helpers import a_result
    from workers.engine.compiled import compile_job
    from workers.engine.devices import open_device
    from workers.engine.fit_search import first_fit

    job = compile_job(long_lm(0.29, what_if=False))
    tried: list[str] = []

    def plan(changed: Any, device: Any, label: str) -> Any:
        tried.append(label)
        split = changed.training.parallelism.context_parallel >= 2
        return a_result(feasible=split, world_size=changed.training.world_size)

    fit = first_fit(job, open_device(job), plan)
    assert fit is not None
    assert fit.changes == {"parallelism.context_parallel": 2} and fit.world_size == 2
    assert any("loss_kernel=liger" in label for label in tried)  # cheaper rungs came first
