"""Hypothesis against the model sources (issue 13): `transformers` configs over several
architectures and `layers` lists, sent to the API as a user would. Whatever the library's config
class, model constructor or a layer's shape check raises, the answer is a 202 (queued) or a 422
whose problem names a field of the spec, never a 5xx.

Configs start from a small valid one per architecture and replace a few of its keys with values
from the edges (zero, negative, huge, wrong type), which is where constructors raise what they
like; the values stay inside what the schema admits (integers within 2**20, finite floats), so
these reach the model build rather than stopping at validation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.config import Settings
from tests.helpers import TINY_LLAMA

ARCHITECTURES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "LlamaForCausalLM": (
        TINY_LLAMA,
        ["head_dim", "rope_theta", "hidden_act", "tie_word_embeddings", "rms_norm_eps"],
    ),
    "MistralForCausalLM": (
        TINY_LLAMA,
        ["sliding_window", "head_dim", "hidden_act"],
    ),
    "GPT2LMHeadModel": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 256},
        ["n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights"],
    ),
    "BertForMaskedLM": (
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 1000,
        },
        ["max_position_embeddings", "type_vocab_size", "hidden_act", "position_embedding_type"],
    ),
    "T5ForConditionalGeneration": (
        {
            "d_model": 64,
            "d_ff": 128,
            "d_kv": 16,
            "num_layers": 2,
            "num_heads": 4,
            "vocab_size": 1000,
        },
        ["num_decoder_layers", "feed_forward_proj", "relative_attention_num_buckets"],
    ),
    "ViTForImageClassification": (
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 8,
            "num_labels": 10,
        },
        ["num_channels", "encoder_stride", "qkv_bias"],
    ),
}

EDGE_VALUES = st.one_of(
    st.integers(-4, 300),
    st.sampled_from([0, -1, 3, 7, 4095, 1 << 16, 1 << 20, -(1 << 20)]),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.sampled_from(["", "gelu", "relu", "silu", "gated-gelu", "absolute", "nonsense"]),
    st.lists(st.integers(-2, 64), max_size=3),
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """No worker (plans only queue); the model-check cache off, so every example builds."""
    db = tmp_path_factory.mktemp("fuzz-models") / "plans.db"
    settings = Settings(database_url=f"sqlite:///{db}", embedded_worker=False, model_check_cache=0)
    with TestClient(create_app(settings)) as client:
        yield client


def _assert_clear(answer: Any, spec: dict[str, Any]) -> None:
    event(f"HTTP {answer.status_code}")  # --hypothesis-show-statistics: how many got through
    if answer.status_code == 422:
        event(f"422 at {answer.json()['errors'][0]['loc'][:3]}")
    assert answer.status_code in (200, 202, 422), (answer.status_code, answer.text, spec)
    if answer.status_code == 422:
        problem = answer.json()
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert problem["errors"], problem
        for error in problem["errors"]:
            assert error["loc"] and error["loc"][0] in ("body", "model", "data", "training")
            assert error["msg"], problem


@st.composite
def transformers_specs(draw: st.DrawFn) -> dict[str, Any]:
    architecture = draw(st.sampled_from(sorted(ARCHITECTURES)))
    base, extra_keys = ARCHITECTURES[architecture]
    changes = draw(
        st.dictionaries(st.sampled_from(sorted(base) + extra_keys), EDGE_VALUES, max_size=3)
    )
    if architecture.startswith("ViT"):
        data = {"kind": "image", "channels": 3, "height": 32, "width": 32, "num_classes": 10}
    else:
        data = {"kind": "tokens", "seq_len": draw(st.sampled_from([8, 64, 300]))}
    return {
        "model": {
            "source": "transformers",
            "architecture": architecture,
            "config": base | changes,
        },
        "data": data,
        "training": {"optimizer": "adamw", "precision": "bf16-mixed"},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=transformers_specs())
def test_any_transformers_config_is_queued_or_a_422(api: TestClient, spec: dict[str, Any]) -> None:
    answer = api.post("/v1/plans", json=spec)
    _assert_clear(answer, spec)
    if answer.status_code == 422:
        problem = answer.json()
        locs = [tuple(e["loc"]) for e in problem["errors"]]
        # a config the library rejects is named as the config (or the field it broke)
        assert all(loc[:1] in (("model",), ("data",), ("body",)) for loc in locs), locs


LAYER_KWARGS: dict[str, list[str]] = {
    "Conv2d": ["in_channels", "out_channels", "kernel_size", "stride", "padding", "groups"],
    "Linear": ["in_features", "out_features"],
    "BatchNorm2d": ["num_features", "eps", "momentum"],
    "MaxPool2d": ["kernel_size", "stride", "padding"],
    "AdaptiveAvgPool2d": ["output_size"],
    "Flatten": ["start_dim", "end_dim"],
    "GroupNorm": ["num_groups", "num_channels"],
    "LayerNorm": ["normalized_shape"],
    "Dropout": ["p"],
    "ReLU": [],
    "Unflatten": ["dim", "unflattened_size"],
    "Upsample": ["scale_factor", "mode"],
    "PixelShuffle": ["upscale_factor"],
    "LSTM": ["input_size", "hidden_size", "num_layers", "batch_first"],
    "MultiheadAttention": ["embed_dim", "num_heads"],
    "Softmax": ["dim"],
}
LAYER_VALUES = st.one_of(
    st.integers(-2, 70),
    st.sampled_from([0, 1, 3, 1 << 20]),
    st.floats(-2.0, 4.0, allow_nan=False),
    st.booleans(),
    st.sampled_from(["nearest", "bilinear", "nonsense"]),
    st.lists(st.integers(-1, 16), min_size=1, max_size=3),
)


@st.composite
def layer(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(LAYER_KWARGS)))
    names = LAYER_KWARGS[kind]
    kwargs = draw(st.dictionaries(st.sampled_from(names), LAYER_VALUES)) if names else {}
    return {"type": kind, **kwargs}


@st.composite
def layers_specs(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(
        st.sampled_from(
            [
                {"kind": "image", "channels": 3, "height": 16, "width": 16, "num_classes": 10},
                {"kind": "image", "channels": 1, "height": 28, "width": 28, "num_classes": 10},
                {"kind": "tensor", "shape": [32], "num_classes": 4},
                {"kind": "tensor", "shape": [8, 16], "num_classes": 4},
            ]
        )
    )
    return {
        "model": {"source": "layers", "layers": draw(st.lists(layer(), min_size=1, max_size=6))},
        "data": data,
        "training": {"optimizer": "sgd", "precision": "fp32"},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=layers_specs())
def test_any_layer_list_is_queued_or_a_422(api: TestClient, spec: dict[str, Any]) -> None:
    _assert_clear(api.post("/v1/plans", json=spec), spec)
