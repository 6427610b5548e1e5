"""Tensor parallelism beside FSDP (issue 27): full fine-tuning, bf16-mixed, gradient
checkpointing, Liger's loss head, 4,096 tokens, on simulated H100s (80 GB, NVLink within a node
of 8); each block's linear layers split over N ranks (N = 1, 2, 4, 8: N = 1 is FSDP alone),
without and with sequence parallelism ("sp"), FSDP over world_size / N; then `layout: "auto"`
on the same job. For each layout: the exact max micro-batch per data rank, the per-rank peak,
tokens/s per GPU, the step's matmul and memory-bound seconds, the TP collectives' share of the
step, FSDP's seconds, traced steps and the plan's wall time on this machine.

.venv/bin/python -m bench.tensor_parallel [--cases 8b,70b,405b] [--tp 1,2,4,8] [--no-auto]
(`--tp ""`: the auto layout alone; results go to bench/results/tensor_parallel[_CASES].json)
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

SEQ = 4096
CASES = {  # name -> (preset, world size, global batch in sequences)
    "8b": ("llama-3.1-8b", 8, 64),
    "70b": ("llama-3.1-70b", 64, 512),
    "405b": ("llama-3.1-405b", 512, 2048),
}


def spec(
    preset: str, world: int, global_batch: int, tp: int, sp: bool = False, auto: bool = False
) -> PlanSpec:
    layout: dict[str, Any] = {"strategy": "fsdp", "tensor_parallel": tp, "sequence_parallel": sp}
    if auto:
        layout = {"layout": "auto"}
    return PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": preset},
            "data": {"kind": "tokens", "seq_len": SEQ, "num_samples": 1_000_000},
            "training": {
                "precision": "bf16-mixed",
                "gradient_checkpointing": True,
                "loss_kernel": "liger",
                "global_batch_size": global_batch,
                "world_size": world,
                "parallelism": layout,
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": False},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="8b,70b")
    parser.add_argument("--tp", default="1,2,4,8")
    parser.add_argument("--no-auto", action="store_true")
    args = parser.parse_args()
    print(header())
    print(
        f"{'case':<5} {'layout':<16} {'max micro':>9} {'peak GiB':>8} {'tok/s/GPU':>9} "
        f"{'matmul s':>8} {'memory s':>8} {'TP %':>6} {'FSDP s':>7} {'step s':>7} "
        f"{'traced':>6} {'wall s':>7}"
    )
    rows: list[dict[str, Any]] = []
    for case in args.cases.split(","):
        preset, world, global_batch = CASES[case]
        degrees = [int(n) for n in args.tp.split(",") if n]  # --tp "": the auto layout only
        layouts = [(tp, sp) for tp in degrees for sp in (False, True)]
        layouts = [(tp, sp) for tp, sp in layouts if tp > 1 or not sp]
        runs: list[tuple[str, PlanSpec]] = [
            (
                f"fsdp{world // tp} tp{tp}" + (" sp" if sp else ""),
                spec(preset, world, global_batch, tp, sp),
            )
            for tp, sp in layouts
        ]
        if not args.no_auto:
            runs.append(("auto", spec(preset, world, global_batch, 1, auto=True)))
        for name, job in runs:
            start = time.perf_counter()
            result = engine.plan(job)
            wall = time.perf_counter() - start
            rows.append(row := _row(case, name, world, result, wall))
            share = row["tensor_parallel_s"] / row["step_time_s"] if row["step_time_s"] else 0.0
            if result.layouts is not None:
                chosen = result.layouts
                name = (
                    f"auto: tp{chosen.tensor_parallel} cp{chosen.context_parallel} "
                    f"({len(chosen.checked)} planned)"
                )
            print(
                f"{case:<5} {name:<16} {row['max_micro_batch_size']:>9} "
                f"{row['peak_bytes'] / 2**30:>8.1f} {row['tokens_per_s_per_gpu']:>9.0f} "
                f"{row['matmul_s']:>8.2f} {row['memory_bound_s']:>8.2f} {share:>6.1%} "
                f"{row['communication_s']:>7.3f} {row['step_time_s']:>7.2f} "
                f"{row['traced_steps']:>6} {wall:>7.1f}",
                flush=True,
            )
    suffix = "" if args.cases == "8b,70b" else "_" + args.cases.replace(",", "_")
    out = Path(__file__).parent / "results" / f"tensor_parallel{suffix}.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


def _row(case: str, name: str, world: int, result: Any, wall: float) -> dict[str, Any]:
    t = result.throughput
    split = t.split if t is not None else None
    layout = result.layouts
    return {
        "case": case,
        "layout": name,
        "world_size": world,
        "chosen": layout.model_dump() if layout is not None else None,
        "feasible": result.feasible,
        "max_micro_batch_size": result.max_micro_batch_size,
        "micro_batch_size": result.micro_batch_size,
        "peak_bytes": result.memory.peak,
        "tokens_per_s_per_gpu": t.samples_per_second * SEQ / world if t else 0.0,
        "step_time_s": t.step_time_s if t else 0.0,
        "matmul_s": split.compute_s if split else 0.0,
        "memory_bound_s": split.memory_bound_s if split else 0.0,
        "tensor_parallel_s": split.tensor_parallel_s if split else 0.0,
        "tensor_parallel_bytes": split.tensor_parallel_bytes if split else 0.0,
        "communication_s": split.communication_s if split else 0.0,
        "traced_steps": result.traced_steps,
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
