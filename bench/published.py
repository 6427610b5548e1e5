"""The simulated device against published measurements on real GPUs.

.venv/bin/python -m bench.fidelity --published [--cases PATH] [--fit]

Each case of `bench/data/published.json` (or PATH, same format) is planned as its spec
says, on the software stack its notes name (PyTorch/CUDA versions set the CUDA context and
zero_grad's default), and compared with what was measured:
- max batch: the plan's answer at headroom 0 and at 5% (the default until session 15) against
  the bracket (`fits` ran, `fails` ran out of memory): consistent when fits <= answer < fails
  (`bench.calibrate` judges the default headroom, with the chance of an OOM between the two);
- throughput: roofline samples/s at the measured batch against the measured samples/s;
- memory: the simulated reserved memory + overhead (what nvidia-smi shows) against the measured.
`--fit` refits the three roofline efficiencies (matmul, conv, memory-bound) to the geometric mean
over all cases together and prints them; the engine's constants are set from that output.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.schemas.spec import PlanSpec
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session
from workers.engine.roofline import EFFICIENCY, StepCost

MIB = 1 << 20
# Ten published real-GPU cases, each with its source (bench/data/README.md).
DEFAULT_CASES = Path(__file__).resolve().parent / "data" / "published.json"
# NGC container releases name no torch version in the notes; NGC's release notes do.
NGC = {"21.03": ("1.9", "11.2")}


def load_cases(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))


def stack_of(case: dict[str, Any]) -> tuple[str, str] | None:
    """(torch, cuda) versions the case's notes or source name, if any."""
    text = f"{case.get('notes', '')} {case.get('source', '')}"
    found = re.search(r"PyTorch (\d+\.\d+)\s*/\s*CUDA (\d+\.\d+)", text)
    if found:
        return found.group(1), found.group(2)
    found = re.search(r"torch ~?(\d+\.\d+)", text)
    if found:
        # CUDA 11.x with torch 1.10-1.12 builds: eager module loading either way.
        return found.group(1), "11.3"
    found = re.search(r"pytorch-(\d\d\.\d\d) NGC", text)
    if found and found.group(1) in NGC:
        return NGC[found.group(1)]
    return None


def case_spec(case: dict[str, Any], headroom: float | None = None) -> PlanSpec:
    spec = json.loads(json.dumps(case["spec"]))
    spec["search"] = {**spec.get("search", {}), "what_if": False}
    if headroom is not None:
        spec["search"]["headroom"] = headroom
    stack = stack_of(case)
    if stack is not None and spec["device"].get("kind") == "simulated":
        spec["device"]["runtime"] = {"torch": stack[0], "cuda": stack[1]}
    return PlanSpec.model_validate(spec)


def verdict(answer: int, bracket: dict[str, Any] | None) -> str:
    if not bracket:
        return "-"
    fits, fails = bracket.get("fits"), bracket.get("fails")
    if fails is not None and answer >= fails:
        return "OVER"
    if fits is not None and answer < fits:
        return "under"
    return "ok"


def probes_at(
    spec: PlanSpec, batches: list[int], cost_at: int | None = None
) -> dict[int, tuple[Any, StepCost | None]]:
    """Each batch probed in one session (one trace); the roofline cost at `cost_at`."""
    job = compile_job(spec)
    device = open_device(job)
    with open_session(device, job) as session:
        return {
            b: (session.probe(b), session.step_cost(b) if b == cost_at else None)
            for b in dict.fromkeys(batches)
        }


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    measured = case["measured"]
    start = time.perf_counter()
    spec0 = case_spec(case, headroom=0.0)
    plan0 = engine.plan(spec0)
    plan_default = engine.plan(case_spec(case, headroom=0.05))  # a fixed reference point
    row: dict[str, Any] = {
        "id": case["id"],
        "stack": stack_of(case),
        "bracket": measured.get("max_batch"),
        "max_h0": plan0.max_micro_batch_size,
        "max_h5": plan_default.max_micro_batch_size,
        "trials_h0": len(plan0.trials),
    }
    row["verdict_h0"] = verdict(row["max_h0"], row["bracket"])
    row["verdict_h5"] = verdict(row["max_h5"], row["bracket"])
    throughput, memory = measured.get("throughput"), measured.get("memory")
    bracket = row["bracket"] or {}
    wanted = [b for b in (bracket.get("fits"), bracket.get("fails")) if b is not None]
    wanted += [m["batch"] for m in (throughput, memory) if m]
    probed = probes_at(spec0, wanted, cost_at=throughput["batch"] if throughput else None)
    # The predicted peak (reserved + overhead, what the search holds against the capacity) at
    # each end of the bracket: the interval the real-over-predicted memory ratio lies in (risk).
    row["capacity_bytes"] = plan0.device.memory_bytes
    for end in ("fits", "fails"):
        if bracket.get(end) is not None:
            row[f"peak_{end}"] = probed[bracket[end]][0].peak_bytes
    if throughput:
        cost = probed[throughput["batch"]][1]
        assert cost is not None
        row["measured_sps"] = throughput["samples_per_s"]
        row["batch"] = throughput["batch"]
        row["cost"] = cost
    if memory:
        outcome = probed[memory["batch"]][0]
        row["measured_used_mib"] = memory["used_mib"]
        row["sim_used_mib"] = (outcome.reserved_bytes or outcome.peak_bytes) / MIB
        row["sim_context_mib"] = outcome.breakdown.get("cuda_context", 0) / MIB
        row["measured_context_mib"] = memory.get("context_mib")
    row["wall_s"] = time.perf_counter() - start
    return row


