"""search.target 'sequence_length': the longest seq_len is exact to a granule, the plan is made
at it, its probes stream apart from the plan's own, and impossible targets are 422s."""

from __future__ import annotations

from typing import Any

import pytest

from service.schemas.result import Trial
from service.schemas.spec import PlanSpec
from tests.helpers import TINY_LLAMA, session_of
from workers import engine

GRANULE = 64


def long_spec(memory_gib: float, seq_len: int = 4096, **search: Any) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"max_position_embeddings": 8192},
            },
            "data": {"kind": "tokens", "seq_len": seq_len, "vocab_size": 1000},
            "training": {"optimizer": "adamw", "precision": "bf16-mixed", "global_batch_size": 8},
            "device": {"kind": "simulated", "memory_gib": memory_gib},
            "search": {
                "what_if": False,
                "headroom": 0.0,
                "target": "sequence_length",
                "sequence_granularity": GRANULE,
                "sequence_micro_batch": 2,
                **search,
            },
        }
    )


def at_length(spec: PlanSpec, seq_len: int) -> PlanSpec:
    raw = spec.model_dump(mode="json")
    raw["data"]["seq_len"] = seq_len
    raw["search"]["target"] = "micro_batch"
    return PlanSpec.model_validate(raw)


def test_longest_sequence_is_exact_and_the_plan_is_made_at_it() -> None:
    spec = long_spec(memory_gib=0.4)
    streamed: list[Trial] = []
    result = engine.plan(spec, streamed.append)
    answer = result.sequence_length
    assert answer is not None and not answer.bound_reached
    longest = answer.max_seq_len
    assert 0 < longest < 4096 and longest % GRANULE == 0
    # independent fresh probes: the answer fits at the micro-batch, one granule more does not
    with session_of(at_length(spec, longest)) as session:
        assert session.probe(2).fits
    with session_of(at_length(spec, longest + GRANULE)) as session:
        assert not session.probe(2).fits
    checked = {c.seq_len: c.fits for c in answer.checked}
    assert checked[longest] and not checked[longest + GRANULE]
    # the plan is the plan at that length
    assert result.max_micro_batch_size == engine.plan(at_length(spec, longest)).max_micro_batch_size
    assert result.max_micro_batch_size >= 2
    # every length probed was streamed, labelled, and kept out of the plan's own trials
    labelled = [t for t in streamed if t.phase == "sequence_length"]
    assert {t.scenario for t in labelled} == {f"seq_len={c.seq_len}" for c in answer.checked}
    assert len(labelled) == len(answer.checked)  # each length traced once
    assert all(t.batch_size == 2 for t in labelled)
    assert all(t.phase != "sequence_length" for t in result.trials)


def test_the_spec_s_own_length_is_the_bound() -> None:
    result = engine.plan(long_spec(memory_gib=8, seq_len=1024))
    assert result.sequence_length is not None
    assert result.sequence_length.max_seq_len == 1024 and result.sequence_length.bound_reached


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"data": {"kind": "tensor", "shape": [16], "num_classes": 4}}, "target"),
        (
            {"search": {"target": "sequence_length", "sequence_granularity": 8192}},
            "sequence_granularity",
        ),
    ],
)
def test_impossible_targets_name_their_field(
    small_spec: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    raw = long_spec(memory_gib=1).model_dump(mode="json")
    if "data" in change:
        raw = small_spec | {"search": {"target": "sequence_length"}} | change
        raw["model"] = {"source": "layers", "layers": [{"type": "Linear", "out_features": 4}]}
    else:
        raw["search"] |= change["search"]
    with pytest.raises(engine.SpecError) as caught:
        engine.check(PlanSpec.model_validate(raw))
    assert caught.value.loc == ("search", field)
