"""Padding against packing on skewed sample lengths (issue 26): llama-3.2-1b, bf16-mixed,
checkpointing, rows of 4096 tokens on a simulated A100-80GB, global batch 256 samples. The
lengths are an illustrative long-tailed instruction mix given as percentiles (not measured on a
data set): p10 60, p50 250, p90 1100, p99 3000, max 4096 tokens. For each batching, with sdpa and
with flash_attention_2: the micro-batch (samples, or rows when packed), accumulation, samples per
second, the padding share, the square mask sdpa is handed for padded or packed rows (MiB per
layer at the micro-batch) and the plan's wall time on this machine.

.venv/bin/python -m bench.token_batching
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.machine import header
from service.schemas.spec import PlanSpec
from workers import engine

LENGTHS = {"percentiles": {"10": 60, "50": 250, "90": 1100, "99": 3000, "100": 4096}}


def spec(batching: str, attention: str = "sdpa") -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "preset": "llama-3.2-1b",
                "attn_implementation": attention,
            },
            "data": {
                "kind": "tokens",
                "seq_len": 4096,
                "num_samples": 100_000,
                "lengths": LENGTHS,
                "batching": batching,
            },
            "training": {
                "precision": "bf16-mixed",
                "gradient_checkpointing": True,
                "global_batch_size": 256,
                "loss_kernel": "liger",
            },
            "device": {"kind": "simulated", "gpu": "A100-80GB"},
            "search": {"what_if": False},
        }
    )


def main() -> None:
    print(header())
    print(
        f"{'batching':<15} {'attention':<18} {'unit':<8} {'max':>4} {'micro':>6} {'accum':>6} "
        f"{'samples/s':>10} {'padding':>8} {'mask MiB':>9} {'wall s':>7}"
    )
    rows = []
    for batching in ("pad_to_max", "pad_to_longest", "packed"):
        for attention in ("sdpa", "flash_attention_2"):
            rows.append(_row(batching, attention))
    out = Path(__file__).parent / "results" / "token_batching.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


def _row(batching: str, attention: str) -> dict[str, object]:
    start = time.perf_counter()
    result = engine.plan(spec(batching, attention))
    wall = time.perf_counter() - start
    t = result.token_batching
    assert t is not None and result.throughput is not None
    masked = any(w.code == "sdpa_square_mask" for w in result.warnings)
    mask_mib = result.micro_batch_size * t.traced_length**2 * 2 / 2**20 if masked else 0.0
    row = {
        "batching": batching,
        "attention": attention,
        "unit": t.batch_unit,
        "max_micro_batch": result.max_micro_batch_size,
        "micro_batch": result.micro_batch_size,
        "accumulation": result.accumulation_steps,
        "samples_per_second": round(result.throughput.samples_per_second, 2),
        "padding_fraction": t.padding_fraction,
        "samples_per_micro_batch": t.samples_per_micro_batch,
        "effective_global_batch_samples": t.effective_global_batch_samples,
        "square_mask_mib_per_layer": round(mask_mib, 1),
        "wall_s": round(wall, 1),
    }
    print(
        f"{batching:<15} {attention:<18} {t.batch_unit:<8} {result.max_micro_batch_size:>4} "
        f"{result.micro_batch_size:>6} "
        f"{result.accumulation_steps:>6} {row['samples_per_second']:>10.2f} "
        f"{t.padding_fraction:>8.1%} {mask_mib:>9.0f} {wall:>7.1f}"
    )
    return row


if __name__ == "__main__":
    main()
