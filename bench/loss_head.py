"""The loss head at long context (issue 26): Llama-3.1-8B, LoRA r=16, bf16-mixed, gradient
checkpointing, on a simulated H100 (80 GB), with transformers' standard loss, Liger's fused
linear cross-entropy and Apple's Cut Cross-Entropy (which needs --precision bf16). For each: the
exact max micro-batch (infeasible: 0), the peak and the breakdown at micro-batch 1, samples/s,
the search's trials and the plan's wall time on this machine.

.venv/bin/python -m bench.loss_head [--seq-len 32768] [--kernels standard,liger] [--what-if]
    [--precision bf16-mixed]
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


def spec(
    seq_len: int, kernel: str, what_if: bool = False, precision: str = "bf16-mixed"
) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": "llama-3.1-8b"},
            "data": {"kind": "tokens", "seq_len": seq_len, "num_samples": 10_000},
            "training": {
                "precision": precision,
                "gradient_checkpointing": True,
                "peft": {"method": "lora", "r": 16},
                "global_batch_size": 8,
                "loss_kernel": kernel,
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": what_if},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--kernels", default="standard,liger")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument(
        "--what-if", action="store_true", help="with the what-ifs (and, if infeasible, fits_with)"
    )
    args = parser.parse_args()
    print(header())
    rows: list[dict[str, Any]] = []
    print(f"{'loss kernel':<12} {'max micro':>9} {'peak@1 GiB':>11} {'trials':>6} {'wall s':>7}")
    for kernel in args.kernels.split(","):
        start = time.perf_counter()
        result = engine.plan(spec(args.seq_len, kernel, args.what_if, args.precision))
        wall = time.perf_counter() - start
        at_one = next((t for t in result.trials if t.batch_size == 1), result.trials[0])
        row = {
            "loss_kernel": kernel,
            "seq_len": args.seq_len,
            "precision": args.precision,
            "feasible": result.feasible,
            "samples_per_second": (
                round(result.throughput.samples_per_second, 3) if result.throughput else None
            ),
            "max_micro_batch": result.max_micro_batch_size,
            "peak_at_1_gib": round(at_one.peak_bytes / GIB, 2),
            "breakdown_gib": {
                k: round(v / GIB, 2)
                for k, v in result.memory.model_dump().items()
                if isinstance(v, int) and v >= GIB // 100 and k not in ("capacity",)
            },
            "trials": len(result.trials),
            "wall_s": round(wall, 1),
        }
        rows.append(row)
        print(
            f"{kernel:<12} {row['max_micro_batch']:>9} {row['peak_at_1_gib']:>11.2f} "
            f"{row['trials']:>6} {row['wall_s']:>7.1f}  {row['samples_per_second']} samples/s"
        )
        print(f"{'':<12} memory at the plan's micro-batch (GiB): {row['breakdown_gib']}")
        if args.what_if:
            row["what_if"] = {
                f"{w.change}={w.value}": w.max_micro_batch_size for w in result.what_if
            }
            row["fits_with"] = result.fits_with.model_dump() if result.fits_with else None
            print(f"{'':<12} what-if max micro-batch: {row['what_if']}")
            print(f"{'':<12} fits_with: {row['fits_with']}")
    name = "loss_head_what_if.json" if args.what_if else "loss_head.json"
    if args.precision != "bf16-mixed":
        name = name.replace(".json", f"_{args.precision}.json")
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
