"""How close trainplan's peak is to independent measurements of the same training step.

.venv/bin/python -m bench.fidelity            # zoo: simulated vs MemTracker vs real CPU (profiler)
.venv/bin/python -m bench.fidelity --llama    # llama-3-8b / llama-3.2-1b, seq 2048, H100-80GB
.venv/bin/python -m bench.fidelity --cuda     # on a GPU: real CUDA peaks and max batch
.venv/bin/python -m bench.fidelity --published [--cases PATH] [--fit]
                                              # published real-GPU measurements (bench/published.py)
.venv/bin/python -m bench.fidelity --timm [--every K]   # timm's RTX 3090 calibration rows

Per model and batch, the bytes of tensors at the peak of one steady-state iteration (device
overhead excluded):
- `sim`: trainplan's simulated probe (fake tensors, CUDA semantics: foreach optimizers, autocast);
- `memtracker`: PyTorch's own `torch.distributed._tools.mem_tracker.MemTracker` around the very
  same fake step (an independent tracker on identical work);
- `cpu`: trainplan's cpu device on a real CPU step, and `profiler`: torch.profiler's memory
  timeline of that same real step (independent of trainplan). CPU steps use CPU defaults
  (for-loop optimizers), so `sim` vs `profiler` also shows what the CUDA semantics add.
Writes bench/results/fidelity.json (or fidelity_llama.json / fidelity_cuda.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench import published, timm_cases
from bench.machine import header
from service.schemas.examples import GRAY_CNN_MODEL as GRAY_CNN
from service.schemas.examples import MLP_MODEL as MLP
from service.schemas.result import MemoryCategory
from service.schemas.spec import PlanSpec
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session

MIB = 1 << 20

TINY_GPT = {
    "source": "transformers",
    "architecture": "GPT2LMHeadModel",
    "config": {"n_layer": 2, "n_embd": 256, "n_head": 4, "vocab_size": 8192, "n_positions": 256},
}
IMAGE = {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 10}

ZOO: dict[str, dict[str, Any]] = {
    "mlp adam fp32": {
        "model": MLP,
        "data": {"kind": "tensor", "shape": [512], "num_classes": 10},
        "training": {"optimizer": "adam"},
    },
    "cnn 28x28 sgd-momentum fp32": {
        "model": GRAY_CNN,
        "data": {"kind": "image", "channels": 1, "height": 28, "width": 28, "num_classes": 10},
        "training": {"optimizer": "sgd_momentum"},
    },
    "resnet18 64x64 sgd-momentum fp32": {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": IMAGE,
        "training": {"optimizer": "sgd_momentum"},
    },
    "resnet18 64x64 bf16-mixed": {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": IMAGE,
        "training": {"optimizer": "sgd_momentum", "precision": "bf16-mixed"},
    },
    "mobilenet_v3_small 64x64 adamw": {
        "model": {
            "source": "torchvision",
            "name": "mobilenet_v3_small",
            "kwargs": {"num_classes": 10},
        },
        "data": IMAGE,
        "training": {"optimizer": "adamw"},
    },
    "tiny gpt2 seq 128 adamw fp32": {
        "model": TINY_GPT,
        "data": {"kind": "tokens", "seq_len": 128},
        "training": {"optimizer": "adamw"},
    },
    "tiny gpt2 seq 128 checkpointed": {
        "model": TINY_GPT,
        "data": {"kind": "tokens", "seq_len": 128},
        "training": {"optimizer": "adamw", "gradient_checkpointing": True},
    },
}
BATCHES = [1, 8, 32]

# (preset, precision): an 8B full fine-tune with AdamW needs ~16 bytes a parameter in bf16-mixed
# (fp32 weights, gradients, two moments), so pure bf16 is the variant that can fit in 80 GB.
LLAMA = {
    "llama-3-8b bf16-mixed": ("llama-3-8b", "bf16-mixed"),
    "llama-3-8b bf16": ("llama-3-8b", "bf16"),
    "llama-3.2-1b bf16-mixed": ("llama-3.2-1b", "bf16-mixed"),
    "llama-3.2-1b bf16": ("llama-3.2-1b", "bf16"),
}


def spec_of(case: dict[str, Any], device: dict[str, Any]) -> PlanSpec:
    return PlanSpec.model_validate(
        {
            "model": case["model"],
            "data": {"num_samples": 10_000, **case["data"]},
            "training": case["training"],
            "device": device,
            "search": {"headroom": 0.0, "what_if": False, "max_batch_size": 4096},
        }
    )


def memtracker_peak(job: Any, batch: int) -> tuple[int, float]:
    """PyTorch's MemTracker around one iteration of the job's own (fake) step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(job.model, job.optimizer)
    start = time.perf_counter()
    with tracker:
        job.iteration(batch)
    elapsed = time.perf_counter() - start
    snapshot = tracker.get_tracker_snapshot("peak")
    return max(int(parts["Total"]) for parts in snapshot.values()), elapsed


