"""Large-model plans (issue 11): the fewest H100s for a full fine-tune of llama-3-8b under FSDP
and ZeRO-3, and QLoRA on a 24 GB card; wall time of each whole plan on this machine.

.venv/bin/python -m bench.scale_out [--cases fsdp,zero3,qlora]
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

LLAMA_8B = {"source": "transformers", "preset": "llama-3-8b"}
DATA = {"kind": "tokens", "seq_len": 2048, "num_samples": 100_000}
SEARCH = {"what_if": False}


def full_fine_tune(strategy: str) -> dict[str, Any]:
    return {
        "model": LLAMA_8B,
        "data": DATA,
        "training": {
            "optimizer": "adamw",
            "precision": "bf16-mixed",
            "global_batch_size": 512,
            "gradient_checkpointing": True,
            "parallelism": {"strategy": strategy, "world_size": "auto"},
        },
        "device": {"kind": "simulated", "gpu": "H100-80GB"},
        "search": SEARCH,
    }


QLORA_24GB = {
    "model": LLAMA_8B,
    "data": DATA,
    "training": {
        "optimizer": "adamw",
        "precision": "bf16-mixed",
        "global_batch_size": 64,
        "gradient_checkpointing": True,
        "peft": {"method": "qlora", "r": 16},
    },
    "device": {"kind": "simulated", "gpu": "L4"},
    "search": SEARCH,
}

CASES = {
    "fsdp": ("llama-3-8b full FT, bf16-mixed AdamW, seq 2048, ckpt, H100, fsdp auto", None),
    "zero3": ("llama-3-8b full FT, bf16-mixed AdamW, seq 2048, ckpt, H100, zero3 auto", None),
    "qlora": ("llama-3-8b QLoRA r=16, bf16-mixed, seq 2048, ckpt, L4 24 GB", QLORA_24GB),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    print(header())
    rows = []
    for key in args.cases.split(","):
        name, body = CASES[key]
        spec = PlanSpec.model_validate(body or full_fine_tune(key))
        start = time.perf_counter()
        result = engine.plan(spec)
        wall = time.perf_counter() - start
        search = [t for t in result.trials if t.phase == "search"]
        rows.append(
            {
                "case": name,
                "world_size": result.world_size,
                "strategy": result.strategy,
                "max_micro_batch": result.max_micro_batch_size,
                "micro_batch": result.micro_batch_size,
                "accumulation": result.accumulation_steps,
                "exact": _exact(search, result.max_micro_batch_size),
                "world_sizes_checked": [
                    (c.world_size, c.fits) for s in result.scale_out for c in s.checked
                ],
                "search_trials": len(search),
                "peak_gib": round(result.memory.peak / 2**30, 2),
                "samples_per_s": round(result.throughput.samples_per_second, 2)
                if result.throughput
                else None,
                "wall_s": round(wall, 1),
            }
        )
        print(json.dumps(rows[-1]))
    out = Path(__file__).parent / "results" / "scale_out.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=1) + "\n")


def _exact(trials: list[Any], best: int) -> bool:
    fits = {t.batch_size: t.fits for t in trials}
    return fits.get(best) is True and fits.get(best + 1) is False


if __name__ == "__main__":
    main()
