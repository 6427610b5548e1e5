"""The `transformers` source: a Hugging Face architecture built from a config, never weights.

`preset` names a public config (numbers copied from the model's config.json); `architecture`
names a transformers model class (checked to be a `PreTrainedModel` subclass) with its config
keys. Built on the meta device, so an 8B model costs nothing until a device materialises it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from service.schemas.spec import DataSpec, TransformersModel
from workers.engine.errors import SpecError
from workers.engine.models.built import BuiltModel
from workers.engine.models.moe import TRACEABLE, MoeLayout
from workers.engine.models.moe import describe as describe_moe
from workers.engine.trace import RowLayout

_LLAMA_3 = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3-8b": ("LlamaForCausalLM", _LLAMA_3),
    "llama-3.1-8b": ("LlamaForCausalLM", _LLAMA_3 | {"max_position_embeddings": 131072}),
    # config.json of meta-llama/Llama-3.1-70B and Llama-3.1-405B (rope scaling left out: it
    # changes no shape)
    "llama-3.1-70b": (
        "LlamaForCausalLM",
        _LLAMA_3
        | {
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "max_position_embeddings": 131072,
        },
    ),
    "llama-3.1-405b": (
        "LlamaForCausalLM",
        _LLAMA_3
        | {
            "hidden_size": 16384,
            "intermediate_size": 53248,
            "num_hidden_layers": 126,
            "num_attention_heads": 128,
            "max_position_embeddings": 131072,
        },
    ),
    "llama-3.2-1b": (
        "LlamaForCausalLM",
        {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "head_dim": 64,
        },
    ),
    "mistral-7b": (
        "MistralForCausalLM",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "max_position_embeddings": 32768,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
        },
    ),
    "qwen2.5-7b": (
        "Qwen2ForCausalLM",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 131072,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    ),
    # Mixture-of-experts (config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B)
    "mixtral-8x7b": (
        "MixtralForCausalLM",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 32000,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeForCausalLM",
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "vocab_size": 151936,
            "max_position_embeddings": 40960,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    ),
    "gpt2-xl": (
        "GPT2LMHeadModel",
        {"n_embd": 1600, "n_layer": 48, "n_head": 25, "vocab_size": 50257, "n_positions": 1024},
    ),
    "bert-base-uncased": (
        "BertForMaskedLM",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "vocab_size": 30522,
            "max_position_embeddings": 512,
        },
    ),
    "t5-base": (
        "T5ForConditionalGeneration",
        {
            "d_model": 768,
            "d_ff": 3072,
            "d_kv": 64,
            "num_layers": 12,
            "num_decoder_layers": 12,
            "num_heads": 12,
            "vocab_size": 32128,
        },
    ),
    "vit-base-patch16-224": (
        "ViTForImageClassification",
        {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "num_channels": 3,
        },
    ),
}

TEXT_SUFFIXES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForSeq2SeqLM",
    "ForSequenceClassification",
)
VISION_SUFFIXES = ("ForImageClassification",)


def resolve(model: TransformersModel) -> tuple[str, dict[str, Any]]:
    if model.preset is not None:
        if model.preset not in PRESETS:
            raise SpecError(
                ("model", "preset"),
                f"unknown preset {model.preset!r}; known: {', '.join(sorted(PRESETS))}",
            )
        architecture, config = PRESETS[model.preset]
        return architecture, config | dict(model.config)
    assert model.architecture is not None
    return model.architecture, dict(model.config)


def is_causal_lm_spec(model: TransformersModel) -> bool:
    """A transformers *ForCausalLM, told from the spec (the build checks it again; a preset it
    does not know is the build's 422, not this answer's)."""
    try:
        architecture, _ = resolve(model)
    except SpecError:
        return False
    return architecture.endswith("ForCausalLM")


def model_class(architecture: str) -> Any:
    import transformers  # the optional `nlp` extra

    if not architecture.endswith(TEXT_SUFFIXES + VISION_SUFFIXES):
        raise SpecError(
            ("model", "architecture"),
            f"{architecture}: trainplan plans "
            f"architectures ending in {', '.join(TEXT_SUFFIXES + VISION_SUFFIXES)}",
        )
    cls = getattr(transformers, architecture, None)
    if (
        cls is None
        or not isinstance(cls, type)
        or not issubclass(cls, transformers.PreTrainedModel)
    ):
        raise SpecError(
            ("model", "architecture"), f"transformers has no model class {architecture!r}"
        )
    return cls


def attention_of(model: TransformersModel) -> str:
    """The attention kernel the model runs with: the spec's (or its config's), else
    transformers' own default: sdpa where the architecture supports it, else eager (gpt-oss's
    attention sinks have no SDPA path)."""
    if model.attn_implementation or isinstance(model.config.get("attn_implementation"), str):
        return model.attention
    architecture, _ = resolve(model)
    return "sdpa" if getattr(model_class(architecture), "_supports_sdpa", True) else "eager"


# the kernels transformers hands a (batch, 1, T, T) mask (flex_attention gets a block mask)
MASKED_ATTENTION = ("sdpa", "eager")


def row_layout(attention: str, data: DataSpec) -> RowLayout:
    """How the rows a collator makes reach the attention, where it changes the memory.

    With `sdpa` (and `eager`), transformers builds a boolean (batch, 1, T, T) mask from a padding
    mask with a zero in it (`masking_utils.sdpa_mask`: `_ignore_causal_mask_sdpa` skips it only
    without padding) and from packed position ids (`find_packed_sequence_indices`); SDPA then
    cannot take the flash kernel, and CUDA's memory-efficient kernel gets the mask converted to
    the query's dtype per layer (`convert_boolean_attn_mask`, saved for backward): a square term
    in the row length. `flash_attention_2` unpads the rows (varlen) and reads packed positions as
    document boundaries, so nothing square is made: its rows count as whole."""
    if attention not in MASKED_ATTENTION or data.kind != "tokens" or data.lengths is None:
        return "whole"
    if data.batching == "packed":
        return "packed"
    shortest = data.lengths.shortest
    return "padded" if shortest < data.seq_len else "whole"


def row_inputs(layout: RowLayout, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The collator's tensors beside `input_ids` for rows laid out so (on the tokens' device):
    a padding mask of ones and zeros, or positions that restart at each packed document."""
    if layout == "padded":
        return {"attention_mask": torch.ones_like(tokens)}
    if layout == "packed":
        rows, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        return {"position_ids": positions.expand(rows, length).contiguous()}
    return {}


