"""The plan's risk model and the roofline's efficiencies, fitted and cross-validated on the
calibration rows (issue 29), without planning anything again.

.venv/bin/python -m bench.calibrate [--folds 5] [--fidelity fidelity.json]

Reads what `bench.fidelity --published` and `bench.fidelity --timm --every K` wrote
(bench/results/fidelity_published.json, fidelity_timm.json, and their costed ops under
bench/results/costs/) and prints:
- memory: ln(real / simulated peak) fitted as a normal by maximum likelihood over the brackets
  (interval-censored: the batch that ran and the one that ran out of memory bound it) and the
  published nvidia-smi readings (points), with `--fidelity` a saved `GET /v1/fidelity` body (the
  store's real-device plans: ln(real / simulated peak) per model and device); at each headroom,
  the rows whose plan reaches the batch that ran out of memory (certain OOMs) and the rows'
  expected OOM rate (between a row's two batches, the fit conditioned on its bracket); the
  default headroom is the smallest half-percent step whose expected rate is at most 1%, checked
  by family fold: `workers/engine/risk.py`'s PEAK_SPREAD and `search.headroom` are set from it;
- throughput: measured / predicted samples/s, its 10th and 90th percentiles (the plan's band,
  THROUGHPUT_SPREAD) and how many rows fall inside, overall and per source;
- the roofline's three efficiencies fitted on every row, and cross-validated by family: the
  families are dealt into K folds, each fold's rows predicted with efficiencies fitted on the
  others (and the published cases); in-sample and held-out figures side by side.
Writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, TypeVar

import numpy as np

from bench import published
from bench.machine import header
from workers.engine.risk import (
    TARGET_OOM_RATE,
    Censored,
    PeakSpread,
    Readings,
    fit_log_normal,
)
from workers.engine.roofline import EFFICIENCY, StepCost

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("fidelity_published", "fidelity_timm")
KINDS = ("matmul", "conv", "memory")
T = TypeVar("T")


@dataclass
class Timed:
    """A row's step, vectorised: each op's time at efficiency 1 as compute and as memory
    traffic, so the efficiencies refit in milliseconds (the same sum as StepCost.total_s)."""

    id: str
    group: str
    batch: int
    measured_sps: float
    compute: np.ndarray
    memory: np.ndarray
    kind: np.ndarray
    fixed_s: float

    @classmethod
    def of(cls, row: dict[str, Any], cost: StepCost, group: str) -> Timed:
        compute = np.array(
            [o.flops / o.ceiling if o.flops and o.ceiling else 0.0 for o in cost.ops]
        )
        memory = np.array([o.nbytes / cost.bandwidth for o in cost.ops])
        kind = np.array([KINDS.index(o.kind) for o in cost.ops], dtype=np.int64)
        timed = cls(row["id"], group, row["batch"], row["measured_sps"], compute, memory, kind, 0.0)
        # Offload and model-parallel links: time no efficiency scales.
        timed.fixed_s = cost.total_s() - timed.step_s(EFFICIENCY)
        return timed

    def step_s(self, eff: dict[str, float]) -> float:
        per_kind = np.array([eff[k] for k in KINDS])
        ops = np.maximum(self.compute / per_kind[self.kind], self.memory / eff["memory"])
        return float(ops.sum()) + self.fixed_s

    def ratio(self, eff: dict[str, float]) -> float:
        """Predicted over measured samples/s (the figure bench.fidelity reports)."""
        return self.batch / self.step_s(eff) / self.measured_sps


def load(name: str) -> list[dict[str, Any]]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def observations(rows: list[dict[str, Any]]) -> list[Censored]:
    """ln(real / simulated peak) per row: bounded by the bracket's ends, or measured."""
    out = []
    for r in rows:
        capacity = r.get("capacity_bytes")
        if capacity and r.get("peak_fits"):
            high = math.log(capacity / r["peak_fits"])  # it ran: real peak <= capacity
            low = math.log(capacity / r["peak_fails"]) if r.get("peak_fails") else None
            out.append(Censored(low=low, high=high))
        if r.get("measured_used_mib") and r.get("sim_used_mib"):
            point = math.log(r["measured_used_mib"] / r["sim_used_mib"])
            out.append(Censored(low=point, high=point))
    return out


