"""Token data as it is: length distributions, padding to the longest, packing."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from service.schemas.examples import TINY_LLAMA
from service.schemas.spec import PlanSpec, TokenLengths
from tests.helpers import session_of
from workers import engine
from workers.engine.token_batching import distribution

# A skewed instruction-tuning mix: most samples short, a long tail up to the row length.
SKEWED = {"percentiles": {"10": 60, "50": 250, "90": 1100, "99": 3000, "100": 4096}}


def token_spec(batching: str, lengths: dict[str, Any] | None = SKEWED, **data: Any) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "architecture": "LlamaForCausalLM",
                "config": TINY_LLAMA | {"max_position_embeddings": 8192},
            },
            "data": {
                "kind": "tokens",
                "seq_len": 4096,
                "vocab_size": 1000,
                "num_samples": 100_000,
                "lengths": lengths,
                "batching": batching,
                **data,
            },
            "training": {"precision": "bf16-mixed", "global_batch_size": 256},
            "device": {"kind": "simulated", "memory_gib": 2},
            "search": {"what_if": False},
        }
    )


def test_a_distribution_from_percentiles_or_a_histogram() -> None:
    uniform = distribution(TokenLengths.model_validate({"percentiles": {"0": 1, "100": 1000}}))
    assert uniform.mean == pytest.approx(500.5, rel=0.01) and uniform.longest == 1000
    # the same uniform lengths as a histogram of ten equal bins
    bins = [{"up_to": 100 * (i + 1), "count": 7} for i in range(10)]
    same = distribution(TokenLengths.model_validate({"histogram": bins}))
    assert same.mean == pytest.approx(500, rel=0.01)
    # E[max of b]: the mean at 1, rising with b; for uniform(1, 1000) 1 + 999 * b / (b + 1)
    assert uniform.expected_longest_of(1) == pytest.approx(uniform.mean)
    for b in (2, 8, 64):
        assert uniform.expected_longest_of(b) == pytest.approx(1 + 999 * b / (b + 1), rel=0.01)
    skewed = distribution(TokenLengths.model_validate(SKEWED))
    assert skewed.mean < 1000 and skewed.longest == 4096


def test_padding_to_the_longest_plans_the_worst_case_and_times_the_expected_batch() -> None:
    padded, longest = (
        engine.plan(token_spec("pad_to_max")),
        engine.plan(token_spec("pad_to_longest")),
    )
    # a batch may hold a 4096-token sample: the same memory, the same batches
    assert longest.max_micro_batch_size == padded.max_micro_batch_size
    assert longest.micro_batch_size == padded.micro_batch_size
    a, b = padded.token_batching, longest.token_batching
    assert a is not None and b is not None and a.batch_unit == b.batch_unit == "samples"
    assert a.padding_fraction == pytest.approx(1 - a.mean_length / 4096, abs=1e-3)
    assert b.padding_fraction < a.padding_fraction
    assert padded.throughput is not None and longest.throughput is not None
    speedup = longest.throughput.samples_per_second / padded.throughput.samples_per_second
    assert speedup == pytest.approx(a.tokens_per_micro_batch / b.tokens_per_micro_batch, rel=1e-4)


def test_shorter_samples_trace_shorter_rows() -> None:
    short = {"percentiles": {"50": 200, "100": 1024}}
    longest = engine.plan(token_spec("pad_to_longest", short))
    padded = engine.plan(token_spec("pad_to_max", short))
    assert longest.token_batching is not None and longest.token_batching.traced_length == 1024
    assert longest.max_micro_batch_size > padded.max_micro_batch_size


def test_packing_counts_rows_and_reaches_the_samples_asked() -> None:
    packed = engine.plan(token_spec("packed"))
    t = packed.token_batching
    assert t is not None and t.batch_unit == "rows" and t.padding_fraction == 0
    per_row = 4096 / t.mean_length
    assert t.samples_per_micro_batch == pytest.approx(packed.micro_batch_size * per_row, rel=1e-3)
    rows = packed.micro_batch_size * packed.accumulation_steps * packed.world_size
    assert rows == packed.effective_global_batch_size
    assert rows * per_row >= 256 and (rows - packed.micro_batch_size) * per_row < 256
    assert t.effective_global_batch_samples == pytest.approx(rows * per_row, rel=1e-3)
    assert packed.iterations_per_epoch == math.ceil(
        math.ceil(100_000 / per_row) / packed.micro_batch_size
    )
    # no padding computed: more samples a second than padding each batch to its longest
    longest = engine.plan(token_spec("pad_to_longest"))
    assert packed.throughput is not None and longest.throughput is not None
    assert packed.throughput.samples_per_second > longest.throughput.samples_per_second


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"lengths": {"percentiles": {"50": 300, "100": 5000}}}, "lengths"),
        ({"lengths": {"percentiles": {"50": 300, "90": 200, "100": 400}}}, "lengths"),
        ({"lengths": {"percentiles": {"50": 300}}}, "percentiles"),
        ({"lengths": {"histogram": []}}, "histogram"),
        ({"lengths": {"histogram": [{"up_to": 64, "count": 0}]}}, "lengths"),
        ({"lengths": None, "batching": "packed"}, "batching"),
    ],
)
def test_bad_lengths_name_their_field(data: dict[str, Any], where: str) -> None:
    raw = token_spec("pad_to_max").model_dump(mode="json")
    raw["data"] |= data
    with pytest.raises(ValidationError) as caught:
        PlanSpec.model_validate(raw)
    assert any(where in map(str, e["loc"]) for e in caught.value.errors())


def tokens_spec(batching: str, lengths: dict[str, Any] | None = SKEWED) -> PlanSpec:
    raw = token_spec(batching, lengths).model_dump(mode="json")
    raw["training"] |= {"batch_unit": "tokens", "global_batch_size": 262_144}
    return PlanSpec.model_validate(raw)


def test_a_global_batch_in_tokens_is_rows_when_packed() -> None:
    packed = engine.plan(tokens_spec("packed"))
    t = packed.token_batching
    assert t is not None and t.global_batch_tokens == 262_144
    assert packed.global_batch_size == 262_144 // 4096  # 64 full rows
    rows = packed.micro_batch_size * packed.accumulation_steps
    assert rows >= 64 and t.effective_global_batch_tokens == rows * 4096
    # the epoch is counted in rows too
    epoch_rows = math.ceil(100_000 / (4096 / t.mean_length))
    assert packed.iterations_per_epoch == math.ceil(epoch_rows / packed.micro_batch_size)


def test_a_global_batch_in_tokens_is_samples_at_the_mean_length_when_padded() -> None:
    padded = engine.plan(tokens_spec("pad_to_longest"))
    t = padded.token_batching
    assert t is not None
    assert padded.global_batch_size == math.ceil(262_144 / distribution_mean())
    assert t.effective_global_batch_tokens >= 262_144 * 0.999
    # no lengths: every sample is seq_len tokens
    plain = engine.plan(tokens_spec("pad_to_max", None))
    assert plain.global_batch_size == 262_144 // 4096 and plain.token_batching is None


def distribution_mean() -> float:
    return distribution(TokenLengths.model_validate(SKEWED)).mean


def test_tokens_need_token_data(small_spec: dict[str, Any]) -> None:
    raw = small_spec | {"training": {**small_spec["training"], "batch_unit": "tokens"}}
    with pytest.raises(engine.SpecError) as caught:
        engine.check(PlanSpec.model_validate(raw))
    assert caught.value.loc == ("training", "batch_unit")


# -- what the rows tell the attention (models.hf.row_layout) ---------------------------------
SHORTER = {"percentiles": {"50": 200, "100": 1024}}


def _activations(batching: str, lengths: dict[str, Any] | None, attention: str) -> int:
    """Activation bytes of one traced step: 2 rows of 1024 tokens on a card they fit on."""
    raw = token_spec(batching, lengths, seq_len=1024).model_dump(mode="json")
    raw["model"]["attn_implementation"] = attention
    raw["device"]["memory_gib"] = 64
    with session_of(PlanSpec.model_validate(raw)) as session:
        return session.probe(2).breakdown["activations"]


@pytest.mark.parametrize("batching", ["pad_to_max", "packed"])
def test_sdpa_keeps_a_square_mask_per_layer_for_padded_or_packed_rows(batching: str) -> None:
    """transformers hands SDPA a (rows, 1, T, T) mask for padded rows and for packed positions;
    SDPA converts it to the query's dtype per layer and keeps it for backward. flash_attention_2
    runs the same rows as varlen sequences: no mask."""
    sdpa = _activations(batching, SHORTER, "sdpa")
    flash = _activations(batching, SHORTER, "flash_attention_2")
    layers, rows, t = TINY_LLAMA["num_hidden_layers"], 2, 1024
    per_layer = rows * t * t * 2  # bf16, the autocast dtype of the query
    assert layers * per_layer <= sdpa - flash <= layers * per_layer + rows * t * t


def test_whole_rows_give_sdpa_no_mask() -> None:
    """Samples as long as the row (or no lengths): no padding, nothing packed, no mask."""
    flash = _activations("pad_to_max", None, "flash_attention_2")
    assert _activations("pad_to_max", None, "sdpa") == flash
    full = {"percentiles": {"0": 1024, "100": 1024}}
    assert _activations("pad_to_max", full, "sdpa") == flash


def test_packed_sdpa_warns_and_refuses_the_ring() -> None:
    raw = token_spec("packed", SHORTER, seq_len=1024).model_dump(mode="json")
    planned = engine.plan(PlanSpec.model_validate(raw))
    warning = next(w for w in planned.warnings if w.code == "sdpa_square_mask")
    assert f"({planned.micro_batch_size}, 1, 1024, 1024)" in warning.message
    raw["training"] |= {"parallelism": {"strategy": "fsdp", "world_size": 2, "context_parallel": 2}}
    with pytest.raises(engine.SpecError) as caught:
        engine.check(PlanSpec.model_validate(raw))
    assert caught.value.loc == ("training", "parallelism", "context_parallel")
    raw["model"]["attn_implementation"] = "flash_attention_2"
    engine.check(PlanSpec.model_validate(raw))  # varlen rows go round the ring


def test_flex_attention_takes_packed_rows_without_a_square_mask() -> None:
    """FlexAttention keeps flash's O(T) statistics and takes the documents as a block mask."""
    flash = _activations("packed", SHORTER, "flash_attention_2")
    assert _activations("packed", SHORTER, "flex_attention") == flash


def test_an_attention_the_architecture_lacks_is_refused_at_its_field() -> None:
    raw = token_spec("pad_to_max", None, seq_len=128).model_dump(mode="json")
    raw["model"] = {
        "source": "transformers",
        "preset": "gpt2",
        "attn_implementation": "flex_attention",
    }
    with pytest.raises(engine.SpecError) as caught:
        engine.check(PlanSpec.model_validate(raw))
    assert caught.value.loc == ("model", "attn_implementation")
    assert "GPT2LMHeadModel" in str(caught.value)
