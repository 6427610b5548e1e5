"""Mixture-of-experts plans (issue 27): Mixtral-8x7B and Qwen3-30B-A3B, full fine-tuning with
FSDP on 8 simulated H100s (80 GB), bf16 weights (as MoE models are trained) and bf16-mixed
(fp32 master weights: the experts' grouped GEMMs then run in fp32), 4k tokens, gradient
checkpointing. For each: the exact max micro-batch per rank, the reserved peak, the step time
and tokens/s per GPU the roofline predicts, the model's parameters and active parameters per
token, the search's trials and the plan's wall time on this machine.

.venv/bin/python -m bench.moe [--presets mixtral-8x7b,qwen3-30b-a3b] [--precisions bf16,bf16-mixed]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.machine import header
from service.schemas.spec import PlanSpec
from workers import engine

GIB = 2**30
SEQ_LEN = 4096


def spec(preset: str, precision: str) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": preset},
            "data": {"kind": "tokens", "seq_len": SEQ_LEN, "num_samples": 100_000},
            "training": {
                "precision": precision,
                "gradient_checkpointing": True,
                "global_batch_size": 64,
                "base_lr": 1e-4,
                "parallelism": {"strategy": "fsdp"},
                "world_size": 8,
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": False},
        }
    )


def row_of(preset: str, precision: str) -> dict[str, Any]:
    start = time.perf_counter()
    result = engine.plan(spec(preset, precision))
    wall = time.perf_counter() - start
    moe = result.moe
    throughput = result.throughput
    return {
        "preset": preset,
        "precision": precision,
        "max_micro_batch": result.max_micro_batch_size,
        "reserved_gib": round((result.memory.reserved or 0) / GIB, 2),
        "parameters": result.model_summary.get("parameters"),
        "active_parameters": moe.active_parameters if moe else None,
        "expert_gemm_dtype": moe.expert_gemm_dtype if moe else None,
        "step_time_s": round(throughput.step_time_s, 3) if throughput else None,
        "tokens_per_s_per_gpu": (
            round(throughput.samples_per_second * SEQ_LEN / result.world_size)
            if throughput
            else None
        ),
        "trials": len(result.trials),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="mixtral-8x7b,qwen3-30b-a3b")
    parser.add_argument("--precisions", default="bf16,bf16-mixed")
    args = parser.parse_args()
    print(header())
    print(
        f"{'preset':<15} {'precision':<11} {'max micro':>9} {'reserved GiB':>12} "
        f"{'tok/s/GPU':>10} {'experts in':>10} {'trials':>6} {'wall s':>7}"
    )
    rows = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            row = row_of(preset, precision)
            rows.append(row)
            print(
                f"{preset:<15} {precision:<11} {row['max_micro_batch']:>9} "
                f"{row['reserved_gib']:>12.2f} {row['tokens_per_s_per_gpu'] or 0:>10} "
                f"{row['expert_gemm_dtype'] or '-':>10} {row['trials']:>6} {row['wall_s']:>7.1f}"
            )
    for row in rows[:: len(args.precisions.split(","))]:
        total, active = row["parameters"], row["active_parameters"]
        print(f"{row['preset']}: {total:,} parameters, {active:,} active per token")
    out = Path(__file__).parent / "results" / "moe.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