def oom_rate(rows: list[dict[str, Any]], headroom: float) -> tuple[int, int]:
    """(rows whose plan at this headroom reaches the batch that ran out of memory, rows with
    such a batch): the plan goes that far exactly when its peak there is under the limit."""
    judged = [r for r in rows if r.get("peak_fails") and r.get("capacity_bytes")]
    over = sum(r["peak_fails"] <= (1 - headroom) * r["capacity_bytes"] for r in judged)
    return over, len(judged)


def planned(row: dict[str, Any], headroom: float) -> tuple[int, float] | None:
    """The batch a plan at this headroom picks for the row, and its simulated peak: on the
    line through two simulated points (the bracket's ends, or the batch that ran and the
    headroom-0 answer, which sits at the capacity); the simulated peak is affine in the batch."""
    capacity, fits, p0 = row["capacity_bytes"], row["bracket"]["fits"], row["peak_fits"]
    if row.get("peak_fails"):
        b1, p1 = row["bracket"]["fails"], row["peak_fails"]
    else:
        b1, p1 = row["max_h0"], capacity
    if b1 == fits or p1 == p0:
        return None
    slope = (p1 - p0) / (b1 - fits)
    batch = math.floor(fits + ((1 - headroom) * capacity - p0) / slope)
    return batch, p0 + slope * (batch - fits)


def row_oom_probability(row: dict[str, Any], spread: PeakSpread, headroom: float) -> float:
    """Chance the row's plan at this headroom runs out of memory on the card the row was
    measured on: 0 at or under the batch that ran, 1 at or over the one that did not, and
    between them the fitted normal conditioned on what the row says of its own error."""
    found = planned(row, headroom)
    fits, fails = row["bracket"]["fits"], row["bracket"].get("fails")
    if found is None or found[0] <= fits:
        return 0.0
    if fails is not None and found[0] >= fails:
        return 1.0
    capacity = row["capacity_bytes"]
    dist = NormalDist(spread.mu, spread.sigma)
    below = dist.cdf(math.log(capacity / row["peak_fails"])) if row.get("peak_fails") else 0.0
    ran = dist.cdf(math.log(capacity / row["peak_fits"]))
    beyond = dist.cdf(math.log(capacity / found[1]))  # ln r above this: out of memory
    return max(0.0, ran - max(beyond, below)) / (ran - below) if ran > below else 0.0


def expected_oom_rate(rows: list[dict[str, Any]], spread: PeakSpread, headroom: float) -> float:
    judged = [r for r in rows if r.get("capacity_bytes") and r.get("peak_fits")]
    return sum(row_oom_probability(r, spread, headroom) for r in judged) / len(judged)