def predicted_sps(row: dict[str, Any], efficiency: dict[str, float] | None = None) -> float:
    return row["batch"] / row["cost"].total_s(efficiency)


def fit_efficiency(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The three efficiencies minimising the squared log error over every case at once."""
    timed = [r for r in rows if "cost" in r]
    return descend(
        lambda eff: sum(math.log(predicted_sps(r, eff) / r["measured_sps"]) ** 2 for r in timed)
    )


def descend(loss: Callable[[dict[str, float]], float]) -> dict[str, float]:
    """Coordinate descent over a log grid from today's efficiencies, each kept in (0, 1]:
    the fit both `--fit` and bench.calibrate run, whatever their rows."""
    eff = dict(EFFICIENCY)
    step, best = 0.5, loss(eff)
    while step > 0.002:
        improved = False
        for key in eff:
            for factor in (math.exp(step), math.exp(-step)):
                trial = {**eff, key: min(1.0, eff[key] * factor)}
                value = loss(trial)
                if value < best - 1e-12:
                    eff, best, improved = trial, value, True
        if not improved:
            step /= 2
    return {k: round(v, 3) for k, v in eff.items()}


def report(rows: list[dict[str, Any]], efficiency: dict[str, float] | None = None) -> str:
    lines = [
        f"{'case':34} {'stack':>10} {'bracket':>10} {'max h0':>7} {'h0':>5} {'max h5':>7} "
        f"{'h5':>5} {'sps sim':>8} {'sps meas':>8} {'ratio':>6} {'mem ratio':>9}"
    ]
    ratios, mem_ratios = [], []
    for r in rows:
        bracket = r["bracket"] or {}
        text = f"{bracket.get('fits')}-{bracket.get('fails')}" if bracket else "-"
        stack = "/".join(r["stack"]) if r["stack"] else "current"
        sps = ratio = ""
        if "cost" in r:
            predicted = predicted_sps(r, efficiency)
            ratios.append(predicted / r["measured_sps"])
            sps, ratio = f"{predicted:8.1f}", f"{ratios[-1]:6.2f}"
        mem = ""
        if "measured_used_mib" in r:
            mem_ratios.append(r["sim_used_mib"] / r["measured_used_mib"])
            mem = f"{mem_ratios[-1]:9.3f}"
        lines.append(
            f"{r['id']:34} {stack:>10} {text:>10} {r['max_h0']:>7} {r['verdict_h0']:>5} "
            f"{r['max_h5']:>7} {r['verdict_h5']:>5} {sps:>8} "
            f"{r.get('measured_sps', ''):>8} {ratio:>6} {mem:>9}"
        )
    judged = [r for r in rows if r["bracket"]]
    held = sum(r["verdict_h0"] == "ok" for r in judged)
    over = sum(r["verdict_h0"] == "OVER" for r in judged)
    over5 = sum(r["verdict_h5"] == "OVER" for r in judged)
    if ratios:
        geo = math.exp(statistics.fmean(math.log(x) for x in ratios))
        within = sum(1 / 1.3 <= x <= 1.3 for x in ratios)
        lines.append(
            f"max batch: {held}/{len(judged)} brackets hold at headroom 0 ({over} over-predicted; "
            f"{over5} over at 5%); throughput sim/measured: geometric mean "
            f"{geo:.3f}, range {min(ratios):.2f}-{max(ratios):.2f}, {within}/{len(ratios)} within "
            f"x1.3; memory sim/measured: " + ", ".join(f"{x:.3f}" for x in mem_ratios)
        )
    return "\n".join(lines)


# Each row's costed ops, beside its JSON result: what bench.calibrate refits the efficiencies on
# without planning again. Our own bench output, never a request's; not committed (megabytes).
COSTS_DIR = Path(__file__).resolve().parent / "results" / "costs"


def save_costs(rows: list[dict[str, Any]], name: str) -> Path:
    COSTS_DIR.mkdir(parents=True, exist_ok=True)
    path = COSTS_DIR / f"{name}.pkl"
    path.write_bytes(pickle.dumps({r["id"]: r["cost"] for r in rows if "cost" in r}))
    return path


def load_costs(name: str) -> dict[str, StepCost]:
    path = COSTS_DIR / f"{name}.pkl"
    return pickle.loads(path.read_bytes()) if path.exists() else {}


def serialisable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        item = {k: v for k, v in r.items() if k != "cost"}
        if "cost" in r:
            item["predicted_sps"] = predicted_sps(r)
            item["split_s"] = r["cost"].seconds()
            item["flops"] = r["cost"].flops
        out.append(item)
    return out
