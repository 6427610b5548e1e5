"""Depth folding: a stack of identical blocks planned from traces of 2-5 blocks gives the same
plan, byte for byte, as tracing every block; where the stack does not fold, the plan traces
it whole and says why."""

from __future__ import annotations

from typing import Any

import pytest

from service.schemas.spec import PlanSpec
from tests.helpers import TINY_MOE, model_of, session_of
from workers import engine
from workers.engine.depth_fold import Fold, NotFoldable, StepTrace
from workers.engine.models.depth import uniform_depth, with_depth

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "num_hidden_layers": 8,
}
MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}


def spec(
    fold: bool,
    architecture: str = "LlamaForCausalLM",
    config: dict[str, Any] | None = None,
    device_gib: float | None = None,
    **training: Any,
) -> PlanSpec:
    device = {"kind": "simulated", "gpu": "T4"}
    if device_gib is not None:
        device["memory_gib"] = device_gib  # type: ignore[assignment]
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": architecture,
                "config": TINY | (config or {}),
            },
            "data": {"kind": "tokens", "seq_len": 64, "num_samples": 1000},
            "training": {"precision": "bf16-mixed", "global_batch_size": 64} | training,
            "device": device,
            "search": {"what_if": False, "depth_folding": fold},
        }
    )


def comparable(result: Any) -> dict[str, Any]:
    """The plan less what says how it was made (and the trials' wall times)."""
    out = result.model_dump(exclude={"depth_folding", "traced_steps", "throughput"})
    for trial in out["trials"]:
        trial.pop("duration_s", None)
    return out


def assert_same_plan(folded: Any, full: Any) -> None:
    """Every byte the same; the step time's sums run in another order (float rounding)."""
    assert comparable(folded) == comparable(full)
    times = [_numbers(r.throughput.model_dump()) for r in (folded, full)]
    assert times[0].keys() == times[1].keys()
    for key, value in times[1].items():
        assert times[0][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}.{key}").items()
        }
    if isinstance(tree, (list, tuple)):
        return {
            k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{prefix}.{i}").items()
        }
    return {prefix: tree} if isinstance(tree, (int, float)) else {}


@pytest.mark.parametrize(
    ("architecture", "config", "training"),
    [
        ("LlamaForCausalLM", {}, {}),
        (
            "LlamaForCausalLM",
            {},
            {"gradient_checkpointing": True, "peft": {"method": "lora", "r": 8}},
        ),
        ("LlamaForCausalLM", {}, {"precision": "fp32", "optimizer": "sgd"}),
        ("MixtralForCausalLM", MIXTRAL, {"precision": "bf16"}),
        ("LlamaForCausalLM", {}, {"parallelism": {"strategy": "fsdp"}, "world_size": 4}),
    ],
    ids=["bf16-mixed", "checkpointed-lora", "fp32-sgd", "moe-bf16", "fsdp-4"],
)
def test_a_folded_plan_is_the_full_trace_plan(
    architecture: str, config: dict[str, Any], training: dict[str, Any]
) -> None:
    full = engine.plan(spec(False, architecture, config, **training))
    folded = engine.plan(spec(True, architecture, config, **training))
    assert full.depth_folding is None
    assert folded.depth_folding is not None and folded.depth_folding.folded
    assert folded.depth_folding.layers == 8
    # FSDP's prefetch makes the blocks beside the first and the last differ: base 3
    sharded = training.get("world_size", 1) > 1
    assert folded.depth_folding.traced_depths == ([3, 4, 5, 6] if sharded else [2, 3, 4, 5])
    assert_same_plan(folded, full)


def test_the_scale_out_sessions_share_one_fold_and_answer_as_full_traces() -> None:
    """world_size 'auto' opens a session per world size: the first learns the fold, the
    others check it on their own traces (2 depths) and use it."""
    training = {"world_size": "auto", "parallelism": {"strategy": "fsdp"}}
    wide = {"hidden_size": 512, "intermediate_size": 2048, "vocab_size": 100_000}  # 135M
    full = engine.plan(spec(False, config=wide, device_gib=2, **training))
    folded = engine.plan(spec(True, config=wide, device_gib=2, **training))
    assert full.world_size > 1 and len(full.scale_out[0].checked) > 1
    assert folded.depth_folding is not None and folded.depth_folding.folded
    assert folded.traced_steps is not None and full.traced_steps is not None
    assert_same_plan(folded, full)


