"""What-if neighbours: each answer equals a full plan of the changed spec, and they stream."""

from __future__ import annotations

from typing import Any

import pytest

from service.schemas.result import Trial
from service.schemas.spec import PlanSpec
from service.store import claims, plans
from service.store.db import make_engine, make_session_factory, upgrade
from workers import engine
from workers.engine.catalogue import GIB, GPU_CATALOGUE
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device
from workers.engine.profile import ProfileHooks, run_plan
from workers.engine.what_if import bigger_gpu, neighbours, other_precision


def with_what_if(spec: dict[str, Any], **search: Any) -> PlanSpec:
    return PlanSpec.model_validate(
        spec | {"search": {**spec["search"], "what_if": True, "max_batch_size": 4096, **search}}
    )


def replan(spec: PlanSpec, change: str, value: Any) -> Any:
    """The full plan of the changed spec, the way a user would ask for it next."""
    raw = spec.model_dump(mode="json")
    raw["search"]["what_if"] = False
    if change == "gpu":
        raw["device"] = {"kind": "simulated", "gpu": value}
    else:
        raw["training"][change] = value
    return engine.plan(PlanSpec.model_validate(raw))


def test_each_what_if_equals_the_plan_of_its_spec(small_spec: dict[str, Any]) -> None:
    spec = with_what_if(small_spec)
    streamed: list[Trial] = []
    result = run_plan(compile_job(spec), ProfileHooks(on_trial=streamed.append))
    changes = {(w.change, w.value) for w in result.what_if}
    assert changes == {
        ("precision", "bf16-mixed"),
        ("gradient_checkpointing", True),
        ("gpu", "T4"),  # the smallest card above 1 GiB (15095 MiB usable; a V100 has 16160)
    }  # Adam's state is a sliver of the card here: no fused / 8-bit neighbours
    for what_if in result.what_if:
        alone = replan(spec, what_if.change, what_if.value)
        assert what_if.max_micro_batch_size == alone.max_micro_batch_size, what_if.change
        assert what_if.search_bound_reached == alone.search_bound_reached
        value = str(what_if.value).lower() if what_if.change != "gpu" else what_if.value
        label = f"{what_if.change}={value}"
        assert [t.scenario for t in what_if.trials] == [label] * len(what_if.trials)
    by_change = {w.change: w for w in result.what_if}
    # mixed precision and checkpointing both free memory for a larger batch
    assert by_change["precision"].max_micro_batch_size > result.max_micro_batch_size
    assert by_change["gradient_checkpointing"].max_micro_batch_size > result.max_micro_batch_size
    assert by_change["gpu"].device.name == "T4"
    # the plan's own trials keep their invariants; every probe was streamed, what-ifs labelled
    assert all(t.phase != "what_if" for t in result.trials)
    what_if_trials = [t for w in result.what_if for t in w.trials]
    assert streamed == result.trials[: len(streamed) - len(what_if_trials)] + what_if_trials


def test_an_infeasible_plan_shows_the_way_out(small_spec: dict[str, Any]) -> None:
    raw = small_spec | {
        "model": {
            "source": "layers",
            "layers": [
                {"type": "Flatten"},
                {"type": "Linear", "out_features": 8192},
                {"type": "ReLU"},
                {"type": "Linear", "out_features": 8192},
                {"type": "ReLU"},
                {"type": "Linear", "out_features": 10},
            ],
        },
        "training": {"optimizer": "adam", "precision": "fp32"},
        "device": {"kind": "simulated", "memory_gib": 1.0},  # 8192^2 fp32 Adam needs ~1.1 GiB
        "search": {"what_if": True, "max_batch_size": 1024, "headroom": 0.0},
    }
    result = engine.plan(PlanSpec.model_validate(raw))
    assert not result.feasible
    gpu = next(w for w in result.what_if if w.change == "gpu")
    assert gpu.feasible and gpu.max_micro_batch_size >= 1
    infeasible = [w for w in result.what_if if not w.feasible]
    assert all(w.max_micro_batch_size == 0 and w.peak_bytes > 1 * GIB for w in infeasible)


def test_what_if_can_be_turned_off(small_spec: dict[str, Any]) -> None:
    assert engine.plan(PlanSpec.model_validate(small_spec)).what_if == []


@pytest.mark.parametrize(
    ("precision", "gpu", "expected"),
    [
        ("fp32", "A100-80GB", "bf16-mixed"),
        ("fp32", "T4", "fp16-mixed"),
        ("bf16-mixed", "A100-80GB", "bf16"),
        ("fp16-mixed", "V100-16GB", "fp32"),
        ("bf16", "H100-80GB", "bf16-mixed"),
    ],
)
def test_other_precision(
    small_spec: dict[str, Any], precision: str, gpu: str, expected: str
) -> None:
    spec = PlanSpec.model_validate(small_spec | {"device": {"kind": "simulated", "gpu": gpu}})
    assert other_precision(precision, open_device(compile_job(spec))) == expected


def test_bigger_gpu() -> None:
    assert bigger_gpu(GPU_CATALOGUE["A100-80GB"].memory_bytes, "bf16-mixed").name == "H200"
    assert bigger_gpu(GPU_CATALOGUE["H200"].memory_bytes, "fp32") is None
    # usable memory: an RTX 3090 offers 7% more than an A10, an RTX 4090 a little more still
    assert bigger_gpu(GPU_CATALOGUE["A10"].memory_bytes, "fp32").name == "RTX-3090"
    # V100 has no bf16: a bf16 plan on a 16 GB card is sent to a bf16 card
    assert bigger_gpu(GPU_CATALOGUE["T4"].memory_bytes, "fp32").name == "V100-16GB"
    assert bigger_gpu(GPU_CATALOGUE["T4"].memory_bytes, "bf16-mixed").name == "L4"


def test_cpu_plans_have_no_card_neighbour(small_spec: dict[str, Any]) -> None:
    spec = PlanSpec.model_validate(small_spec | {"device": {"kind": "cpu", "memory_gib": 0.5}})
    job = compile_job(spec)
    changes = [n.change for n in neighbours(job, open_device(job))]
    assert changes == ["precision", "gradient_checkpointing"]
    with_state = [n.change for n in neighbours(job, open_device(job), state_share=0.3)]
    assert with_state == ["precision", "gradient_checkpointing", "optimizer_impl", "optimizer"]


def test_store_keeps_the_scenario_of_a_trial(db_url: str, small_spec: dict[str, Any]) -> None:
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    spec = PlanSpec.model_validate(small_spec)
    with factory() as session:
        plan = plans.create_plan(session, spec=spec.canonical(), spec_hash=spec.spec_hash)
        session.commit()
        trial = {"batch_size": 4, "fits": True, "peak_bytes": 10, "duration_s": 0.1}
        claims.add_trial(
            session,
            plan_id=plan.id,
            attempt=1,
            index=0,
            trial=trial | {"phase": "what_if", "scenario": "gpu=H200"},
        )
        claims.add_trial(session, plan_id=plan.id, attempt=1, index=1, trial=trial)
        stored = plans.trials_of(session, plan_id=plan.id)
    assert [(t.phase, t.scenario) for t in stored] == [("what_if", "gpu=H200"), ("search", None)]