def deciles(values: list[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles, interpolated as numpy's default does (the band's ends)."""
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return cuts[0], cuts[-1]


def spread(ratios: list[float]) -> dict[str, float]:
    p10, p90 = deciles(ratios)
    return {
        "rows": len(ratios),
        "median": statistics.median(ratios),
        "p10": p10,
        "p90": p90,
        "within_1_25": sum(1 / 1.25 <= x <= 1.25 for x in ratios) / len(ratios),
    }


def fit(timed: list[Timed]) -> dict[str, float]:
    """Least squares in log space over the rows at once (bench.published's method)."""
    return published.descend(lambda eff: sum(math.log(t.ratio(eff)) ** 2 for t in timed))


def family_folds(
    items: list[T], family_of: Callable[[T], str | None], folds: int
) -> Iterator[tuple[list[T], list[T]]]:
    """(train, test) per fold: timm's families dealt round-robin by name into `folds`; an
    item with no family (a published case) always trains. Empty folds are skipped."""
    families = sorted({f for f in map(family_of, items) if f is not None})
    fold_of = {f: i % folds for i, f in enumerate(families)}

    def fold(item: T) -> int | None:
        family = family_of(item)
        return None if family is None else fold_of[family]

    for k in range(folds):
        test = [x for x in items if fold(x) == k]
        if test:
            yield [x for x in items if fold(x) != k], test


def row_family(row: dict[str, Any]) -> str | None:
    return row.get("family")


def cross_validate(timed: list[Timed], folds: int) -> dict[str, Any]:
    """Each fold of families predicted with efficiencies fitted on the rest."""
    held: list[float] = []
    fits = []
    for train, test in family_folds(
        timed, lambda t: None if t.group == "published" else t.group, folds
    ):
        eff = fit(train)
        fits.append(eff)
        held += [t.ratio(eff) for t in test]
    return {"held_out": spread(held) if held else None, "fold_efficiencies": fits}


def store_readings(path: Path | None) -> list[Readings]:
    """A saved `GET /v1/fidelity` body: each model and device's real-device plans, as ln(real
    / simulated peak)'s count, mean and sd."""
    if path is None:
        return []
    items = json.loads(path.read_text())["items"]
    return [
        Readings(n=i["peak_ratio_plans"], mean=i["log_peak_ratio_mean"], sd=i["log_peak_ratio_sd"])
        for i in items
        if i.get("peak_ratio_plans")
    ]


def memory_folds(
    rows: list[dict[str, Any]], readings: list[Readings], folds: int, headroom: float
) -> list[dict[str, Any]]:
    """The fit on all but one fold of timm families (and everything else), and the held-out
    families' expected OOM rate at `headroom` under it: does the default hold out of family?"""
    out = []
    for train, test in family_folds(rows, row_family, folds):
        fitted = fit_log_normal(observations(train), readings)
        out.append(
            {
                "mu": fitted.mu,
                "sigma": fitted.sigma,
                "held_out_rows": len(test),
                "held_out_expected_rate": expected_oom_rate(test, fitted, headroom),
            }
        )
    return out


def memory_report(
    rows: list[dict[str, Any]], readings: list[Readings], folds: int
) -> dict[str, Any]:
    obs = observations(rows)
    model = fit_log_normal(obs, readings)
    table = []
    for tenths in range(0, 101, 5):
        h = tenths / 1000
        over, judged = oom_rate(rows, h)
        table.append(
            {
                "headroom": h,
                "over": over,
                "judged": judged,
                "expected_rate": expected_oom_rate(rows, model, h),
                "model_at_limit": model.oom_probability(int((1 - h) * 1e9), int(1e9)),
            }
        )
    # issue 29's rule: the smallest headroom (in steps of half a percent) at which the
    # calibration rows' plans run out of memory at most TARGET_OOM_RATE of the time.
    default = next((t["headroom"] for t in table if t["expected_rate"] <= TARGET_OOM_RATE), None)
    return {
        "observations": len(obs),
        "brackets": sum(o.low is not None and o.low != o.high for o in obs),
        "upper_only": sum(o.low is None for o in obs),
        "points": sum(o.low is not None and o.low == o.high for o in obs),
        "store_plans": sum(r.n for r in readings),
        "mu": model.mu,
        "sigma": model.sigma,
        "headroom_at_limit": model.headroom_for(TARGET_OOM_RATE),
        "default_headroom": default,
        "table": table,
        "folds": memory_folds(rows, readings, folds, default) if default is not None else [],
    }


def throughput_report(
    rows_by_source: dict[str, list[dict[str, Any]]], folds: int
) -> dict[str, Any]:
    """Measured over predicted (the band multiplies the estimate by it)."""
    every = [
        r["measured_sps"] / r["predicted_sps"]
        for rows in rows_by_source.values()
        for r in rows
        if r.get("predicted_sps")
    ]
    low, high = deciles(every)
    out: dict[str, Any] = {"low": low, "high": high, "sources": {}}
    for name, rows in rows_by_source.items():
        ratios = [r["measured_sps"] / r["predicted_sps"] for r in rows if r.get("predicted_sps")]
        if ratios:
            inside = sum(low <= x <= high for x in ratios) / len(ratios)
            out["sources"][name] = {**spread(ratios), "inside_band": inside}
    out["coverage"] = sum(low <= x <= high for x in every) / len(every)
    out["cross_validated_coverage"] = band_coverage_by_family(rows_by_source, folds)
    return out


def band_coverage_by_family(
    rows_by_source: dict[str, list[dict[str, Any]]], folds: int
) -> float | None:
    """The band's coverage out of family: each fold of timm families judged by the band that
    the other rows (and the published cases) give."""
    rows = [r for group in rows_by_source.values() for r in group if r.get("predicted_sps")]
    inside = judged = 0
    for train, test in family_folds(rows, row_family, folds):
        low, high = deciles([r["measured_sps"] / r["predicted_sps"] for r in train])
        inside += sum(low <= r["measured_sps"] / r["predicted_sps"] <= high for r in test)
        judged += len(test)
    return inside / judged if judged else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--fidelity", type=Path, help="a saved GET /v1/fidelity body: the store's real plans"
    )
    args = parser.parse_args()
    print(header(), flush=True)
    rows = {name: load(name) for name in SOURCES}
    every = [r for group in rows.values() for r in group]
    memory = memory_report(every, store_readings(args.fidelity), args.folds)
    print(
        f"memory: ln(real/simulated peak) ~ N(mu={memory['mu']:+.4f}, sigma={memory['sigma']:.4f}) "
        f"from {memory['observations']} rows ({memory['brackets']} brackets, "
        f"{memory['upper_only']} with no failing batch, {memory['points']} readings, "
        f"{memory['store_plans']} real-device plans from the store)"
    )
    print(f"{'headroom':>8} {'rows over':>10} {'expected OOM':>13} {'plan at limit':>14}")
    for t in memory["table"]:
        print(
            f"{t['headroom']:>8.1%} {t['over']:>5}/{t['judged']:<4} {t['expected_rate']:>13.2%} "
            f"{t['model_at_limit']:>14.2%}"
        )
    print(
        f"rows over: plans reaching the batch that ran out of memory; expected OOM: the rows' "
        f"plans, the fit conditioned on each row's bracket; plan at limit: a peak at exactly "
        f"(1 - headroom) x capacity. Default headroom (expected OOM <= {TARGET_OOM_RATE:.0%}): "
        f"{memory['default_headroom']}; a plan at its limit stays under {TARGET_OOM_RATE:.0%} "
        f"from {memory['headroom_at_limit']:.2%}"
    )
    for f in memory["folds"]:
        print(
            f"  fold fit mu {f['mu']:+.4f} sigma {f['sigma']:.4f}: held-out families "
            f"({f['held_out_rows']} rows) expected OOM at the default "
            f"{f['held_out_expected_rate']:.2%}"
        )
    throughput = throughput_report(rows, args.folds)
    print(
        f"throughput measured/predicted band p10-p90: {throughput['low']:.3f}-"
        f"{throughput['high']:.3f} ({throughput['coverage']:.0%} of rows inside; by family "
        f"fold, each judged by the others' band, {throughput['cross_validated_coverage']:.0%})"
    )
    for name, s in throughput["sources"].items():
        print(
            f"  {name}: {s['rows']} rows, median {s['median']:.3f}, p10 {s['p10']:.3f}, "
            f"p90 {s['p90']:.3f}, inside the band {s['inside_band']:.0%}"
        )
    timed = []
    for name, group in rows.items():
        costs = published.load_costs(name)
        for r in group:
            if r["id"] in costs and r.get("measured_sps"):
                label = "published" if name == "fidelity_published" else r.get("family", "?")
                timed.append(Timed.of(r, costs[r["id"]], label))
    efficiencies: dict[str, Any] = {}
    if timed:
        current = spread([t.ratio(EFFICIENCY) for t in timed])
        all_fit = fit(timed)
        in_sample = spread([t.ratio(all_fit) for t in timed])
        cv = cross_validate(timed, args.folds)
        efficiencies = {
            "current": EFFICIENCY,
            "current_spread": current,
            "fitted_on_all": all_fit,
            "in_sample": in_sample,
            "cross_validated": cv,
        }
        print(f"simulated/measured samples/s with today's {EFFICIENCY}: {fmt(current)}")
        print(f"fitted on all {len(timed)} rows {all_fit}: in sample {fmt(in_sample)}")
        if cv["held_out"]:
            print(f"cross-validated by family ({args.folds} folds): held out {fmt(cv['held_out'])}")
        for eff in cv["fold_efficiencies"]:
            print(f"  fold fit {eff}")
    else:
        print("no costs saved: run bench.fidelity --published and --timm first")
    out = RESULTS / "calibration.json"
    out.write_text(
        json.dumps(
            {
                "header": header(),
                "memory": memory,
                "throughput": throughput,
                "efficiencies": efficiencies,
            },
            indent=2,
        )
    )


def fmt(s: dict[str, float]) -> str:
    return (
        f"median {s['median']:.3f}, p10 {s['p10']:.3f}, p90 {s['p90']:.3f}, within x1.25 "
        f"{s['within_1_25']:.0%} ({s['rows']} rows)"
    )


if __name__ == "__main__":
    main()
