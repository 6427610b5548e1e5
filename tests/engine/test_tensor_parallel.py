"""Tensor parallelism (`parallelism.tensor_parallel: N`): each decoder block's linear layers split
over N ranks with transformers' colwise/rowwise plan (DTensor's `parallelize_module`), FSDP over
the data ranks on top, as torchtitan composes them. Traced per rank like the other layouts."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.schemas.examples import TINY_LLAMA
from service.schemas.spec import PlanSpec
from tests.helpers import configs_of, run_on_gloo, session_of, with_changes
from workers import engine
from workers.engine.errors import SpecError

CONFIG = TINY_LLAMA | {"vocab_size": 512, "num_hidden_layers": 3}
HIDDEN, INTER = CONFIG["hidden_size"], CONFIG["intermediate_size"]
HEAD_DIM = HIDDEN // CONFIG["num_attention_heads"]
SEQ = 128


def spec(tp: int, world: int = 2, **changes: Any) -> PlanSpec:
    raw: dict[str, Any] = {
        "model": {"source": "transformers", "architecture": "LlamaForCausalLM", "config": CONFIG},
        "data": {"kind": "tokens", "seq_len": SEQ, "num_samples": 1000},
        "training": {
            "precision": "bf16-mixed",
            "global_batch_size": 64,
            "world_size": world,
            "parallelism": {"strategy": "fsdp", "tensor_parallel": tp},
        },
        "device": {"kind": "simulated", "gpu": "H100-80GB", "memory_gib": 2},
        "search": {"what_if": False},
    }
    return PlanSpec.model_validate(with_changes(raw, **changes))


@cache
def step(tp: int, batch: int = 8, checkpointing: bool = False) -> tuple[Any, Any]:
    """One probe's outcome and the step's roofline, world size 2 (traced once per run); Liger's
    fused loss keeps the head whole, so only the blocks are split (the head: see
    test_loss_parallelism_splits_the_head_and_its_logits)."""
    changes = {"training__gradient_checkpointing": checkpointing, "training__loss_kernel": "liger"}
    with session_of(spec(tp, **changes)) as session:
        session.want_cost(batch)
        outcome = session.probe(batch)
        return outcome, session.step_cost(batch)


def block_linears() -> int:
    """Parameters of one block's split linear layers (q, k, v, o and the MLP's three)."""
    kv = CONFIG["num_key_value_heads"] * HEAD_DIM
    return HIDDEN * (2 * HIDDEN + 2 * kv) + 3 * HIDDEN * INTER


def test_each_rank_holds_half_of_each_block_s_linear_layers() -> None:
    """On 2 ranks, FSDP alone holds half of every parameter; TP 2 (FSDP over one rank) holds
    half of the blocks' linear layers and all of the rest: the difference is exactly the rest's
    other half, fp32."""
    (fsdp, _), (tp, _) = step(1), step(2)
    layers = CONFIG["num_hidden_layers"]
    params = _model_parameters()
    total = sum(p.numel() for p in params)
    rest = total - layers * block_linears()
    rounding = 512 * len(params)  # each shard is its own allocation, in 512-byte blocks
    assert 0 <= fsdp.breakdown["parameters"] - total * 4 // 2 < rounding
    assert 0 <= tp.breakdown["parameters"] - (layers * block_linears() // 2 + rest) * 4 < rounding
    assert tp.breakdown["parameters"] - fsdp.breakdown["parameters"] > 2 * rounding
    assert abs(tp.breakdown["optimizer_state"] - 2 * tp.breakdown["parameters"]) < rounding


def test_the_split_layers_keep_less_for_backward() -> None:
    """Attention heads and MLP features split: each rank keeps their activations for its
    share (the residual stream and the norms stay whole)."""
    (fsdp, _), (tp, _) = step(1), step(2)
    assert tp.breakdown["activations"] < fsdp.breakdown["activations"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_block_all_reduces_its_output_and_its_input_gradient(checkpointing: bool) -> None:
    """Per block: forward all-reduces the attention's and the MLP's outputs, backward their
    input gradients once per module (the inputs enter as one replicated DTensor, as torchtitan
    prepares them); a ring all-reduce sends 2 (N-1) / N of the (batch x tokens x hidden) bf16
    tensor. A checkpointed block's recompute all-reduces the attention's output again but not
    the MLP's: non-reentrant checkpointing stops recomputing once it has every tensor backward
    needs (its early stop), and nothing after the down projection is saved."""
    batch, n = 8, 2
    _, plain = step(1, batch, checkpointing)
    _, split = step(n, batch, checkpointing)
    per_block = 4 + (1 if checkpointing else 0)
    activation = batch * SEQ * HIDDEN * 2
    expected = CONFIG["num_hidden_layers"] * per_block * activation * 2 * (n - 1) // n
    assert plain.tensor_parallel_bytes == 0
    assert split.tensor_parallel_bytes == expected


def test_the_plan_counts_data_ranks_and_adds_the_all_reduces_to_the_step() -> None:
    plain, split = engine.plan(spec(1, world=4)), engine.plan(spec(2, world=4))
    for plan, data_parallel in ((plain, 4), (split, 2)):
        batch = plan.micro_batch_size * plan.accumulation_steps * data_parallel
        assert plan.effective_global_batch_size == batch == 64
    assert split.throughput is not None and plain.throughput is not None
    parts = split.throughput.split
    assert parts.tensor_parallel_bytes > 0 and parts.tensor_parallel_s > 0
    assert plain.throughput.split.tensor_parallel_s == 0
    rest = parts.compute_s + parts.memory_bound_s + parts.optimizer_s + parts.tensor_parallel_s
    assert split.throughput.step_time_s >= rest
    # FSDP gathers 1/tp of the parameters over half the ranks
    assert parts.communication_bytes < plain.throughput.split.communication_bytes


@pytest.mark.parametrize("tp", [1, 2])
def test_per_rank_peak_matches_pytorch_s_fsdp_mem_tracker(tp: int) -> None:
    """PyTorch's own `FSDPMemTracker` on the same fake step, FSDP alone (dp 4) and the 2-D
    layout (dp 2 x tp 2). It counts the bytes tensors ask for, the tracker the caching
    allocator's 512-byte blocks: 0.15% apart here in both layouts."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    with session_of(spec(tp, world=4)) as session:
        session.probe(4)  # steady state
        job, tracker = session.job, session.tracker
        assert job is not None
        tracker.reset_peak()
        reference = FSDPMemTracker(job.model, job.optimizer)
        with reference:
            job.iteration(4)
        theirs = max(dev["Total"] for dev in reference.get_tracker_snapshot("peak").values())
        assert 0 <= tracker.peak - theirs <= 0.002 * theirs


