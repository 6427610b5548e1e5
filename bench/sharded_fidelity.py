"""Per-rank memory of sharded plans against the references the field uses (issue 11).

1. PyTorch's own `FSDPMemTracker` on the same fake step: the simulated session's rank-0 job
   (fully_shard under a fake process group) runs one more iteration under FSDPMemTracker, and its
   peak is set beside trainplan's tracker's allocated peak of the same iteration.
2. DeepSpeed's `estimate_zero2/3_model_states_mem_needs` (model states only, no activations)
   beside trainplan's traced parameters + gradients + optimizer state (+ gathered parameters for
   ZeRO-3) at the peak, and the traced activations that DeepSpeed's estimate leaves out.

.venv/bin/python -m bench.sharded_fidelity [--world 8] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.machine import header
from service.schemas.spec import PlanSpec
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session
from workers.engine.models import build_model

GIB = 2**30


def spec_for(strategy: str, world: int, preset: str, seq: int) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": {"source": "transformers", "preset": preset},
            "data": {"kind": "tokens", "seq_len": seq},
            "training": {
                "optimizer": "adamw",
                "precision": "bf16-mixed",
                "global_batch_size": 512,
                "gradient_checkpointing": True,
                "parallelism": {"strategy": strategy, "world_size": world},
            },
            "device": {"kind": "simulated", "gpu": "H100-80GB"},
        }
    )


def against_fsdp_mem_tracker(spec: PlanSpec, batch: int) -> dict[str, Any]:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    job = compile_job(spec)
    device = open_device(job)
    with open_session(device, job) as session:
        session.probe(batch)  # steady state
        job, tracker = session.job, session.tracker
        assert job is not None
        tracker.reset_peak()
        reference = FSDPMemTracker(job.model, job.optimizer)
        with reference:
            job.iteration(batch)
        ours = tracker.peak
        snapshot = reference.get_tracker_snapshot("peak")
        theirs = max(dev["Total"] for dev in snapshot.values())
    return {
        "trainplan_allocated_gib": round(ours / GIB, 3),
        "fsdp_mem_tracker_gib": round(theirs / GIB, 3),
        "ratio": round(ours / theirs, 4),
    }


def against_deepspeed(spec: PlanSpec, batch: int, stage: int) -> dict[str, Any]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = spec.training.world_size
    built = build_model(spec.model, spec.data, spec.training.peft)
    total = sum(p.numel() for p in built.module.parameters())
    largest = max(  # the largest single layer (DeepSpeed gathers one at a time)
        sum(p.numel() for p in m.parameters(recurse=False)) for m in built.module.modules()
    )
    nodes, per_node = max(1, world // 8), min(8, world)
    if stage == 2:
        _, ds = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    else:
        _, ds, _ = estimate_zero3_model_states_mem_needs(
            total, largest, per_node, nodes, cpu_offload=False, cpu_offload_params=False
        )
    device = open_device(compile_job(spec))
    with open_session(device, compile_job(spec), built) as session:
        parts = session.probe(batch).breakdown
    states = sum(
        parts[k]
        for k in (
            "parameters",
            "gradients",
            "optimizer_state",
            "gathered_parameters",
            "communication",
        )
    )
    return {
        "deepspeed_model_states_gib": round(ds / GIB, 3),
        "trainplan_model_states_gib": round(states / GIB, 3),
        "ratio": round(states / ds, 4),
        "trainplan_activations_gib": round(parts["activations"] / GIB, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    print(header())
    rows = []
    fsdp = spec_for("fsdp", args.world, args.preset, args.seq)
    rows.append({"case": f"{args.preset} fsdp x{args.world}", "reference": "FSDPMemTracker",
                 **against_fsdp_mem_tracker(fsdp, args.batch)})  # fmt: skip
    print(json.dumps(rows[-1]))
    for strategy, stage in (("zero2", 2), ("zero3", 3)):
        spec = spec_for(strategy, args.world, args.preset, args.seq)
        rows.append({"case": f"{args.preset} {strategy} x{args.world}",
                     "reference": f"deepspeed estimate_zero{stage}",
                     **against_deepspeed(spec, args.batch, stage)})  # fmt: skip
        print(json.dumps(rows[-1]))
    out = Path(__file__).parent / "results" / "sharded_fidelity.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
