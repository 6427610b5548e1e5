"""What the optimizer's implementation costs (issue 17): llama-3-8b, pure bf16, checkpointing,
seq 2048 on a simulated H100 (80 GB), under AdamW's foreach (PyTorch's CUDA default), fused and
for_loop kernels, bitsandbytes' 8-bit and paged 8-bit AdamW, and Lion. For each: the exact max
micro-batch, the optimizer state and temporaries at that batch, host-backed bytes, and the wall
time of the plan on this machine.

.venv/bin/python -m bench.optimizer_memory [--cases foreach,fused,...]
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
CASES: dict[str, dict[str, Any]] = {
    "foreach": {"optimizer": "adamw", "optimizer_impl": "foreach"},
    "fused": {"optimizer": "adamw", "optimizer_impl": "fused"},
    "for_loop": {"optimizer": "adamw", "optimizer_impl": "for_loop"},
    "adamw_8bit": {"optimizer": "adamw_8bit"},
    "paged_adamw_8bit": {"optimizer": "paged_adamw_8bit"},
    "lion": {"optimizer": "lion"},
}


def spec(optimizer: dict[str, Any]) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": "llama-3-8b"},
            "data": {"kind": "tokens", "seq_len": 2048, "num_samples": 100_000},
            "training": {
                "precision": "bf16",
                "global_batch_size": 64,
                "gradient_checkpointing": True,
                **optimizer,
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
            "search": {"what_if": False},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    print(header())
    rows = []
    for key in args.cases.split(","):
        start = time.perf_counter()
        result = engine.plan(spec(CASES[key]))
        wall = time.perf_counter() - start
        memory = result.memory
        rows.append(
            {
                "case": key,
                "optimizer": result.optimizer,
                "max_micro_batch": result.max_micro_batch_size,
                "optimizer_state_gib": round(memory.optimizer_state / GIB, 2),
                "temporary_gib": round(memory.temporary / GIB, 2),
                "host_gib": round(memory.host_offloaded / GIB, 2),
                "peak_gib": round(memory.peak / GIB, 2),
                "reserved_gib": round((memory.reserved or 0) / GIB, 2),
                "search_trials": len([t for t in result.trials if t.phase == "search"]),
                "wall_s": round(wall, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "results" / "optimizer_memory.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