@pytest.mark.parametrize("tp", [1, 2])
def test_the_optimizer_on_local_shards_allocates_as_over_dtensors(
    tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake job's optimizer steps on each rank's local shards (DTensor's dispatch is what a
    plan spent its set-up on): every allocation of the step, its size and its order, is the
    same as the optimizer over the DTensor parameters, FSDP alone and dp 2 x tp 2."""

    def sequences() -> list[Any]:
        with session_of(spec(tp, world=4)) as session:
            for batch in (2, 4):
                session.probe(batch)
            return [session._sequences[b] for b in (2, 4)]

    on_shards = sequences()
    monkeypatch.setattr("workers.engine.job._local_shards", lambda params: [])
    assert sequences() == on_shards


def sequence_parallel_step(batch: int = 8) -> tuple[Any, Any]:
    layout = {"strategy": "fsdp", "tensor_parallel": 2, "sequence_parallel": True}
    job = spec(2, training__parallelism=layout, training__loss_kernel="liger")
    with session_of(job) as session:
        session.want_cost(batch)
        outcome = session.probe(batch)
        return outcome, session.step_cost(batch)


def test_sequence_parallelism_splits_the_norms_for_the_same_bytes() -> None:
    """Each all-reduce becomes an all-gather before the attention and the MLP and a
    reduce-scatter after them, (N-1)/N each: the same bytes, plus one all-gather of the
    stream where it leaves the stack and its gradient's where it enters, and the all-reduce
    of each norm's weight gradient (its tokens are split: its gradient is a partial sum); the
    norms and the residual stream keep 1/N of the tokens."""
    batch, n = 8, 2
    (plain, plain_cost), (split, split_cost) = step(2, batch), sequence_parallel_step(batch)
    unit = batch * SEQ * HIDDEN * 2 * 2 * (n - 1) // n  # one all-reduce's bytes
    norms = CONFIG["num_hidden_layers"] * 2 * HIDDEN * 2 * 2 * (n - 1) // n  # bf16 gradients
    assert split_cost.tensor_parallel_bytes == plain_cost.tensor_parallel_bytes + unit + norms
    assert split.breakdown["activations"] < plain.breakdown["activations"]


def test_each_plan_in_a_process_costs_its_own_collectives() -> None:
    """DTensor caches sharding by specs whose meshes compare equal across fake worlds: without
    clearing it, a plan after another (the layout search runs several) ran its all-reduces on
    the earlier plan's group and the roofline costed none of them."""
    deep = CONFIG | {"num_hidden_layers": 12}
    layouts = (
        {"strategy": "fsdp", "tensor_parallel": 2, "context_parallel": 2},
        {"strategy": "fsdp", "tensor_parallel": 2},
    )
    for layout in layouts:
        plan = engine.plan(
            spec(
                2,
                world=4,
                model__config=deep,
                training__parallelism=layout,
                training__loss_kernel="liger",
            )
        )
        assert plan.throughput is not None and plan.throughput.split is not None
        assert plan.throughput.split.tensor_parallel_bytes > 0, layout


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model__config": CONFIG | {"num_key_value_heads": 1}}, "num_key_value_heads"),
        (
            {"model__architecture": "GPT2LMHeadModel", "model__config": {"n_layer": 2}},
            "no tensor-parallel plan",
        ),
        ({"training__peft": {"method": "lora"}}, "LoRA"),
    ],
)
def test_what_the_plan_cannot_split_is_refused_at_the_field(
    changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(SpecError) as error:
        engine.check(spec(2, **changes))
    assert error.value.loc == ("training", "parallelism", "tensor_parallel")
    assert words in error.value.message


@pytest.mark.parametrize(
    ("parallelism", "world", "words"),
    [
        ({"strategy": "ddp", "tensor_parallel": 2}, 2, "fsdp"),
        ({"strategy": "fsdp", "tensor_parallel": 4}, 6, "divide"),
        ({"strategy": "fsdp", "tensor_parallel": 2, "context_parallel": 2}, 6, "divide"),
        ({"strategy": "fsdp", "tensor_parallel": 2, "world_size": "auto"}, None, "auto"),
        ({"strategy": "fsdp", "sequence_parallel": True}, 2, "over tensor_parallel ranks"),
        (
            {
                "strategy": "fsdp",
                "tensor_parallel": 2,
                "context_parallel": 2,
                "sequence_parallel": True,
            },
            4,
            "not traced",
        ),
    ],
)
def test_layouts_that_do_not_compose_are_422s(
    parallelism: dict[str, Any], world: int | None, words: str
) -> None:
    with pytest.raises(ValidationError) as error:
        spec(2, world=world, training__parallelism=parallelism)  # type: ignore[arg-type]
    assert words in str(error.value)


def test_configs_spell_the_layout_for_torchtitan_accelerate_and_axolotl() -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.parallelism_config import ParallelismConfig

    configs = configs_of(spec(2, world=8), world_size=8)
    titan = configs["parallelism"]["torchtitan"]["parallelism"]
    assert (titan["data_parallel_shard_degree"], titan["tensor_parallel_degree"]) == (4, 2)
    config = ParallelismConfig(**configs["parallelism"]["accelerate"]["parallelism_config"])
    assert (config.total_size, config.tp_size, config.dp_shard_size) == (8, 2, 4)
    assert (configs["axolotl"]["tensor_parallel_size"], configs["axolotl"]["dp_shard_size"]) == (
        2,
        4,
    )
    assert "context_parallel" not in configs and accelerate is not None
    from lightning.pytorch.strategies import ModelParallelStrategy

    chosen = dict(configs["lightning"]["trainer"]["strategy"])
    assert chosen.pop("class").endswith(".ModelParallelStrategy")
    chosen.pop("configure_model")
    strategy = ModelParallelStrategy(**chosen)  # Lightning's own class takes the sizes
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 2)


