"""Depth folding (issue 28): whole LLM plans traced block by block (search.depth_folding
false, what every plan did before) against the folded plan (2-6 blocks traced, the stack
synthesised). Each plan runs in its own process (alternating full and folded, `--repeat`
times), so the wall time and the peak resident set (ru_maxrss from wait4) are that plan's.
Reports median wall times, their ratio, the traced steps, the peak RSS, and whether the two
plans are the same (every field; the step time's float sums to 1e-9).

.venv/bin/python -m bench.depth_fold [--repeat 3] [--cases 8b-lora,8b-fsdp-auto,...]
    [--folded-only]   (cases whose full trace would take too long to repeat)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.machine import header

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


def fsdp_auto(preset: str) -> dict[str, Any]:
    return {
        "model": {"source": "transformers", "preset": preset},
        "data": {"kind": "tokens", "seq_len": 4096, "num_samples": 1_000_000},
        "training": {
            "precision": "bf16-mixed",
            "gradient_checkpointing": True,
            "global_batch_size": 1024,
            "world_size": "auto",
            "parallelism": {"strategy": "fsdp"},
        },
        "device": {"kind": "simulated", "gpu": "H100-80GB"},
    }


CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "8b-lora": (LORA_8B, False),
    "8b-lora-what-if": (LORA_8B, True),
    "8b-fsdp-auto": (fsdp_auto("llama-3-8b"), False),
    "70b-fsdp-auto": (fsdp_auto("llama-3.1-70b"), False),
    "405b-fsdp-auto": (fsdp_auto("llama-3.1-405b"), False),
}


def run_one(case: str, fold: bool, out: str) -> None:
    """In the child: plan one case and write the plan and its wall time."""
    from service.schemas.spec import PlanSpec
    from workers import engine

    spec_dict, what_if = CASES[case]
    spec = PlanSpec.model_validate(
        spec_dict | {"search": {"what_if": what_if, "depth_folding": fold}}
    )
    start = time.perf_counter()
    result = engine.plan(spec)
    wall = time.perf_counter() - start
    Path(out).write_text(json.dumps({"wall_s": wall, "plan": result.model_dump(mode="json")}))


def spawn(case: str, fold: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, "-m", "bench.depth_fold", "--one", case, "--out", out]
    command += ["--fold"] if fold else []
    child = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"{case} (fold={fold}) failed with status {status}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    data["max_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return data


def same_plan(a: dict[str, Any], b: dict[str, Any]) -> bool:
    skip = ("depth_folding", "traced_steps", "throughput")
    da, db = ({k: v for k, v in p.items() if k not in skip} for p in (a, b))
    for d in (da, db):
        d["trials"] = [{k: v for k, v in t.items() if k != "duration_s"} for t in d["trials"]]
        for w in d.get("what_if", []):
            w["trials"] = [{k: v for k, v in t.items() if k != "duration_s"} for t in w["trials"]]
    if da != db:
        return False
    ta, tb = ((p["throughput"] or {}).get("step_time_s", 0.0) for p in (a, b))
    return math.isclose(ta, tb, rel_tol=1e-9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default="8b-lora,8b-lora-what-if,8b-fsdp-auto")
    parser.add_argument("--folded-only", default="", help="cases planned folded only")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--fold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.fold, args.out)
        return
    print(header())
    print(
        f"{'case':<16} {'full s':>8} {'folded s':>9} {'ratio':>6} {'steps':>9} "
        f"{'RSS MiB full/folded':>20} {'same':>5} {'world x micro':>13}"
    )
    rows = []
    folded_only = set(filter(None, args.folded_only.split(",")))
    for name in [c for c in args.cases.split(",") if c] + sorted(folded_only):
        modes = (True,) if name in folded_only else (False, True)
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(args.repeat if len(modes) == 2 else 1):
            for fold in modes:
                runs[fold].append(spawn(name, fold))
        medians = {f: statistics.median(r["wall_s"] for r in runs[f]) for f in modes}
        last = {f: runs[f][-1]["plan"] for f in modes}
        plan = last[True]
        row = {
            "case": name,
            "wall_s": {str(f): [round(r["wall_s"], 1) for r in runs[f]] for f in modes},
            "median_s": {str(f): round(medians[f], 1) for f in modes},
            "speedup": round(medians[False] / medians[True], 2) if False in medians else None,
            "traced_steps": {str(f): last[f]["traced_steps"] for f in modes},
            "max_rss_mib": {str(f): round(max(r["max_rss_mib"] for r in runs[f])) for f in modes},
            "same_plan": same_plan(last[True], last[False]) if False in last else None,
            "world_size": plan["world_size"],
            "max_micro_batch": plan["max_micro_batch_size"],
            "depth_folding": plan["depth_folding"],
        }
        rows.append(row)
        full = f"{medians[False]:.1f}" if False in medians else "-"
        ratio = f"{row['speedup']:.2f}" if row["speedup"] else "-"
        steps = "/".join(str(s) for s in row["traced_steps"].values())
        rss = "/".join(str(v) for v in row["max_rss_mib"].values())
        print(
            f"{name:<16} {full:>8} {medians[True]:>9.1f} {ratio:>6} {steps:>9} {rss:>20} "
            f"{row['same_plan']!s:>5} {plan['world_size']:>6} x {plan['max_micro_batch_size']}"
        )
    out = Path(__file__).parent / "results" / "depth_fold.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
