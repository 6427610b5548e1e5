"""The profiling engine on the simulated and cpu devices: exact answers, honest breakdowns."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import pytest

from service.schemas.spec import PlanSpec
from tests.helpers import assert_exact, mlp_spec, model_of, session_of
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session
from workers.engine.errors import SpecError

MIB = 1 << 20


def test_grayscale_cnn_is_exact_in_few_trials(small_spec: dict[str, Any]) -> None:
    result = assert_exact(small_spec)
    search_trials = [t for t in result.trials if t.phase == "search"]
    assert len(search_trials) <= 8
    memory = result.memory
    parts = (
        memory.parameters
        + memory.gradients
        + memory.optimizer_state
        + memory.input_batch
        + memory.activations
        + memory.temporary
        + memory.workspace
        + memory.overhead
    )
    assert parts == memory.peak
    assert memory.peak <= memory.capacity
    assert memory.reserved is not None and memory.peak <= memory.reserved <= memory.capacity


@pytest.mark.slow
def test_resnet18_is_exact_on_a_small_card() -> None:
    spec = {
        "model": {"source": "torchvision", "name": "resnet18"},
        "data": {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 100},
        "training": {"optimizer": "sgd_momentum", "precision": "bf16-mixed"},
        "device": {"kind": "simulated", "memory_gib": 2},
        "search": {"headroom": 0.05},
    }
    result = assert_exact(spec)
    assert result.memory.parameters == pytest.approx(11_227_812 * 4, rel=0.01)


@pytest.mark.parametrize(
    ("optimizer", "copies"),
    [
        ("sgd", 0),
        ("sgd_momentum", 1),
        ("nesterov", 1),
        ("adam", 2),
        ("adamw", 2),
        ("rmsprop", 1),
        ("adagrad", 1),
    ],
)
def test_optimizer_state_is_counted_per_parameter(optimizer: str, copies: int) -> None:
    spec = PlanSpec.model_validate(mlp_spec(optimizer))
    job = compile_job(spec)
    device = open_device(job)
    with open_session(device, job) as session:
        outcome = session.probe(1)  # batch 1: the peak is at the optimizer step
    params = (512 * 1024 + 1024) * 4 + (1024 * 1024 + 1024) * 4 + (1024 * 10 + 10) * 4
    parts = outcome.breakdown
    # each tensor rounds up to 512 bytes; 6 tensors per copy
    assert parts["parameters"] == pytest.approx(params, abs=6 * 512)
    assert parts["optimizer_state"] == pytest.approx(copies * params, abs=6 * 512 * 2)


def test_gradients_exist_at_the_step_and_frozen_parameters_have_none() -> None:
    full = PlanSpec.model_validate(mlp_spec("adam"))
    frozen = PlanSpec.model_validate(mlp_spec("adam", trainable=["0.", "2."]))
    out = {}
    for name, spec in (("full", full), ("frozen", frozen)):
        with session_of(spec) as session:
            out[name] = session.probe(1).breakdown
    assert out["full"]["gradients"] >= out["full"]["parameters"] - 6 * 512
    last_layer = (1024 * 10 + 10) * 4
    assert out["frozen"]["optimizer_state"] == pytest.approx(2 * last_layer, abs=4 * 512)
    assert out["frozen"]["parameters"] == out["full"]["parameters"]


def _activations_at(spec_dict: dict[str, Any], batch: int) -> int:
    spec = PlanSpec.model_validate(spec_dict)
    with session_of(spec) as session:
        return session.probe(batch).breakdown["activations"]


def test_mixed_precision_and_checkpointing_shrink_activations(small_spec: dict[str, Any]) -> None:
    base = _activations_at(small_spec, 256)
    bf16 = deepcopy(small_spec)
    bf16["training"]["precision"] = "bf16-mixed"
    ckpt = deepcopy(small_spec)
    ckpt["training"]["gradient_checkpointing"] = True
    assert _activations_at(bf16, 256) < 0.8 * base
    assert _activations_at(ckpt, 256) < 0.8 * base


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16"])
def test_other_precisions_plan(small_spec: dict[str, Any], precision: str) -> None:
    small_spec["training"]["precision"] = precision
    assert_exact(small_spec)


def test_channels_last_and_rgb(small_spec: dict[str, Any]) -> None:
    small_spec["data"].update(channels=3, layout="channels_last")
    assert_exact(small_spec)


def test_cpu_device_is_exact_under_its_budget() -> None:
    spec = mlp_spec("sgd_momentum")
    spec["device"] = {"kind": "cpu", "memory_gib": 0.05}
    result = assert_exact(spec)
    assert result.device.backend == "cpu"
    assert result.throughput is not None and result.throughput.measured


def test_infeasible_plan_explains_itself() -> None:
    spec = PlanSpec.model_validate(mlp_spec("adam", memory_gib=0.01))
    result = engine.plan(spec)
    assert not result.feasible and result.max_micro_batch_size == 0
    assert [t.batch_size for t in result.trials] == [1]
    assert result.memory.peak > result.memory.capacity * 0.99
    assert result.memory.parameters > 0 and result.suggestions
    assert result.warnings[0].code == "infeasible"


def test_batchnorm_warning_when_micro_batch_is_small(small_spec: dict[str, Any]) -> None:
    small_spec["data"].update(height=512, width=512)
    small_spec["device"] = {"kind": "simulated", "memory_gib": 1.3}
    result = engine.plan(PlanSpec.model_validate(small_spec))
    assert 0 < result.micro_batch_size < 16
    codes = [w.code for w in result.warnings]
    assert "batchnorm_small_micro_batch" in codes
    assert result.accumulation_steps * result.micro_batch_size >= 512


def test_global_batch_over_dataset_warns(small_spec: dict[str, Any]) -> None:
    small_spec["data"]["num_samples"] = 100
    result = engine.plan(PlanSpec.model_validate(small_spec))
    assert "global_batch_exceeds_dataset" in [w.code for w in result.warnings]


def test_shape_that_does_not_chain_names_the_layer(small_spec: dict[str, Any]) -> None:
    small_spec["model"]["layers"].insert(8, {"type": "Linear", "in_features": 7, "out_features": 5})
    with pytest.raises(SpecError) as info:
        model_of(PlanSpec.model_validate(small_spec))
    assert info.value.loc == ("model", "layers", 8)


def test_head_must_match_the_classes(small_spec: dict[str, Any]) -> None:
    small_spec["model"]["layers"][-1]["out_features"] = 7
    with pytest.raises(SpecError, match="num_classes=10"):
        model_of(PlanSpec.model_validate(small_spec))


def test_sequence_layers_and_regression() -> None:
    spec = {
        "model": {
            "source": "layers",
            "layers": [
                {"type": "LSTM", "hidden_size": 64},
                {"type": "TransformerEncoderLayer"},
                {"type": "Flatten"},
                {"type": "Linear", "out_features": 3},
            ],
        },
        "data": {"kind": "tensor", "shape": [16, 32], "target": "regression", "num_outputs": 3},
        "training": {"optimizer": "rmsprop"},
        "device": {"kind": "simulated", "memory_gib": 1},
    }
    assert_exact(spec)


def test_unsupported_torchvision_family_is_a_clear_error() -> None:
    spec = {
        "model": {"source": "torchvision", "name": "fasterrcnn_resnet50_fpn"},
        "data": {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 3},
    }
    with pytest.raises(SpecError, match="detection"):
        model_of(PlanSpec.model_validate(spec))


def test_every_torchvision_name_builds_or_is_refused_clearly() -> None:
    from workers.engine.models.vision import SUPPORTED_FAMILIES, families

    for name, family in families().items():
        spec = PlanSpec.model_validate(
            {
                "model": {"source": "torchvision", "name": name},
                "data": {
                    "kind": "image",
                    "channels": 3,
                    "height": 224,
                    "width": 224,
                    "num_classes": 10,
                },
            }
        )
        if family in SUPPORTED_FAMILIES:
            assert model_of(spec).module is not None, name
        else:
            with pytest.raises(SpecError):
                model_of(spec)


def test_grayscale_torchvision_adapts_the_stem() -> None:
    spec = {
        "model": {"source": "torchvision", "name": "resnet18"},
        "data": {"kind": "image", "channels": 1, "height": 32, "width": 32, "num_classes": 10},
        "device": {"kind": "simulated", "memory_gib": 1},
    }
    built = model_of(PlanSpec.model_validate(spec))
    assert built.module.conv1.in_channels == 1 and built.notes


@pytest.mark.parametrize("gpu", ["T4", "L4", "A100-40GB", "H100-80GB"])
def test_exact_on_catalogue_cards(small_spec: dict[str, Any], gpu: str) -> None:
    small_spec["device"] = {"kind": "simulated", "gpu": gpu}
    small_spec["data"].update(height=96, width=96)
    result = assert_exact(small_spec)
    assert result.device.name == gpu
    assert len([t for t in result.trials if t.phase == "search"]) <= 8


def test_adafactor_keeps_factored_state() -> None:
    spec = PlanSpec.model_validate(mlp_spec("adafactor"))
    with session_of(spec) as session:
        parts = session.probe(1).breakdown
    # rows + columns per matrix, far below one full copy of the parameters
    assert 0 < parts["optimizer_state"] < parts["parameters"] / 10


def test_local_cli_prints_only_json(small_spec: dict[str, Any], tmp_path: Any) -> None:
    import json

    from typer.testing import CliRunner

    from service.cli import app

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(small_spec))
    result = CliRunner().invoke(app, ["plan", str(spec_file), "--local", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["status"] == "succeeded" and body["result"]["max_micro_batch_size"] > 0


def test_local_cli_names_the_bad_field(small_spec: dict[str, Any], tmp_path: Any) -> None:
    import json

    from typer.testing import CliRunner

    from service.cli import app

    small_spec["training"]["optimizer"] = "lamb"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(small_spec))
    result = CliRunner().invoke(app, ["plan", str(spec_file), "--local"])
    assert result.exit_code == 2 and "training.optimizer" in result.output


def test_simulated_throughput_counts_the_flops() -> None:
    """Forward 2 FLOPs per weight per sample, backward 4 (2 for the input of the first layer
    are skipped: the data needs no gradient)."""
    result = engine.plan(PlanSpec.model_validate(mlp_spec("adam", memory_gib=1.0)))
    throughput = result.throughput
    assert throughput is not None and not throughput.measured
    w1, w2, w3 = 512 * 1024, 1024 * 1024, 1024 * 10
    assert throughput.flops_per_sample == 4 * w1 + 6 * (w2 + w3)
    assert throughput.split is not None and throughput.samples_per_second_band is not None
    assert throughput.epoch_time_s == pytest.approx(
        throughput.step_time_s * result.optimizer_steps_per_epoch
    )


def test_a_plan_counts_its_traces_and_costs_the_step_from_the_probe_s_trace(
    small_spec: dict[str, Any],
) -> None:
    """Every probe is one traced step, and the step's roofline comes from the breakdown probe's
    own trace: a plan traces as many steps as it streams trials, plus one where the chosen
    micro-batch was already probed by the search (its roofline then needs a trace of its own)."""
    spec = PlanSpec.model_validate(
        small_spec | {"search": {**small_spec["search"], "what_if": True}}
    )
    streamed: list[Any] = []
    result = engine.plan(spec, streamed.append)
    probed_by_search = any(
        t.batch_size == result.micro_batch_size and t.phase == "search" for t in result.trials
    )
    assert result.traced_steps == len(streamed) + probed_by_search
    # the cost read off a probe's trace is the cost of tracing that step on its own
    with session_of(spec) as session:
        session.want_cost(64)
        session.probe(64)
        reused = session.step_cost(64)
    with session_of(spec) as session:
        fresh = session.step_cost(64)
    assert reused is not None and fresh is not None
    assert (reused.flops, reused.total_s()) == (fresh.flops, fresh.total_s())


def test_the_engine_never_reaches_for_the_hub() -> None:
    """Importing the engine puts the Hugging Face Hub offline (bitsandbytes' CPU backend asked
    the Hub about a kernel on import); an operator's own setting stands."""
    import os
    import subprocess
    import sys

    probe = (
        "import workers, huggingface_hub.constants as c, os; "
        "print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    run = lambda e: subprocess.run(  # noqa: E731
        [sys.executable, "-c", probe], env=e, capture_output=True, text=True, check=True
    ).stdout.split()
    assert run(env) == ["1", "True"]
    assert run(env | {"HF_HUB_OFFLINE": "0"}) == ["0", "False"]