def _model_parameters() -> list[Any]:
    from workers.engine.models import build_model

    plain = spec(1)
    return list(build_model(plain.model, plain.data, None).module.parameters())


# -- parallelism.layout: "auto" ------------------------------------------------------------
LONG = CONFIG | {"max_position_embeddings": 4096}


def auto_spec(global_batch: int, **parallelism: Any) -> PlanSpec:
    return spec(
        1,
        world=4,
        model__config=LONG,
        data__seq_len=4096,
        device__memory_gib=1.25,
        training__gradient_checkpointing=True,
        training__global_batch_size=global_batch,
        training__parallelism={"layout": "auto", **parallelism},
    )


def fixed(global_batch: int, tp: int, cp: int) -> PlanSpec:
    """The same job with the layout named."""
    raw = auto_spec(global_batch).model_dump(mode="json")
    raw["training"]["parallelism"] |= {
        "layout": "fixed",
        "strategy": "fsdp",
        "tensor_parallel": tp,
        "context_parallel": cp,
    }
    return PlanSpec.model_validate(raw)


@cache
def auto_plan(global_batch: int) -> Any:
    return engine.plan(auto_spec(global_batch))


def test_auto_layout_plans_each_tensor_parallel_degree_and_keeps_the_fastest() -> None:
    result = auto_plan(16)
    layout = result.layouts
    assert layout is not None and result.feasible
    planned = {(c.tensor_parallel, c.context_parallel) for c in layout.checked}
    assert {(1, 1), (2, 1)} <= planned  # tp 4 does not divide 2 key/value heads: skipped
    assert any("tp4 cp1" in reason and "num_key_value_heads" in reason for reason in layout.skipped)
    feasible = [c for c in layout.checked if c.feasible]
    fastest = min(feasible, key=lambda c: c.total_time_s or float("inf"))
    assert (layout.tensor_parallel, layout.context_parallel) == (
        fastest.tensor_parallel,
        fastest.context_parallel,
    )
    assert layout.checked[0] == fastest  # ranked
    # the plan returned is the chosen layout's own plan
    alone = engine.plan(fixed(16, layout.tensor_parallel, layout.context_parallel))
    assert result.max_micro_batch_size == alone.max_micro_batch_size
    assert result.throughput is not None and alone.throughput is not None
    assert result.throughput.total_time_s == pytest.approx(alone.throughput.total_time_s)


