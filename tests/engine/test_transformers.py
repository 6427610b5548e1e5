"""The transformers source: architectures from configs (no weights), presets, checkpointing."""

from __future__ import annotations

from typing import Any

import pytest

from service.schemas.spec import PlanSpec
from tests.helpers import TINY_LLAMA, assert_exact, configs_of, model_of, session_of
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session
from workers.engine.errors import SpecError
from workers.engine.models.hf import PRESETS


def lm_spec(
    architecture: str, config: dict[str, Any], seq_len: int = 64, **training: Any
) -> dict[str, Any]:
    return {
        "model": {"source": "transformers", "architecture": architecture, "config": config},
        "data": {"kind": "tokens", "seq_len": seq_len, "num_samples": 10000},
        "training": {"optimizer": "adamw", "precision": "bf16-mixed", **training},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }


@pytest.mark.parametrize(
    ("architecture", "config"),
    [
        ("LlamaForCausalLM", TINY_LLAMA),
        ("GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000}),
        (
            "BertForMaskedLM",
            {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "vocab_size": 1000,
            },
        ),
        (
            "T5ForConditionalGeneration",
            {
                "d_model": 64,
                "d_ff": 128,
                "d_kv": 16,
                "num_layers": 2,
                "num_heads": 4,
                "vocab_size": 1000,
            },
        ),
    ],
)
def test_text_architectures_plan_exactly(architecture: str, config: dict[str, Any]) -> None:
    result = assert_exact(lm_spec(architecture, config))
    assert result.model_summary["parameters"] > 0


def test_vision_transformer_plans() -> None:
    spec = {
        "model": {
            "source": "transformers",
            "architecture": "ViTForImageClassification",
            "config": {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "patch_size": 8,
            },
        },
        "data": {"kind": "image", "channels": 3, "height": 32, "width": 32, "num_classes": 10},
        "device": {"kind": "simulated", "memory_gib": 1},
    }
    assert_exact(spec)


def test_checkpointing_shrinks_transformer_activations() -> None:
    def activations(ckpt: bool) -> int:
        spec = PlanSpec.model_validate(
            lm_spec(
                "LlamaForCausalLM",
                TINY_LLAMA | {"num_hidden_layers": 4},
                seq_len=256,
                gradient_checkpointing=ckpt,
            )
        )
        with session_of(spec) as session:
            return session.probe(8).breakdown["activations"]

    assert activations(True) < 0.7 * activations(False)


def test_presets_build_without_allocating() -> None:
    for name in PRESETS:
        spec = PlanSpec.model_validate(
            {
                "model": {"source": "transformers", "preset": name},
                "data": (
                    {
                        "kind": "image",
                        "channels": 3,
                        "height": 224,
                        "width": 224,
                        "num_classes": 1000,
                    }
                    if "vit" in name
                    else {"kind": "tokens", "seq_len": 128}
                ),
            }
        )
        built = model_of(spec)
        assert all(p.is_meta for p in built.module.parameters()), name


def test_llama_3_8b_has_8b_parameters_and_tied_1b() -> None:
    big = model_of(
        PlanSpec.model_validate(
            {
                "model": {"source": "transformers", "preset": "llama-3-8b"},
                "data": {"kind": "tokens", "seq_len": 2048},
            }
        )
    )
    assert sum(p.numel() for p in big.module.parameters()) == 8_030_261_248
    small = PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": "llama-3.2-1b"},
            "data": {"kind": "tokens", "seq_len": 128},
            "training": {"precision": "bf16", "optimizer": "sgd"},
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
        }
    )
    with open_session(open_device(compile_job(small)), compile_job(small)) as session:
        parts = session.probe(1).breakdown
    assert parts["parameters"] == pytest.approx(1_235_814_400 * 2, rel=0.001)  # tied: once


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"architecture": "os"}, ("model", "architecture")),
        ({"architecture": "PreTrainedModelForCausalLM"}, ("model", "architecture")),
        ({"preset": "gpt-5"}, ("model", "preset")),
        # the library's own checks, which raise what they like (these were 500s)
        (
            {"architecture": "LlamaForCausalLM", "config": {"hidden_size": -5}},
            ("model", "config", "hidden_size"),
        ),
        (
            {
                "architecture": "LlamaForCausalLM",
                "config": {"num_attention_heads": 7, "hidden_size": 4096},
            },
            ("model", "config"),
        ),
    ],
)
def test_bad_transformers_specs(change: dict[str, Any], loc: tuple[str, ...]) -> None:
    model = {"source": "transformers"} | change
    spec = PlanSpec.model_validate({"model": model, "data": {"kind": "tokens", "seq_len": 16}})
    with pytest.raises(SpecError) as info:
        model_of(spec)
    assert info.value.loc == loc


