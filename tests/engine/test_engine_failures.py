"""What the engine does with a spec it validates and builds but cannot train as asked (issue
24): a batch where training is undefined is skipped, not called out of memory; a trace that
fails inside a library is a problem naming the layer and op; a config names its key."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import pytest

from service.schemas.spec import PlanSpec
from tests.helpers import TINY_LLAMA
from workers import engine
from workers.engine.devices.base import TrialOutcome
from workers.engine.errors import BatchUndefined
from workers.engine.search import find_max_batch
from workers.runner import unsupported_problem

# A 1x1 map into BatchNorm2d: one value per channel at batch 1, as resnet18's last BatchNorm
# at 32 px (PyTorch: "Expected more than 1 value per channel when training").
ONE_BY_ONE_BATCHNORM: dict[str, Any] = {
    "model": {
        "source": "layers",
        "layers": [
            {"type": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
            {"type": "AdaptiveAvgPool2d", "output_size": 1},
            {"type": "BatchNorm2d"},
            {"type": "Flatten"},
            {"type": "Linear", "out_features": 10},
        ],
    },
    "data": {"kind": "image", "channels": 3, "height": 8, "width": 8, "num_classes": 10},
    "training": {"optimizer": "sgd_momentum", "global_batch_size": 64},
    "device": {"kind": "simulated", "memory_gib": 1},
    "search": {"max_batch_size": 4096, "what_if": False, "headroom": 0.0},
}


def _outcome(batch: int, fits: bool) -> TrialOutcome:
    return TrialOutcome(batch, fits, 1000 * batch, 0.0)


def test_the_search_starts_above_a_batch_where_training_is_undefined() -> None:
    seen: list[int] = []

    def probe(batch: int) -> TrialOutcome:
        seen.append(batch)
        if batch == 1:
            raise BatchUndefined(1, "one value per channel")
        return _outcome(batch, batch <= 37)

    result = find_max_batch(probe, 37_500, 1000)
    assert result.max_batch == 37 and result.min_batch == 2
    assert result.undefined_reason == "one value per channel"
    assert seen.count(1) == 1  # tried once, never counted as a failure
    assert {t.batch_size for t in result.trials} >= {37, 38}


def test_batchnorm_on_a_one_by_one_map_plans_from_two() -> None:
    """It was accepted, then failed with PyTorch's message although 2 and more train."""
    result = engine.plan(PlanSpec.model_validate(ONE_BY_ONE_BATCHNORM))
    assert result.feasible and result.max_micro_batch_size >= 2
    assert all(t.batch_size >= 2 for t in result.trials)
    floor = next(w for w in result.warnings if w.code == "micro_batch_floor")
    assert "micro-batch of 2" in floor.message and "value per channel" in floor.message


def test_a_micro_batch_where_training_is_undefined_is_a_422_at_the_global_batch() -> None:
    spec = deepcopy(ONE_BY_ONE_BATCHNORM)
    spec["training"]["global_batch_size"] = 1
    with pytest.raises(engine.SpecError) as caught:
        engine.plan(PlanSpec.model_validate(spec))
    assert caught.value.loc == ("training", "global_batch_size")
    assert "at least 2 samples" in caught.value.message


def _mixtral() -> PlanSpec:
    config = TINY_LLAMA | {"num_local_experts": 4, "num_experts_per_tok": 2}
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "MixtralForCausalLM",
                "config": config,
            },
            "data": {"kind": "tokens", "seq_len": 32, "num_samples": 100},
            "training": {"precision": "bf16-mixed", "global_batch_size": 8},
            "device": {"kind": "simulated", "gpu": "A100-80GB"},
            "search": {"what_if": False},
        }
    )


def test_a_trace_failing_inside_a_library_names_the_layer_and_the_op() -> None:
    """A Mixtral config crashed with `_grouped_mm`'s raw RuntimeError as a 500."""
    pytest.importorskip("transformers")
    try:
        engine.plan(_mixtral())
    except engine.Unsupported as exc:
        problem = unsupported_problem(exc)
    else:  # MoE models plan for real once issue 27 lands: then this defect is gone for good
        return
    assert problem["status"] == 422 and problem["type"].endswith("/unsupported")
    assert "MixtralExperts (model.layers.0.mlp.experts)" in problem["detail"]
    assert "aten._grouped_mm" in problem["unsupported"]
    assert problem["errors"][0]["loc"] == ["model"]


def _llama(**config: Any) -> dict[str, Any]:
    return {
        "model": {
            "source": "transformers",
            "architecture": "LlamaForCausalLM",
            "config": TINY_LLAMA | config,
        },
        "data": {"kind": "tokens", "seq_len": 32, "num_samples": 100},
        "training": {"precision": "bf16-mixed", "global_batch_size": 8},
        "device": {"kind": "simulated", "gpu": "A100-80GB"},
    }


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_a_config_size_below_one_is_a_422_at_its_key(client: Any, key: str) -> None:
    """`hidden_size: 0` was '0.0 cannot be raised to a negative power' at `model.config`."""
    pytest.importorskip("transformers")
    answer = client.post("/v1/plans", json=_llama(**{key: 0}))
    assert answer.status_code == 422, answer.text
    (error,) = answer.json()["errors"]
    assert error["field"] == f"model.config.{key}"
    assert error["msg"] == f"{key} must be at least 1, not 0"


def test_the_plan_process_reports_an_unsupported_model_as_a_422_problem() -> None:
    import queue

    from workers.runner import child_main

    pytest.importorskip("transformers")
    reports: queue.Queue[tuple[str, Any]] = queue.Queue()
    child_main(_mixtral().model_dump_json(), reports)
    kinds = []
    while not reports.empty():
        kinds.append(reports.get())
    kind, body = kinds[-1]
    if kind == "result":  # MoE plans for real (issue 27)
        return
    assert kind == "error" and body["status"] == 422, body
    assert body["type"].endswith("/unsupported") and "traceback" not in body
