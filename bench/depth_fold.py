"""Depth folding (issue 28): whole LLM plans traced block by block (search.depth_folding
false, what every plan did before) against the folded plan (2-5 blocks traced, the stack
synthesised), in the same process, alternating, each case `--repeat` times. Reports the median
wall times, their ratio, the traced steps, and whether the two plans are the same (every field
but the step time's float sums, which are compared to 1e-9).

.venv/bin/python -m bench.depth_fold [--repeat 3] [--cases 8b-lora,8b-lora-what-if,1b]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from bench.machine import header
from service.schemas.spec import PlanSpec
from workers import engine

LORA_8B = {
    "model": {"source": "transformers", "preset": "llama-3-8b"},
    "data": {"kind": "tokens", "seq_len": 4096, "num_samples": 10_000},
    "training": {
        "precision": "bf16-mixed",
        "gradient_checkpointing": True,
        "peft": {"method": "lora", "r": 16},
        "global_batch_size": 64,
    },
    "device": {"kind": "simulated", "gpu": "H100-80GB"},
}
FULL_1B = {
    "model": {"source": "transformers", "preset": "llama-3.2-1b"},
    "data": {"kind": "tokens", "seq_len": 2048, "num_samples": 10_000},
    "training": {"precision": "bf16-mixed", "global_batch_size": 64},
    "device": {"kind": "simulated", "gpu": "H100-80GB"},
}
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "8b-lora": (LORA_8B, False),
    "8b-lora-what-if": (LORA_8B, True),
    "1b": (FULL_1B, False),
    "1b-what-if": (FULL_1B, True),
}


def spec(case: dict[str, Any], what_if: bool, fold: bool) -> PlanSpec:
    return PlanSpec.model_validate(case | {"search": {"what_if": what_if, "depth_folding": fold}})


def same_plan(a: Any, b: Any) -> bool:
    skip = {"depth_folding", "traced_steps", "throughput", "what_if"}
    da, db = a.model_dump(exclude=skip), b.model_dump(exclude=skip)
    for d in (da, db):
        for trial in d["trials"]:
            trial.pop("duration_s", None)
    if da != db:
        return False
    whats = [[(w.change, w.value, w.max_micro_batch_size) for w in r.what_if] for r in (a, b)]
    ta, tb = (r.throughput.step_time_s if r.throughput else 0.0 for r in (a, b))
    return whats[0] == whats[1] and math.isclose(ta, tb, rel_tol=1e-9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    print(header())
    print(f"{'case':<17} {'full s':>8} {'folded s':>9} {'ratio':>6} {'steps':>11} {'same':>5}")
    rows = []
    for name in args.cases.split(","):
        case, what_if = CASES[name]
        times: dict[bool, list[float]] = {False: [], True: []}
        results: dict[bool, Any] = {}
        for _ in range(args.repeat):
            for fold in (False, True):
                start = time.perf_counter()
                results[fold] = engine.plan(spec(case, what_if, fold))
                times[fold].append(time.perf_counter() - start)
        full, folded = (statistics.median(times[f]) for f in (False, True))
        row = {
            "case": name,
            "full_s": [round(t, 2) for t in times[False]],
            "folded_s": [round(t, 2) for t in times[True]],
            "median_full_s": round(full, 2),
            "median_folded_s": round(folded, 2),
            "speedup": round(full / folded, 2),
            "traced_steps": [results[f].traced_steps for f in (False, True)],
            "max_micro_batch": results[True].max_micro_batch_size,
            "same_plan": same_plan(results[True], results[False]),
            "folding": results[True].depth_folding.model_dump()
            if results[True].depth_folding
            else None,
        }
        rows.append(row)
        steps = "/".join(str(s) for s in row["traced_steps"])
        print(
            f"{name:<17} {full:>8.1f} {folded:>9.1f} {row['speedup']:>6.2f} {steps:>11} "
            f"{row['same_plan']!s:>5}"
        )
    out = Path(__file__).parent / "results" / "depth_fold.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