def profiler_peak(job: Any, batch: int) -> int:
    """torch.profiler's memory timeline of one real CPU iteration: the highest total."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        job.iteration(batch)
    with tempfile.NamedTemporaryFile(suffix=".json") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(f.name, device="cpu")
        _, sizes = json.loads(Path(f.name).read_text())
    return max(sum(point) for point in sizes)


TENSOR_PARTS = MemoryCategory.tensors()


def tensor_peak(outcome: Any) -> int:
    """Bytes of tensors at the peak: what MemTracker and the profiler see (no library
    workspaces, no context, no allocator caching)."""
    return sum(outcome.breakdown.get(k, 0) for k in TENSOR_PARTS)


def allocated_and_reserved(outcome: Any) -> tuple[int, int]:
    """Allocated and reserved peaks, without the overhead outside the allocator."""
    overhead = outcome.breakdown.get("overhead", 0)
    allocated = (outcome.allocated_bytes or outcome.peak_bytes) - overhead
    reserved = (outcome.reserved_bytes or outcome.peak_bytes) - overhead
    return allocated, reserved


def zoo_rows() -> list[dict[str, Any]]:
    rows = []
    for name, case in ZOO.items():
        sim_spec = spec_of(case, {"kind": "simulated", "memory_gib": 64})
        cpu_spec = spec_of(case, {"kind": "cpu", "memory_gib": 16})
        sim_dev, cpu_dev = open_device(compile_job(sim_spec)), open_device(compile_job(cpu_spec))
        fake: dict[int, tuple[Any, int, float]] = {}
        with open_session(sim_dev, compile_job(sim_spec)) as sim:  # fake tensors
            # MemTracker sees tensors only: leave out the modelled cuDNN workspaces, which
            # would move the moment of the peak
            sim.tracker.workspace = None  # type: ignore[attr-defined]
            for batch in BATCHES:
                ours = sim.probe(batch)
                fake[batch] = (ours, *memtracker_peak(sim.job, batch))
        with open_session(cpu_dev, compile_job(cpu_spec)) as cpu:  # real tensors
            for batch in BATCHES:
                real = cpu.probe(batch)
                prof = profiler_peak(cpu.job, batch)
                ours, theirs, mt_s = fake[batch]
                rows.append(
                    {
                        "case": name,
                        "batch": batch,
                        "sim": tensor_peak(ours),
                        "memtracker": theirs,
                        "cpu": tensor_peak(real),
                        "profiler": prof,
                        "sim_probe_s": ours.duration_s,
                        "memtracker_s": mt_s,
                    }
                )
                print_zoo_row(rows[-1])
    return rows


def rel(a: int, b: int) -> float:
    return (a - b) / b if b else float("nan")


def print_zoo_row(r: dict[str, Any]) -> None:
    print(
        f"{r['case']:34} {r['batch']:>5} {r['sim'] / MIB:>9.1f} {r['memtracker'] / MIB:>9.1f} "
        f"{rel(r['sim'], r['memtracker']):>+8.2%} {r['cpu'] / MIB:>9.1f} "
        f"{r['profiler'] / MIB:>9.1f} {rel(r['cpu'], r['profiler']):>+8.2%} "
        f"{rel(r['sim'], r['profiler']):>+8.2%}",
        flush=True,
    )


def llama_rows(repeat: int) -> list[dict[str, Any]]:
    """Issue 4's figures: the full plan (answer, trials, wall time) and batch-1 peak vs
    MemTracker on the same step, for a full fine-tune with AdamW at seq 2048."""
    rows = []
    for name, (preset, precision) in LLAMA.items():
        spec = PlanSpec.model_validate(
            {
                "model": {"source": "transformers", "preset": preset},
                "data": {"kind": "tokens", "seq_len": 2048, "num_samples": 100_000},
                "training": {
                    "optimizer": "adamw",
                    "precision": precision,
                    "global_batch_size": 64,
                    "base_lr": 2e-5,
                    "base_batch_size": 64,
                },
                "device": {"kind": "simulated", "gpu": "H100-80GB"},
                "search": {"what_if": False},
            }
        )
        walls, result = [], None
        for _ in range(repeat):
            start = time.perf_counter()
            result = engine.plan(spec)
            walls.append(time.perf_counter() - start)
        assert result is not None
        job = compile_job(spec)
        device = open_device(job)
        with open_session(device, job) as session:
            ours = session.probe(1)
            theirs, mt_s = memtracker_peak(session.job, 1)
        row = {
            "case": name,
            "feasible": result.feasible,
            "max_micro_batch": result.max_micro_batch_size,
            "trials": [(t.batch_size, t.fits) for t in result.trials],
            "plan_wall_median_s": statistics.median(walls),
            "plan_walls_s": walls,
            "peak_at_1_with_overhead": ours.peak_bytes,
            "sim_at_1": tensor_peak(ours),
            "memtracker_at_1": theirs,
            "sim_probe_s": ours.duration_s,
            "memtracker_s": mt_s,
            "breakdown_at_1": ours.breakdown,
        }
        rows.append(row)
        gib = 1 << 30
        print(
            f"{name}: answer {row['max_micro_batch']} (feasible {row['feasible']}), "
            f"{len(row['trials'])} trials {row['trials']}, plan median "
            f"{row['plan_wall_median_s']:.1f} s over {repeat}; batch-1 tensors: trainplan "
            f"{row['sim_at_1'] / gib:.2f} GiB in {row['sim_probe_s']:.1f} s, MemTracker "
            f"{theirs / gib:.2f} GiB in {mt_s:.1f} s ({rel(row['sim_at_1'], theirs):+.2%})",
            flush=True,
        )
    return rows


def cuda_rows(memory_gib: float) -> list[dict[str, Any]]:
    """Real CUDA against the simulation: tensor peaks at fixed batches, and the max micro-batch
    under the same memory cap (the real card's own overhead against the catalogue's guess)."""
    rows = []
    for name, case in ZOO.items():
        real_spec = spec_of(case, {"kind": "cuda", "memory_gib": memory_gib})
        sim_spec = spec_of(case, {"kind": "simulated", "memory_gib": memory_gib})
        peaks: dict[str, dict[int, int]] = {}
        reserved: dict[str, dict[int, int]] = {}
        for label, spec in (("cuda", real_spec), ("sim", sim_spec)):
            device = open_device(compile_job(spec))
            with open_session(device, compile_job(spec)) as session:
                outcomes = {b: session.probe(b) for b in BATCHES}
            peaks[label] = {b: allocated_and_reserved(o)[0] for b, o in outcomes.items()}
            reserved[label] = {b: allocated_and_reserved(o)[1] for b, o in outcomes.items()}
        real_plan, sim_plan = engine.plan(real_spec), engine.plan(sim_spec)
        row = {
            "case": name,
            "memory_gib": memory_gib,
            "cuda_allocated": peaks["cuda"],
            "sim_allocated": peaks["sim"],
            "cuda_reserved": reserved["cuda"],
            "sim_reserved": reserved["sim"],
            "cuda_max_batch": real_plan.max_micro_batch_size,
            "sim_max_batch": sim_plan.max_micro_batch_size,
            "cuda_trials": len(real_plan.trials),
            "cuda_overhead": real_plan.memory.overhead,
            "sim_overhead": sim_plan.memory.overhead,
        }
        rows.append(row)
        errs = " ".join(f"b{b}:{rel(peaks['sim'][b], peaks['cuda'][b]):+.1%}" for b in BATCHES)
        res = " ".join(f"b{b}:{rel(reserved['sim'][b], reserved['cuda'][b]):+.1%}" for b in BATCHES)
        print(
            f"{name:34} allocated sim vs cuda {errs}; reserved {res}; "
            f"max batch cuda {row['cuda_max_batch']} "
            f"sim {row['sim_max_batch']} ({rel(row['sim_max_batch'], row['cuda_max_batch']):+.1%})",
            flush=True,
        )
    return rows


def timm_fidelity(folder: Path, every: int, out: Path) -> None:
    """Every (K-th) calibration row planned with its recipe: brackets and throughput, per family
    and overall (bench/timm_cases.py)."""
    cases, skipped = timm_cases.cases(folder, every)
    print(f"{len(cases)} cases; {len(skipped)} rows name a model today's timm lacks", flush=True)
    rows, failed = [], []
    for case in cases:
        try:
            row = published.run_case(case)
        except Exception as exc:  # a model this stack cannot plan: counted, not fatal
            failed.append({"id": case["id"], "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{case['id']}: failed ({failed[-1]['error'][:120]})", flush=True)
            continue
        row["family"] = case["family"]
        rows.append(row)
        print(f"{case['id']}: {row['verdict_h0']} {row['wall_s']:.1f} s", flush=True)
    print(published.report(rows))
    summary = timm_summary(rows)
    for line in summary["lines"]:
        print(line)
    payload = {
        "header": header(),
        "every": every,
        "skipped": skipped,
        "failed": failed,
        "summary": {k: v for k, v in summary.items() if k != "lines"},
        "rows": published.serialisable(rows),
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    published.save_costs(rows, out.stem)


def timm_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Brackets held / over / under and the throughput ratio's spread, overall and by family."""

    def figures(group: list[dict[str, Any]]) -> dict[str, Any]:
        ratios = sorted(published.predicted_sps(r) / r["measured_sps"] for r in group)
        verdicts = [r["verdict_h0"] for r in group]
        return {
            "cases": len(group),
            "held": verdicts.count("ok"),
            "over": verdicts.count("OVER"),
            "under": verdicts.count("under"),
            "over_at_5_percent": sum(r["verdict_h5"] == "OVER" for r in group),
            "ratio_median": statistics.median(ratios),
            "ratio_p10": ratios[len(ratios) // 10],
            "ratio_p90": ratios[min(len(ratios) - 1, (9 * len(ratios)) // 10)],
            "within_1_25": sum(1 / 1.25 <= x <= 1.25 for x in ratios) / len(ratios),
        }

    if not rows:
        return {"lines": ["no case planned"]}
    overall = figures(rows)
    families: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    by_family = {name: figures(group) for name, group in sorted(families.items())}
    lines = [
        f"{'family':<16} {'cases':>5} {'held':>5} {'over':>5} {'under':>5} {'ratio p50':>9} "
        f"{'p10':>6} {'p90':>6} {'in x1.25':>8}"
    ]
    for name, f in [*by_family.items(), ("ALL", overall)]:
        lines.append(
            f"{name:<16} {f['cases']:>5} {f['held']:>5} {f['over']:>5} {f['under']:>5} "
            f"{f['ratio_median']:>9.2f} {f['ratio_p10']:>6.2f} {f['ratio_p90']:>6.2f} "
            f"{f['within_1_25']:>8.0%}"
        )
    return {"overall": overall, "families": by_family, "lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama", action="store_true", help="issue 4's llama figures")
    parser.add_argument("--cuda", action="store_true", help="real CUDA against simulated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=4.0)
    parser.add_argument("--published", action="store_true", help="published real-GPU cases")
    parser.add_argument("--cases", type=Path, default=published.DEFAULT_CASES)
    parser.add_argument("--fit", action="store_true", help="refit the roofline efficiencies")
    parser.add_argument("--timm", action="store_true", help="timm's RTX 3090 calibration rows")
    parser.add_argument("--every", type=int, default=1, help="with --timm: every K-th row")
    parser.add_argument("--timm-dir", type=Path, default=timm_cases.DEFAULT_DIR)
    args = parser.parse_args()
    print(header(), flush=True)
    results = Path(__file__).parent / "results"
    if args.timm:
        timm_fidelity(args.timm_dir, args.every, results / "fidelity_timm.json")
        return
    if args.published:
        rows = []
        for case in published.load_cases(args.cases):
            rows.append(published.run_case(case))
            print(f"{case['id']}: {rows[-1]['wall_s']:.1f} s", flush=True)
        print(published.report(rows))
        if args.fit:
            fitted = published.fit_efficiency(rows)
            print(f"fitted efficiencies: {fitted}")
            print(published.report(rows, fitted))
        out = results / "fidelity_published.json"
        published.save_costs(rows, out.stem)
        out.write_text(
            json.dumps(
                {"header": header(), "rows": published.serialisable(rows)}, indent=2, default=str
            )
        )
        return
    if args.llama:
        rows, out = llama_rows(args.repeat), results / "fidelity_llama.json"
    elif args.cuda:
        rows, out = cuda_rows(args.memory_gib), results / "fidelity_cuda.json"
    else:
        print(
            f"{'case':34} {'batch':>5} {'sim MiB':>9} {'MemTr MiB':>9} {'sim/MT':>8} "
            f"{'cpu MiB':>9} {'prof MiB':>9} {'cpu/prof':>8} {'sim/prof':>8}"
        )
        rows, out = zoo_rows(), results / "fidelity.json"
        errors = [abs(rel(r["sim"], r["memtracker"])) for r in rows]
        cpu_errors = [abs(rel(r["cpu"], r["profiler"])) for r in rows]
        speed = [r["memtracker_s"] / r["sim_probe_s"] for r in rows]
        print(
            f"median |sim - MemTracker| / MemTracker: {statistics.median(errors):.2%} "
            f"(max {max(errors):.2%}); median |cpu - profiler| / profiler: "
            f"{statistics.median(cpu_errors):.2%} (max {max(cpu_errors):.2%}); "
            f"MemTracker step / trainplan probe time: median {statistics.median(speed):.1f}x"
        )
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