def test_the_synthesised_step_is_the_traced_one_event_for_event() -> None:
    """At depth 8, LoRA in a checkpointed step, two steps in a row: the fold learned from 2-5
    blocks writes the traced sequence. The weight casts a block's recomputation makes are freed
    when it ends (torch.autocast clears its cache on leaving the outermost region), so nothing
    of one step is freed in the next."""
    training = {"gradient_checkpointing": True, "peft": {"method": "lora", "r": 8}}
    traces: dict[int, StepTrace] = {}
    peaks: dict[int, tuple[int, dict[str, int]]] = {}
    for blocks in (2, 3, 4, 5, 8):
        deep = spec(False, config={"num_hidden_layers": blocks}, **training)
        with session_of(deep) as session:
            for batch in (3, 4):  # the second step carries the first one's leftovers
                session.probe(batch)
            traces[blocks] = StepTrace.of(session.tracker)
            peaks[blocks] = session.tracker.peak, session.tracker.breakdown_at_peak()
    fold = Fold.learn({k: traces[k] for k in (2, 3, 4, 5)})
    eight = fold.synthesize(traces[2], 8)
    assert eight == traces[8]
    assert not any(e[0] == "f" and e[1] < 0 for e in eight.events)  # no leftovers
    peak, parts = eight.peak()
    assert peak == peaks[8][0]
    assert {k: v for k, v in parts.items() if v} == {k: v for k, v in peaks[8][1].items() if v}


def test_blocks_that_differ_somewhere_in_the_stack_are_not_folded() -> None:
    """DeepSeek's first dense layer, gpt-oss's alternating attention: a trace of 2-5 blocks
    could miss layer 40, so the full model is checked and these are traced whole."""
    experts = TINY_MOE["DeepseekV3ForCausalLM"] | {"num_experts_per_tok": 2}
    deepseek = spec(True, "DeepseekV3ForCausalLM", experts)
    gpt_oss = spec(True, "GptOssForCausalLM", MIXTRAL | {"head_dim": 16})
    llama = spec(True)
    for case, depth in ((deepseek, None), (gpt_oss, None), (llama, 8)):
        model = case.model
        assert uniform_depth(model, model_of(case).module) == depth  # type: ignore[arg-type]


def test_a_fold_that_fails_late_hands_over_to_the_whole_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fold that stops matching after some probes (a step whose ops change with the batch in
    a way the fold does not follow): the whole model first runs the steps the session already
    ran (what one step leaves, the next frees), then answers as a full trace would."""
    training = {"gradient_checkpointing": True, "peft": {"method": "lora", "r": 8}}
    full = engine.plan(spec(False, **training))

    def refuse(self: Fold, one: StepTrace, two: StepTrace) -> None:
        raise NotFoldable("refused by the test")

    monkeypatch.setattr(Fold, "resized", refuse)
    tried = engine.plan(spec(True, **training))
    assert tried.depth_folding is not None and not tried.depth_folding.folded
    assert tried.depth_folding.reason == "refused by the test"
    assert_same_plan(tried, full)


def test_per_layer_config_lists_are_cut_with_the_stack() -> None:
    layers = ["full_attention"] * 8
    model = spec(True, "GptOssForCausalLM", MIXTRAL | {"layer_types": layers}).model
    shallow = with_depth(model, 8, 3)  # type: ignore[arg-type]
    assert shallow.config["num_hidden_layers"] == 3
    assert shallow.config["layer_types"] == layers[:3]


def test_traces_that_do_not_repeat_refuse_to_fold() -> None:
    one = StepTrace((), (("a", 512, "activations", "forward"),))
    two = StepTrace((), (("a", 1024, "activations", "forward"),))
    with pytest.raises(NotFoldable):
        Fold.learn({2: one, 3: two, 4: two, 5: two})
