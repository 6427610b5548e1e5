"""Wall time, trials and answer of whole plans on the simulated device, with and without the
what-if neighbours.

.venv/bin/python -m bench.plan_timing [--repeat 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.machine import header
from service.schemas.examples import RESNET50_A100, SMALL_GRAYSCALE_CNN
from service.schemas.spec import PlanSpec
from workers import engine

CASES: dict[str, dict[str, Any]] = {
    "resnet50 224x224 bf16-mixed A100-80GB": RESNET50_A100,
    "grayscale CNN (layers) 28x28 fp32 T4": SMALL_GRAYSCALE_CNN,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(header())
    rows = []
    for (name, spec_dict), what_if in itertools.product(CASES.items(), (False, True)):
        spec = PlanSpec.model_validate(spec_dict)
        spec = spec.model_copy(
            update={"search": spec.search.model_copy(update={"what_if": what_if})}
        )
        name = f"{name}{' + what_if' if what_if else ''}"
        times, result = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = engine.plan(spec)
            times.append(time.perf_counter() - start)
        assert result is not None
        search = [t for t in result.trials if t.phase == "search"]
        rows.append(
            {
                "case": name,
                "max_micro_batch": result.max_micro_batch_size,
                "search_trials": len(search),
                "all_trials": len(result.trials),
                "what_if": {
                    f"{w.change}={w.value}": w.max_micro_batch_size for w in result.what_if
                },
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "repeat": args.repeat,
                "probes": [(t.batch_size, t.fits) for t in result.trials],
            }
        )
    print(f"{'case':42} {'answer':>7} {'trials':>7} {'median s':>9} {'min-max s':>13}")
    for r in rows:
        print(
            f"{r['case']:42} {r['max_micro_batch']:>7} {r['search_trials']:>7} "
            f"{r['median_s']:>9.2f} {r['min_s']:>6.2f}-{r['max_s']:<6.2f}"
        )
        print(f"{'':42} probes: {r['probes']}")
        if r["what_if"]:
            print(f"{'':42} what-if: {r['what_if']}")
    out = Path(__file__).parent / "results" / "plan_timing.json"
    out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
