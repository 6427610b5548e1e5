"""`training.checkpointing.auto`: the plan picks the checkpointing policy with the least
recompute that fits the batch, and its answer is the plan of that policy set by hand."""

from __future__ import annotations

from typing import Any

from service.schemas.examples import TINY_LLAMA
from service.schemas.spec import PlanSpec
from workers import engine

ORDER = ["none", "every 4", "every 2", "full", "full+offload"]


def spec(memory_gib: float, global_batch: int, checkpointing: Any = None) -> PlanSpec:
    """A 4-layer Llama at 2048 tokens; `checkpointing`: a policy set by hand, else auto."""
    training: dict[str, Any] = {
        "precision": "bf16-mixed",
        "loss_kernel": "liger",
        "global_batch_size": global_batch,
        "gradient_checkpointing": checkpointing is not None,
        "checkpointing": checkpointing or {"auto": True},
    }
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"num_hidden_layers": 4, "max_position_embeddings": 4096},
            },
            "data": {"kind": "tokens", "seq_len": 2048, "vocab_size": 1000, "num_samples": 512},
            "training": training,
            "device": {"kind": "simulated", "memory_gib": memory_gib},
            "search": {"what_if": False, "headroom": 0.05},  # sized at the old default
        }
    )


def test_auto_picks_the_least_recompute_that_reaches_the_batch_per_rank() -> None:
    result = engine.plan(spec(0.5, 8))
    choice = result.checkpointing
    assert choice is not None and choice.needed == 8  # the global batch on one GPU
    reached = {c.policy: c.max_micro_batch_size >= 8 for c in choice.checked}
    assert reached[choice.policy]
    # every block policy with less recompute than the choice was planned and falls short
    for policy in ORDER[: ORDER.index(choice.policy)]:
        assert reached[policy] is False
    assert choice.policy == "every 4" and (choice.every, choice.offload) == (4, False)
    # the answer is the plan of that policy set by hand, and the configs render it
    by_hand = engine.plan(spec(0.5, 8, {"every": 4}))
    assert by_hand.max_micro_batch_size == result.max_micro_batch_size
    assert result.configs["hf_trainer"]["gradient_checkpointing_kwargs"]["every_n_layers"] == 4
    # op-selective reaches the batch too, but recomputes more on this narrow model (its
    # pointwise ops outweigh a quarter of its blocks): the plan says so and passed it over
    assert reached["op"]
    recompute = {c.policy: c.recompute_s_per_sample for c in choice.checked}
    assert 0 < recompute["every 4"] < recompute["op"]


def test_where_no_policy_reaches_the_batch_auto_takes_the_least_recompute_that_fits() -> None:
    result = engine.plan(spec(0.3, 64))
    choice = result.checkpointing
    assert choice is not None and choice.needed == 1
    fitting = [c.policy for c in choice.checked if c.feasible]
    assert choice.policy == min(fitting, key=ORDER.index)
    assert result.feasible and result.configs["hf_trainer"]["gradient_checkpointing"]
