"""Spec validation: every bad input is refused with the field named; the hash is canonical."""

from __future__ import annotations

import contextlib
from copy import deepcopy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.schemas.examples import RESNET50_A100, SMALL_GRAYSCALE_CNN
from service.schemas.spec import PlanSpec


def _with(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = deepcopy(spec)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def _error_locs(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        PlanSpec.model_validate(spec)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def test_examples_validate() -> None:
    assert PlanSpec.model_validate(RESNET50_A100).model.source == "torchvision"
    assert PlanSpec.model_validate(SMALL_GRAYSCALE_CNN).data.channels == 1


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("data.channels", 2, "data.image.channels"),
        ("data.height", 0, "data.image.height"),
        ("data.width", 100000, "data.image.width"),
        ("data.num_samples", 0, "data.image.num_samples"),
        ("training.optimizer", "lamb", "training.optimizer"),
        ("training.precision", "fp8", "training.precision"),
        ("training.global_batch_size", 0, "training.global_batch_size"),
        ("training.base_lr", -1, "training.base_lr"),
        ("training.world_size", 0, "training.world_size"),
        ("training.epochs", 0, "training.epochs"),
        ("training.trainable", ["conv1; rm -rf"], "training.trainable"),
        ("search.headroom", 0.9, "search.headroom"),
        ("search.max_batch_size", 0, "search.max_batch_size"),
        ("search.micro_batch", "odd", "search.micro_batch"),
        ("device", {"kind": "simulated"}, "device.simulated"),
        ("device", {"kind": "quantum"}, "device"),
        ("model.kwargs", {"weights": "IMAGENET1K_V1"}, "model.torchvision.kwargs"),
        ("model.name", "../../etc/passwd", "model.torchvision.name"),
        ("unknown_field", 1, "unknown_field"),
    ],
)
def test_bad_fields_are_named(path: str, value: Any, field: str) -> None:
    locs = _error_locs(_with(RESNET50_A100, path, value))
    assert any(loc.startswith(field) for loc in locs), locs


def test_unknown_layer_type_is_named() -> None:
    spec = _with(SMALL_GRAYSCALE_CNN, "model.layers.1", {"type": "os.system"})
    locs = _error_locs(spec)
    assert any(loc.startswith("model.layers.layers.1") for loc in locs), locs


def test_layer_kwargs_are_checked_against_the_class() -> None:
    spec = _with(SMALL_GRAYSCALE_CNN, "model.layers.0", {"type": "Conv2d", "evil": 1})
    with pytest.raises(ValidationError, match="does not take"):
        PlanSpec.model_validate(spec)


def test_huge_sample_is_refused() -> None:
    spec = _with(
        RESNET50_A100,
        "data",
        {"kind": "image", "channels": 4, "height": 8192, "width": 8192, "num_classes": 10},
    )
    with pytest.raises(ValidationError, match="64 Mi elements"):
        PlanSpec.model_validate(spec)


def test_classification_needs_num_classes() -> None:
    spec = deepcopy(SMALL_GRAYSCALE_CNN)
    del spec["data"]["num_classes"]
    with pytest.raises(ValidationError, match="num_classes"):
        PlanSpec.model_validate(spec)


def test_global_batch_at_least_world_size() -> None:
    spec = _with(RESNET50_A100, "training.world_size", 2048)
    with pytest.raises(ValidationError, match="world_size"):
        PlanSpec.model_validate(spec)


def test_hash_ignores_key_order_and_refresh_and_defaults() -> None:
    a = PlanSpec.model_validate(RESNET50_A100)
    reordered = {k: RESNET50_A100[k] for k in reversed(list(RESNET50_A100))}
    b = PlanSpec.model_validate(reordered | {"refresh": True})
    assert a.spec_hash == b.spec_hash
    c = PlanSpec.model_validate(_with(RESNET50_A100, "training.epochs", 91))
    assert c.spec_hash != a.spec_hash
    d = PlanSpec.model_validate(
        _with(RESNET50_A100, "device", {"kind": "simulated", "gpu": "H100-80GB"})
    )
    assert d.spec_hash != a.spec_hash


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_json_never_crashes_validation(value: Any) -> None:
    with contextlib.suppress(ValidationError):
        PlanSpec.model_validate(value)


def test_an_unknown_card_is_the_engines_422_at_device_gpu() -> None:
    """The catalogue is the engine's: the contract no longer imports it to check a name."""
    from workers import engine

    spec = PlanSpec.model_validate(
        _with(RESNET50_A100, "device", {"kind": "simulated", "gpu": "TPU-v5"})
    )
    with pytest.raises(engine.SpecError) as caught:
        engine.check(spec)
    assert caught.value.loc == ("device", "gpu")
    assert "unknown gpu 'TPU-v5'" in caught.value.message