def test_seq_len_beyond_the_model_is_refused() -> None:
    spec = PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": "gpt2"},
            "data": {"kind": "tokens", "seq_len": 4096},
        }
    )
    with pytest.raises(SpecError) as info:
        model_of(spec)
    assert info.value.loc == ("data", "seq_len")


def test_the_trace_builds_no_causal_mask_a_gpu_would_not() -> None:
    """With no padding, a real step lets SDPA apply causality (`is_causal`): nothing in memory
    grows with the square of the sequence. The fake trace must agree (transformers reads a fake
    tensor as graph tracing and would otherwise build a T x T mask and a copy per layer)."""

    def activations(seq_len: int) -> int:
        spec = PlanSpec.model_validate(
            {
                "model": {
                    "source": "transformers",
                    "architecture": "LlamaForCausalLM",
                    "config": TINY_LLAMA | {"max_position_embeddings": 16384},
                },
                "data": {"kind": "tokens", "seq_len": seq_len, "vocab_size": 1000},
                "training": {"precision": "bf16-mixed", "gradient_checkpointing": True},
                "device": {"kind": "simulated", "gpu": "H100-80GB"},
                "search": {"what_if": False},
            }
        )
        with session_of(spec) as session:
            parts = session.probe(1).breakdown
        return parts.get("activations", 0) + parts.get("temporary", 0)

    small, middle, large = activations(2048), activations(4096), activations(8192)
    # doubling the sequence doubles what grows with it (a square term would quadruple it)
    assert 1.8 < (large - middle) / (middle - small) < 2.3


def _attention_bytes(attn: str, seq_len: int) -> int:
    """Activations + temporaries of one traced step of a tiny Llama at `seq_len`."""
    spec = PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"max_position_embeddings": 8192},
                "attn_implementation": attn,
            },
            "data": {"kind": "tokens", "seq_len": seq_len, "vocab_size": 1000},
            "training": {"precision": "bf16-mixed"},
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": False},
        }
    )
    with session_of(spec) as session:
        parts = session.probe(1).breakdown
    return parts.get("activations", 0) + parts.get("temporary", 0)


def test_eager_attention_keeps_the_scores_and_flash_does_not() -> None:
    eager = [_attention_bytes("eager", n) for n in (1024, 2048)]
    sdpa = [_attention_bytes("sdpa", n) for n in (1024, 2048)]
    # 4 heads x T x T scores (and their softmax) per layer: a square term that sdpa lacks
    assert eager[1] - eager[0] > 3 * (sdpa[1] - sdpa[0])
    assert eager[1] - sdpa[1] > 2 * 4 * 2048 * 2048 * 2  # two layers' bf16 scores at least
    # flash-attention 2 keeps the same O(T) statistics as SDPA's flash kernel: its stand-in
    assert _attention_bytes("flash_attention_2", 2048) == sdpa[1]


def test_configs_load_the_model_with_the_traced_attention() -> None:
    spec = PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "preset": "llama-3.2-1b",
                "attn_implementation": "eager",
            },
            "data": {"kind": "tokens", "seq_len": 128},
        }
    )
    configs = configs_of(spec)
    assert configs["from_pretrained"] == {"attn_implementation": "eager"}