def test_context_parallelism_is_searched_only_where_it_could_be_faster() -> None:
    """Every layout at cp 1 fits here and cp 2 could not take fewer micro-steps (its max
    micro-batch is at most 2 m + 1 for twice the samples per rank): skipped by the bound. The
    bound on an instance: cp 2, planned anyway, is no faster."""
    layouts = auto_plan(16).layouts
    assert layouts is not None
    assert all(c.context_parallel == 1 for c in layouts.checked)
    assert any("cannot be faster" in reason for reason in layouts.skipped)
    planned = next(c for c in layouts.checked if (c.tensor_parallel, c.context_parallel) == (1, 1))
    doubled = engine.plan(fixed(16, 1, 2))
    assert doubled.max_micro_batch_size <= 2 * planned.max_micro_batch_size + 1
    assert doubled.throughput is not None and planned.total_time_s is not None
    assert doubled.throughput.total_time_s >= planned.total_time_s


def test_a_layout_that_does_not_fit_gets_its_context_split() -> None:
    """At 64k tokens one rank cannot hold a sample at tp 1; the search splits the sequence."""
    raw = auto_spec(16).model_dump(mode="json")
    raw["model"]["config"]["max_position_embeddings"] = 65536
    raw["data"]["seq_len"] = 65536
    layouts = engine.plan(PlanSpec.model_validate(raw)).layouts
    assert layouts is not None
    by_layout = {(c.tensor_parallel, c.context_parallel): c for c in layouts.checked}
    assert not by_layout[(1, 1)].feasible
    assert (1, 2) in by_layout


