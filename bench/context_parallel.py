"""Context parallelism at long context (issue 26): Llama-3.1-8B, full fine-tune, bf16-mixed,
gradient checkpointing, Liger's loss head, FSDP on 8 simulated H100s (80 GB, NVLink), the
sequence split over N of them (N = 1, 2, 4, 8; world_size / N data-parallel groups). For each:
the exact max micro-batch (sequences per rank group), the tokens each rank holds, the ring's
bytes and share of the step, samples/s of the job, and the plan's wall time on this machine.
Also the activation offload beside N = 1 (checkpointed inputs on the host).

.venv/bin/python -m bench.context_parallel [--seq-lens 32768,131072] [--cp 1,2,4,8]
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

WORLD = 8


def spec(seq_len: int, cp: int, offload: bool = False) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {
                "source": "transformers",
                "preset": "llama-3.1-8b",
                "config": {"max_position_embeddings": 131072},
            },
            "data": {"kind": "tokens", "seq_len": seq_len, "num_samples": 100_000},
            "training": {
                "precision": "bf16-mixed",
                "gradient_checkpointing": True,
                "checkpointing": {"offload": offload},
                "loss_kernel": "liger",
                "global_batch_size": 64,
                "world_size": WORLD,
                "parallelism": {"strategy": "fsdp", "context_parallel": cp},
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": False},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", default="32768,131072")
    parser.add_argument("--cp", default="1,2,4,8")
    args = parser.parse_args()
    print(header())
    print(
        f"{'seq':>7} {'layout':<14} {'max micro':>9} {'tokens/rank':>11} {'ring %':>7} "
        f"{'ring GiB':>8} {'samples/s':>9} {'peak GiB':>8} {'wall s':>7}"
    )
    rows: list[dict[str, Any]] = []
    for seq in (int(s) for s in args.seq_lens.split(",")):
        layouts = [(int(n), False) for n in args.cp.split(",")] + [(1, True)]
        for cp, offload in layouts:
            start = time.perf_counter()
            result = engine.plan(spec(seq, cp, offload))
            wall = time.perf_counter() - start
            t = result.throughput
            split = t.split if t is not None else None
            ring = split.context_parallel_s if split else 0.0
            row = {
                "seq_len": seq,
                "context_parallel": cp,
                "offload": offload,
                "feasible": result.feasible,
                "max_micro_batch_size": result.max_micro_batch_size,
                "tokens_per_rank": seq // cp * max(result.micro_batch_size, 1),
                "ring_share": ring / t.step_time_s if t else 0.0,
                "ring_bytes": split.context_parallel_bytes if split else 0.0,
                "samples_per_second": t.samples_per_second if t else 0.0,
                "peak_bytes": result.memory.peak,
                "host_offloaded": result.memory.host_offloaded,
                "traced_steps": result.traced_steps,
                "wall_s": wall,
            }
            rows.append(row)
            layout = f"fsdp{WORLD} cp{cp}" + (" offload" if offload else "")
            print(
                f"{seq:>7} {layout:<14} {row['max_micro_batch_size']:>9} "
                f"{row['tokens_per_rank']:>11} {row['ring_share']:>7.1%} "
                f"{row['ring_bytes'] / 2**30:>8.2f} {row['samples_per_second']:>9.3f} "
                f"{row['peak_bytes'] / 2**30:>8.1f} {wall:>7.1f}"
            )
    out = Path(__file__).parent / "results" / "context_parallel.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
