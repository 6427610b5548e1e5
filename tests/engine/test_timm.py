"""timm as a model source: names from its registry, no weights, the data's classes, channels and
image size, its fused-attention switch, and configs that build the same model."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.schemas.spec import PlanSpec
from tests.helpers import assert_exact, configs_of, model_of, session_of
from workers import engine

timm = pytest.importorskip("timm")


def timm_spec(name: str, size: int = 64, channels: int = 3, **model: Any) -> dict[str, Any]:
    return {
        "model": {"source": "timm", "name": name, **model},
        "data": {
            "kind": "image",
            "channels": channels,
            "height": size,
            "width": size,
            "num_classes": 10,
            "num_samples": 1000,
        },
        "training": {"precision": "fp16-mixed", "optimizer": "nesterov", "global_batch_size": 64},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"headroom": 0.0},
    }


def test_a_timm_network_plans_exactly() -> None:
    result = assert_exact(timm_spec("resnet18"))
    built = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert result.model_summary["parameters"] == sum(p.numel() for p in built.parameters())


def test_grayscale_images_set_the_stem_s_channels() -> None:
    spec = PlanSpec.model_validate(timm_spec("resnet18", channels=1))
    stem = model_of(spec).module.conv1
    assert stem.in_channels == 1


def test_fused_attention_keeps_no_score_matrix() -> None:
    """timm's switch, set on this model's attention blocks: off, each block keeps its
    (batch, heads, T, T) softmax for backward, as timm did before SDPA."""
    activations = {}
    for fused in (True, False):
        spec = PlanSpec.model_validate(
            timm_spec("vit_tiny_patch16_224", size=224, fused_attn=fused)
            | {"device": {"kind": "simulated", "memory_gib": 16}}
        )
        with session_of(spec) as session:
            activations[fused] = session.probe(4).breakdown["activations"]
    blocks, heads, tokens = 12, 3, 197  # 14 x 14 patches and the class token
    scores = blocks * 4 * heads * tokens * tokens * 2  # at least one fp16 copy per block
    assert activations[False] - activations[True] >= scores


def test_the_configs_create_the_planned_model() -> None:
    spec = PlanSpec.model_validate(timm_spec("vit_tiny_patch16_224", size=96, fused_attn=False))
    settings = configs_of(spec)["timm"]
    create = settings["create_model"]
    assert create["pretrained"] is False and create["num_classes"] == 10
    assert settings["img_size"] == [96, 96] and settings["fused_attn"] is False
    made = timm.create_model(**create, img_size=tuple(settings["img_size"]))
    planned = model_of(spec).module
    assert sum(p.numel() for p in made.parameters()) == sum(p.numel() for p in planned.parameters())


@pytest.mark.parametrize(
    ("model", "where"),
    [
        ({"name": "no_such_net"}, "name"),
        ({"name": "resnet18", "kwargs": {"pretrained": True}}, "kwargs"),
        ({"name": "resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}}, "kwargs"),
        ({"name": "Bad-Name"}, "name"),
    ],
)
def test_bad_timm_models_name_their_field(model: dict[str, Any], where: str) -> None:
    raw = timm_spec("resnet18")
    raw["model"] = {"source": "timm", **model}
    try:
        spec = PlanSpec.model_validate(raw)
    except ValidationError as exc:
        assert any(where in map(str, e["loc"]) for e in exc.errors())
        return
    with pytest.raises(engine.SpecError) as caught:
        engine.check(spec)
    assert caught.value.loc == ("model", where)


def test_timm_benchmark_rows_become_cases_with_their_recipe() -> None:
    """bench.fidelity --timm: a row's bracket follows timm's batch decay (512, 384, 256, 192,
    ...): the batch that ran, and the step before it that ran out of memory."""
    from bench import timm_cases

    assert timm_cases.bracket(512) == {"fits": 512, "fails": None}
    assert timm_cases.bracket(192) == {"fits": 192, "fails": 256}
    assert timm_cases.bracket(48) == {"fits": 48, "fails": 64}
    assert timm_cases.family("tf_efficientnet_b0") == "efficientnet"
    assert timm_cases.family("vit_base_patch16_224") == "vit"
    row = {
        "model": "resnet18",
        "train_samples_per_sec": "2500.5",
        "train_batch_size": "384",
        "train_img_size": "160",
        "param_count": "11.69",
    }
    case = timm_cases._case("f.csv", row, "nhwc", ("1.12", "11.3"))
    spec = PlanSpec.model_validate(case["spec"])
    assert spec.model.source == "timm" and spec.model.fused_attn is False
    assert spec.data.layout == "channels_last" and spec.data.height == 160
    assert case["measured"]["max_batch"] == {"fits": 384, "fails": 512}