def hf_forward_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, **rows: torch.Tensor
) -> torch.Tensor:
    """The loss the model computes itself from labels, as the HF Trainer would; `rows` are the
    collator's other tensors (`row_inputs`)."""
    key = "pixel_values" if x.is_floating_point() else "input_ids"
    with causal_mask_as_on_a_gpu(packed="position_ids" in rows):
        return model(**{key: x, "labels": y, **rows}).loss


@contextmanager
def causal_mask_as_on_a_gpu(*, packed: bool = False) -> Iterator[None]:
    """A real training step on whole sequences builds no causal mask: with no padding and no
    cache, transformers looks for packed sequences in the position ids
    (`find_packed_sequence_indices`), finds none (`.all()` on the last index) and lets SDPA run
    with `is_causal=True`. On a fake tensor that check cannot read values, so transformers
    assumes packing and materialises a (batch, 1, T, T) mask with a copy per layer: a square
    term in the sequence (2 GiB a layer at 32k tokens) that the GPU never allocates. For whole
    rows the answer during the trace is the real run's: no packed sequences. Packed rows
    (`packed`) do hold several documents, and there transformers' own answer stands: it finds
    them, as on the GPU."""
    import transformers.masking_utils as masking  # the optional `nlp` extra

    find = getattr(masking, "find_packed_sequence_indices", None)
    if find is None or packed:  # another transformers, or packed rows: nothing to correct
        yield
        return
    masking.find_packed_sequence_indices = _no_packed_sequences
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = find


def _no_packed_sequences(position_ids: torch.Tensor) -> None:
    return None


def hf_config(model: TransformersModel, data: DataSpec) -> Any:
    """The model's transformers config as the build makes it (cheap: no module is built)."""
    architecture, config_values = resolve(model)
    return _config(model, data, architecture, model_class(architecture), config_values)


