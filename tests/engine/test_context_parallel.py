"""Context parallelism (`parallelism.context_parallel: N`): each rank holds seq_len / N tokens of
every sample and attention runs through PyTorch's ring (all-gathered keys and values), with
FSDP over all ranks as torchtitan lays them out. Traced per rank like the other strategies."""

from __future__ import annotations

from collections import Counter
from functools import cache
from typing import Any

import pytest
from pydantic import ValidationError

from service.schemas.examples import TINY_LLAMA
from service.schemas.spec import PlanSpec
from tests.helpers import configs_of, session_of, with_changes
from workers import engine
from workers.engine.errors import SpecError

CONFIG = TINY_LLAMA | {"vocab_size": 512, "max_position_embeddings": 4096}
HEAD_DIM = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]


def spec(cp: int, world: int = 4, seq: int = 256, **changes: Any) -> PlanSpec:
    raw: dict[str, Any] = {
        "model": {"source": "transformers", "architecture": "LlamaForCausalLM", "config": CONFIG},
        "data": {"kind": "tokens", "seq_len": seq, "num_samples": 1000},
        "training": {
            "precision": "bf16-mixed",
            "gradient_checkpointing": True,
            "global_batch_size": 64,
            "world_size": world,
            "parallelism": {"strategy": "fsdp", "context_parallel": cp},
        },
        "device": {"kind": "simulated", "gpu": "T4", "memory_gib": 1},
        "search": {"what_if": False, "headroom": 0.05},  # 1 GiB: sized at the old default
    }
    return PlanSpec.model_validate(with_changes(raw, **changes))


@cache
def step(cp: int, batch: int = 8) -> tuple[Any, Any]:
    """One probe's outcome and the step's roofline (traced once per module run: the tests
    only read them)."""
    with session_of(spec(cp)) as session:
        session.want_cost(batch)
        outcome = session.probe(batch)
        return outcome, session.step_cost(batch)


def test_each_rank_holds_its_share_of_the_sequence() -> None:
    (whole, _), (half, _), (quarter, _) = step(1), step(2), step(4)
    assert whole.breakdown["input_batch"] == 2 * half.breakdown["input_batch"]
    assert whole.breakdown["input_batch"] == 4 * quarter.breakdown["input_batch"]
    # activations split with the tokens, up to a few 512-byte blocks that do not (scalars)
    activations = [o.breakdown["activations"] for o in (whole, half, quarter)]
    assert abs(activations[0] - 2 * activations[1]) <= 2048
    assert abs(activations[0] - 4 * activations[2]) <= 4096


def test_attention_runs_as_a_ring_whose_traffic_follows_the_layers() -> None:
    """Under CP the flash kernel runs per chunk on each rank's queries against the gathered
    keys and values: per layer the ring gathers K and V in forward, in the checkpointed
    recompute and in backward, and exchanges their gradients twice, each (N-1)/N of the
    full-sequence K+V on this rank's link."""
    batch, n, layers = 8, 2, CONFIG["num_hidden_layers"]
    _, plain = step(1, batch)
    _, ring = step(n, batch)
    names = Counter(op.name for op in ring.ops)
    assert names["_scaled_dot_product_flash_attention"] > 2 * layers  # chunks, fwd + recompute
    assert names["_scaled_dot_product_flash_attention_for_cpu"] == 0
    assert plain.ring_bytes == 0
    kv = 2 * batch * 256 * CONFIG["num_key_value_heads"] * HEAD_DIM * 2  # K+V, bf16, all tokens
    assert ring.ring_bytes == layers * 5 * kv * (n - 1) // n


def test_a_plan_counts_batches_over_the_data_parallel_ranks() -> None:
    plain, ring = engine.plan(spec(1)), engine.plan(spec(2))
    assert ring.max_micro_batch_size > plain.max_micro_batch_size  # half the tokens per rank
    for plan, data_parallel in ((plain, 4), (ring, 2)):
        batch = plan.micro_batch_size * plan.accumulation_steps * data_parallel
        assert plan.effective_global_batch_size == batch == 64
    split = ring.throughput.split
    assert split.context_parallel_bytes > 0 and split.context_parallel_s > 0
    rest = split.compute_s + split.memory_bound_s + split.optimizer_s + split.context_parallel_s
    assert ring.throughput.step_time_s >= rest
    assert plain.throughput.split.context_parallel_s == 0


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"data__seq_len": 258}, "multiple of 2 x 2"),
        ({"model__attn_implementation": "eager"}, "SDPA"),
    ],
)
def test_what_the_ring_cannot_run_is_refused_at_the_field(
    changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(SpecError) as error:
        engine.check(spec(2, **changes))
    assert error.value.loc == ("training", "parallelism", "context_parallel")
    assert words in error.value.message


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"training__parallelism": {"strategy": "ddp", "context_parallel": 2}}, "fsdp"),
        (
            {
                "training__world_size": 6,
                "training__parallelism": {"strategy": "fsdp", "context_parallel": 4},
            },
            "divide",
        ),
    ],
)
def test_layouts_that_do_not_compose_are_422s(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as error:
        spec(2, **changes)
    assert words in str(error.value)


def test_configs_spell_the_layout_for_torchtitan_and_accelerate() -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils.dataclasses import TorchContextParallelConfig

    settings = configs_of(spec(2), world_size=4)["context_parallel"]
    titan = settings["torchtitan"]["parallelism"]
    assert (titan["data_parallel_shard_degree"], titan["context_parallel_degree"]) == (2, 2)
    raw = dict(settings["accelerate"]["parallelism_config"])
    handler = TorchContextParallelConfig(**raw.pop("cp_handler"))
    config = ParallelismConfig(**raw, cp_handler=handler)
    assert config.total_size == 4 and accelerate is not None


def test_a_sharded_optimizer_step_costs_this_rank_s_shard() -> None:
    """The roofline costs ops on DTensors by the local tensors DTensor runs them on: each
    rank's optimizer steps its shard of the state (the whole was costed before)."""
    alone = engine.plan(spec(1, world=1, training__parallelism={"strategy": "none"}))
    sharded = engine.plan(spec(1, world=4))
    ratio = alone.throughput.split.optimizer_s / sharded.throughput.split.optimizer_s
    assert ratio > 3  # 5.1 here (FSDP's own padding and casts aside); 1.4 when it costed all


def test_the_ring_computes_what_one_rank_computes_at_the_same_tokens() -> None:
    """At the same tokens per rank, the load-balanced ring's chunks (some causal, some not)
    add up to exactly the FLOPs of one rank's causal attention over whole sequences. Two
    things make it so: the roofline skips DTensor's sharding propagation (it runs each op at
    full shapes to learn its output's metadata; a whole-sequence attention per call was costed
    on top before), and a causal kernel counts the share of the score matrix it computes
    (PyTorch's flop counter counts all of it)."""
    _, whole = step(1, batch=4)  # 4 x 256 tokens on each rank
    _, split = step(2, batch=8)  # 8 x 128 tokens on each rank
    assert split.flops == whole.flops


def test_a_causal_kernel_counts_the_tiles_it_computes() -> None:
    from workers.engine.roofline import causal_share

    assert causal_share(4, 4) == 10 / 16  # query i sees keys 0..i
    assert causal_share(2, 4) == 3 / 8  # fewer queries than keys: top-left aligned
    assert causal_share(4, 2) == 7 / 8
    assert causal_share(4096, 4096) == pytest.approx(0.5, abs=1e-3)