@pytest.mark.parametrize(
    ("parallelism", "words"),
    [
        ({"strategy": "ddp"}, "fsdp"),
        ({"tensor_parallel": 2}, "leave both at 1"),
        ({"world_size": "auto"}, "fixed world_size"),
    ],
)
def test_auto_layout_needs_what_it_searches_left_open(
    parallelism: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValidationError) as error:
        auto_spec(16, **parallelism)
    assert words in str(error.value)


def test_loss_parallelism_splits_the_head_and_its_logits() -> None:
    """loss_parallel with the model's own loss: the head is split by vocabulary and the
    cross-entropy runs on each rank's share of the logits: every rank computes half the step's
    FLOPs and holds half the head; a fused loss kernel takes the head's weight whole, so with
    Liger's the head stays whole on each rank (sharded by FSDP only)."""
    layout = {
        "strategy": "fsdp",
        "tensor_parallel": 2,
        "sequence_parallel": True,
        "loss_parallel": True,
    }

    def traced(tp: int, loss: str) -> tuple[Any, Any]:
        parallelism = layout if tp > 1 else {"strategy": "fsdp"}
        job = spec(tp, training__loss_kernel=loss, training__parallelism=parallelism)
        with session_of(job) as session:
            session.want_cost(8)
            return session.probe(8), session.step_cost(8)

    (_, whole), (split, split_cost), (fused, fused_cost) = (
        traced(1, "standard"),
        traced(2, "standard"),
        traced(2, "liger"),
    )
    assert split_cost.flops == pytest.approx(whole.flops / 2, rel=0.01)
    assert fused_cost.flops > split_cost.flops
    head = CONFIG["vocab_size"] * HIDDEN * 4  # fp32, FSDP over one data rank
    assert fused.breakdown["parameters"] - split.breakdown["parameters"] == pytest.approx(
        head / 2, abs=1024
    )


def test_sequence_parallelism_needs_a_sequence_the_degree_divides() -> None:
    layout = {"strategy": "fsdp", "tensor_parallel": 2, "sequence_parallel": True}
    with pytest.raises(SpecError) as error:
        engine.check(spec(2, data__seq_len=SEQ + 1, training__parallelism=layout))
    assert error.value.loc == ("training", "parallelism", "sequence_parallel")
    assert "multiple of tensor_parallel 2" in error.value.message


# -- the generated PyTorch loop, run for real ----------------------------------------------
LOOP_PRELUDE = f"""
import os, torch, transformers
from torch.optim.optimizer import register_optimizer_step_pre_hook
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{CONFIG!r}))
train_dataset = [{{"input_ids": list(range(1, 1 + 16 + i % 16))}} for i in range(16)]
STEPS = []
register_optimizer_step_pre_hook(lambda *a: STEPS.append(1))
"""
LOOP_EPILOGUE = """
if int(os.environ["RANK"]) == 0:
    q = layers[0].self_attn.q_proj.weight
    print("STEPS", len(STEPS), "PLACEMENTS", q.placements)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_rendered_loop_runs_fsdp_by_tensor_parallel_on_gloo(
    sequence_parallel: bool, tmp_path: Path
) -> None:
    """The generated loop on 4 CPU ranks, dp 2 x tp 2 (FSDP over the data ranks), ends at the
    plan's optimizer steps with each q projection sharded on both mesh dimensions."""
    from workers.engine.compiled import compile_job
    from workers.engine.configs import PlanNumbers, build_configs

    layout = {"strategy": "fsdp", "tensor_parallel": 2, "sequence_parallel": sequence_parallel}
    job = compile_job(spec(2, world=4, data__seq_len=32, training__parallelism=layout)).launch
    numbers = PlanNumbers(
        micro_batch_size=2,
        accumulation_steps=2,
        world_size=4,
        learning_rate=1e-3,
        warmup_steps=1,
        total_optimizer_steps=3,
        model_parallel=2,
    )
    code = build_configs(job, numbers)["pytorch"]
    assert "x 2 data-parallel rank(s) = global batch 8" in code
    run = run_on_gloo(LOOP_PRELUDE + code + LOOP_EPILOGUE, tmp_path, ranks=4)
    line = next(x for x in run.stdout.splitlines() if x.startswith("STEPS"))
    assert line.split()[1] == "3"
    assert "_StridedShard" in line or "Shard(dim=0), Shard(dim=0)" in line