def build_transformers(model: TransformersModel, data: DataSpec) -> BuiltModel:
    architecture, config_values = resolve(model)
    cls = model_class(architecture)
    config = _config(model, data, architecture, cls, config_values)
    attention = attention_of(model)
    _check_attention(cls, attention)
    # flash_attention_2 needs the flash-attn package and a GPU, flex_attention torch.compile's
    # Triton kernel; SDPA's flash kernel keeps the same O(T) statistics (the output and a
    # float32 logsumexp per row and head), so it stands in for both
    config._attn_implementation = "eager" if attention == "eager" else "sdpa"
    try:
        module = cls(config)
    except Exception as exc:
        raise _config_error(architecture, exc, config_values) from None
    module.config.use_cache = False
    moe = _traceable_experts(module)
    family = "hf_sequence" if architecture.endswith("ForSequenceClassification") else "hf"
    return BuiltModel(
        module,
        family,
        forward_loss=hf_forward_loss,
        vocab_size=getattr(config, "vocab_size", None),
        moe=moe,
    )


def _config(
    model: TransformersModel,
    data: DataSpec,
    architecture: str,
    cls: Any,
    config_values: dict[str, Any],
) -> Any:
    """The architecture's config from the spec's values, each refusal a 422 at its key."""
    is_vision = architecture.endswith(VISION_SUFFIXES)
    if is_vision and data.kind != "image":
        raise SpecError(("data", "kind"), f"{architecture} takes images: use data.kind 'image'")
    if not is_vision and data.kind != "tokens":
        raise SpecError(("data", "kind"), f"{architecture} takes tokens: use data.kind 'tokens'")
    if is_vision:
        assert data.kind == "image"
        config_values.setdefault("num_labels", data.num_classes or 1000)
        config_values.setdefault("image_size", data.height)
        config_values.setdefault("num_channels", data.channels)
    if architecture.endswith("ForConditionalGeneration"):  # labels are shifted right from these
        config_values.setdefault("decoder_start_token_id", 0)
        config_values.setdefault("pad_token_id", 0)
    if architecture.endswith("ForSequenceClassification"):
        config_values.setdefault("num_labels", data.num_classes or 2)
    _check_sizes(model.config)
    try:
        config = cls.config_class(**config_values)
    except Exception as exc:  # whatever the library raises on a config it rejects is a 422
        raise _config_error(architecture, exc, config_values) from None
    if data.kind == "tokens":
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if limit is not None and data.seq_len > limit:
            raise SpecError(
                ("data", "seq_len"),
                f"seq_len {data.seq_len} is longer than the model's {limit} positions",
            )
    return config


# attn_implementation -> the class flag transformers checks before it loads a model with it
ATTENTION_SUPPORT = {
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}


def _check_attention(cls: Any, attention: str) -> None:
    flag = ATTENTION_SUPPORT.get(attention)
    if flag is not None and not getattr(cls, flag, True):
        raise SpecError(
            ("model", "attn_implementation"),
            f"{cls.__name__} does not support attn_implementation {attention!r} "
            f"(transformers' {flag} is False)",
        )


def _traceable_experts(module: nn.Module) -> MoeLayout | None:
    """The model's experts, if it has any, in an implementation a trace can follow."""
    layout = describe_moe(module)
    if layout is not None and layout.implementation not in TRACEABLE:
        raise SpecError(
            ("model", "config", "experts_implementation"),
            f"experts_implementation {layout.implementation!r} loops over the experts with "
            f"shapes that depend on the routing, which a plan cannot trace; use "
            f"{' or '.join(repr(t) for t in TRACEABLE)} (transformers' default: 'grouped_mm')",
        )
    return layout


# Config keys that count or size something: 0 or less never builds a model (transformers
# fails deep inside with messages like "0.0 cannot be raised to a negative power").
SIZE_KEY = re.compile(r"(^num_|^n_|_size$|_dim$|_layers$|_heads$|^max_position_embeddings$)")


def _check_sizes(config: dict[str, Any]) -> None:
    """Every size or count the user set is at least 1, named at its key if not."""
    for key, value in config.items():
        if not SIZE_KEY.search(key) or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value < 1:
            raise SpecError(("model", "config", key), f"{key} must be at least 1, not {value}")


def _config_error(architecture: str, exc: Exception, config: dict[str, Any]) -> SpecError:
    """A config the architecture rejects (heads that do not divide the width, ...), however
    the library says it: its message, at the config key it names (else `model.config`)."""
    message = str(exc) or type(exc).__name__
    named = [key for key in config if re.search(rf"\b{re.escape(key)}\b", message)]
    loc: tuple[str, ...] = ("model", "config", named[0]) if named else ("model", "config")
    return SpecError(loc, f"{architecture} rejects this config: {message}")
